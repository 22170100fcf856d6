"""Bad model/job configs fail before any work, with a message naming the field and the fix."""

import pytest

from megatron_elastic.model.config import ConfigError
from megatron_elastic.store.job_config import load_pretrain_config
from megatron_elastic.testing import tiny_config


@pytest.mark.parametrize(
    "overrides,field,fix",
    [
        (dict(hybrid_pattern="M-X*"), "hybrid_pattern", "unknown symbol"),
        (dict(hybrid_pattern=""), "hybrid_pattern", "one symbol per layer"),
        (dict(vocab_size=0), "vocab_size", "positive"),
        (dict(tensor_model_parallel_size=3), "num_attention_heads", "divisible by tensor_model_parallel_size"),
        (dict(mamba_num_groups=1, tensor_model_parallel_size=2), "mamba_num_groups", "whole groups"),
        (dict(mamba_num_heads=6, mamba_num_groups=4), "mamba_num_heads", "divisible by mamba_num_groups"),
        (dict(num_query_groups=3), "num_query_groups", "must divide num_attention_heads"),
        (dict(activation="tanh"), "activation", "must be one of"),
        # Options the elastic method (sort, cost model, extraction) does not handle are refused, not half-used.
        (dict(add_bias_linear=True), "add_bias_linear", "set it to False"),
        (dict(position_embedding_type="learned_absolute"), "position_embedding_type", "not sorted, counted or sliced"),
        (dict(normalization="LayerNorm"), "normalization", "RMSNorm"),
        (dict(qk_layernorm=True), "qk_layernorm", "set it to False"),
        (dict(add_qkv_bias=True), "add_qkv_bias", "set it to False"),
        (dict(sequence_parallel=True), "sequence_parallel", "tensor_model_parallel_size >= 2"),
    ],
)
def test_model_config_errors(overrides, field, fix):
    with pytest.raises(ConfigError, match=field) as e:
        tiny_config(**overrides)
    assert fix in str(e.value)


def test_unknown_model_field():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hiden_size'\]"):
        tiny_config(hiden_size=3)


BASE = """
model: {hybrid_pattern: "M-*", vocab_size: 264, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4,
        num_query_groups: 2, kv_channels: 8, mamba_num_heads: 4, mamba_head_dim: 8, mamba_num_groups: 2,
        mamba_state_dim: 8}
"""


@pytest.mark.parametrize(
    "extra,overrides,message",
    [
        ("", ["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size"),
        ("", ["train.lr=abc"], "train.lr: expected a number, got 'abc'"),
        ("", ["train.lr=inf"], "train.lr: expected a finite number"),
        ("", ["train.min_lr=1.0"], "train.min_lr"),
        ("", ["train.lr_warmup_iters=5000"], "train.lr_warmup_iters"),
        ("", ["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size"),
        ("", ["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs"),
        ("", ["parallel.distributed_timeout_minutes=0"], "parallel.distributed_timeout_minutes: must be a positive"),
        ("trian: {}\n", [], "unknown section"),
        ("", ["train.epochs=3"], "train: unknown field"),
        ("", ["model.hybrid_pattern=M?"], "model.hybrid_pattern"),
        ("", ["trainiters=3"], "section.field=value"),
    ],
)
def test_job_config_errors(extra, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg = load_pretrain_config(text=BASE + extra, overrides=overrides)
        cfg.validate(world_size=1)


def test_float_fields_take_yaml_exponents_without_a_dot():
    """PyYAML reads `5e-4` as a string (YAML 1.1); a float field takes it as the number it means."""
    cfg = load_pretrain_config(text=BASE + "train: {min_lr: 5e-5}\n", overrides=["train.lr=5e-4"])
    assert (cfg.train.lr, cfg.train.min_lr) == (5e-4, 5e-5)


def test_missing_sections_and_files():
    with pytest.raises(ConfigError, match="model: section missing"):
        load_pretrain_config(text="train: {lr: 0.1}")
    with pytest.raises(ConfigError, match="not found"):
        load_pretrain_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="world size 3"):
        load_pretrain_config(text=BASE, overrides=["parallel.tensor_model_parallel_size=2"]).validate(world_size=3)
