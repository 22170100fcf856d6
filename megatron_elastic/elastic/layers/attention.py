"""Elastic GQA self-attention: fewer query heads per KV group (all KV heads kept), sliced weights."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_elastic.model.layouts import QKVLayout


class ElasticSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` with the number of active query heads set by :meth:`set_elastic`.

    During a sliced forward the per-partition head counts Megatron reads are set to the active ones, so its
    own QKV split, GQA expansion and core attention run unchanged on the smaller tensors.
    """

    _active_heads_local: Optional[int] = None

    def set_elastic(self, hidden_size: int, num_attention_heads: int, gate: Optional[torch.Tensor] = None) -> None:
        self.linear_proj.output_gate = gate
        self.linear_proj.active_output_size = None if hidden_size == self.config.hidden_size else hidden_size
        if num_attention_heads == self.config.num_attention_heads:
            self._active_heads_local = None
            self.linear_qkv.active_rows = None
            self.linear_proj.active_cols = None
            return
        groups_local = self.num_query_groups_per_partition
        local = QKVLayout(
            groups_local, self.num_attention_heads_per_partition // groups_local, self.hidden_size_per_attention_head
        )  # this TP rank's KV groups and their heads
        heads = local.nested_heads(num_attention_heads // self.config.num_query_groups * groups_local)
        dev = self.linear_proj.weight.device
        self.linear_qkv.active_rows = local.qkv_rows(heads).to(dev)
        self.linear_proj.active_cols = local.proj_cols(heads).to(dev)
        self._active_heads_local = heads.numel()

    def forward(self, hidden_states, *args, **kwargs):
        if self._active_heads_local is None:
            return super().forward(hidden_states, *args, **kwargs)
        core = self.core_attention
        saved = (
            self.num_attention_heads_per_partition,
            core.num_attention_heads_per_partition,
            core.hidden_size_per_partition,
        )
        self.num_attention_heads_per_partition = core.num_attention_heads_per_partition = self._active_heads_local
        core.hidden_size_per_partition = self._active_heads_local * self.hidden_size_per_attention_head
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            (
                self.num_attention_heads_per_partition,
                core.num_attention_heads_per_partition,
                core.hidden_size_per_partition,
            ) = saved
