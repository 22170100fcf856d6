"""The CPU's float32 products through oneDNN (``ops.cpu_gemm``) against float64 products and against the BLAS:
every layout a linear layer's forward and backward hands ``mm``, small and non-float32 products left on the BLAS."""

import subprocess
import sys

import pytest
import torch

from megatron_elastic.ops import cpu_gemm

pytestmark = pytest.mark.skipif(cpu_gemm._onednn_linear() is None, reason="this torch build has no oneDNN linear")


def _pairs():
    g = torch.Generator().manual_seed(0)
    x, w, dy = (
        torch.randn(*s, generator=g)
        for s in (
            (
                1024,
                320,
            ),
            (768, 320),
            (1024, 768),
        )
    )
    return {
        "forward x @ W^T": (x, w.t()),
        "input grad dy @ W": (dy, w),
        "weight grad dy^T @ x": (dy.t(), x),
        "sliced weight (an elastic sub-model)": (x[:, :256], w[:512, :256].t()),
    }


@pytest.mark.parametrize("name", list(_pairs()))
def test_onednn_products_equal_float64_products(name):
    a, b = _pairs()[name]
    assert a.shape[0] * a.shape[1] * b.shape[1] >= cpu_gemm.MIN_MULTIPLY_ADDS
    got = cpu_gemm.onednn_mm(a, b)
    want = a.double() @ b.double()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_operands_with_gaps_reach_onednn_dense():
    """oneDNN takes an operand whose leading dimension exceeds its width (a sliced weight) down a path hundreds of
    times slower: such operands are copied along their unit stride first, row- or column-major as they were."""
    w = torch.randn(768, 320)
    for t in (w[:512, :256], w[:512, :256].t()):
        d = cpu_gemm._dense(t)
        assert torch.equal(d, t) and (d.is_contiguous() or d.t().is_contiguous())
        assert (d.stride(0) == 1) == (t.stride(0) == 1)
    assert (
        cpu_gemm._dense(w) is w
        and cpu_gemm._dense(w.t()) is not None
        and cpu_gemm._dense(w.t()).data_ptr() == w.data_ptr()
    )


def test_the_registered_kernel_routes_by_size_and_dtype_and_autograd_is_unchanged():
    """In a process that installed oneDNN: a linear layer's gradients equal float64 ones; a small float32 product and
    a float64 product are bit for bit what the BLAS (``mm.out``) gives."""
    code = r"""
import os, torch
os.environ["MEGATRON_ELASTIC_CPU_GEMM"] = "onednn"
from megatron_elastic.ops import cpu_gemm
assert cpu_gemm.use_fastest_cpu_gemm() == "onednn"
g = torch.Generator().manual_seed(1)
x = torch.randn(4, 256, 320, generator=g, requires_grad=True)
w = torch.randn(768, 320, generator=g, requires_grad=True)
y = torch.nn.functional.linear(x, w)
dy = torch.randn(y.shape, generator=g)
y.backward(dy)
x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
y64 = x64 @ w64.t()
y64.backward(dy.double())
for got, want in ((y, y64), (x.grad, x64.grad), (w.grad, w64.grad)):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
assert torch.equal(a @ b, torch.ops.aten.mm.out(a, b, out=torch.empty(64, 64)))
a, b = torch.randn(512, 512, dtype=torch.float64, generator=g), torch.randn(512, 512, dtype=torch.float64, generator=g)
assert torch.equal(a @ b, torch.ops.aten.mm.out(a, b, out=torch.empty(512, 512, dtype=torch.float64)))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_a_bad_choice_is_one_clear_error(monkeypatch):
    from megatron_elastic.errors import ConfigError

    monkeypatch.setattr(cpu_gemm, "_decided", None)
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    with pytest.raises(ConfigError, match="MEGATRON_ELASTIC_CPU_GEMM='mkl': use one of auto, onednn, blas"):
        cpu_gemm.use_fastest_cpu_gemm()
