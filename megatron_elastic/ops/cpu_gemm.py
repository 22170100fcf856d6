"""float32 matrix products on the CPU through oneDNN, where it is faster than the BLAS torch was built with.

torch's CPU ``mm`` calls MKL, which on AMD processors runs its AVX2 code (about 170 GFLOP/s on 2 cores of the
AVX-512 EPYC our CI runs on); oneDNN, also inside every x86 torch build, runs AVX-512 there (about 400 GFLOP/s)
and gives the same float32 product up to summation order. :func:`use_fastest_cpu_gemm` measures both once per
process and, when oneDNN wins, registers it as ``aten::mm``'s CPU kernel for float32 products of at least
``MIN_MULTIPLY_ADDS``: every linear layer's forward, input-gradient and weight-gradient product (Megatron's local
linears, the output layer, the teacher) goes through it, autograd untouched. Other dtypes and small products
stay on the BLAS (``aten::mm.out``, a separate kernel). ``MEGATRON_ELASTIC_CPU_GEMM=blas`` (or ``onednn``) skips
the measurement and decides. :func:`cpu_bf16_flags` says whether the CPU multiplies bfloat16 in hardware (the
demo's ``--precision auto`` reads it).
"""

from __future__ import annotations

import os
import time
import warnings

import torch

MIN_MULTIPLY_ADDS = 1 << 22  # below this oneDNN's set-up costs more than it saves (measured: 64^3 runs 2.7x slower)
ENV = "MEGATRON_ELASTIC_CPU_GEMM"
_CHOICES = ("auto", "onednn", "blas")

_library = None  # the registration lives as long as this object
_decided = None  # "onednn" or "blas" once decided in this process


def _onednn_linear():
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is row- or column-major without gaps, else a contiguous copy. oneDNN's linear takes a strided
    operand with a leading dimension larger than its width (a sliced weight of an elastic sub-model) down a path
    several hundred times slower; the copy costs one pass over the operand."""
    if t.is_contiguous() or t.t().is_contiguous():
        return t
    return t.t().contiguous().t() if t.stride(0) == 1 else t.contiguous()  # copy along the unit stride


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D float32 CPU tensors through oneDNN's linear (``a @ (b^T)^T``)."""
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b).t(), None, "none", [None], "")


def _mm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if (
        a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MULTIPLY_ADDS
    ):
        return onednn_mm(a, b)
    return torch.ops.aten.mm.out(a, b, out=a.new_empty((a.shape[0], b.shape[1])))


# CPU flags (Linux /proc/cpuinfo names) of instructions that multiply bfloat16 in hardware: AVX-512's dot products
# of bf16 pairs (Zen 4, Cooper Lake and later Xeons) and AMX's bf16 tiles (Sapphire Rapids and later).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list:
    """Which of :data:`NATIVE_BF16_FLAGS` this CPU reports (empty where there is no ``cpuinfo``: not Linux). oneDNN
    runs bfloat16 products on these 2-3.5x faster than float32 ones (measured at the demo's sizes on a Zen 4 EPYC);
    on a CPU without them it emulates bf16, and gains nothing."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _onednn_is_faster() -> bool:
    """One measurement (about 50 ms): a 1024 x 512 x 1024 float32 product both ways; oneDNN must win by 20%."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 512, generator=gen), torch.randn(512, 1024, generator=gen)
    blas = _seconds(lambda: torch.ops.aten.mm.out(a, b, out=torch.empty(1024, 1024)))
    return _seconds(lambda: onednn_mm(a, b)) < blas / 1.2


def use_fastest_cpu_gemm() -> str:
    """Decide once per process which library computes large float32 CPU products (``MEGATRON_ELASTIC_CPU_GEMM``:
    ``auto`` measures, the default) and register oneDNN as ``aten::mm``'s CPU kernel if it is the one. Returns the
    choice, "onednn" or "blas"."""
    global _library, _decided
    if _decided is not None:
        return _decided
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in _CHOICES:
        from megatron_elastic.errors import ConfigError

        raise ConfigError(f"{ENV}={want!r}: use one of {', '.join(_CHOICES)} (auto measures which is faster)")
    if _onednn_linear() is None:
        _decided = "blas"
    elif want == "auto":
        _decided = "onednn" if _onednn_is_faster() else "blas"
    else:
        _decided = want
    if _decided == "onednn":
        _library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            _library.impl("mm", _mm_cpu, "CPU")
    return _decided
