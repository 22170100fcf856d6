"""Router: valid nested choices, an exact differentiable parameter count, correct gradients, and a resource
loss that lands every budget on its target."""

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.choose import choose, choose_all, choose_budgets
from megatron_elastic.elastic.cost import arch_parameters
from megatron_elastic.elastic.resource_loss import expected_cost, resource_loss
from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.space import ElasticSpace
from tests.importance.test_permute import _cfg

BUDGETS = (1.0, 0.75, 0.5)


def _router(heterogeneous=True, seed=0):
    torch.manual_seed(seed)
    cfg = _cfg()
    space = ElasticSpace.default(cfg, depth_ranking=[0, 3, 1, 2, 4, 5], heterogeneous=heterogeneous)
    return cfg, Router(cfg, space, BUDGETS, hidden=32)


@pytest.mark.parametrize("heterogeneous", [True, False])
def test_expected_parameters_is_exact_at_hard_choices(heterogeneous):
    cfg, router = _router(heterogeneous)
    for budget in BUDGETS[1:]:
        for s in range(3):
            arch, gates, probs = router.sample(budget, tau=0.5, generator=torch.Generator().manual_seed(s))
            hard = {a: F.one_hot(p.argmax(-1), p.shape[-1]).double() for a, p in probs.items()}
            assert float(expected_cost(router, hard)) == arch_parameters(cfg, arch)
            assert all(float(g.detach()) == pytest.approx(1.0) for g in gates.values())


def test_a_homogeneous_space_gives_one_choice_per_axis_for_every_layer_of_its_type():
    """``space.heterogeneous: false`` (the paper's homogeneous variant): every Mamba layer gets the same heads and
    head channels, every attention layer the same heads, every MLP the same neurons; the heterogeneous space
    does not tie them (the same draws differ somewhere)."""
    from megatron_elastic.model.config import LAYER_FIELDS

    def untied(arch, cfg):
        return [
            f
            for sym, fields in LAYER_FIELDS.items()
            for f in fields
            if len({getattr(arch, f)[i] for i, s in enumerate(cfg.hybrid_pattern) if s == sym}) > 1
        ]

    cfg, homogeneous = _router(heterogeneous=False)
    _, heterogeneous = _router(heterogeneous=True)
    differs = 0
    for s in range(8):
        arch, _, _ = homogeneous.sample(0.5, tau=1.0, generator=torch.Generator().manual_seed(s))
        assert untied(arch, cfg) == [], arch
        other, _, _ = heterogeneous.sample(0.5, tau=1.0, generator=torch.Generator().manual_seed(s))
        differs += bool(untied(other, cfg))
    assert differs > 0


def test_a_space_heterogeneous_in_ffn_only_ties_mamba_and_attention_sizes_across_layers():
    """``space.heterogeneous: [ffn]`` (what vLLM's NemotronH serves): Mamba heads, head channels and attention heads
    are one choice for every layer of their type, FFN widths are drawn per MLP layer (they differ in some draw)."""
    torch.manual_seed(0)
    cfg = _cfg()
    space = ElasticSpace.default(cfg, depth_ranking=[0, 3, 1, 2, 4, 5], heterogeneous=["ffn"])
    router = Router(cfg, space, BUDGETS, hidden=32)
    assert [a for a in ("mamba_heads", "mamba_head_dim", "attention_heads", "ffn") if space.per_layer(a)] == ["ffn"]
    ffn_differs = 0
    for s in range(12):
        arch, _, _ = router.sample(0.5, tau=1.0, generator=torch.Generator().manual_seed(s))
        for name in ("mamba_num_heads", "mamba_head_dim", "num_attention_heads"):
            assert len(set(getattr(arch, name).values())) <= 1, (name, arch)
        ffn_differs += len(set(arch.ffn_hidden_size.values())) > 1
    assert ffn_differs > 0


def test_depth_choices_down_to_one_layer_with_depth_fractions_all():
    """``space.depth_fractions: all`` (the paper's Eq. 9: any L in [1, N]): the space offers every depth, the router
    draws them, and each drawn architecture skips exactly the least important layers of the ranking."""
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.model.config import ConfigError

    text = (
        "parent: p\nbudgets: [1.0, 0.5]\nspace: {depth_fractions: DEPTH}\n"
        "curriculum: {stages: [{name: s, tokens: 25600, seq_length: 32, global_batch_size: 8, "
        "budget_weights: [1, 1]}]}\n"
    )
    assert load_elastic_config(text=text.replace("DEPTH", "all")).space.depth_fractions == "all"
    for bad in ("most", "[0.5, x]", "[0, 1]"):
        with pytest.raises(ConfigError, match="depth_fractions"):
            load_elastic_config(text=text.replace("DEPTH", bad))
    cfg = _cfg()
    ranking = [0, 3, 1, 2, 4, 5]
    space = ElasticSpace.default(cfg, depth_fractions="all", depth_ranking=ranking)
    assert space.num_layers == list(range(1, len(cfg.hybrid_pattern) + 1))
    router = Router(cfg, space, (1.0, 0.3), hidden=16)
    depths = set()
    for s in range(40):
        arch, _, _ = router.sample(0.3, tau=5.0, generator=torch.Generator().manual_seed(s))
        kept = len(cfg.hybrid_pattern) - len(arch.skipped_layers)
        assert sorted(arch.skipped_layers) == sorted(ranking[kept:])
        depths.add(kept)
    assert len(depths) >= 3, depths  # the draws reach depths the default space (0.75-1) never offers


def test_same_generator_state_gives_the_same_architecture():
    _, router = _router()
    a1, _, _ = router.sample(0.75, generator=torch.Generator().manual_seed(7))
    a2, _, _ = router.sample(0.75, generator=torch.Generator().manual_seed(7))
    assert a1 == a2


def test_expected_parameter_gradient_matches_finite_differences():
    cfg, router = _router()
    router.double()
    probs_of = lambda: {a: F.softmax(lg, -1) for a, lg in router.logits(0.75).items()}
    loss = expected_cost(router, probs_of())
    w = router.nets["ffn"][2].weight
    (g,) = torch.autograd.grad(loss, [w])
    eps = 1e-6
    for idx in [(0, 0), (3, 5), (7, 11)]:
        with torch.no_grad():
            w[idx] += eps
            up = float(expected_cost(router, probs_of()))
            w[idx] -= 2 * eps
            down = float(expected_cost(router, probs_of()))
            w[idx] += eps
        assert float(g[idx]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-3)


def test_interpolated_budget_input_and_range_errors():
    _, router = _router()
    x = router.budget_input(0.625)
    assert x.tolist() == [0.0, 0.5, 0.5]
    assert router.budget_input(0.75).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="outside the configured range"):
        router.budget_input(0.3)
    with pytest.raises(ValueError, match="distinct fractions"):
        Router(_cfg(), ElasticSpace.default(_cfg()), (1.0, 1.0))


def test_resource_loss_alone_lands_every_budget_within_two_percent():
    cfg, router = _router(seed=1)
    full = arch_parameters(cfg, ElasticArch.full(cfg))
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for step in range(300):
        tau = max(0.05, 1.0 - step / 250)
        loss = 0
        for b in BUDGETS[1:]:  # 1.0 is the parent itself (the router is bypassed)
            _, _, probs = router.sample(b, tau=tau, generator=torch.Generator().manual_seed(step))
            loss = loss + resource_loss(expected_cost(router, probs), b * full)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for b in BUDGETS:
        got = arch_parameters(cfg, choose(router, b)) / full
        assert got == pytest.approx(b, abs=0.02), (b, got)
    assert router.sample(1.0)[1:] == ({}, None) and choose(router, 1.0) == ElasticArch.full(cfg)
    nested = choose_all(router)
    assert list(nested) == sorted(BUDGETS, reverse=True)
    for big, small in zip(BUDGETS, BUDGETS[1:]):
        assert nested[small].is_within(nested[big]), (big, small)
        assert arch_parameters(cfg, nested[small]) / full == pytest.approx(small, abs=0.02)


def test_choose_within_never_exceeds_the_larger_choice():
    cfg, router = _router(seed=4)  # untrained: free choices are not nested in general
    outer = choose(router, 0.5)
    inner = choose(router, 0.75, within=outer)
    assert inner.is_within(outer)
    free = choose(router, 0.75)
    assert choose(router, 0.75, within=free) == free, "a bound the free choice meets changes nothing"
    assert choose(router, 0.75, within=ElasticArch.full(cfg)) == free


def test_router_gradient_through_the_model_matches_finite_differences(single_process_parallel):
    """The straight-through gates carry dL/dgate * dgate/dtheta to the router. Finite differences of the
    relaxed objective theta -> L(gate = 1 + y(theta) - y(theta0)) (same Gumbel noise, so the same arch)
    must give the autograd gradient."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    cfg, router = _router(seed=2)
    router.double()
    model = build_elastic_model(_cfg(params_dtype=torch.float64)).double()
    ids = torch.randint(0, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    args = (ids, position_ids_for(ids), causal_attention_mask(9))

    def objective(y0=None):
        arch, gates, probs = router.sample(0.75, tau=0.7, hard=y0 is None, generator=torch.Generator().manual_seed(5))
        if y0 is not None:  # the relaxed objective: gate = 1 + (y_chosen - y0) with y0 fixed
            gates = {k: 1 + (g - y0[k]) for k, g in gates.items()}
        with use_arch(model, arch, gates):
            logits = model(*args)
        return (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum(), gates

    loss, gates = objective()
    w = router.nets["hidden"][2].weight
    (g,) = torch.autograd.grad(loss, [w])
    assert g.abs().sum() > 0, "the router must receive gradient through the model"
    _, soft_gates, _ = router.sample(0.75, tau=0.7, hard=False, generator=torch.Generator().manual_seed(5))
    y0 = {k: v.detach() for k, v in soft_gates.items()}
    eps = 1e-6
    for idx in [(0, 0), (1, 3)]:
        with torch.no_grad():
            w[idx] += eps
            up = float(objective(y0)[0])
            w[idx] -= 2 * eps
            down = float(objective(y0)[0])
            w[idx] += eps
        assert float(g[idx]) == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-6), idx


def _trained_router(seed=1, steps=300):
    """A router trained by the resource loss alone on nested draws (fast; no model)."""
    cfg, router = _router(seed=seed)
    full = arch_parameters(cfg, ElasticArch.full(cfg))
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for step in range(steps):
        tau = max(0.05, 1.0 - step / 250)
        draws = router.sample_nested(tau, 1.0, lambda bi: torch.Generator().manual_seed(step * 16 + bi))
        targets = {b: d.probs for b, d in draws.items() if d.probs is not None}
        loss = sum(resource_loss(expected_cost(router, p), b * full) for b, p in targets.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, router, full


def test_nested_draws_are_nested_and_the_mask_only_acts_when_needed():
    """Every draw of sample_nested lies within the next larger budget's draw, for any router; where the free draw
    of the same noise was already nested, the mask changed nothing; untrained routers need the mask sometimes."""
    masked_some = False
    for seed in range(4):
        _, router = _router(seed=seed)
        for step in range(25):
            draws = router.sample_nested(1.0, 1.0, lambda bi: torch.Generator().manual_seed(step * 16 + bi))
            assert list(draws) == [1.0, 0.75, 0.5]
            assert draws[0.5].arch.is_within(draws[0.75].arch) and draws[0.75].arch.is_within(draws[1.0].arch)
            # the free draw is the unmasked sample() with the same generator state
            free = router.sample(0.5, generator=torch.Generator().manual_seed(step * 16 + 2))[0]
            assert draws[0.5].free_arch == free
            if free.is_within(draws[0.75].arch):
                assert draws[0.5].arch == free
            else:
                masked_some = True
    assert masked_some, "independent draws of an untrained router are not nested in general"


def test_sample_nested_with_only_keeps_the_graph_for_that_budget():
    _, router = _router(seed=3)
    gen = lambda bi: torch.Generator().manual_seed(11 + bi)
    draws = router.sample_nested(0.7, 2.0, gen, only=0.5)
    assert all(not g.requires_grad for g in draws[0.75].gates.values())
    assert all(g.requires_grad for g in draws[0.5].gates.values())
    assert draws[0.5].arch == router.sample_nested(0.7, 2.0, gen)[0.5].arch


def test_scaled_mask_mode_gates_are_the_chosen_probabilities_of_the_same_draw():
    """Mode 1 (Eq. 50): the same architectures as the straight-through draw, each gate the softmax probability of
    the chosen component (recomputed here from the logits and the same Gumbel noise), with its gradient."""
    _, router = _router(seed=4)
    gen = lambda bi: torch.Generator().manual_seed(21 + bi)
    straight = router.sample_nested(0.6, 1.5, gen)
    scaled = router.sample_nested(0.6, 1.5, gen, hard=False)
    prev, below_one = None, 0
    for b in (1.0, 0.75, 0.5):
        assert scaled[b].arch == straight[b].arch
        if b == 1.0:
            assert scaled[b].gates == {}
            prev = scaled[b].arch
            continue
        assert all(float(g) == 1.0 for g in straight[b].gates.values())
        g = torch.Generator().manual_seed(21 + router.budgets.index(b))
        for axis, lg in router.logits(b, 1.5).items():  # draw's noise: one uniform tensor per axis, in this order
            u = torch.rand(lg.shape, generator=g).clamp_(1e-10, 1 - 1e-10)
            noisy = (lg - torch.log(-torch.log(u))).masked_fill(~router.allowed(axis, prev), float("-inf"))
            expected = F.softmax(noisy / 0.6, dim=-1).max(-1).values
            layers = router.segments[axis]
            key = {"hidden": "hidden", "depth": "depth.0"}.get(axis)
            got = [scaled[b].gates[key]] if key else [scaled[b].gates[f"{axis}.{layer}"] for layer in layers]
            assert torch.allclose(torch.stack(got), expected, atol=1e-6), axis
            assert all(x.requires_grad for x in got)
            below_one += sum(float(x) < 1.0 for x in got)  # 1.0 only where the nesting left one choice
        prev = scaled[b].arch
    assert below_one > 0


def test_any_budget_between_trained_ones_is_nested_and_on_target():
    cfg, router, full = _trained_router()
    asked = [0.5, 0.55, 0.6, 0.7, 0.75, 0.9, 1.0]
    chosen = choose_budgets(router, asked)
    assert list(chosen) == asked
    trained = choose_all(router)
    for b in (0.5, 0.75, 1.0):
        assert chosen[b].trained and chosen[b].arch == trained[b]
    assert [chosen[b].between for b in (0.55, 0.6, 0.7, 0.9)] == [(0.5, 0.75)] * 3 + [(0.75, 1.0)]
    for b in asked:  # nested between its trained neighbours
        lo, hi = chosen[b].between
        assert trained[lo].is_within(chosen[b].arch) and chosen[b].arch.is_within(trained[hi]), b
    for b in (0.6, 0.7, 0.9):
        assert arch_parameters(cfg, chosen[b].arch) / full == pytest.approx(b, rel=0.02), b
        assert not chosen[b].trained


@pytest.mark.parametrize("bad", [1.2, 0.3, "0.6", float("nan"), True])
def test_budgets_outside_the_trained_range_are_refused(bad):
    _, router = _router()
    with pytest.raises(ValueError, match="between the smallest trained budget 0.5 and 1"):
        choose_budgets(router, [bad])


def test_a_fixed_architecture_router_only_gives_that_architecture():
    cfg, router = _router()
    arch = choose(router, 0.75)
    fixed = Router(cfg, router.space, (0.75,), hidden=8, fixed_arch=arch)
    assert fixed.sample(0.75, generator=torch.Generator().manual_seed(0)) == (arch, {}, None)
    assert choose_all(fixed) == {0.75: arch}
    with pytest.raises(ValueError, match="fixed-architecture"):
        choose_budgets(fixed, [0.8])


def test_a_budget_between_is_drawn_between_its_neighbours_draws():
    """``between``: the untrained budget's draw contains the smaller neighbour's draw and lies within the larger
    one's on every step, whatever the router's logits (checked on the architectures, not on the mask)."""
    cfg = None
    for seed in range(3):
        cfg, router = _router(seed=seed)
        full = arch_parameters(cfg, ElasticArch.full(cfg))
        for step in range(20):
            for between in (0.6, 0.9):
                gen = lambda bi: torch.Generator().manual_seed(step * 16 + bi)
                draws = router.sample_nested(1.0, 1.0, gen, between=between)
                lo, hi = router.neighbours(between)
                assert list(draws) == [1.0, 0.75, 0.5, between]
                assert draws[lo].arch.is_within(draws[between].arch) and draws[between].arch.is_within(draws[hi].arch)
                n = [arch_parameters(cfg, draws[b].arch) for b in (lo, between, hi)]
                assert n[0] <= n[1] <= n[2] <= full
                # the trained draws are the ones without `between` (its noise comes last)
                assert draws[0.5].arch == router.sample_nested(1.0, 1.0, gen)[0.5].arch
    only = router.sample_nested(0.5, 1.0, lambda bi: torch.Generator().manual_seed(bi), only=0.6, between=0.6)
    assert all(g.requires_grad for g in only[0.6].gates.values())
    assert all(not g.requires_grad for g in only[0.5].gates.values())


@pytest.mark.parametrize("bad", [0.75, 0.5, 1.0, 0.4])
def test_a_budget_between_must_lie_strictly_between_trained_ones(bad):
    _, router = _router()
    with pytest.raises(ValueError, match="not strictly between two trained budgets"):
        router.sample_nested(1.0, 1.0, lambda bi: torch.Generator().manual_seed(bi), between=bad)


def _argmax_error_between(train_between: bool) -> float:
    """Mean |size - budget| of the router's own bounded argmax (no walk onto the target) at 8 untrained budgets,
    after 400 steps of resource loss alone at the trained budgets (and a random budget between them)."""
    import random

    cfg, router = _router(seed=1)
    full = arch_parameters(cfg, ElasticArch.full(cfg))
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    rng = random.Random(0)
    for step in range(400):
        tau = max(0.05, 1.0 - step / 300)
        between = 0.5 + 0.5 * rng.random() if train_between else None
        draws = router.sample_nested(
            tau, 1.0, lambda bi: torch.Generator().manual_seed(step * 16 + bi), between=between
        )
        loss = sum(resource_loss(expected_cost(router, d.probs), b * full) for b, d in draws.items() if d.probs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = choose_all(router)
    errors = []
    for b in (0.55, 0.6, 0.625, 0.7, 0.8, 0.85, 0.9, 0.95):
        lo, hi = router.neighbours(b)
        arch = choose(router, b, within=trained[hi], containing=trained[lo])
        errors.append(abs(arch_parameters(cfg, arch) / full - b))
    return sum(errors) / len(errors)


def test_resource_loss_at_random_budgets_between_brings_untrained_budgets_towards_target():
    """Training the interpolated inputs too moves the router's own choices at untrained budgets towards their
    sizes (the toy space is coarse between 0.5 and 0.75, so not onto them: ``choose_budgets`` walks the rest)."""
    with_between, without = _argmax_error_between(True), _argmax_error_between(False)
    assert with_between < 0.75 * without, (with_between, without)
