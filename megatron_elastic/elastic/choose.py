"""Choosing a budget's sub-model after training: the router's noise-free choices for the trained budgets (nested,
what training sampled at its final temperature), any untrained budget between two trained ones (zero-shot, walked
onto its target), budgets stated in any cost kind, and opening an elastic checkpoint with its router. ``extract``,
``evaluate``, ``generate`` and the elastic run's summary all choose here."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import Budget, format_cost, parse_budget, same_kind
from megatron_elastic.elastic.router import Router
from megatron_elastic.errors import ConfigError


@dataclass
class BudgetChoice:
    """A budget's architecture after training: ``trained`` budgets are the router's nested choices; an untrained
    one is nested between the choices of the trained budgets ``between`` (normally its neighbours; a neighbour
    that missed its own target past this one is replaced by the next; None: the space's smallest sub-model)."""

    arch: ElasticArch
    trained: bool
    between: Tuple[Optional[float], float]


@torch.no_grad()
def choose(
    router: Router, budget: float, within: Optional[ElasticArch] = None, containing: Optional[ElasticArch] = None
) -> ElasticArch:
    """The deterministic (argmax) architecture for ``budget``, for evaluation and extraction. With
    ``within``, every segment's argmax is taken over the choices no larger than ``within``'s (so the
    result is nested inside it); with ``containing``, over the choices no smaller than its (so it nests in
    the result)."""
    if router.is_full(budget):
        return ElasticArch.full(router.config)
    if router.fixed_arch is not None:
        return router.fixed_arch
    return router.arch_of(_bounded_argmax(router, router.logits(budget), within, containing))


def _bounded_argmax(router, logits, within, containing) -> Dict[str, torch.Tensor]:
    return {
        axis: lg.masked_fill(~router.allowed(axis, within, containing, lg.device), float("-inf")).argmax(-1)
        for axis, lg in logits.items()
    }


def choose_all(router) -> Dict[float, ElasticArch]:
    """``choose`` for every configured budget, largest first, each nested inside the next larger one: the
    noise-free limit of ``Router.sample_nested``, i.e. what training samples once the temperature is low."""
    out, prev = {}, None
    for b in sorted(router.budgets, reverse=True):
        prev = out[b] = choose(router, b, within=prev)
    return out


@torch.no_grad()
def choose_budgets(router, budgets: Sequence[float], tolerance: float = 0.01) -> Dict[float, "BudgetChoice"]:
    """The architecture of every fraction in ``budgets``: a trained budget's nested choice (``choose_all``), or
    for an untrained one between two trained budgets, the argmax of the router's logits at the interpolated
    budget input, bounded by the nearest trained sub-models around its target (normally its trained
    neighbours, so it nests between them) and then moved, one choice of one segment at a time, onto its
    target (``tolerance``, relative). Untrained budgets are each nested between the trained ones, not
    in one another: a coarse axis (hidden size) would otherwise leave some targets unreachable. Towards the full
    budget (which the router never sees) the logits of the largest trained budget below it rank the moves. A
    budget above 1 or below the smallest trained budget raises ``ConfigError``; a target the space's choices
    cannot reach within 2% warns."""
    trained = choose_all(router)
    trained.setdefault(1.0, ElasticArch.full(router.config))  # the whole elastic model, trained or not
    lo_all = min(router.budgets)
    for b in budgets:
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not lo_all <= b <= 1.0:
            raise ConfigError(
                f"budget {b!r}: must be a fraction between the smallest trained budget {lo_all:g} and 1 (the "
                f"router only interpolates between trained budgets {sorted(router.budgets)})"
            )
    full = router.full_cost
    count = lambda a: router.cost.of(router.config, a)
    ordered = sorted(trained)
    # The bounds of an untrained budget: the nearest of the trained choices (nested), the full model and the
    # space's smallest around its target (normally its trained neighbours).
    chain = [*trained.values(), router.space.smallest_arch(router.config)]
    out: Dict[float, BudgetChoice] = {}
    for b in sorted(set(float(x) for x in budgets), reverse=True):
        key = next((t for t in trained if abs(t - b) < 1e-9), None)
        if key is not None:
            out[b] = BudgetChoice(trained[key], key in router.budgets, (key, key))
            continue
        if router.fixed_arch is not None:
            raise ConfigError(
                f"budget {b:g}: a fixed-architecture run has only its trained budgets {sorted(router.budgets)}"
            )
        lo = max(t for t in ordered if t < b)
        hi = min(t for t in ordered if t > b)
        target = b * full
        upper = min((a for a in chain if count(a) >= target), key=count)
        lower = max((a for a in chain if count(a) <= target), key=count, default=min(chain, key=count))
        # ``between``: the trained budgets whose choices bound it (None: the space's smallest sub-model)
        label = lambda arch: next((t for t, a in trained.items() if a == arch), None)
        between = (label(lower), label(upper))
        logits = router.logits(lo if router.is_full(hi) else b)
        # Three starts (the bounded argmax, the lower and the upper bound) walk to the target; a coarse axis (the
        # hidden size) may only be reachable from one side. Keep the closest; among those on target, the one the
        # router's logits prefer.
        starts = [
            _bounded_argmax(router, logits, upper, lower),
            _bounded_argmax(router, logits, lower, lower),
            _bounded_argmax(router, logits, upper, upper),
        ]
        walks = [_move_to_target(router, i, logits, upper, lower, target, tolerance) for i in starts]

        def rank(idx):
            miss = abs(count(router.arch_of(idx)) / target - 1)
            score = sum(float(logits[a].gather(1, v.view(-1, 1).to(logits[a].device)).sum()) for a, v in idx.items())
            return (max(miss - tolerance, 0.0), -score)

        arch = router.arch_of(min(walks, key=rank))
        got = count(arch) / full
        if abs(got / b - 1) > 0.02:
            warnings.warn(
                f"budget {b:g}: the closest sub-model nested between its trained neighbours has {got:.3f} of the "
                f"parent's parameters (the space's choices are too coarse here; add space.fractions)",
                stacklevel=2,
            )
        out[b] = BudgetChoice(arch, False, between)
    return {b: out[float(b)] for b in budgets}


def _move_to_target(router, idx, logits, upper, lower, target, tolerance):
    """Greedy: while the parameter count is off target by more than ``tolerance``, take the one-step move (one
    segment one choice smaller, or larger) inside [lower, upper] that brings the count closer at the least
    loss of logit per parameter moved; stop when no move gets closer."""
    position = lambda arch, axis: [router.choices[axis].index(v) for v in router.sizes(arch, axis)]
    bounds = {axis: (position(lower, axis), position(upper, axis)) for axis in idx}
    idx = {a: v.clone() for a, v in idx.items()}
    count = router.cost.of(router.config, router.arch_of(idx))
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
                moved = router.cost.of(router.config, router.arch_of(idx))
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


def budget_archs(router: Optional[Router], budgets: List[str], where: str = "") -> Dict[str, BudgetChoice]:
    """Name -> the router's choice for each requested budget: ``all`` (every trained budget, nested), fractions
    (of the router's kind: parameters, or the memory/FLOPs its job was trained on), trained or not
    (:func:`choose_budgets`: an untrained one between its trained neighbours, zero-shot), or budgets stated in
    any kind (``elastic.budget``: ``6GiB@32768``, ``1.5GFLOP@4096``): one of the router's own kind is its fraction of
    the parent; another kind gets the largest sub-model the router gives whose cost of that kind is within it
    (:func:`fraction_within`). Bad values raise a one-line ``ConfigError``."""
    if router is None:
        raise ConfigError(f"{where} has no router (not an elastic-training checkpoint); pass --arch FILE.json")
    out = {}
    if "all" in budgets:
        out = {f"{b:g}": BudgetChoice(a, True, (b, b)) for b, a in choose_all(router).items()}
    named = {}
    for text in [b for b in budgets if b != "all"]:
        try:
            stated = parse_budget(text, router.config)
        except ConfigError as e:
            raise ConfigError(f"--budget: {e}, or 'all'") from None
        if stated.kind == "params":  # a bare fraction: of the router's own kind, as the job's budgets are
            named[_name(text, stated)] = stated.value
        elif same_kind(stated.cost, router.cost):
            named[_name(text, stated)] = stated.fraction(router.config)
        else:
            named[_name(text, stated)] = fraction_within(router, stated)
    choices = choose_budgets(router, sorted(set(named.values()), reverse=True))
    out.update({name: choices[f] for name, f in named.items() if name not in out})
    return out


def _name(text: str, stated: Budget) -> str:
    return f"{stated.value:g}" if stated.kind == "params" else str(text).strip()


def fraction_within(router: Router, stated: Budget, steps: int = 24) -> float:
    """The largest budget fraction of ``router``'s kind whose chosen sub-model costs at most ``stated`` in its own
    kind (bisection: a larger fraction's sub-model contains a smaller one's choices, so the cost grows with it);
    1.0 when the parent itself fits. A budget below the smallest trained sub-model's cost is a ``ConfigError``."""
    config, target = router.config, stated.target(router.config)
    cost_at = lambda f: float(stated.cost.of(config, choose_budgets(router, [f])[f].arch))
    lo, hi = min(router.budgets), 1.0
    if cost_at(hi) <= target:
        return hi
    smallest = cost_at(lo)
    if smallest > target:
        raise ConfigError(
            f"--budget {stated}: the smallest sub-model this router gives (budget {lo:g}) needs "
            f"{format_cost(smallest, stated.cost)}; state a larger budget"
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_at(mid) <= target else (lo, mid)
    return lo
