"""Elastic Mamba-2 mixer: runs any group-aware nested choice of heads and head channels with sliced weights."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_elastic.model.mamba_mixer import MambaMixer, MixerView


def mamba_head_index(nheads_local: int, ngroups_local: int, heads_per_group: int) -> torch.Tensor:
    """Local head indices kept when every B/C group keeps its first ``heads_per_group`` heads.
    Heads of a group are contiguous (head h belongs to group h // (nheads/ngroups))."""
    r = nheads_local // ngroups_local
    return (torch.arange(ngroups_local)[:, None] * r + torch.arange(heads_per_group)[None, :]).flatten()


def head_channel_index(heads: torch.Tensor, headdim: int, active_headdim: int) -> torch.Tensor:
    """Channel indices (into ``nheads*headdim``) of the first ``active_headdim`` channels of ``heads``."""
    return (heads[:, None] * headdim + torch.arange(active_headdim)[None, :]).flatten()


class ElasticMambaMixer(MambaMixer):
    """``MambaMixer`` whose active heads (per group) and head channels are set by :meth:`set_elastic`.

    ``in_proj`` rows ``[z|x|B|C|dt]``, conv1d channels ``[x|B|C]``, ``dt_bias``/``A_log``/``D``, the gated
    norm (its groups fixed, each group narrower) and ``out_proj`` columns are sliced consistently; B and C
    are never sliced. ``in_proj``/``out_proj`` must be the elastic linear layers.
    """

    _active: Optional[tuple] = None

    def set_elastic(self, hidden_size: int, nheads: int, headdim: int, gate: Optional[torch.Tensor] = None) -> None:
        """Choose ``nheads`` (global, a multiple of ngroups) and ``headdim`` for the next forward passes."""
        self.out_proj.output_gate = gate
        self.out_proj.active_output_size = None if hidden_size == self.d_model else hidden_size
        if nheads == self.nheads and headdim == self.headdim:
            self._active = None
            self.in_proj.active_rows = None
            self.out_proj.active_cols = None
            return
        dev = self.dt_bias.device
        k = nheads // self.ngroups
        heads = mamba_head_index(self.nheads_local_tp, self.ngroups_local_tp, k).to(dev)
        ch = head_channel_index(heads, self.headdim, headdim)
        dl, bc = self.d_inner_local_tp, self.ngroups_local_tp * self.d_state
        bc_rows = torch.arange(2 * bc, device=dev)
        self.in_proj.active_rows = torch.cat([ch, dl + ch, 2 * dl + bc_rows, 2 * dl + 2 * bc + heads])
        self.out_proj.active_cols = ch
        self._active = (heads, ch, torch.cat([ch, dl + bc_rows]), k * self.ngroups_local_tp, headdim, k * headdim)

    def active_view(self) -> MixerView:
        if self._active is None:
            return self.full_view()
        heads, ch, conv_idx, nheads_local, headdim, group_size = self._active
        conv_b = self.conv1d.bias[conv_idx] if self.conv1d.bias is not None else None
        return MixerView(
            nheads_local,
            headdim,
            self.conv1d.weight.squeeze(1)[conv_idx],
            conv_b,
            self.dt_bias[heads],
            self.A_log[heads],
            self.D[ch] if self.D_has_hdim else self.D[heads],
            self.norm.weight[ch] if self.rmsnorm else None,
            group_size,
        )

    def current_view(self) -> MixerView:
        return self.active_view()
