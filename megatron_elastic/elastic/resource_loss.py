"""The resource loss (Nemotron Elastic §Router): the router's expected cost under its soft choice probabilities,
differentiable, against the budget's target. Every cost kind (``elastic.cost``) is multilinear in independent per-axis
choices, so its expectation is the cost at the expected sizes (and the kept-layer probabilities); at a hard choice it
equals ``cost.of(arch)`` exactly."""

from __future__ import annotations

from typing import Dict

import torch

from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.space import AXIS_FIELD
from megatron_elastic.model.config import LAYER_FIELDS


def expected_cost(router: Router, probs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The router's cost kind (parameters by default), differentiable, under per-axis choice probabilities
    ``probs`` (``[segments, choices]`` each, rows summing to 1); equals ``cost.of(arch)`` when every row is
    one-hot."""
    cfg = router.config
    dev = next(router.parameters()).device
    val = lambda axis: (probs[axis] * torch.tensor(router.choices[axis], dtype=probs[axis].dtype, device=dev)).sum(-1)
    h = val("hidden")[0] if "hidden" in probs else torch.tensor(float(cfg.hidden_size), device=dev)
    n = len(cfg.hybrid_pattern)
    if "depth" in probs:
        p = probs["depth"][0]
        rank_pos = {layer: r for r, layer in enumerate(router.space.depth_ranking)}
        keep = torch.stack(
            [sum(p[c] for c, k in enumerate(router.space.num_layers) if rank_pos[l] < k) for l in range(n)]
        )
    else:
        keep = torch.ones(n, device=dev)

    def per_layer(axis, full):
        if axis not in probs:
            return lambda layer: torch.tensor(float(full), device=dev)
        v = val(axis)
        segs = router.segments[axis]
        return lambda layer: v[0] if segs == [-1] else v[segs.index(layer)]

    expected = {AXIS_FIELD[a]: per_layer(a, getattr(cfg, AXIS_FIELD[a])) for a in AXIS_FIELD}
    total = router.cost.non_layer(cfg, h)
    for i, sym in enumerate(cfg.hybrid_pattern):
        layer_sizes = {field: expected[field](i) for field in LAYER_FIELDS[sym]}
        total = total + keep[i] * router.cost.layer(cfg, sym, h, layer_sizes)
    return total


def resource_loss(expected: torch.Tensor, target: float) -> torch.Tensor:
    """Relative distance of the expected cost from the budget's target (|E[cost]/target - 1|)."""
    return (expected / target - 1.0).abs()
