"""The CPU stand-ins for Megatron's CUDA assumptions behave like what they replace."""

import os

import pytest
import torch

from megatron_elastic import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims are only used without CUDA")


def test_cpu_rng_tracker_forks_named_streams_and_restores_default():
    tracker = compat.CpuRNGStatesTracker()
    tracker.add("a", 11)
    torch.manual_seed(0)
    default_next = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), default_next), "the default stream must be untouched by a fork"
    with tracker.fork("a"):
        second = torch.rand(3)
    torch.manual_seed(11)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([first, second]), expected), "a named stream continues where it left off"
    with pytest.raises(Exception, match="already exists"):
        tracker.add("b", 11)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("zzz"):
            pass


def test_cuda_to_cpu_mode_only_inside_the_context():
    compat.disable_cpu_backend()  # an earlier test may have left a parallel job's process-wide mode on
    with compat.CudaToCpuMode():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu"
        assert t.cuda() is t
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.float64).to(torch.float32).sum().item() == 1.0
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_version_compat_names():
    assert compat.PATTERN_KWARG in ("hybrid_override_pattern", "hybrid_layer_pattern")
    assert compat.HybridModel.__name__ in ("MambaModel", "HybridModel")


def test_a_parallel_job_holds_the_cpu_backend_until_it_is_torn_down():
    from megatron_elastic.parallel import destroy_parallel, initialize_parallel

    destroy_parallel()
    assert torch.ones(1).type() == "torch.FloatTensor"
    initialize_parallel(1, 1, seed=3)
    initialize_parallel(1, 1, seed=3)  # idempotent: the mode is entered once
    try:
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    finally:
        destroy_parallel()
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    destroy_parallel()  # a second tear-down is harmless


def test_cpu_backend_suspended_leaves_the_mode_for_the_block_only():
    from megatron_elastic.parallel import destroy_parallel, initialize_parallel

    destroy_parallel()
    with compat.cpu_backend_suspended():  # mode off: a no-op
        assert torch.ones(1).type() == "torch.FloatTensor"
    initialize_parallel(1, 1, seed=3)
    try:
        with compat.cpu_backend_suspended():
            assert torch.ones(1).type() == "torch.FloatTensor"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        with pytest.raises(ValueError), compat.cpu_backend_suspended():
            raise ValueError("the mode comes back after an error too")
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with compat.CudaToCpuMode():  # another mode on top: left alone
            with compat.cpu_backend_suspended():
                assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    finally:
        destroy_parallel()
    assert torch.ones(1).type() == "torch.FloatTensor"


def _reduce_scatter_job(rank, world):
    import torch.distributed as dist

    from megatron_elastic.parallel import initialize_parallel

    initialize_parallel(1, 1)
    assert not compat.ensure_reduce_scatter(), "this torch's gloo reduce-scatters: no shim"
    g = torch.Generator().manual_seed(17)
    inputs = [torch.randn(world * 3, 5, generator=g) for _ in range(world)]  # every rank's input, same on all
    definition = sum(inputs).chunk(world, dim=0)[rank]
    for op, expect in (
        (dist.ReduceOp.SUM, definition),
        (dist.ReduceOp.MAX, torch.stack(inputs).amax(0).chunk(world)[rank]),
    ):
        shim, native = torch.empty(3, 5), torch.empty(3, 5)
        handle = compat.reduce_scatter_by_all_reduce(shim, inputs[rank], op=op, async_op=True)
        assert handle.wait()
        dist.reduce_scatter_tensor(native, inputs[rank], op=op)
        torch.testing.assert_close(shim, expect)
        torch.testing.assert_close(native, expect)


def test_reduce_scatter_shim_equals_the_definition_and_gloo():
    """The all-reduce-and-keep-your-chunk reduce-scatter (for a gloo without one) against the definition (the sum
    of every rank's input, this rank's chunk) and against gloo's own reduce-scatter."""
    from megatron_elastic.testing import run_multiprocess

    run_multiprocess(2, _reduce_scatter_job)


def test_srun_tasks_without_a_rendezvous_are_refused():
    """Tasks started by srun with no MASTER_ADDR would each train alone into the same checkpoint directory."""
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.parallel import _ranks_from_slurm

    saved = dict(os.environ)
    try:
        for name in ("RANK", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "SLURM_LOCALID"):
            os.environ.pop(name, None)
        os.environ.update(SLURM_PROCID="1", SLURM_NTASKS="2")
        with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
            _ranks_from_slurm()
        os.environ["SLURM_NTASKS"] = "1"  # one task: a single process, as before
        _ranks_from_slurm()
        assert "RANK" not in os.environ
        os.environ.update(SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1")
        _ranks_from_slurm()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("1", "2")
    finally:
        os.environ.clear()
        os.environ.update(saved)
