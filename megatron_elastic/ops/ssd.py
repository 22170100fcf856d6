"""Mamba-2 SSD (state-space duality) chunked scan.

Semantics follow ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``. For every head h with
group g(h) = h // (nheads // ngroups) and per-token step dt_t = softplus(dt_t + dt_bias) (clamped to
``dt_limit``):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          (S: headdim x d_state)
    y_t = S_t C_t + D_h * x_t,   then  y_t *= silu(z_t) if z is given

The CPU path evaluates this with the chunked (block-decomposed) algorithm of the SSD paper: quadratic
attention-like form inside each chunk, a linear recurrence over chunk states between chunks. It is
vectorised over batch, chunks, groups and heads; only the chunk recurrence is a (short) matrix product.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_chunk_scan_combined

    HAVE_MAMBA_SSM_SSD = True
except ImportError:  # pragma: no cover - depends on the machine
    _mamba_chunk_scan_combined = None
    HAVE_MAMBA_SSM_SSD = False


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """Pairwise within-chunk log decays. a: (..., T) -> (..., T, T) with out[i, j] = sum_{j<k<=i} a[k]
    for j <= i and -inf above the diagonal (so exp() of it is the causal decay matrix)."""
    T = a.shape[-1]
    expanded = a.unsqueeze(-1).expand(*a.shape, T)  # [..., k, j] = a[k]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    expanded = expanded.masked_fill(~strictly_lower, 0.0)
    out = expanded.cumsum(dim=-2)  # [..., i, j] = sum_{j<k<=i} a[k]
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def _step_sizes(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit: Tuple[float, float]) -> torch.Tensor:
    """Mamba-2's step sizes: dt + dt_bias, softplus, clamped to ``dt_limit``."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_chunk_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
):
    """Pure-PyTorch chunked SSD scan.

    Shapes: x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n); D (h,) or (h, p); z like x;
    dt_bias (h,); initial_states (b, h, p, n). Returns y (b, l, h, p) [and final states (b, h, p, n)].
    Computation is in float32 (or float64 if the inputs are float64); y has x's dtype.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")
    r = h // g
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    dt = _step_sizes(dt.to(cdtype), dt_bias, dt_softplus, dt_limit)
    # Pad the sequence to a whole number of chunks: dt = 0 on padding means no decay and no input,
    # so padded steps change neither the outputs of real steps nor the final state.
    pad = (-l) % chunk_size
    xs, dt, Bs, Cs = (F.pad(t.to(cdtype), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    L = l + pad
    c, q = L // chunk_size, chunk_size

    # Discretise: dA = dt * A (log decay per step), x scaled by dt.
    dA = dt * A.to(cdtype)  # (b, L, h)
    xdt = xs * dt.unsqueeze(-1)  # (b, L, h, p)

    # Chunked views with heads split into (group, head-in-group).
    X = xdt.reshape(b, c, q, g, r, p)
    Bc = Bs.reshape(b, c, q, g, n)
    Cc = Cs.reshape(b, c, q, g, n)
    a = dA.reshape(b, c, q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, q)
    a_cum = a.cumsum(dim=-1)

    # 1) Intra-chunk (diagonal blocks): y_i = sum_{j<=i} (C_i . B_j) exp(a_cum_i - a_cum_j) x_j
    decay = torch.exp(_segment_sum(a))  # (b, g, r, c, q_i, q_j)
    CB = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # shared by the heads of a group
    y_diag = torch.einsum("bgcij,bgrcij,bcjgrp->bcigrp", CB, decay, X)

    # 2) State contributed by each chunk, as of the chunk's end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, g, r, c, q)
    chunk_states = torch.einsum("bcjgn,bgrcj,bcjgrp->bcgrpn", Bc, decay_to_end, X)

    # 3) Recurrence over chunks: state entering chunk k = sum_{m<k} exp(sum of chunk decays) state_m.
    if initial_states is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=cdtype, device=x.device)
    else:
        init = initial_states.to(cdtype).reshape(b, g, r, p, n).unsqueeze(1)
    states = torch.cat([init, chunk_states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = F.pad(a_cum[..., -1], (1, 0))  # (b, g, r, c+1)
    inter = torch.exp(_segment_sum(chunk_decay))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrkm,bmgrpn->bkgrpn", inter, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4) Contribution of the entering state to every position of the chunk.
    y_off = torch.einsum("bcign,bcgrpn,bgrci->bcigrp", Cc, entering, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, L, h, p)[:, :l]
    if D is not None:
        Dd = D.to(cdtype)
        y = y + xs[:, :l] * (Dd.unsqueeze(-1) if Dd.dim() == 1 else Dd)
    if z is not None:
        y = y * F.silu(z.to(cdtype))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final.reshape(b, h, p, n)
    return y


def ssd_chunk_scan(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=True,
    dt_limit=(0.0, float("inf")),
    initial_states=None,
    return_final_states=False,
):
    """SSD chunked scan: ``mamba_ssm``'s Triton kernel on CUDA when installed, else :func:`ssd_chunk_scan_torch`."""
    if HAVE_MAMBA_SSM_SSD and x.is_cuda:
        return _mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=initial_states,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            return_final_states=return_final_states,
        )
    return ssd_chunk_scan_torch(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        initial_states=initial_states,
        return_final_states=return_final_states,
    )
