"""The router (Nemotron Elastic §Router): a small network per elastic axis that maps a target budget to a
choice on that axis, sampled with straight-through Gumbel-Softmax, plus the resource loss that pulls each
budget's (expected) cost onto its target: parameters (the paper's), deployment memory at a context length or FLOPs
per token (``elastic.cost``; a budget is a fraction of the parent's cost of the router's kind).

* Input: one-hot over the configured budgets; a budget fraction between two configured ones is a linear
  interpolation of their one-hots (an untrained, intermediate budget).
* Per axis: ``Linear(n_budgets, hidden) -> LeakyReLU -> Linear(hidden, n_segments * n_choices)``; an axis is
  heterogeneous when it has one segment per layer of its type (Mamba heads/channels, attention heads, FFN),
  otherwise one segment (hidden width, depth).
* Depth: the choice is how many layers to keep; the kept layers are the top of the importance ranking.
* ``sample``: hard one-hot per segment in the forward pass, straight-through gradients; the value of the chosen
  component is the gate (1.0 forward) handed to ``use_arch`` so the router's gradient flows through the model.
  With ``hard=False`` (``router.mask_mode: scaled``, the paper's Mode 1, Eq. 50) the gate is the chosen
  component's probability itself, forward and back; the chosen architecture is the same.
* Nesting: ``sample_nested`` draws every budget from the largest down, each smaller budget's Gumbel choice masked
  to the choices no larger than the next larger budget's draw, so every sampled set is nested and training samples
  exactly the family ``choose.choose_all`` extracts (its noise-free limit).

After training, ``choose.py`` picks every budget's sub-model (trained or not); ``resource_loss.py`` holds the
expected cost the router is trained against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.elastic.arch import AXIS_FIELD, AXIS_SYMBOL, ElasticArch
from megatron_elastic.elastic.cost import PARAMETERS, Cost
from megatron_elastic.elastic.space import AXES, ElasticSpace
from megatron_elastic.errors import ConfigError


@dataclass
class RouterSample:
    """One Gumbel draw: the architecture, its straight-through gates, the per-axis probabilities (None for the
    full budget) and ``free_arch``, the argmax of the same noisy logits without the nesting mask."""

    arch: ElasticArch
    gates: Dict[str, torch.Tensor]
    probs: Optional[Dict[str, torch.Tensor]]
    free_arch: ElasticArch


class Router(nn.Module):
    """Budget -> per-axis choice logits. ``budgets`` are fractions of the parent's cost (``cost``, parameters by
    default), e.g. (1, .75, .5)."""

    def __init__(
        self,
        config,
        space: ElasticSpace,
        budgets: Sequence[float],
        hidden: int = 256,
        fixed_arch: Optional[ElasticArch] = None,
        cost: Cost = PARAMETERS,
    ):
        super().__init__()
        self.config, self.space, self.budgets = config, space, [float(b) for b in budgets]
        # What a budget bounds (``elastic.cost``): budgets are fractions of the parent's cost of this kind.
        self.cost = cost
        self.full_cost = float(cost.of(config, ElasticArch.full(config)))
        # A fixed-architecture run (the exact baseline): every budget below 1.0 is this sub-model, no search.
        self.fixed_arch = fixed_arch.validate(config) if fixed_arch is not None else None
        if sorted(self.budgets) != sorted(set(self.budgets)) or not all(0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets must be distinct fractions in (0, 1], got {budgets}")
        self.segments: Dict[str, List[int]] = {
            "hidden": [-1],
            **{axis: self._seg(axis, symbol) for axis, symbol in AXIS_SYMBOL.items()},
            "depth": [-1],
        }
        self.choices = {"hidden": space.hidden, **{a: getattr(space, a) for a in AXIS_FIELD}, "depth": space.num_layers}
        self.nets = nn.ModuleDict(
            {
                axis: nn.Sequential(
                    nn.Linear(len(self.budgets), hidden),
                    nn.LeakyReLU(),
                    nn.Linear(hidden, len(self.segments[axis]) * len(self.choices[axis])),
                )
                for axis in AXES
                if self.choices[axis] and self.segments[axis]
            }
        )

    def _seg(self, axis: str, symbol: str) -> List[int]:
        layers = self.space.layers_of(self.config, symbol)
        return layers if self.space.per_layer(axis) else ([-1] if layers else [])

    @staticmethod
    def is_full(budget: float) -> bool:
        """A budget of 1.0 is the parent itself (every smaller choice has fewer parameters): the router is
        bypassed for it, ``sample`` returns the full architecture, no gates and no probabilities."""
        return budget >= 1.0

    def budget_input(self, budget: float) -> torch.Tensor:
        """One-hot of a configured budget, or the interpolation between the two nearest ones."""
        b = sorted(self.budgets)
        if not b[0] <= budget <= b[-1]:
            raise ConfigError(f"budget {budget} is outside the configured range [{b[0]}, {b[-1]}]")
        x = torch.zeros(len(self.budgets))
        for lo, hi in zip(b, b[1:] + [b[-1]]):
            if lo <= budget <= hi:
                w = 0.0 if hi == lo else (budget - lo) / (hi - lo)
                x[self.budgets.index(lo)] += 1 - w
                x[self.budgets.index(hi)] += w
                return x
        x[self.budgets.index(budget)] = 1.0
        return x

    def logits(self, budget: float, scale: float = 1.0) -> Dict[str, torch.Tensor]:
        """Per axis: logits ``[segments, choices]``, multiplied by the router-logit ``scale``."""
        w = next(self.parameters())
        x = self.budget_input(budget).to(device=w.device, dtype=w.dtype)
        return {axis: scale * net(x).view(len(self.segments[axis]), -1) for axis, net in self.nets.items()}

    def sample(self, budget: float, *args, **kwargs):
        """Gumbel-Softmax sample (arguments as :meth:`draw`). Returns (arch, gates for ``use_arch``, per-axis soft
        probabilities; None for the full budget)."""
        s = self.draw(budget, *args, **kwargs)
        return s.arch, s.gates, s.probs

    def draw(
        self,
        budget: float,
        tau: float = 1.0,
        scale: float = 1.0,
        hard: bool = True,
        generator: Optional[torch.Generator] = None,
        within: Optional[ElasticArch] = None,
        containing: Optional[ElasticArch] = None,
    ) -> "RouterSample":
        """A straight-through Gumbel-Softmax draw at temperature ``tau`` of the logits times ``scale``. With
        ``within``, choices larger than ``within``'s are masked out before the softmax (the draw is nested inside
        it); with ``containing``, choices smaller than its (it nests in the draw). ``free_arch`` keeps the
        unmasked choice of the same noise for the nesting log. Pass the same ``generator`` state on every TP rank
        so all ranks draw the same architecture."""
        if self.is_full(budget) or self.fixed_arch is not None:
            arch = ElasticArch.full(self.config) if self.is_full(budget) else self.fixed_arch
            return RouterSample(arch, {}, None, arch)
        probs, picks, free = {}, {}, {}
        for axis, lg in self.logits(budget, scale).items():
            u = torch.rand(lg.shape, generator=generator).to(lg.device).clamp_(1e-10, 1 - 1e-10)
            noisy = lg - torch.log(-torch.log(u))
            free[axis] = noisy.detach().argmax(-1)
            if within is not None or containing is not None:
                noisy = noisy.masked_fill(~self.allowed(axis, within, containing, noisy.device), float("-inf"))
            y = F.softmax(noisy / tau, dim=-1)
            probs[axis] = y
            idx = y.argmax(-1)
            onehot = F.one_hot(idx, y.shape[-1]).to(y.dtype)
            picks[axis] = (onehot - y.detach() + y) if hard else y
        arch = self.arch_of({a: p.argmax(-1) for a, p in picks.items()})
        return RouterSample(arch, self._gates(picks), probs, self.arch_of(free))

    def sample_nested(
        self,
        tau: float,
        scale: float,
        generator_of: Callable[[int], torch.Generator],
        only: Optional[float] = None,
        between: Optional[float] = None,
        hard: bool = True,
    ) -> Dict[float, "RouterSample"]:
        """Draw every budget from the largest down, each within the draw of the next larger one
        (``generator_of(budget_index)`` gives each budget its noise). ``between``, an untrained budget inside the
        trained range, is drawn last (noise index ``len(budgets)``) within its larger trained neighbour's draw and
        containing its smaller one's, so the whole set stays nested. With ``only``, keep the autograd graph for
        that budget alone (the other draws only bound it) and stop once it is drawn. ``hard``: straight-through
        gates (1.0 forward), else the chosen probabilities (the paper's Mode 1); the architectures are the same."""
        lo, hi = self.neighbours(between) if between is not None else (None, None)  # checked before any draw
        grad = torch.is_grad_enabled()
        out, prev = {}, None
        for b in sorted(self.budgets, reverse=True):
            with torch.set_grad_enabled(grad and only in (None, b)):
                s = out[b] = self.draw(
                    b, tau, scale, hard=hard, generator=generator_of(self.budgets.index(b)), within=prev
                )
            prev = s.arch
            if b == only:
                return out
        if between is not None:
            with torch.set_grad_enabled(grad and only in (None, between)):
                out[between] = self.draw(
                    between,
                    tau,
                    scale,
                    hard=hard,
                    generator=generator_of(len(self.budgets)),
                    within=out[hi].arch,
                    containing=out[lo].arch,
                )
        return out

    def neighbours(self, budget: float) -> Tuple[float, float]:
        """The trained budgets just below and just above an untrained ``budget`` strictly inside their range."""
        lower = [b for b in self.budgets if b < budget]
        upper = [b for b in self.budgets if b > budget]
        if budget in self.budgets or not lower or not upper:
            raise ConfigError(
                f"budget {budget} is not strictly between two trained budgets {sorted(self.budgets)} (an untrained "
                f"budget to train in between)"
            )
        return max(lower), min(upper)

    def sizes(self, arch: ElasticArch, axis: str) -> List[int]:
        """``arch``'s size on ``axis`` in every segment of the router."""
        return [self.value_in(arch, axis, seg) for seg in self.segments[axis]]

    def allowed(
        self, axis: str, within: Optional[ElasticArch], containing: Optional[ElasticArch] = None, device=None
    ) -> torch.Tensor:
        """``[segments, choices]``: True where the choice is no larger than ``within``'s size in that segment and
        no smaller than ``containing``'s (either may be None: no bound on that side)."""
        sizes = torch.tensor(self.choices[axis]).unsqueeze(0)
        allowed = torch.ones(len(self.segments[axis]), sizes.shape[1], dtype=torch.bool)
        if within is not None:
            allowed &= sizes <= torch.tensor(self.sizes(within, axis)).unsqueeze(1)
        if containing is not None:
            allowed &= sizes >= torch.tensor(self.sizes(containing, axis)).unsqueeze(1)
        return allowed.to(device)

    def value_in(self, arch: ElasticArch, axis: str, seg: int) -> int:
        """The size ``arch`` has on ``axis`` in segment ``seg`` (a layer index, or -1 for all layers)."""
        if axis == "hidden":
            return arch.hidden_size
        if axis == "depth":
            return len(self.config.hybrid_pattern) - len(arch.skipped_layers)
        d = getattr(arch, AXIS_FIELD[axis])
        return min(d.values()) if seg == -1 else d[seg]

    def arch_of(self, idx: Dict[str, torch.Tensor]) -> ElasticArch:
        cfg, sp = self.config, self.space
        arch = ElasticArch.full(cfg)
        pick = lambda axis, seg: self.choices[axis][int(idx[axis][seg])]
        if "hidden" in idx:
            arch.hidden_size = pick("hidden", 0)
        for axis, field_name in AXIS_FIELD.items():
            if axis not in idx:
                continue
            d = getattr(arch, field_name)
            for k, layer in enumerate(self.segments[axis]):
                value = pick(axis, k)
                targets = list(d) if layer == -1 else [layer]
                for t in targets:
                    d[t] = value
        if "depth" in idx:
            keep = pick("depth", 0)
            arch.skipped_layers = tuple(sorted(sp.depth_ranking[keep:]))
        return arch.validate(cfg)

    def _gates(self, picks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The chosen component of each segment's straight-through one-hot (1.0 forward, router grads back).
        The depth gate scales every block (its layer kept or not is decided by the skipped layers)."""
        chosen = lambda y: (y * F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)).sum(-1)
        gates = {}
        for axis, y in picks.items():
            g = chosen(y)
            if axis == "hidden":
                gates["hidden"] = g[0]
            elif axis == "depth":
                gates.update({f"depth.{l}": g[0] for l in range(len(self.config.hybrid_pattern))})
            else:
                for k, layer in enumerate(self.segments[axis]):
                    layers = self.space.layers_of(self.config, AXIS_SYMBOL[axis]) if layer == -1 else [layer]
                    gates.update({f"{axis}.{l}": g[k] for l in layers})
        return gates
