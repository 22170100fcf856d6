"""Process-group set-up: torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's model-parallel groups."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import random
import socket
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_elastic import compat
from megatron_elastic.errors import ConfigError
from megatron_elastic.ops.cpu_gemm import use_fastest_cpu_gemm


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a rendezvous that binds it a moment later.

    Drawn at random below the kernel's ephemeral range: a port the kernel hands out (``bind`` to port 0) is one it
    also gives to outgoing connections, e.g. gloo's between the ranks of other jobs on the machine, so between this
    check and the rendezvous's bind another process could take it (EADDRINUSE, seen with tests in parallel)."""
    first_ephemeral = _first_ephemeral_port()
    draw = random.SystemRandom()  # not the seeded global generator: processes seeded alike would draw alike
    for _ in range(64):
        port = draw.randrange(_LOWEST_PORT, first_ephemeral) if first_ephemeral > _LOWEST_PORT + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free TCP port on 127.0.0.1 between {_LOWEST_PORT} and {first_ephemeral} after 64 draws")


_LOWEST_PORT = 20000  # above the registered services a development machine commonly runs


def clean_process_context(preload: Sequence[str]):
    """A multiprocessing context whose processes start clean: ``forkserver`` where the platform has it (each process
    a fork of a fresh single-threaded server that imported ``preload`` once), else ``spawn``. Never a fork of the
    caller: a caller that already runs threads (torch's, gloo's, the tokenizers library's, a test runner's timeout)
    can be forked while one of them holds a lock, and the child then waits for it forever.

    The server starts once per process, with the ``preload`` of the first caller that starts a process; later
    callers' children import what they need themselves. A child takes the caller's working directory and ``sys.path``
    but the server's environment variables: pass any the child depends on."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        return context
    return multiprocessing.get_context("spawn")


def _first_ephemeral_port() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems: bind(0) ports are drawn from above it too


def _ranks_from_slurm() -> None:
    """``srun`` with one task per GPU (no torchrun): take RANK/WORLD_SIZE/LOCAL_RANK from Slurm's variables.
    Needs MASTER_ADDR/MASTER_PORT in the environment (launch/slurm/megatron_elastic.sbatch sets them)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if "MASTER_ADDR" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError(
                f"srun started {os.environ['SLURM_NTASKS']} tasks but MASTER_ADDR is not set: each would train alone, "
                "writing the same checkpoints; export MASTER_ADDR and MASTER_PORT (the first node of the job, as "
                "launch/slurm/megatron_elastic.sbatch does) or launch with torchrun"
            )
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Initialise torch.distributed from the torchrun environment (or as a single process when there is
    none) and Megatron's TP/PP/DP groups, then seed Megatron's RNG streams. Idempotent. Without CUDA it also
    enables the CPU back-end for this process (``compat.enable_cpu_backend``), until :func:`destroy_parallel`, and
    picks the faster library for float32 matrix products (``ops.cpu_gemm``).
    ``timeout_minutes`` bounds every collective of every group (a rank waiting longer fails instead of hanging)."""
    compat.enable_cpu_backend()
    compat.eager_fused_functions()
    if not torch.cuda.is_available():
        use_fastest_cpu_gemm()
    _ranks_from_slurm()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun / Slurm launcher environment
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a single process: an in-memory store (no port to race for; os.environ left alone, so child
            # processes do not inherit a rendezvous)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        compat.ensure_reduce_scatter()
    world = dist.get_world_size()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(
            f"world size {world} is not divisible by tensor_model_parallel_size*pipeline_model_parallel_size "
            f"({tp}*{pp}); launch a multiple of {tp * pp} processes"
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        ) != (tp, pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=timeout_minutes
        )
    compat.seed_model_parallel_rng(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group, and leave the CPU back-end's mode."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    compat.disable_cpu_backend()


def release_at_exit(succeeded: bool) -> None:
    """Tear the process groups down before the interpreter exits: a gloo group left alive aborts the process at
    exit (SIGABRT, "terminate called without an active exception", exit 134 after a finished job, which Slurm's
    crash path would requeue). After a failure an NCCL group is left to the exit: its teardown is collective and
    would wait for ranks that may never come."""
    if not dist.is_initialized():
        return
    if succeeded or dist.get_backend() == "gloo":
        destroy_parallel()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """A barrier over every process (nothing without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def tensor_parallel():
    """(TP size, TP rank, TP group): (1, 0, None) before Megatron's parallel state is initialised."""
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group(),
        )
    return 1, 0, None
