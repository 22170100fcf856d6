"""Causal depthwise 1-D convolution (the Mamba-2 short conv over ``[x | B | C]``).

``y[b, d, t] = act(bias[d] + sum_{k<w} weight[d, k] * x[b, d, t - (w - 1) + k])`` with zeros before t=0.
``causal_conv1d_fn`` from the ``causal_conv1d`` package on CUDA when installed, else time-shifted multiply-adds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn

    HAVE_CAUSAL_CONV1D = True
except ImportError:  # pragma: no cover - depends on the machine
    _causal_conv1d_fn = None
    HAVE_CAUSAL_CONV1D = False

_ACTIVATIONS = (None, "silu", "swish")


class _CausalConv(torch.autograd.Function):
    """The time-shifted multiply-adds with a hand-written backward: autograd's own graph of the forward (a slice,
    a broadcast multiply and a sum per tap) zero-fills and copies a full-size gradient per tap and reduces the
    weight gradient through broadcast multiplies; here the input gradient is the same shifted multiply-adds run
    backwards in time and the weight gradient one dot product per tap."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        width, seqlen = weight.shape[1], x.shape[-1]
        xs = F.pad(x.transpose(1, 2), (0, 0, width - 1, 0))  # (batch, width - 1 + seqlen, dim), zeros before t = 0
        w = weight.t()  # (width, dim)
        last = xs[:, width - 1 :]
        y = last * w[width - 1] if bias is None else torch.addcmul(bias, last, w[width - 1])
        for k in range(width - 1):
            y.addcmul_(xs[:, k : k + seqlen], w[k])
        ctx.save_for_backward(xs, weight, y if silu else None)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return (F.silu(y) if silu else y).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        xs, weight, pre_activation = ctx.saved_tensors
        width = weight.shape[1]
        g = grad_out.transpose(1, 2).contiguous()  # (batch, seqlen, dim)
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, pre_activation)
        seqlen = g.shape[1]
        w = weight.t()
        # x[s] fed output s + (width - 1) - k through tap k: dx[s] = sum_k w[k] g[s + width - 1 - k]
        gp = F.pad(g, (0, 0, 0, width - 1))
        grad_x = gp[:, width - 1 :] * w[0]
        for k in range(1, width):
            grad_x.addcmul_(gp[:, width - 1 - k : width - 1 - k + seqlen], w[k])
        grad_w = torch.stack([(xs[:, k : k + seqlen] * g).sum((0, 1)) for k in range(width)], dim=1)
        grad_b = g.sum((0, 1)) if ctx.has_bias else None
        return grad_x.transpose(1, 2), grad_w, grad_b, None


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = "silu"
) -> torch.Tensor:
    """x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,). Returns (batch, dim, seqlen).

    Computed as ``width`` multiply-adds of time-shifted slices of x in the (batch, seqlen, dim) layout, the mixer's:
    a transposed view of such a tensor is read without a transposed copy, and the result is a (batch, dim, seqlen)
    view of a contiguous (batch, seqlen, dim) tensor. The backward is written out (:class:`_CausalConv`)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return _CausalConv.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation is not None)


def causal_conv1d(x, weight, bias=None, activation="silu"):
    """Dispatching causal depthwise conv; same arguments as :func:`causal_conv1d_torch`."""
    if HAVE_CAUSAL_CONV1D and x.is_cuda:
        return _causal_conv1d_fn(x, weight, bias, activation)
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
