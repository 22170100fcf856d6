"""GPU kernels against their CPU twins, and TP=2 over NCCL. Skipped, with the reason, without CUDA or the
kernels. Run on a GPU machine with: pytest -m gpu -v"""

import pytest
import torch

from megatron_elastic import ops

pytestmark = pytest.mark.gpu

NO_CUDA = "no CUDA device on this machine"


def _needs(flag: bool, package: str):
    if not torch.cuda.is_available():
        return pytest.mark.skipif(True, reason=NO_CUDA)
    return pytest.mark.skipif(not flag, reason=f"{package} is not installed (pip install .[gpu])")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
needs_ssd = _needs(ops.HAVE_MAMBA_SSM_SSD, "mamba_ssm")
needs_conv = _needs(ops.HAVE_CAUSAL_CONV1D, "causal_conv1d")
needs_norm = _needs(ops.HAVE_MAMBA_SSM_NORM, "mamba_ssm")


@needs_cuda
@needs_ssd
@pytest.mark.parametrize("seqlen,chunk", [(256, 64), (200, 64)])
def test_mamba_ssm_ssd_kernel_matches_torch(seqlen, chunk):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, ng, n = 2, 8, 16, 2, 32
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    x, dt, B, C, z = r(b, seqlen, h, p), r(b, seqlen, h), r(b, seqlen, ng, n), r(b, seqlen, ng, n), r(b, seqlen, h, p)
    A = -torch.rand(h, device="cuda", generator=g) * 4
    D, dt_bias = r(h), r(h)
    y_kernel = ops.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias)
    y_torch = ops.ssd_chunk_scan_torch(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias)
    torch.testing.assert_close(y_kernel, y_torch, rtol=2e-3, atol=2e-3)


@needs_cuda
@needs_conv
def test_causal_conv1d_kernel_matches_torch():
    x = torch.randn(2, 64, 100, device="cuda")
    w, bias = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    torch.testing.assert_close(ops.causal_conv1d(x, w, bias), ops.causal_conv1d_torch(x, w, bias), rtol=1e-4, atol=1e-4)


@needs_cuda
@needs_norm
def test_gated_rmsnorm_kernel_matches_torch():
    x, z = torch.randn(4, 10, 64, device="cuda"), torch.randn(4, 10, 64, device="cuda")
    w = torch.randn(64, device="cuda")
    torch.testing.assert_close(
        ops.gated_rmsnorm(x, w, z, group_size=16), ops.gated_rmsnorm_torch(x, w, z, group_size=16), rtol=1e-4, atol=1e-4
    )


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs 2 GPUs")
def test_tp2_nccl_matches_tp1(tmp_path):
    from megatron_elastic.testing import run_multiprocess
    from tests.model.test_tensor_parallel import _tp_job

    run_multiprocess(2, _tp_job, str(tmp_path), {})
