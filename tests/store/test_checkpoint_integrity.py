"""Checkpoints carry a manifest; a truncated, altered or missing file, another architecture or another budget
set fail with a clear message instead of half-loading."""

import json
import os

import pytest

from tests.elastic.test_elastic_training import _train


def _corrupt(path, how):
    files = json.load(open(os.path.join(path, "manifest.json")))["files"]
    victim = os.path.join(path, max((f for f in files if f.startswith("dist/")), key=lambda f: files[f]["bytes"]))
    if how == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(files[os.path.relpath(victim, path)]["bytes"] // 2)
    elif how == "flip":
        with open(victim, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.remove(victim)
    return victim


@pytest.mark.parametrize("how,message", [("truncate", "truncated"), ("flip", "checksum"), ("remove", "missing")])
def test_damaged_checkpoint_names_the_file_and_the_previous_one(
    single_process_parallel, parent, tmp_path, how, message
):
    from megatron_elastic.store.checkpoint import CheckpointCorruptError

    ckpt = str(tmp_path / "run")
    _train(parent, ckpt)  # checkpoints at steps 3 and 6
    victim = _corrupt(os.path.join(ckpt, "iter_0000006"), how)
    with pytest.raises(CheckpointCorruptError) as e:
        _train(parent, ckpt, resume=True)
    assert victim in str(e.value) and message in str(e.value) and "echo iter_0000003 >" in str(e.value)


def test_other_architecture_and_other_budgets_are_refused(single_process_parallel, parent, tmp_path):
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.model.config import ConfigError
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.testing import tiny_config

    ckpt = str(tmp_path / "run")
    _train(parent, ckpt)
    other = build_hybrid_model(tiny_config(vocab_size=264, hidden_size=48))
    with pytest.raises(ValueError, match="another architecture.*hidden_size: checkpoint 32 vs model 48"):
        load_model_weights(ckpt, other)
    with pytest.raises(ConfigError, match="trained for budgets"):
        _train(
            parent,
            ckpt,
            resume=True,
            overrides=[
                "budgets=[1.0, 0.5]",
                "curriculum.stages=[{name: s, tokens: 512, seq_length: 32, "
                "global_batch_size: 8, budget_weights: [1, 1]}]",
            ],
        )
