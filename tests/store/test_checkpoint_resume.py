"""Checkpoints restore the exact model (logits) and a resumed run continues the exact loss curve."""

import json
import os
import shutil

import pytest
import torch

from megatron_elastic.data.corpus import iter_stdlib_documents
from megatron_elastic.data.indexed import write_split_datasets

TINY_JOB = """
model: {{hybrid_pattern: "M-*M", vocab_size: 264, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4,
        num_query_groups: 2, kv_channels: 8, mamba_num_heads: 4, mamba_head_dim: 8, mamba_num_groups: 2,
        mamba_state_dim: 8, mamba_chunk_size: 16}}
data: {{path: {data}, seq_length: 48}}
train: {{micro_batch_size: 2, global_batch_size: 4, train_iters: 6, lr: 0.003, min_lr: 0.0003, lr_warmup_iters: 2,
        log_interval: 1, eval_interval: 3, eval_iters: 2}}
checkpoint: {{dir: {ckpt}, save_interval: 3, keep_last: 5}}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_split_datasets(str(out), iter_stdlib_documents(max_bytes=300_000), "byte", valid_every=5, progress=False)
    return str(out)


def _train_losses(ckpt):
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["iteration"]: r["train_loss"] for r in recs if "train_loss" in r}


def test_checkpoint_round_trip_gives_identical_logits(single_process_parallel, tmp_path):
    from megatron_elastic.model.builder import build_hybrid_model, causal_attention_mask, position_ids_for
    from megatron_elastic.store.checkpoint import load_model_weights, save_checkpoint
    from megatron_elastic.testing import tiny_config

    torch.manual_seed(1)
    a = build_hybrid_model(tiny_config())
    save_checkpoint(str(tmp_path), 5, a, trainer_state={"note": "x"})
    torch.manual_seed(2)
    b = build_hybrid_model(tiny_config())
    ids = torch.randint(0, 260, (2, 19))
    args = (ids, position_ids_for(ids), causal_attention_mask(19))
    assert not torch.allclose(a(*args), b(*args)), "different seeds must give different models"
    state = load_model_weights(str(tmp_path), b)
    assert state["iteration"] == 5 and state["note"] == "x"
    torch.testing.assert_close(a(*args), b(*args), rtol=0, atol=0)


def test_resume_continues_the_same_loss_curve(single_process_parallel, tiny_data, tmp_path):
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    full = str(tmp_path / "full")
    summary = pretrain(load_pretrain_config(text=TINY_JOB.format(data=tiny_data, ckpt=full)), progress=False)
    assert summary["final_valid_bpb"] < summary["initial_valid_bpb"]
    reference = _train_losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # A run whose only checkpoint is iteration 3 (as if it had died after saving it).
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(full, "iter_0000003"), os.path.join(part, "iter_0000003"))
    with open(os.path.join(part, "latest"), "w") as f:
        f.write("iter_0000003")
    pretrain(load_pretrain_config(text=TINY_JOB.format(data=tiny_data, ckpt=part)), resume=True, progress=False)
    resumed = _train_losses(part)
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == pytest.approx(reference[it], rel=1e-6, abs=1e-7), it


def test_resume_without_checkpoint_is_a_clear_error(single_process_parallel, tiny_data, tmp_path):
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    cfg = load_pretrain_config(text=TINY_JOB.format(data=tiny_data, ckpt=tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        pretrain(cfg, resume=True, progress=False)


def test_evaluate_reports_the_mean_loss_whatever_the_micro_batch_count(single_process_parallel, tiny_data):
    """Megatron divides the loss it is handed by the micro-batch count in place; the reported value must not
    change with it."""
    from megatron_elastic.data.loader import build_gpt_datasets, make_loader
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.testing import tiny_config
    from megatron_elastic.training.lm import lm_loss
    from megatron_elastic.training.pretrain import evaluate

    torch.manual_seed(0)
    model = build_hybrid_model(tiny_config(vocab_size=264))
    _, valid = build_gpt_datasets(tiny_data, 32, 1, 8, seed=1, model_vocab_size=264)
    with torch.no_grad():
        direct = [float(lm_loss(model, b)) for b in make_loader(valid, 0, 2)][:4]
    for num_micro in (1, 2, 4):
        got = evaluate(model, iter(make_loader(valid, 0, 2)), 4 // num_micro, num_micro, 32, 2)
        assert got == pytest.approx(sum(direct) / 4, rel=1e-5), num_micro
