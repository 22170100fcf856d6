"""Helpers for tests and benchmarks: a tiny model config and a multi-process launcher (gloo on CPU)."""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

from megatron_elastic.parallel import clean_process_context, free_port


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


# Modules the workers' parent process imports once: every worker is then a fork of it with them loaded, instead of
# a fresh interpreter importing torch and Megatron-Core again (several seconds per worker on 2 cores).
PRELOAD = ["torch", "megatron.core", "megatron_elastic.model.builder", "megatron_elastic.elastic.run"]


def _context():
    """:func:`megatron_elastic.parallel.clean_process_context` with :data:`PRELOAD`: a worker starts from a process that
    has not initialised torch's threads or a process group (forking the test process itself could inherit both)."""
    return clean_process_context(PRELOAD)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errq, env: dict, cwd: str) -> None:
    # A forkserver's child has the server's environment, not the test's: take the test's (and its directory).
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes (:func:`_context`) with the
    torch.distributed environment set (gloo on CPU) and the caller's environment and directory; raise with the
    failing rank's traceback if any fails."""
    ctx = _context()
    errq = ctx.SimpleQueue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq, env, cwd)) for r in range(world_size)
    ]
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
