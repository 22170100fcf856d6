"""Elastic Mamba-2 mixer: runs any group-aware nested choice of heads and head channels with sliced weights."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_elastic.model.mamba_mixer import MambaMixer, MixerView


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
        local = self.layout  # this TP rank's sizes: every rank keeps the same heads of each of its groups
        heads = local.nested_heads(nheads // self.ngroups * self.ngroups_local_tp).to(dev)
        head_channels = torch.arange(headdim, device=dev)
        ch = local.channels(heads, head_channels)
        self.in_proj.active_rows = local.in_proj_rows(heads, head_channels)
        self.out_proj.active_cols = ch
        conv = local.conv_channels(heads, head_channels)
        self._active = (heads, ch, conv, heads.numel(), headdim, heads.numel() // self.ngroups_local_tp * headdim)

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
