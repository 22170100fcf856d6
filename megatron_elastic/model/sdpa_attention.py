"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``: Megatron's ``DotProductAttention``
without the ``s x s`` score and probability tensors.

``SDPAttention`` is a drop-in ``core_attention`` for Megatron's ``SelfAttention`` (same constructor, same
``forward(query, key, value, attention_mask, attn_mask_type, ...)`` on ``[s, b, heads, head_dim]`` tensors).
PyTorch picks the kernel: flash / cuDNN / memory-efficient attention on CUDA, the fused flash kernel on CPU;
memory grows linearly with the sequence. Grouped-query attention passes the un-repeated K/V heads
(``enable_gqa``), and the head counts are read from the tensors, so every elastic (sliced) head count runs on the
same kernels as the full parent.

Mask semantics follow Megatron's fused kernels (TransformerEngine): with ``attn_mask_type=causal`` the mask is
causal by construction and ``attention_mask`` is not read; with ``padding``/``no_mask`` a given boolean
``attention_mask`` (True = masked out, Megatron's convention) is applied. Features SDPA does not express
(sliding windows, softmax offsets, attention bias, packed sequences) run Megatron's own ``DotProductAttention``
path unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _bottom_right_causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """SDPA's boolean mask (True = attend) for ``sq`` queries that are the last ``sq`` of ``sk`` positions."""
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    return torch.arange(sk, device=device)[None, :] <= q_pos


class SDPAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` (same arguments, checks and state dict) computed by PyTorch's fused
    scaled-dot-product attention."""

    def _sdpa_applies(self, attention_bias, packed_seq_params) -> bool:
        window = getattr(self.scale_mask_softmax, "window_size", None)
        return attention_bias is None and packed_seq_params is None and self.softmax_offset is None and not window

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        if not self._sdpa_applies(attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params, **kwargs
            )
        sq, b, nq, hn = query.shape
        sk = key.shape[0]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask, is_causal = None, False
        if mask_type == AttnMaskType.causal and attention_mask is not None and attention_mask.shape[0] > 1:
            mask = ~attention_mask  # one mask per row, causality included (left-padded prompts: serving.decode)
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            elif sq > 1:
                mask = _bottom_right_causal_mask(sq, sk, q.device)
        elif attention_mask is not None:
            mask = ~attention_mask
        # The effective scale: Megatron divides softmax_scale by the layer number under
        # apply_query_key_layer_scaling and multiplies it back inside its softmax.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        # As Megatron: dropout under the model-parallel RNG stream unless the sequence is split over TP.
        forked = dropout and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=k.shape[1] != nq,
            )
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)
