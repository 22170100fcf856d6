"""The router (Nemotron Elastic §Router): a small network per elastic axis that maps a target budget to a
choice on that axis, sampled with straight-through Gumbel-Softmax, plus the resource loss that pulls each
budget's (expected) cost onto its target: parameters (the paper's), deployment memory at a context length or FLOPs
per token (``model.cost``; a budget is a fraction of the parent's cost of the router's kind).

* Input: one-hot over the configured budgets; a budget fraction between two configured ones is a linear
  interpolation of their one-hots (an untrained, intermediate budget).
* Per axis: ``Linear(n_budgets, hidden) -> LeakyReLU -> Linear(hidden, n_segments * n_choices)``; an axis is
  heterogeneous when it has one segment per layer of its type (Mamba heads/channels, attention heads, FFN),
  otherwise one segment (hidden width, depth).
* Depth: the choice is how many layers to keep; the kept layers are the top of the importance ranking.
* ``sample``: hard one-hot per segment in the forward pass, straight-through gradients; the value of the chosen
  component is the gate (1.0 forward) handed to ``use_arch`` so the router's gradient flows through the model.
* Nesting: ``sample_nested`` draws every budget from the largest down, each smaller budget's Gumbel choice masked
  to the choices no larger than the next larger budget's draw, so every sampled set is nested and training samples
  exactly the family ``choose_all`` extracts (its noise-free limit).
* Any budget after training: ``choose_budgets`` gives an untrained budget between two trained ones from the
  interpolated budget input, bounded by its trained neighbours (so nested between them) and moved onto its
  target.
* ``expected_cost``: the cost under the soft choice probabilities. Every cost kind is multilinear in independent
  per-axis choices, so its expectation is the cost at the expected sizes (and the kept-layer probabilities); at a
  hard choice it equals ``cost.of(arch)`` exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.compat import ATTENTION, MAMBA, MLP
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import LAYER_FIELDS
from megatron_elastic.model.cost import PARAMETERS, Cost
from megatron_elastic.model.elastic_arch import AXIS_FIELD, AXIS_SYMBOL, ElasticArch

AXES = ("hidden", *AXIS_FIELD, "depth")


@dataclass
class RouterSample:
    """One Gumbel draw: the architecture, its straight-through gates, the per-axis probabilities (None for the
    full budget) and ``free_arch``, the argmax of the same noisy logits without the nesting mask."""

    arch: ElasticArch
    gates: Dict[str, torch.Tensor]
    probs: Optional[Dict[str, torch.Tensor]]
    free_arch: ElasticArch


@dataclass
class BudgetChoice:
    """A budget's architecture after training: ``trained`` budgets are the router's nested choices; an untrained
    one is nested between the choices of the trained budgets ``between`` (normally its neighbours; a neighbour
    that missed its own target past this one is replaced by the next; None: the space's smallest sub-model)."""

    arch: ElasticArch
    trained: bool
    between: Tuple[Optional[float], float]


@dataclass
class ElasticSpace:
    """The allowed sizes of every axis (ascending) and the depth ranking (most important first)."""

    hidden: List[int]
    mamba_heads: List[int]
    mamba_head_dim: List[int]
    attention_heads: List[int]
    ffn: List[int]
    num_layers: List[int]
    depth_ranking: List[int]
    heterogeneous: bool = True

    @classmethod
    def default(
        cls,
        config,
        fractions: Sequence[float] = (0.5, 0.625, 0.75, 0.875, 1.0),
        depth_fractions: Sequence[float] = (0.75, 0.875, 1.0),
        depth_ranking: Optional[List[int]] = None,
        heterogeneous: bool = True,
    ) -> "ElasticSpace":
        """Choices at ``fractions`` of every width axis (snapped to valid multiples) and ``depth_fractions`` of
        the layers; ``depth_ranking`` defaults to the layer order (pass the importance ranking)."""

        def snap(full, multiple):
            return sorted({max(multiple, min(full, int(round(full * f / multiple)) * multiple)) for f in fractions})

        n = len(config.hybrid_pattern)
        return cls(
            hidden=snap(config.hidden_size, 8 if config.hidden_size >= 64 else 1),
            mamba_heads=snap(config.mamba_num_heads, config.mamba_num_groups) if MAMBA in config.hybrid_pattern else [],
            mamba_head_dim=snap(config.mamba_head_dim, 1) if MAMBA in config.hybrid_pattern else [],
            attention_heads=snap(config.num_attention_heads, config.num_query_groups)
            if ATTENTION in config.hybrid_pattern
            else [],
            ffn=snap(config.ffn_hidden_size, config.elastic_ffn_groups) if MLP in config.hybrid_pattern else [],
            num_layers=sorted({max(1, min(n, int(round(n * f)))) for f in depth_fractions}),
            depth_ranking=list(depth_ranking) if depth_ranking is not None else list(range(n)),
            heterogeneous=heterogeneous,
        )

    def smallest_arch(self, config) -> ElasticArch:
        """Every axis at its smallest choice: the smallest sub-model this space reaches."""
        arch = ElasticArch.full(config)
        if self.hidden:
            arch.hidden_size = self.hidden[0]
        for field_name, choices in (
            ("mamba_num_heads", self.mamba_heads),
            ("mamba_head_dim", self.mamba_head_dim),
            ("num_attention_heads", self.attention_heads),
            ("ffn_hidden_size", self.ffn),
        ):
            if choices:
                d = getattr(arch, field_name)
                for k in d:
                    d[k] = choices[0]
        if self.num_layers:
            arch.skipped_layers = tuple(sorted(self.depth_ranking[self.num_layers[0] :]))
        return arch.validate(config)

    def layers_of(self, config, symbol: str) -> List[int]:
        return [i for i, s in enumerate(config.hybrid_pattern) if s == symbol]


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
        # What a budget bounds (``model.cost``): budgets are fractions of the parent's cost of this kind.
        self.cost = cost
        self.full_cost = float(cost.of(config, ElasticArch.full(config)))
        # A fixed-architecture run (the exact baseline): every budget below 1.0 is this sub-model, no search.
        self.fixed_arch = fixed_arch.validate(config) if fixed_arch is not None else None
        if sorted(self.budgets) != sorted(set(self.budgets)) or not all(0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets must be distinct fractions in (0, 1], got {budgets}")
        self.segments: Dict[str, List[int]] = {
            "hidden": [-1],
            **{axis: self._seg(symbol) for axis, symbol in AXIS_SYMBOL.items()},
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

    def _seg(self, symbol: str) -> List[int]:
        layers = self.space.layers_of(self.config, symbol)
        return layers if self.space.heterogeneous else ([-1] if layers else [])

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
                noisy = noisy.masked_fill(~self._allowed(axis, within, containing, noisy.device), float("-inf"))
            y = F.softmax(noisy / tau, dim=-1)
            probs[axis] = y
            idx = y.argmax(-1)
            onehot = F.one_hot(idx, y.shape[-1]).to(y.dtype)
            picks[axis] = (onehot - y.detach() + y) if hard else y
        arch = self._arch({a: p.argmax(-1) for a, p in picks.items()})
        return RouterSample(arch, self._gates(picks), probs, self._arch(free))

    def sample_nested(
        self,
        tau: float,
        scale: float,
        generator_of: Callable[[int], torch.Generator],
        only: Optional[float] = None,
        between: Optional[float] = None,
    ) -> Dict[float, "RouterSample"]:
        """Draw every budget from the largest down, each within the draw of the next larger one
        (``generator_of(budget_index)`` gives each budget its noise). ``between``, an untrained budget inside the
        trained range, is drawn last (noise index ``len(budgets)``) within its larger trained neighbour's draw and
        containing its smaller one's, so the whole set stays nested. With ``only``, keep the autograd graph for
        that budget alone (the other draws only bound it) and stop once it is drawn."""
        lo, hi = self.neighbours(between) if between is not None else (None, None)  # checked before any draw
        grad = torch.is_grad_enabled()
        out, prev = {}, None
        for b in sorted(self.budgets, reverse=True):
            with torch.set_grad_enabled(grad and only in (None, b)):
                s = out[b] = self.draw(b, tau, scale, generator=generator_of(self.budgets.index(b)), within=prev)
            prev = s.arch
            if b == only:
                return out
        if between is not None:
            with torch.set_grad_enabled(grad and only in (None, between)):
                out[between] = self.draw(
                    between,
                    tau,
                    scale,
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

    def _sizes(self, arch: ElasticArch, axis: str) -> List[int]:
        """``arch``'s size on ``axis`` in every segment of the router."""
        return [self._value_in(arch, axis, seg) for seg in self.segments[axis]]

    def _allowed(
        self, axis: str, within: Optional[ElasticArch], containing: Optional[ElasticArch] = None, device=None
    ) -> torch.Tensor:
        """``[segments, choices]``: True where the choice is no larger than ``within``'s size in that segment and
        no smaller than ``containing``'s (either may be None: no bound on that side)."""
        sizes = torch.tensor(self.choices[axis]).unsqueeze(0)
        allowed = torch.ones(len(self.segments[axis]), sizes.shape[1], dtype=torch.bool)
        if within is not None:
            allowed &= sizes <= torch.tensor(self._sizes(within, axis)).unsqueeze(1)
        if containing is not None:
            allowed &= sizes >= torch.tensor(self._sizes(containing, axis)).unsqueeze(1)
        return allowed.to(device)

    @torch.no_grad()
    def choose(
        self, budget: float, within: Optional[ElasticArch] = None, containing: Optional[ElasticArch] = None
    ) -> ElasticArch:
        """The deterministic (argmax) architecture for ``budget``, for evaluation and extraction. With
        ``within``, every segment's argmax is taken over the choices no larger than ``within``'s (so the
        result is nested inside it); with ``containing``, over the choices no smaller than its (so it nests in
        the result)."""
        if self.is_full(budget):
            return ElasticArch.full(self.config)
        if self.fixed_arch is not None:
            return self.fixed_arch
        return self._arch(self._bounded_argmax(self.logits(budget), within, containing))

    def _bounded_argmax(self, logits, within, containing) -> Dict[str, torch.Tensor]:
        return {
            axis: lg.masked_fill(~self._allowed(axis, within, containing, lg.device), float("-inf")).argmax(-1)
            for axis, lg in logits.items()
        }

    def choose_all(self) -> Dict[float, ElasticArch]:
        """``choose`` for every configured budget, largest first, each nested inside the next larger one: the
        noise-free limit of :meth:`sample_nested`, i.e. what training samples once the temperature is low."""
        out, prev = {}, None
        for b in sorted(self.budgets, reverse=True):
            prev = out[b] = self.choose(b, within=prev)
        return out

    @torch.no_grad()
    def choose_budgets(self, budgets: Sequence[float], tolerance: float = 0.01) -> Dict[float, "BudgetChoice"]:
        """The architecture of every fraction in ``budgets``: a trained budget's nested choice (``choose_all``), or
        for an untrained one between two trained budgets, the argmax of the router's logits at the interpolated
        budget input, bounded by the nearest trained sub-models around its target (normally its trained
        neighbours, so it nests between them) and then moved, one choice of one segment at a time, onto its
        target (``tolerance``, relative). Untrained budgets are each nested between the trained ones, not
        in one another: a coarse axis (hidden size) would otherwise leave some targets unreachable. Towards the full
        budget (which the router never sees) the logits of the largest trained budget below it rank the moves. A
        budget above 1 or below the smallest trained budget raises ``ConfigError``; a target the space's choices
        cannot reach within 2% warns."""
        trained = self.choose_all()
        trained.setdefault(1.0, ElasticArch.full(self.config))  # the whole elastic model, trained or not
        lo_all = min(self.budgets)
        for b in budgets:
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not lo_all <= b <= 1.0:
                raise ConfigError(
                    f"budget {b!r}: must be a fraction between the smallest trained budget {lo_all:g} and 1 (the "
                    f"router only interpolates between trained budgets {sorted(self.budgets)})"
                )
        full = self.full_cost
        count = lambda a: self.cost.of(self.config, a)
        ordered = sorted(trained)
        # The bounds of an untrained budget: the nearest of the trained choices (nested), the full model and the
        # space's smallest around its target (normally its trained neighbours).
        chain = [*trained.values(), self.space.smallest_arch(self.config)]
        out: Dict[float, BudgetChoice] = {}
        for b in sorted(set(float(x) for x in budgets), reverse=True):
            key = next((t for t in trained if abs(t - b) < 1e-9), None)
            if key is not None:
                out[b] = BudgetChoice(trained[key], key in self.budgets, (key, key))
                continue
            if self.fixed_arch is not None:
                raise ConfigError(
                    f"budget {b:g}: a fixed-architecture run has only its trained budgets {sorted(self.budgets)}"
                )
            lo = max(t for t in ordered if t < b)
            hi = min(t for t in ordered if t > b)
            target = b * full
            upper = min((a for a in chain if count(a) >= target), key=count)
            lower = max((a for a in chain if count(a) <= target), key=count, default=min(chain, key=count))
            # ``between``: the trained budgets whose choices bound it (None: the space's smallest sub-model)
            label = lambda arch: next((t for t, a in trained.items() if a == arch), None)
            between = (label(lower), label(upper))
            logits = self.logits(lo if self.is_full(hi) else b)
            # Three starts (the bounded argmax, the lower and the upper bound) walk to the target; a coarse axis (the
            # hidden size) may only be reachable from one side. Keep the closest; among those on target, the one the
            # router's logits prefer.
            starts = [
                self._bounded_argmax(logits, upper, lower),
                self._bounded_argmax(logits, lower, lower),
                self._bounded_argmax(logits, upper, upper),
            ]
            walks = [self._move_to_target(i, logits, upper, lower, target, tolerance) for i in starts]

            def rank(idx):
                miss = abs(count(self._arch(idx)) / target - 1)
                score = sum(
                    float(logits[a].gather(1, v.view(-1, 1).to(logits[a].device)).sum()) for a, v in idx.items()
                )
                return (max(miss - tolerance, 0.0), -score)

            arch = self._arch(min(walks, key=rank))
            got = count(arch) / full
            if abs(got / b - 1) > 0.02:
                warnings.warn(
                    f"budget {b:g}: the closest sub-model nested between its trained neighbours has {got:.3f} of the "
                    f"parent's parameters (the space's choices are too coarse here; add space.fractions)",
                    stacklevel=2,
                )
            out[b] = BudgetChoice(arch, False, between)
        return {b: out[float(b)] for b in budgets}

    def _move_to_target(self, idx, logits, upper, lower, target, tolerance):
        """Greedy: while the parameter count is off target by more than ``tolerance``, take the one-step move (one
        segment one choice smaller, or larger) inside [lower, upper] that brings the count closer at the least
        loss of logit per parameter moved; stop when no move gets closer."""
        position = lambda arch, axis: [self.choices[axis].index(v) for v in self._sizes(arch, axis)]
        bounds = {axis: (position(lower, axis), position(upper, axis)) for axis in idx}
        idx = {a: v.clone() for a, v in idx.items()}
        count = self.cost.of(self.config, self._arch(idx))
        while abs(count / target - 1) > tolerance:
            step = -1 if count > target else 1
            best = None
            for axis, v in idx.items():
                lo_b, hi_b = bounds[axis]
                for k in range(len(v)):
                    new = int(v[k]) + step
                    if not lo_b[k] <= new <= hi_b[k]:
                        continue
                    v[k] = new
                    moved = self.cost.of(self.config, self._arch(idx))
                    v[k] = new - step
                    if abs(moved - target) >= abs(count - target):
                        continue
                    cost = float(logits[axis][k, int(v[k])] - logits[axis][k, new]) / abs(moved - count)
                    if best is None or cost < best[0]:
                        best = (cost, axis, k, new, moved)
            if best is None:
                break
            _, axis, k, new, count = best
            idx[axis][k] = new
        return idx

    def _value_in(self, arch: ElasticArch, axis: str, seg: int) -> int:
        """The size ``arch`` has on ``axis`` in segment ``seg`` (a layer index, or -1 for all layers)."""
        if axis == "hidden":
            return arch.hidden_size
        if axis == "depth":
            return len(self.config.hybrid_pattern) - len(arch.skipped_layers)
        d = getattr(arch, AXIS_FIELD[axis])
        return min(d.values()) if seg == -1 else d[seg]

    def _arch(self, idx: Dict[str, torch.Tensor]) -> ElasticArch:
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

    def expected_cost(self, probs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The router's cost kind (parameters by default), differentiable, under per-axis choice probabilities
        ``probs`` (``[segments, choices]`` each, rows summing to 1); equals ``cost.of(arch)`` when every row is
        one-hot."""
        cfg = self.config
        dev = next(self.parameters()).device
        val = lambda axis: (probs[axis] * torch.tensor(self.choices[axis], dtype=probs[axis].dtype, device=dev)).sum(-1)
        h = val("hidden")[0] if "hidden" in probs else torch.tensor(float(cfg.hidden_size), device=dev)
        n = len(cfg.hybrid_pattern)
        if "depth" in probs:
            p = probs["depth"][0]
            rank_pos = {layer: r for r, layer in enumerate(self.space.depth_ranking)}
            keep = torch.stack(
                [sum(p[c] for c, k in enumerate(self.space.num_layers) if rank_pos[l] < k) for l in range(n)]
            )
        else:
            keep = torch.ones(n, device=dev)

        def per_layer(axis, full):
            if axis not in probs:
                return lambda layer: torch.tensor(float(full), device=dev)
            v = val(axis)
            segs = self.segments[axis]
            return lambda layer: v[0] if segs == [-1] else v[segs.index(layer)]

        expected = {AXIS_FIELD[a]: per_layer(a, getattr(cfg, AXIS_FIELD[a])) for a in AXIS_FIELD}
        total = self.cost.non_layer(cfg, h)
        for i, sym in enumerate(cfg.hybrid_pattern):
            layer_sizes = {field: expected[field](i) for field in LAYER_FIELDS[sym]}
            total = total + keep[i] * self.cost.layer(cfg, sym, h, layer_sizes)
        return total


def resource_loss(expected: torch.Tensor, target: float) -> torch.Tensor:
    """Relative distance of the expected cost from the budget's target (|E[cost]/target - 1|)."""
    return (expected / target - 1.0).abs()
