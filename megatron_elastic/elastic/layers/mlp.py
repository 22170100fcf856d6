"""Elastic MLP: the first k FFN neurons (per layer), gated or not, with sliced weights.

Megatron's own ``MLP`` is kept (so ``TransformerLayer`` builds it with its process groups); only its two
linears are elastic, and :func:`set_mlp_elastic` configures them.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_elastic.elastic.layers.linear import as_index
from megatron_elastic.model.layouts import FFNLayout


def set_mlp_elastic(mlp, hidden_size: int, ffn_hidden_size: int, gate: Optional[torch.Tensor] = None) -> None:
    """Make ``mlp`` (a Megatron MLP with elastic ``linear_fc1``/``linear_fc2``) use the nested choice of
    ``ffn_hidden_size`` neurons (``FFNLayout.local_neurons``: the same neurons at every TP size) and
    ``hidden_size`` output channels. For a gated MLP the local ``linear_fc1`` rows are ``[gate | up]`` and both
    halves keep the same neurons."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    fc2.active_output_size = None if hidden_size == mlp.config.hidden_size else hidden_size
    fc2.output_gate = gate
    full_local = fc2.weight.shape[1]
    if ffn_hidden_size == mlp.config.ffn_hidden_size:
        fc1.active_rows = fc2.active_cols = None
        return
    tp_size = mlp.config.ffn_hidden_size // full_local
    layout = FFNLayout.of_config(mlp.config)
    rank = fc2.tp_group.rank() if tp_size > 1 else 0
    rows = layout.local_neurons(ffn_hidden_size, tp_size, rank).to(fc2.weight.device)
    fc1.active_rows = as_index(layout.fc1_rows(rows, fc1_half=full_local))
    fc2.active_cols = as_index(rows)
