"""Helpers for tests and benchmarks: a tiny model config and a multi-process launcher (gloo on CPU)."""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_elastic.parallel import free_port


def tiny_config(**overrides: Any):
    """A small hybrid config with every layer type, ngroups=2 Mamba and GQA attention (TP up to 2)."""
    import torch

    from megatron_elastic.model.config import HybridConfig, tiny_defaults

    kw = dict(
        hybrid_pattern="M-*-M-",
        vocab_size=260,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        mamba_num_groups=2,
        mamba_state_dim=8,
        mamba_chunk_size=8,
        params_dtype=torch.float32,
    )
    kw.update(tiny_defaults())
    kw.update(overrides)
    return HybridConfig.from_dict(kw)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errq) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        fn(rank, world_size, *args)
    except BaseException:  # report to the parent, which fails the test with the traceback
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        from megatron_elastic.parallel import destroy_parallel

        destroy_parallel()


def run_multiprocess(world_size: int, fn: Callable, *args: Any, timeout: float = 600) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with the torch.distributed
    environment set (gloo on CPU); raise with the failing rank's traceback if any fails."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"worker processes exited abnormally (rank, exitcode): {bad}")


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
    from megatron_elastic.data.corpus import iter_stdlib_documents
    from megatron_elastic.data.indexed import write_split_datasets
    from megatron_elastic.importance.run import run_importance
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.training.config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    paths = {k: os.path.join(root, k) for k in ("data", "parent", "importance")}
    write_split_datasets(
        paths["data"], iter_stdlib_documents(max_bytes=max_bytes), tokenizer, valid_every=5, progress=False
    )
    initialize_parallel(1, 1, seed=1234)
    job = TINY_PARENT_JOB.format(data=paths["data"], ckpt=paths["parent"], iters=iters, vocab_size=vocab_size)
    pretrain(load_pretrain_config(text=job), progress=False)
    run_importance(paths["parent"], paths["data"], paths["importance"], calib_tokens=2048, progress=False)
    return paths


def peak_live_tensor_bytes(fn):
    """Run ``fn()``; return (its result, the peak of live CPU tensor bytes while it ran, above those alive before).

    Every allocation and free of torch's CPU allocator is a ``[memory]`` event of the profiler (a free of a
    block allocated before the profile started is not reported, so the running sum can only over-count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return result, peak
