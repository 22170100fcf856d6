"""Megatron's data conventions: weighted blends of dataset prefixes with a split string or a separate validation
blend, datasets written directly by Megatron-Core's ``IndexedDatasetBuilder`` (no ``prepare-data``), and bad blends
that fail naming the field or the prefix."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_elastic.data.loader import build_gpt_datasets, make_loader
from megatron_elastic.data.source import DataSource, parse_blend, parse_split
from megatron_elastic.errors import ConfigError, DataError, InputNotFoundError


def write_prefix(prefix, low, high, documents=300, seed=0, eod=256):
    """Documents of random token ids in [low, high) + EOD, written as Megatron-LM's preprocess_data.py does."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(documents):
        ids = rng.integers(low, high, size=int(rng.integers(20, 120))).tolist() + [eod]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm_data")
    return {
        "a": write_prefix(str(root / "a_text_document"), 0, 100, seed=1),
        "b": write_prefix(str(root / "b_text_document"), 100, 200, seed=2),
        "root": root,
    }


class _Data:
    """A config ``data`` section."""

    def __init__(self, **kw):
        self.path, self.blend, self.split, self.valid_blend, self.tokenizer = "", None, "99,1,0", None, ""
        self.__dict__.update(kw)


def test_a_blend_draws_samples_in_its_weights_and_a_resumed_stream_continues_at_the_same_sample(
    single_process_parallel, prefixes, tmp_path
):
    source = DataSource.from_config(
        _Data(blend=[0.3, prefixes["a"], 0.7, prefixes["b"]], split="98,2,0", tokenizer="byte"), str(tmp_path)
    )
    written = sum(os.path.getsize(p + ".bin") // 2 for p in (prefixes["a"], prefixes["b"]))  # uint16 tokens
    assert source.train_tokens() == int(written * 98 / 100)
    train, valid = build_gpt_datasets(source, 32, 2000, 20, seed=7)
    # Which dataset a sample came from, read from its tokens (a: ids < 100, b: 100..199), not from Megatron's index.
    from_a = [bool((train[i]["tokens"][train[i]["tokens"] != 256] < 100).all()) for i in range(2000)]
    assert abs(np.mean(from_a) - 0.3) < 0.02, np.mean(from_a)
    assert len(valid) >= 20
    # A stream resumed after 37 micro-batches of 4 yields what the uninterrupted stream yields from there.
    straight = list(make_loader(train, 0, 4))
    resumed = list(make_loader(train, 37 * 4, 4))
    for a, b in zip(straight[37:], resumed):
        torch.testing.assert_close(a["tokens"], b["tokens"], rtol=0, atol=0)


def test_pretraining_on_a_blend_of_megatron_lm_datasets_resumes_the_same_curve(prefixes, tmp_path):
    from megatron_elastic.parallel import destroy_parallel
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    job = """
model: {{hybrid_pattern: "M*-", vocab_size: 264, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4,
        num_query_groups: 2, mamba_num_heads: 4, mamba_head_dim: 8, mamba_num_groups: 2, mamba_state_dim: 8}}
data: {{blend: [0.3, {a}, 0.7, {b}], valid_blend: [{b}], tokenizer: byte, seq_length: 32}}
train: {{micro_batch_size: 2, global_batch_size: 4, train_iters: 4, lr: 0.003, min_lr: 0.0003, lr_warmup_iters: 1,
        log_interval: 1, eval_interval: 2, eval_iters: 1}}
checkpoint: {{dir: {ckpt}, save_interval: 2, keep_last: 5}}
"""

    def losses(ckpt):
        with open(os.path.join(ckpt, "metrics.jsonl")) as f:
            return {r["iteration"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    try:
        summary = pretrain(load_pretrain_config(text=job.format(ckpt=full, **prefixes)), progress=False)
        assert summary["tokenizer"] == "byte" and summary["bytes_per_token"] == 1.0
        os.makedirs(part)
        shutil.copytree(os.path.join(full, "iter_0000002"), os.path.join(part, "iter_0000002"))
        with open(os.path.join(part, "latest"), "w") as f:
            f.write("iter_0000002")
        pretrain(load_pretrain_config(text=job.format(ckpt=part, **prefixes)), resume=True, progress=False)
    finally:
        destroy_parallel()
    ref, got = losses(full), losses(part)
    assert sorted(got) == [3, 4]
    for it in (3, 4):
        assert got[it] == pytest.approx(ref[it], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(
    "blend,message",
    [
        ([0.3, "a", -0.7, "b"], "data.blend: weight -0.7 of b is negative"),
        ([0.3, "a", 0.7], "data.blend: odd-length list"),
        ([0, "a", 0, "b"], "the weights sum to 0"),
        ([0.5, 0.5, "a", "b"], "expected weight, prefix pairs"),
        ([], "expected a list"),
    ],
)
def test_bad_blends_name_the_field(blend, message):
    with pytest.raises(ConfigError, match=message):
        parse_blend(blend, "data.blend")


def test_bad_splits_and_sources_name_the_fix(prefixes, tmp_path):
    assert parse_split("99,1,0") == "99,1,0"
    for bad in ("99,1", "1,0,0", "a,b,c"):
        with pytest.raises(ConfigError, match="data.split"):
            parse_split(bad)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataSource.from_config(_Data(blend=[prefixes["a"]]))
    with pytest.raises(ConfigError, match="either data.path"):
        DataSource.from_config(_Data(path=str(tmp_path), blend=[prefixes["a"]], tokenizer="byte"))
    with pytest.raises(ConfigError, match="no data"):
        DataSource.from_config(_Data())
    missing = str(tmp_path / "nothing_text_document")
    with pytest.raises(InputNotFoundError, match=f"dataset prefix {missing}"):
        DataSource.from_config(_Data(blend=[1, prefixes["a"], 1, missing], tokenizer="byte")).check()
    # A prefix whose ids exceed the tokenizer's vocabulary (258 for byte) is named.
    wide = write_prefix(str(tmp_path / "wide_text_document"), 250, 300, documents=20)
    with pytest.raises(DataError, match=f"{wide}.bin holds token id 29[0-9] >= the tokenizer's vocabulary"):
        DataSource.from_config(_Data(blend=[1, prefixes["a"], 1, wide], tokenizer="byte")).check()


def test_an_empty_override_unsets_the_directory_so_a_blend_can_replace_it(prefixes):
    from megatron_elastic.store.job_config import load_pretrain_config

    job = "model: {hybrid_pattern: M*-, vocab_size: 264}\ndata: {path: runs/data, seq_length: 32}\n"
    cfg = load_pretrain_config(
        text=job, overrides=["data.path=", f"data.blend=[1, {prefixes['a']}]", "data.tokenizer=byte"]
    )
    assert cfg.data.path == "" and DataSource.from_config(cfg.data).train == ([prefixes["a"]], [1.0])
