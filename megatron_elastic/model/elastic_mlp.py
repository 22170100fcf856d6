"""Elastic MLP: the first k FFN neurons (per layer), gated or not, with sliced weights.

Megatron's own ``MLP`` is kept (so ``TransformerLayer`` builds it with its process groups); only its two
linears are elastic, and :func:`set_mlp_elastic` configures them.
"""

from __future__ import annotations

from typing import Optional

import torch


def set_mlp_elastic(mlp, hidden_size: int, ffn_hidden_size: int, gate: Optional[torch.Tensor] = None) -> None:
    """Make ``mlp`` (a Megatron MLP with elastic ``linear_fc1``/``linear_fc2``) use its first
    ``ffn_hidden_size`` neurons (global; split over TP) and ``hidden_size`` output channels. For a gated MLP
    the local ``linear_fc1`` rows are ``[gate | up]`` and both halves keep their first neurons."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    fc2.active_output_size = None if hidden_size == mlp.config.hidden_size else hidden_size
    fc2.output_gate = gate
    full_local = fc2.weight.shape[1]
    active_local = ffn_hidden_size // (mlp.config.ffn_hidden_size // full_local)  # TP splits the FFN
    if active_local == full_local:
        fc1.active_rows = fc2.active_cols = None
        return
    rows = torch.arange(active_local, device=fc2.weight.device)
    fc1.active_rows = torch.cat([rows, full_local + rows]) if mlp.config.gated_linear_unit else rows
    fc2.active_cols = rows
