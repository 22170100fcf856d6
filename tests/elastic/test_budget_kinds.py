"""Budgets in parameters, deployment memory or FLOPs per token: the memory the cost model predicts for a
generation equals the tensor bytes ``generate`` really holds (weights of the extracted model + the caches of its
inference context), the router's resource loss lands every kind on its targets, and budgets parse or fail with
one line."""

import dataclasses
import random

import pytest
import torch

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import parse_budget
from megatron_elastic.elastic.cost import PARAMETERS, FlopsPerToken, ServingMemory, dtype_bytes
from megatron_elastic.errors import ConfigError
from tests.elastic.test_elastic_model import random_heterogeneous_arch
from tests.elastic.test_slicing import _sub_config
from tests.importance.test_permute import _cfg


@pytest.mark.parametrize(
    "seed, batch, prompt, new, bf16", [(0, 1, 9, 5, False), (1, 3, 20, 12, False), (2, 2, 6, 30, True)]
)
def test_predicted_serving_memory_equals_the_bytes_generate_holds(
    single_process_parallel, monkeypatch, seed, batch, prompt, new, bf16
):
    import megatron_elastic.serving.decode as decode_mod
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.elastic.slicing import slice_state_dict
    from megatron_elastic.model.builder import build_hybrid_model

    dtype = dict(bf16=True, params_dtype=torch.bfloat16) if bf16 else {}
    cfg = _cfg(mamba_chunk_size=4, **dtype)
    arch = ElasticArch.full(cfg) if seed == 0 else random_heterogeneous_arch(cfg, random.Random(seed)).validate(cfg)
    torch.manual_seed(seed)
    parent = build_elastic_model(cfg)
    sub = build_hybrid_model(dataclasses.replace(_sub_config(cfg, arch), **dtype))
    # the matmul weights are in the serving dtype (norms, A_log and D stay float32: measured as they are)
    assert sub.embedding.word_embeddings.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    sub.load_state_dict(slice_state_dict(parent.state_dict(), cfg, arch), strict=False)
    weights = sum(t.numel() * t.element_size() for t in sub.state_dict().values() if torch.is_tensor(t) and t.numel())
    contexts = []
    original = decode_mod._context
    monkeypatch.setattr(decode_mod, "_context", lambda b, n: contexts.append(original(b, n)) or contexts[-1])
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    decode_mod.decode(sub, ids, new)
    caches = decode_mod.inference_cache_bytes(contexts[0])
    predicted = ServingMemory(prompt + new, batch, dtype_bytes(cfg)).of(cfg, arch)
    predicted_weights = dtype_bytes(cfg) * PARAMETERS.of(cfg, arch)
    assert predicted - predicted_weights == caches, "KV caches + Mamba conv/SSM states, byte for byte"
    assert predicted == pytest.approx(weights + caches, rel=0.05), (predicted, weights + caches)


def _trained_router(cost, seed=1, steps=300):
    from megatron_elastic.elastic.resource_loss import expected_cost, resource_loss
    from megatron_elastic.elastic.router import Router
    from megatron_elastic.elastic.space import ElasticSpace

    torch.manual_seed(seed)
    cfg = _cfg()
    space = ElasticSpace.default(cfg, depth_ranking=[0, 3, 1, 2, 4, 5], heterogeneous=True)
    router = Router(cfg, space, (1.0, 0.75, 0.5), hidden=32, cost=cost)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for step in range(steps):
        tau = max(0.05, 1.0 - step / 250)
        loss = 0
        for b in (0.75, 0.5):
            _, _, probs = router.sample(b, tau=tau, generator=torch.Generator().manual_seed(step))
            loss = loss + resource_loss(expected_cost(router, probs), b * router.full_cost)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, router


@pytest.mark.parametrize("cost", [PARAMETERS, ServingMemory(128, 2, 2), FlopsPerToken(2048)], ids=lambda c: c.kind)
def test_resource_loss_alone_lands_every_kind_within_two_percent(cost):
    from megatron_elastic.elastic.choose import choose_all

    cfg, router = _trained_router(cost)
    full = cost.of(cfg, ElasticArch.full(cfg))
    chosen = choose_all(router)
    for b in (0.75, 0.5):
        assert cost.of(cfg, chosen[b]) / full == pytest.approx(b, rel=0.02), (cost.kind, b)


def test_each_kind_is_its_own_target():
    """A memory budget at a long context is dominated by the KV caches, so it chooses differently from the same
    fraction of parameters: the kinds are not one number under different names."""
    cfg = _cfg()
    arch = random_heterogeneous_arch(cfg, random.Random(3)).validate(cfg)
    full = ElasticArch.full(cfg)
    fractions = [
        c.of(cfg, arch) / c.of(cfg, full) for c in (PARAMETERS, ServingMemory(1 << 16, 8, 2), FlopsPerToken(64))
    ]
    assert len({round(f, 3) for f in fractions}) == 3


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("0.5", "params", 0.5),
        (0.75, "params", 0.75),
        ("6GiB@32768", "memory", 6 * 2**30),
        ("512MiB@4096x8", "memory", 512 * 2**20),
        ("1.5GB@128", "memory", 1.5e9),
        ("1.5GFLOP@4096", "flops", 1.5e9),
        ("2e9FLOPs@128", "flops", 2e9),
    ],
)
def test_budgets_parse_and_print_back(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))
    again = parse_budget(str(b))
    assert again.kind == b.kind and again.value == pytest.approx(b.value, rel=1e-2)
    assert again.cost.to_dict() == b.cost.to_dict()


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.5", r"in \(0, 1\]"),
        ("nan", r"in \(0, 1\]"),
        ("6GiB", "memory at a context length"),
        ("6XB@4096", "memory at a context length"),
        ("6GiB@0", "context must be a positive"),
        ("0GiB@4096", "must be positive"),
        ("fast", "FLOPs per token"),
        (True, "write a parameter fraction"),
    ],
)
def test_bad_budgets_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_budget(text)
    assert "\n" not in str(e.value)


def test_memory_budget_as_fraction_of_the_parent():
    cfg = _cfg()
    full = ServingMemory(1024, 1, dtype_bytes(cfg)).of(cfg, ElasticArch.full(cfg))
    b = parse_budget(f"{full / 2 / 2**20}MiB@1024", cfg)
    assert b.fraction(cfg) == pytest.approx(0.5)
