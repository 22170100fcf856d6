"""The tiny pre-elastic pipeline the tests share: stdlib data, a few pretraining steps, importance and the sort."""

import os

from megatron_elastic.data.corpus import iter_stdlib_documents
from megatron_elastic.data.indexed import write_split_datasets
from megatron_elastic.importance.run import run_importance
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.job_config import load_pretrain_config
from megatron_elastic.training.pretrain import pretrain

TINY_PARENT_JOB = """
model: {{hybrid_pattern: "M-*-M-", vocab_size: {vocab_size}, hidden_size: 32, ffn_hidden_size: 64,
        num_attention_heads: 4, num_query_groups: 2, kv_channels: 8, mamba_num_heads: 4, mamba_head_dim: 8,
        mamba_num_groups: 2, mamba_state_dim: 8, mamba_chunk_size: 16}}
data: {{path: {data}, seq_length: 64}}
train: {{micro_batch_size: 4, global_batch_size: 4, train_iters: {iters}, lr: 0.003, min_lr: 0.0003,
        lr_warmup_iters: 2, log_interval: 5, eval_interval: 100, eval_iters: 1}}
checkpoint: {{dir: {ckpt}, save_interval: 1000}}
"""


def make_tiny_sorted_parent(
    root: str, max_bytes: int = 300_000, iters: int = 20, tokenizer: str = "byte", vocab_size: int = 264
) -> dict:
    """Build the whole pre-elastic pipeline at toy size under ``root`` (single process): stdlib data tokenised with
    ``tokenizer``, a ``iters``-step pretrained parent, importance + sort. Returns the paths {data, parent,
    importance}."""
    paths = {k: os.path.join(root, k) for k in ("data", "parent", "importance")}
    write_split_datasets(
        paths["data"], iter_stdlib_documents(max_bytes=max_bytes), tokenizer, valid_every=5, progress=False
    )
    initialize_parallel(1, 1, seed=1234)
    job = TINY_PARENT_JOB.format(data=paths["data"], ckpt=paths["parent"], iters=iters, vocab_size=vocab_size)
    pretrain(load_pretrain_config(text=job), progress=False)
    run_importance(paths["parent"], paths["data"], paths["importance"], calib_tokens=2048, progress=False)
    return paths
