"""Depth importance: normalized MSE of the logits when one layer is skipped (the paper's criterion),

    s_j = sum (logits_full - logits_without_j)^2 / sum logits_full^2,

over the calibration batches; a higher score means a more important layer. The iterative variant removes the
least important layer and re-scores the rest with it removed, until one layer remains.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.elastic_model import set_arch


def _tp_sum(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        for group, size in (
            (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()),
            (parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()),
        ):
            if size > 1:
                dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def _nmse(
    model, batches: Sequence, forward: Callable, removed: Tuple[int, ...], candidates: Sequence[int]
) -> torch.Tensor:
    """NMSE per candidate layer (with ``removed`` already skipped) vs the full model, summed over batches
    and reduced over TP (vocab shards) and DP."""
    config = model.config
    num = torch.zeros(len(candidates), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        set_arch(model, None)
        full = forward(model, batch).double()
        den += full.pow(2).sum()
        for k, j in enumerate(candidates):
            arch = ElasticArch.full(config)
            arch.skipped_layers = tuple(sorted(set(removed) | {j}))
            set_arch(model, arch)
            num[k] += (full - forward(model, batch).double()).pow(2).sum()
    set_arch(model, None)
    stacked = _tp_sum(torch.cat([num, den[None]]))
    return stacked[:-1] / stacked[-1]


def depth_scores(
    model, batches: Iterable, forward: Callable, iterative: bool = False, progress: Optional[Callable] = None
) -> Tuple[torch.Tensor, List[int]]:
    """Return (per-layer NMSE scores, ranking most-important-first). ``model`` is an elastic hybrid model
    (whole network, any TP); ``forward(model, batch)`` returns logits. In the iterative variant a layer's
    score is the NMSE at the moment it was removed."""
    batches = list(batches)
    n = len(model.config.hybrid_pattern)
    was_training = model.training
    model.eval()
    try:
        if not iterative:
            scores = _nmse(model, batches, forward, (), list(range(n)))
            ranking = torch.sort(-scores, stable=True).indices.tolist()
            return scores, ranking
        removed: List[int] = []
        scores = torch.zeros(n, dtype=torch.float64)
        steps = range(n - 1)
        for _ in progress(steps) if progress else steps:
            cands = [j for j in range(n) if j not in removed]
            s = _nmse(model, batches, forward, tuple(removed), cands)
            k = int(torch.argmin(s))
            scores[cands[k]] = s[k]
            removed.append(cands[k])
        last = next(j for j in range(n) if j not in removed)
        scores[last] = float("inf")
        return scores, [last] + removed[::-1]
    finally:
        set_arch(model, None)
        model.train(was_training)
