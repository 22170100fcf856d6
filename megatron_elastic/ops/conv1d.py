"""Causal depthwise 1-D convolution (the Mamba-2 short conv over ``[x | B | C]``).

``y[b, d, t] = act(bias[d] + sum_{k<w} weight[d, k] * x[b, d, t - (w - 1) + k])`` with zeros before t=0.
``causal_conv1d_fn`` from the ``causal_conv1d`` package on CUDA when installed, else time-shifted multiply-adds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_elastic.ops import native

try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn

    HAVE_CAUSAL_CONV1D = True
except ImportError:  # pragma: no cover - depends on the machine
    _causal_conv1d_fn = None
    HAVE_CAUSAL_CONV1D = False

_ACTIVATIONS = (None, "silu", "swish")


class _CausalConv(torch.autograd.Function):
    """The time-shifted multiply-adds, in blocks of time steps, with a written-out backward.

    Each block of time steps (``_blocks``: about 1 MiB of float32) is finished (bias, every tap, activation) while
    it is in cache, reading the input where it lies (a strided view of the mixer's packed input projection: no padded
    copy); a whole-tensor pass per tap streams the output through memory ``width`` times. The backward is the
    same shifted multiply-adds run backwards in time for the input gradient and one dot product per tap and block
    for the weight gradient (autograd's own graph of the forward zero-fills and copies a full-size gradient per
    tap)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool, for_backward: bool):
        xt = x.transpose(1, 2)  # (batch, seqlen, dim): the caller's layout, read in place
        batch, seqlen, dim = xt.shape
        width = weight.shape[1]
        w = weight.t().contiguous()  # (width, dim)
        pre = torch.empty(batch, seqlen, dim, dtype=x.dtype, device=x.device)
        keep_pre = silu and for_backward  # else the activation is applied in place
        out = torch.empty_like(pre) if keep_pre else pre
        for t0, t1 in _blocks(seqlen, batch * dim):
            block = pre[:, t0:t1]
            if bias is None:
                torch.mul(xt[:, t0:t1], w[width - 1], out=block)
            else:
                torch.addcmul(bias, xt[:, t0:t1], w[width - 1], out=block)
            for k in range(width - 1):
                shift = width - 1 - k  # y[t] += w[k] x[t - shift], zeros before t = 0
                start = max(t0, shift)
                if start < t1:
                    pre[:, start:t1].addcmul_(xt[:, start - shift : t1 - shift], w[k])
            if silu:
                torch.ops.aten.silu.out(block, out=out[:, t0:t1])
        ctx.save_for_backward(x, weight, pre if keep_pre else None)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, pre = ctx.saved_tensors
        xt, g = x.transpose(1, 2), grad_out.transpose(1, 2).contiguous()  # (batch, seqlen, dim)
        batch, seqlen, dim = xt.shape
        width = weight.shape[1]
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, pre)
        w = weight.t()
        grad_x = torch.empty(batch, seqlen, dim, dtype=g.dtype, device=g.device)
        grad_w = torch.zeros(width, dim, dtype=torch.float32 if g.dtype != torch.float64 else g.dtype, device=g.device)
        grad_b = torch.zeros(dim, dtype=grad_w.dtype, device=g.device) if ctx.has_bias else None
        for t0, t1 in _blocks(seqlen, batch * dim):
            # x[s] fed output s + shift through tap k = width - 1 - shift: dx[s] = sum_k w[k] g[s + width - 1 - k]
            torch.mul(g[:, t0:t1], w[width - 1], out=grad_x[:, t0:t1])
            for k in range(width - 1):
                shift = width - 1 - k
                end = min(t1, seqlen - shift)
                if end > t0:
                    grad_x[:, t0:end].addcmul_(g[:, t0 + shift : end + shift], w[k])
            # dw[k] = sum_t x[t - shift] g[t], over this block's outputs t
            for k in range(width):
                shift = width - 1 - k
                start = max(t0, shift)
                if start < t1:
                    grad_w[k] += (xt[:, start - shift : t1 - shift] * g[:, start:t1]).sum((0, 1))
            if grad_b is not None:
                grad_b += g[:, t0:t1].sum((0, 1))
        grad_w = grad_w.t().to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x.transpose(1, 2), grad_w, grad_b, None, None


def _blocks(seqlen: int, step_elements: int):
    """(start, end) time-step ranges of about ``_BLOCK_ELEMENTS`` elements (at least ``_MIN_BLOCK_STEPS`` steps, so
    the per-block calls stay few) covering seqlen. Any block length gives the same result."""
    steps = max(_MIN_BLOCK_STEPS, _BLOCK_ELEMENTS // max(1, step_elements))
    return [(t0, min(seqlen, t0 + steps)) for t0 in range(0, seqlen, steps)]


_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32 per block: stays in a core's L2 with the slices it reads
_MIN_BLOCK_STEPS = 16


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = "silu"
) -> torch.Tensor:
    """x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,). Returns (batch, dim, seqlen).

    Computed as ``width`` multiply-adds of time-shifted slices of x in the (batch, seqlen, dim) layout, the mixer's:
    a transposed view of such a tensor is read without a transposed copy, and the result is a (batch, dim, seqlen)
    view of a contiguous (batch, seqlen, dim) tensor. The backward is written out (:class:`_CausalConv`)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    # Whether a backward can follow: decided here, as forward runs with gradients off and ctx.needs_input_grad says
    # only which inputs require them, under torch.no_grad too.
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _CausalConv.apply(x, weight, bias, activation is not None, for_backward)


def causal_conv1d(x, weight, bias=None, activation="silu"):
    """Dispatching causal depthwise conv; same arguments as :func:`causal_conv1d_torch`: ``causal_conv1d``'s kernel on
    CUDA when installed; on the CPU, where no gradient is wanted, the compiled loop of ``native`` (when built)."""
    if HAVE_CAUSAL_CONV1D and x.is_cuda:
        return _causal_conv1d_fn(x, weight, bias, activation)
    if activation in _ACTIVATIONS and native.usable(x, weight, bias):
        return native.causal_conv1d_forward(x, weight, bias, silu=activation is not None)
    return causal_conv1d_torch(x, weight, bias, activation)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias=None, activation="silu"
) -> torch.Tensor:
    """One decoding step. x: (batch, dim); conv_state: (batch, dim, width) holding the last ``width``
    inputs, updated in place. Returns (batch, dim)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight.to(conv_state.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return F.silu(y) if activation is not None else y
