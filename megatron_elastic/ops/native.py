"""Compiled CPU kernels for the mixer's forward passes that need no gradient (evaluation, a frozen teacher,
importance scoring, generation): the SSD scan (with the causal conv fused in front of it or alone) and the gated
RMSNorm of ``csrc/cpu_kernels.c``, built once per machine with the system C compiler and called through ``ctypes``.

The scan runs Mamba-2's recurrence token by token with each head's state held in vector registers a few rows at a
time (the same function as ``ssd.ssd_chunk_scan_torch``, the float64 recurrence its test reference); the conv is the
same multiply-adds as ``conv1d._CausalConv``'s forward; the norm is ``gated_rmsnorm.gated_rmsnorm_torch``'s formula in
one pass. Training keeps the torch paths (they carry the backward).

Built on first use (about a second) into ``$MEGATRON_ELASTIC_CACHE`` (default ``$XDG_CACHE_HOME/megatron_elastic``
or ``~/.cache/megatron_elastic``), one file per source, compiler and CPU, written under a temporary name and renamed
(concurrent processes may race to build it). ``MEGATRON_ELASTIC_CPU_KERNELS``: ``auto`` (default: the compiled
kernels where a C compiler builds them, else the torch paths, said once in a warning), ``native`` (an error where
they cannot be built), ``torch`` (never build or use them). ``CC`` names the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

ENV = "MEGATRON_ELASTIC_CPU_KERNELS"
_CHOICES = ("auto", "native", "torch")
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# Tried in turn: -fopenmp puts the kernels' threads in the OpenMP runtime torch already loaded (same soname); the
# later sets serve a compiler without OpenMP or -march=native (POSIX threads, generic vector code).
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
_lock = threading.Lock()

i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class SsdArgs(ctypes.Structure):
    """``ssd_args`` of cpu_kernels.c, field by field."""

    _fields_ = [
        *[(name, i64) for name in ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate")],
        ("x", ptr), ("x_sb", i64), ("x_st", i64),
        ("dt", ptr), ("dt_sb", i64), ("dt_st", i64),
        ("A", ptr), ("dt_bias", ptr),
        ("softplus", i64), ("dt_min", f32), ("dt_max", f32),
        ("B", ptr), ("B_sb", i64), ("B_st", i64),
        ("C", ptr), ("C_sb", i64), ("C_st", i64),
        ("D", ptr), ("D_per_channel", i64),
        ("z", ptr), ("z_sb", i64), ("z_st", i64),
        ("initial", ptr), ("y", ptr), ("final", ptr),
        ("conv_width", i64), ("conv_stride", i64),
        *[(name, ptr) for name in ("conv_x", "conv_B", "conv_C", "conv_bias_x", "conv_bias_B", "conv_bias_C")],
    ]  # fmt: skip


class ConvArgs(ctypes.Structure):
    """``conv_args`` of cpu_kernels.c, field by field."""

    _fields_ = [
        ("batch", i64), ("seqlen", i64), ("dim", i64), ("width", i64),
        ("x", ptr), ("x_sb", i64), ("x_st", i64),
        ("weight", ptr), ("bias", ptr), ("silu", i64), ("y", ptr),
    ]  # fmt: skip


class NormArgs(ctypes.Structure):
    """``norm_args`` of cpu_kernels.c, field by field."""

    _fields_ = [
        ("outer", i64), ("inner", i64), ("dim", i64), ("group_size", i64),
        ("x", ptr), ("x_so", i64), ("x_si", i64),
        ("z", ptr), ("z_so", i64), ("z_si", i64),
        ("weight", ptr), ("eps", f32), ("norm_before_gate", i64), ("y", ptr),
    ]  # fmt: skip


# entry point -> (its argument struct, the C function giving that struct's size)
KERNELS = {
    "ssd_scan_forward": (SsdArgs, "ssd_args_size"),
    "causal_conv1d_forward": (ConvArgs, "conv_args_size"),
    "gated_rmsnorm_forward": (NormArgs, "norm_args_size"),
}


def choice() -> str:
    """``MEGATRON_ELASTIC_CPU_KERNELS``, checked: auto, native or torch."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in _CHOICES:
        from megatron_elastic.errors import ConfigError

        raise ConfigError(f"{ENV}={want!r}: use one of {', '.join(_CHOICES)} (auto builds them where a C compiler is)")
    return want


def compiler() -> Optional[str]:
    """The C compiler: ``$CC``, else the one Python was built with, else cc, gcc or clang on the PATH; None."""
    names = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MEGATRON_ELASTIC_CACHE"):
        return Path(os.environ["MEGATRON_ELASTIC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_elastic"


def _cpu_identity() -> str:
    """The CPU model and flags (-march=native code is for this CPU only)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:8192]
    except OSError:
        return platform.processor()


def build(cc: str, out_dir: Path) -> Path:
    """Compile the kernels with ``cc`` into ``out_dir`` (reused when already there); raises RuntimeError naming the
    compiler's complaint."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout[:200]
    parts = [source, cc.encode(), version.encode(), repr(_FLAG_SETS).encode(), _cpu_identity().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()
    target = out_dir / f"cpu_kernels-{platform.machine()}-{key[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *flags, "-fPIC", "-shared", "-pthread", str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        complaint = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        errors.append(f"{' '.join(cmd)}: {complaint}")
    raise RuntimeError("; ".join(errors))


@functools.lru_cache(maxsize=1)
def _load():
    """The loaded library, or None with the reason (for ``auto``)."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc, clang or $CC) on the PATH"
    try:
        try:
            path = build(cc, cache_dir())
        except OSError:  # the cache is not writable: a private temporary directory
            path = build(cc, Path(tempfile.gettempdir()) / f"megatron_elastic-{os.getuid()}")
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} with {cc} failed: {e}"
    for fn, (args, size_fn) in KERNELS.items():
        getattr(lib, fn).argtypes = [ctypes.POINTER(args), i64]
        getattr(lib, fn).restype = None
        size = getattr(lib, size_fn)
        size.restype = i64
        if size() != ctypes.sizeof(args):
            return None, f"{path} does not match native.py's layout of {args.__name__} (a stale build: delete it)"
    return lib, None


def library():
    """The compiled kernels (a ``ctypes.CDLL``), or None where ``MEGATRON_ELASTIC_CPU_KERNELS`` is ``torch`` or, under
    ``auto``, they cannot be built (warned once). Raises ConfigError under ``native`` when they cannot be built."""
    want = choice()
    if want == "torch":
        return None
    with _lock:
        lib, why = _load()
    if lib is None:
        if want == "native":
            from megatron_elastic.errors import ConfigError

            raise ConfigError(f"{ENV}=native but {why}: install a C compiler, or set {ENV}=torch")
        _warn_once(why)
    return lib


@functools.lru_cache(maxsize=None)
def _warn_once(why: str) -> None:
    warnings.warn(
        f"megatron_elastic: {why}; the mixer's CPU forward runs its torch path (slower). Install a C compiler, or "
        f"set {ENV}=torch to silence this.",
        stacklevel=3,
    )


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a forward on these tensors may take a compiled kernel: all on the CPU, none of float64 (the reference
    precision stays on the torch path), no gradient wanted, and the kernels built."""
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return library() is not None


def _float32(t: torch.Tensor, dense_dims: int) -> torch.Tensor:
    """``t`` as float32 with its last ``dense_dims`` dimensions packed row-major (other strides are passed on)."""
    t = t.float()
    expected = 1
    for d in range(t.dim() - 1, t.dim() - 1 - dense_dims, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return t.contiguous()
        expected *= t.shape[d]
    return t


def _address(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def ssd_scan_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    conv: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
):
    """``ssd.ssd_chunk_scan_torch``'s function (same arguments but the chunk length; same shapes) by the compiled
    recurrence; y in x's dtype, the final states in float32. With ``conv`` = (weight (channels, width), bias or None)
    of the mixer's causal conv over the channels [x | B | C], x, B and C are that conv's inputs: the conv and its silu
    run inside the scan, a block of time steps at a time (its output is never written out). Call where
    :func:`usable` says so."""
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")
    xs, dts, Bs, Cs = _float32(x, 2), _float32(dt, 1), _float32(B, 2), _float32(C, 2)
    zs = None if z is None else _float32(z, 2)
    As, bias = A.float().contiguous(), None if dt_bias is None else dt_bias.float().contiguous()
    Ds = None if D is None else D.float().contiguous()
    init = None if initial_states is None else initial_states.float().contiguous()
    y = torch.empty(b, l, h, p, dtype=torch.float32)
    final = torch.empty(b, h, p, n, dtype=torch.float32) if return_final_states else None
    lo, hi = (-float("inf"), float("inf")) if dt_limit == (0.0, float("inf")) else dt_limit
    conv_fields, keep = [0, 0, None, None, None, None, None, None], []
    if conv is not None:
        weight, conv_bias = conv
        if weight.shape[0] != h * p + 2 * g * n:
            raise ValueError(f"conv weight has {weight.shape[0]} channels; x, B and C have {h * p + 2 * g * n}")
        wt = weight.float().t().contiguous()  # (width, channels)
        cb = None if conv_bias is None else conv_bias.float().contiguous()
        starts = (0, h * p, h * p + g * n)  # the first channel of x, B, C
        conv_fields = [wt.shape[0], wt.shape[1]]
        conv_fields += [wt.data_ptr() + 4 * s for s in starts]
        conv_fields += [None if cb is None else cb.data_ptr() + 4 * s for s in starts]
        keep = [wt, cb]  # alive through the call
    args = SsdArgs(
        b, l, h, p, g, n,
        xs.data_ptr(), xs.stride(0), xs.stride(1),
        dts.data_ptr(), dts.stride(0), dts.stride(1),
        As.data_ptr(), _address(bias),
        int(dt_softplus), lo, hi,
        Bs.data_ptr(), Bs.stride(0), Bs.stride(1),
        Cs.data_ptr(), Cs.stride(0), Cs.stride(1),
        _address(Ds), int(Ds is not None and Ds.dim() == 2),
        _address(zs), zs.stride(0) if zs is not None else 0, zs.stride(1) if zs is not None else 0,
        _address(init), y.data_ptr(), _address(final),
        *conv_fields,
    )  # fmt: skip
    library().ssd_scan_forward(ctypes.byref(args), torch.get_num_threads())
    del keep
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def causal_conv1d_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool):
    """``conv1d.causal_conv1d_torch``'s forward (x (batch, dim, seqlen), weight (dim, width), bias (dim,)) by the
    compiled loop; the result is a (batch, dim, seqlen) view of a (batch, seqlen, dim) tensor in x's dtype."""
    xt = _float32(x.transpose(1, 2), 1)  # (batch, seqlen, dim): the mixer's layout, read in place
    batch, seqlen, dim = xt.shape
    w = weight.float().t().contiguous()  # (width, dim)
    bs = None if bias is None else bias.float().contiguous()
    y = torch.empty(batch, seqlen, dim, dtype=torch.float32)
    args = ConvArgs(
        batch, seqlen, dim, w.shape[0], xt.data_ptr(), xt.stride(0), xt.stride(1), w.data_ptr(), _address(bs),
        int(silu), y.data_ptr(),
    )  # fmt: skip
    library().causal_conv1d_forward(ctypes.byref(args), torch.get_num_threads())
    return y.to(x.dtype).transpose(1, 2)


def gated_rmsnorm_forward(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """``gated_rmsnorm.gated_rmsnorm_torch``'s function (x, z (..., d), weight (d,)) in one compiled pass over each
    row; the result in x's dtype."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    if d % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide the channel count ({d})")
    xs, zs = _rows(x), None if z is None else _rows(z)
    w = weight.float().contiguous()
    y = torch.empty(xs.shape, dtype=torch.float32)
    args = NormArgs(
        xs.shape[0], xs.shape[1], d, group_size, xs.data_ptr(), xs.stride(0), xs.stride(1),
        _address(zs), zs.stride(0) if zs is not None else 0, zs.stride(1) if zs is not None else 0,
        w.data_ptr(), eps, int(norm_before_gate), y.data_ptr(),
    )  # fmt: skip
    library().gated_rmsnorm_forward(ctypes.byref(args), torch.get_num_threads())
    return y.view(x.shape).to(x.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., d) as float32 (outer, inner, d) rows with d packed: the mixer's (batch, seq, d) slices of a
    (seq, batch, channels) projection are read in place (one stride per row index)."""
    t = _float32(t, 1)
    t3 = t.reshape(-1, t.shape[-2], t.shape[-1]) if t.dim() >= 2 else t.reshape(1, 1, -1)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()
