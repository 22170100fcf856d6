"""Grouped, gated RMSNorm of the Mamba-2 mixer output (``mamba_ssm``'s ``RMSNormGated``).

With ``norm_before_gate=False`` (Megatron's and Nemotron-H's setting):
``out = rmsnorm_per_group(x * silu(z)) * weight``, the RMS taken over each contiguous block of
``group_size`` channels. Computed in float32, returned in x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_elastic.ops import native

try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _rmsnorm_fn

    HAVE_MAMBA_SSM_NORM = True
except ImportError:  # pragma: no cover - depends on the machine
    _rmsnorm_fn = None
    HAVE_MAMBA_SSM_NORM = False


def gated_rmsnorm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """x, z: (..., d); weight: (d,); group_size divides d (None = d). Returns (..., d)."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    if d % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide the channel count ({d})")
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdtype)
    if z is not None and not norm_before_gate:
        h = F.silu(z.to(cdtype)) * h
    # torch's own RMSNorm over each group (one kernel for the statistics and the scaling where torch fuses it); the
    # weight goes in with it when there is one group, else after it (it differs from group to group)
    if group_size == d:
        out = F.rms_norm(h, (d,), weight.to(cdtype), eps)
    else:
        groups = F.rms_norm(h.reshape(*h.shape[:-1], d // group_size, group_size), (group_size,), None, eps)
        out = groups.reshape(h.shape) * weight.to(cdtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(cdtype))
    return out.to(x.dtype)


def gated_rmsnorm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Dispatching gated RMSNorm: ``mamba_ssm``'s Triton kernel on CUDA when installed; on the CPU, where no gradient
    is wanted, the compiled pass of ``native`` (when built); else :func:`gated_rmsnorm_torch`."""
    if HAVE_MAMBA_SSM_NORM and x.is_cuda:
        return _rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    if native.usable(x, weight, z):
        return native.gated_rmsnorm_forward(x, weight, z, eps, group_size, norm_before_gate)
    return gated_rmsnorm_torch(x, weight, z, eps, group_size, norm_before_gate)
