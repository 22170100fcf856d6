"""Mamba-2 SSD (state-space duality) chunked scan.

Semantics follow ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``. For every head h with
group g(h) = h // (nheads // ngroups) and per-token step dt_t = softplus(dt_t + dt_bias) (clamped to
``dt_limit``):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          (S: headdim x d_state)
    y_t = S_t C_t + D_h * x_t,   then  y_t *= silu(z_t) if z is given

The CPU path evaluates this with the chunked (block-decomposed) algorithm of the SSD paper: quadratic
attention-like form inside each chunk, a linear recurrence over chunk states between chunks. It is
vectorised over batch, chunks, groups and heads; only the chunk recurrence is a (short) matrix product.

The chunk length is a blocking choice, not part of the function: every chunk length gives the same y (up to
float rounding). On CUDA the dispatcher passes the model's ``mamba_chunk_size`` through; on the CPU it runs the
torch path at :func:`cpu_chunk_size`, the fastest there (``benchmarks/ssd_scan.py`` prints the sweep), where a
gradient is wanted, and the compiled recurrence of ``ops/native.py`` where none is (3-7x faster than this torch
path; :func:`conv_ssd_scan` fuses the mixer's conv into it).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_elastic.ops import native

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_chunk_scan_combined

    HAVE_MAMBA_SSM_SSD = True
except ImportError:  # pragma: no cover - depends on the machine
    _mamba_chunk_scan_combined = None
    HAVE_MAMBA_SSM_SSD = False


@functools.lru_cache(maxsize=32)
def _above_diagonal(T: int, offset: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: True where column - row >= ``offset`` (offset 1: strictly above the diagonal). Made once per
    size; read-only (only passed to out-of-place ``masked_fill``). A normal tensor even when first asked for under
    ``torch.inference_mode`` (an inference tensor cannot be saved for a later backward)."""
    with torch.inference_mode(False):
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(offset)


class _ExpDecay(torch.autograd.Function):
    """exp of log decays, the argument kept within three quarters of the way to the exponent range of its dtype
    (-65.5 to 66.5 in float32), and exactly 0 where ``future`` (a mask, or None) is True. torch's CPU exp takes a
    slow path for every vector holding an argument whose result is subnormal, zero, infinite or near either end of
    the range (measured 4-30x slower per element on an AVX-512 EPYC), and long chunks and strong decays (a trained
    Mamba's A down to -16) reach such arguments. A decay below exp(-65.5) = 3e-29 is nothing a float32 sum holds
    next to the decay-1 term of the step itself; a Mamba decay never exceeds 1 (dt >= 0, A < 0): the ceiling only
    meets the masked future.

    The backward is exp's own (the gradient times the result; 0 on the future), also where the argument was clamped
    (below the floor exp's true gradient is under 3e-29 as well): the result is the one tensor kept for it, as for a
    plain exp, and the same tensor the product it feeds keeps (a clamp and a mask applied by autograd would each
    keep another decay-matrix-sized tensor)."""

    @staticmethod
    def forward(ctx, log_decay, future):
        info = torch.finfo(log_decay.dtype)
        out = torch.exp(log_decay.clamp(0.75 * math.log(info.tiny), 0.75 * math.log(info.max)))
        if future is not None:
            out.masked_fill_(future, 0.0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out, None


def _exp_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of log decays (see :class:`_ExpDecay`)."""
    return _ExpDecay.apply(log_decay, None)


def _causal_exp_decay(log_decay: torch.Tensor, T: int) -> torch.Tensor:
    """exp of a (..., T, T) matrix of log decays, exactly 0 above the diagonal (the future: whatever the caller's
    arithmetic left there; in the within-chunk differences of running sums, large and positive)."""
    return _ExpDecay.apply(log_decay, _above_diagonal(T, 1, log_decay.device))


def _segment_decay(a: torch.Tensor) -> torch.Tensor:
    """Pairwise decays from log decays summed exactly (no difference of large running sums). a: (..., T) ->
    (..., T, T) with out[i, j] = exp(sum_{j<k<=i} a[k]) for j <= i and 0 above the diagonal. Used across chunks,
    where running sums grow with the sequence."""
    T = a.shape[-1]
    expanded = a.unsqueeze(-1).expand(*a.shape, T)  # [..., k, j] = a[k]
    sums = expanded.masked_fill(_above_diagonal(T, 0, a.device), 0.0).cumsum(dim=-2)  # [..., i, j] = sum_{j<k<=i}
    return _causal_exp_decay(sums, T)


def _causal_decay(a_cum: torch.Tensor) -> torch.Tensor:
    """Within-chunk decays from the running sums ``a_cum`` (..., T): out[..., i, j] = exp(a_cum_i - a_cum_j) for
    j <= i, 0 above the diagonal (the difference of running sums, as mamba_ssm's chunk-scan kernel: within one
    chunk the sums stay small enough for float32)."""
    return _causal_exp_decay(a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2), a_cum.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous. Placed on a batched matrix product's output
    whose consumers permute it: torch's CPU bmm backward with a strided gradient copies matrix by matrix (one small
    copy per (batch, chunk, head)); one copy of the whole gradient here is several times cheaper."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def decays_on_b_and_c(headdim: int, d_state: int) -> bool:
    """Whether the CPU scan puts the per-head decays of the chunk states and of the entering states on B and C
    (``d_state`` wide, made per head by that product) rather than on x and y (``headdim`` wide, with B and C
    copied per head): the narrower side, fewer bytes written and kept for backward."""
    return d_state <= headdim


def _per_head(t: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """(b, g, c, q, n) -> (b, g, r, c, q, n), copied (a batched matrix product copies a broadcast operand anyway)."""
    b, g, c, q, n = t.shape
    return t.unsqueeze(2).expand(b, g, heads_per_group, c, q, n).contiguous()


def _step_sizes(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit: Tuple[float, float]) -> torch.Tensor:
    """Mamba-2's step sizes: dt + dt_bias, softplus, clamped to ``dt_limit``."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _states_over_chunks(
    chunk_states: torch.Tensor, chunk_log_decay: torch.Tensor, initial_states: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk (b, g, r, c, p, n) and the final state (b, g, r, p, n), from each chunk's own
    contribution ``chunk_states`` (b, g, r, c, p, n), its total log decay (b, g, r, c) and ``initial_states``
    (b, h, p, n) or None: products with the exact segment sums of the decays (sums grow across chunks).

    decay[i, j] (i, j in 0..c) carries what stands at the end of chunk j - 1 (j = 0: the initial state) to the end
    of chunk i - 1, i.e. into chunk i; row c is the final state. The chunk-state columns (1..c) are one strided
    operand, so no concatenated copy of the states is made."""
    b, g, r, c, p, n = chunk_states.shape
    decay = _segment_decay(F.pad(chunk_log_decay, (1, 0)))  # (b, g, r, c+1, c+1)
    flat = chunk_states.reshape(b, g, r, c, p * n)
    entering = decay[..., :c, 1:] @ flat  # (b, g, r, c, p*n)
    final = decay[..., c:, 1:] @ flat  # (b, g, r, 1, p*n)
    if initial_states is not None:
        init = initial_states.to(chunk_states.dtype).reshape(b, g, r, 1, p * n)
        entering = entering + decay[..., :c, :1] * init
        final = final + decay[..., c:, :1] * init
    return entering.view(b, g, r, c, p, n), final.view(b, g, r, p, n)


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
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    xs, Bs, Cs = x.to(cdtype), B.to(cdtype), C.to(cdtype)
    L = l + pad
    c, q = L // chunk_size, chunk_size

    # Chunked layouts with heads split into (group, head-in-group) ahead of the chunk index, made contiguous once:
    # every heavy product below is then one batched matrix product over (batch, group, head, chunk), forward and
    # backward (a strided operand sends torch's CPU bmm, and its backward, through a per-matrix copy loop), and the
    # recurrence over chunks reads the chunk states in place.
    dA = (dt * A.to(cdtype)).reshape(b, c, q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, q) log decay per step
    a_cum = dA.cumsum(dim=-1)
    X = (xs * dt.unsqueeze(-1)).reshape(b, c, q, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()  # (b,g,r,c,q,p)
    Bc = Bs.reshape(b, c, q, g, n).permute(0, 3, 1, 2, 4).contiguous()  # (b, g, c, q, n)
    Cc = Cs.reshape(b, c, q, g, n).permute(0, 3, 1, 2, 4).contiguous()

    # 1) Intra-chunk (diagonal blocks): y_i = sum_{j<=i} (C_i . B_j) exp(a_cum_i - a_cum_j) x_j
    CB = Cc @ Bc.transpose(-1, -2)  # (b, g, c, q_i, q_j), shared by the heads of a group
    y_diag = (CB.unsqueeze(2) * _causal_decay(a_cum)) @ X  # (b, g, r, c, q, p)

    # 2)-4) below put each per-head decay on the narrower operand (see decays_on_b_and_c).
    decay_on_bc = decays_on_b_and_c(p, n)
    to_end = _exp_decay(a_cum[..., -1:] - a_cum).unsqueeze(-1)  # (b, g, r, c, q, 1)
    from_start = _exp_decay(a_cum).unsqueeze(-1)

    # 2) State contributed by each chunk, as of the chunk's end: sum_j exp(a_end - a_cum_j) x_j B_j^T.
    if decay_on_bc:
        chunk_states = X.transpose(-1, -2) @ (Bc.unsqueeze(2) * to_end)  # (b, g, r, c, p, n)
    else:
        chunk_states = (X * to_end).transpose(-1, -2) @ _per_head(Bc, r)

    # 3) Recurrence over chunks: state entering chunk k = sum_{m<k} exp(sum of chunk decays) state_m.
    entering, final = _states_over_chunks(chunk_states, a_cum[..., -1], initial_states)

    # 4) Contribution of the entering state to every position of the chunk, exp(a_cum_i) C_i . state, added to the
    # intra-chunk part (by the matrix product itself when the decay is on C).
    entering_t = entering.transpose(-1, -2)  # (b, g, r, c, n, p)
    if decay_on_bc:
        C_from_start = Cc.unsqueeze(2) * from_start  # (b, g, r, c, q, n)
        y = torch.baddbmm(y_diag.view(-1, q, p), C_from_start.view(-1, q, n), entering_t.reshape(-1, n, p))
        y = y.view(b, g, r, c, q, p)
    else:
        y = torch.addcmul(y_diag, _per_head(Cc, r) @ entering_t, from_start)

    y = _ContiguousGrad.apply(y).permute(0, 3, 4, 1, 2, 5).reshape(b, L, h, p)[:, :l]
    if D is not None:
        Dd = D.to(cdtype)
        y = torch.addcmul(y, xs[:, :l], Dd.unsqueeze(-1) if Dd.dim() == 1 else Dd)
    if z is not None:
        y = y * F.silu(z.to(cdtype))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final.reshape(b, h, p, n)
    return y


def cpu_chunk_size(headdim: int, d_state: int) -> int:
    """The torch scan's chunk length on the CPU: the power of two at or below sqrt(headdim * d_state), at least 16.
    It balances the intra-chunk work (chunk x chunk decay matrices per head) against the per-chunk state work
    (headdim x d_state per head); measured fastest on 2 cores for the shapes of ``benchmarks/ssd_scan.py`` and the
    demo (forward and backward)."""
    return max(16, 1 << int(math.log2(math.sqrt(headdim * d_state))))


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
    """SSD chunked scan: ``mamba_ssm``'s Triton kernel on CUDA when installed; on the CPU, where no gradient is wanted,
    the compiled recurrence of ``native`` (when built); else :func:`ssd_chunk_scan_torch` (at ``chunk_size`` on CUDA,
    at :func:`cpu_chunk_size` on the CPU)."""
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
    if native.usable(x, dt, A, B, C, D, z, dt_bias, initial_states):
        return native.ssd_scan_forward(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states
        )
    if not x.is_cuda:
        chunk_size = cpu_chunk_size(x.shape[-1], B.shape[-1])
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


def conv_ssd_scan(
    xBC: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    dt: torch.Tensor,
    A: torch.Tensor,
    headdim: int,
    d_state: int,
    ngroups: int,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    keep: Optional[torch.Tensor] = None,
):
    """The Mamba-2 mixer's causal conv with silu over ``xBC`` (batch, seqlen, [x | B | C] channels; conv_weight
    (channels, width)), then the SSD scan of its x, B and C (dt (batch, seqlen, nheads) before softplus; ``keep``
    (batch, seqlen), or None: the conv's output is zeroed where it is False). On the CPU where no gradient is wanted
    (and ``keep`` is None) the compiled kernel of ``native`` runs both, the conv a block of time steps at a time
    inside the scan; else :func:`ops.conv1d.causal_conv1d` and :func:`ssd_chunk_scan`. Returns y (batch, seqlen,
    nheads, headdim) [and the final states]."""
    from megatron_elastic.ops.conv1d import causal_conv1d

    batch, seq, channels = xBC.shape
    d_inner, bc = channels - 2 * ngroups * d_state, ngroups * d_state
    x, B, C = torch.split(xBC, [d_inner, bc, bc], dim=-1)
    nheads = d_inner // headdim
    shapes = ((batch, seq, nheads, headdim), (batch, seq, ngroups, d_state))
    zs = None if z is None else z.reshape(*shapes[0])
    kw = dict(D=D, z=zs, dt_bias=dt_bias, dt_softplus=True, return_final_states=return_final_states)
    if keep is None and native.usable(xBC, conv_weight, conv_bias, dt, A, D, z, dt_bias):
        ins = (x.reshape(shapes[0]), B.reshape(shapes[1]), C.reshape(shapes[1]))
        return native.ssd_scan_forward(ins[0], dt, A, *ins[1:], conv=(conv_weight, conv_bias), **kw)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv_weight, conv_bias, activation="silu").transpose(1, 2)
    if keep is not None:
        xBC = xBC * keep[..., None].to(xBC.dtype)
    x, B, C = torch.split(xBC, [d_inner, bc, bc], dim=-1)
    return ssd_chunk_scan(x.reshape(shapes[0]), dt, A, B.reshape(shapes[1]), C.reshape(shapes[1]), chunk_size, **kw)
