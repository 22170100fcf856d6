"""Elastic MLP: the first k FFN neurons (per layer), gated or not, with sliced weights.

Megatron's own ``MLP`` is kept (so ``TransformerLayer`` builds it with its process groups); only its two
linears are elastic, and :func:`set_mlp_elastic` configures them.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_elastic.model.elastic_layers import as_index


def ffn_local_index(ffn_hidden_size: int, ffn_groups: int, active: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Local neuron indices (into this TP rank's shard) of the nested choice ``active``.

    The FFN axis has ``ffn_groups`` contiguous groups and every group keeps its first ``active/ffn_groups``
    neurons, so the choice means the same neurons at every TP size. With ``ffn_groups`` a multiple of the TP
    size each rank keeps the same number (balanced); with ``ffn_groups=1`` the choice is a plain prefix and
    the first ranks do more of the work.
    """
    group, shard = ffn_hidden_size // ffn_groups, ffn_hidden_size // tp_size
    kept = (torch.arange(ffn_groups)[:, None] * group + torch.arange(active // ffn_groups)[None, :]).flatten()
    lo = tp_rank * shard
    return kept[(kept >= lo) & (kept < lo + shard)] - lo


def set_mlp_elastic(mlp, hidden_size: int, ffn_hidden_size: int, gate: Optional[torch.Tensor] = None) -> None:
    """Make ``mlp`` (a Megatron MLP with elastic ``linear_fc1``/``linear_fc2``) use the nested choice of
    ``ffn_hidden_size`` neurons (see :func:`ffn_local_index`) and ``hidden_size`` output channels. For a gated
    MLP the local ``linear_fc1`` rows are ``[gate | up]`` and both halves keep the same neurons."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    fc2.active_output_size = None if hidden_size == mlp.config.hidden_size else hidden_size
    fc2.output_gate = gate
    full_local = fc2.weight.shape[1]
    if ffn_hidden_size == mlp.config.ffn_hidden_size:
        fc1.active_rows = fc2.active_cols = None
        return
    tp_size = mlp.config.ffn_hidden_size // full_local
    rows = ffn_local_index(
        mlp.config.ffn_hidden_size,
        mlp.config.elastic_ffn_groups,
        ffn_hidden_size,
        tp_size,
        fc2.tp_group.rank() if tp_size > 1 else 0,
    ).to(fc2.weight.device)
    fc1.active_rows = as_index(torch.cat([rows, full_local + rows]) if mlp.config.gated_linear_unit else rows)
    fc2.active_cols = as_index(rows)
