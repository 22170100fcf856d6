"""Elastic GQA self-attention: fewer query heads per KV group (all KV heads kept), sliced weights."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention


def qkv_row_index(groups_local: int, heads_per_group: int, active_per_group: int, head_dim: int) -> torch.Tensor:
    """Rows of Megatron's interleaved ``linear_qkv`` (per KV group: its query heads, then k, then v) kept when
    every group keeps its first ``active_per_group`` query heads."""
    block = (heads_per_group + 2) * head_dim
    per_group = torch.cat(
        [
            torch.arange(active_per_group * head_dim),
            torch.arange(heads_per_group * head_dim, (heads_per_group + 2) * head_dim),
        ]
    )
    return (torch.arange(groups_local)[:, None] * block + per_group[None, :]).flatten()


def proj_col_index(groups_local: int, heads_per_group: int, active_per_group: int, head_dim: int) -> torch.Tensor:
    """Columns of ``linear_proj`` (query heads in order) for the same choice."""
    heads = (torch.arange(groups_local)[:, None] * heads_per_group + torch.arange(active_per_group)[None, :]).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


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
        hpg = self.num_attention_heads_per_partition // groups_local
        k = num_attention_heads // self.config.num_query_groups
        hn = self.hidden_size_per_attention_head
        dev = self.linear_proj.weight.device
        self.linear_qkv.active_rows = qkv_row_index(groups_local, hpg, k, hn).to(dev)
        self.linear_proj.active_cols = proj_col_index(groups_local, hpg, k, hn).to(dev)
        self._active_heads_local = k * groups_local

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
