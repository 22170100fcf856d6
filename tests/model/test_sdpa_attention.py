"""SDPAttention (PyTorch's fused scaled-dot-product attention) == Megatron's DotProductAttention in fp32, and ==
a float64 softmax attention written here; for full and sliced head counts, the whole elastic model, decoding."""

import random

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_elastic.model.sdpa_attention import SDPAttention


def _config(**kw):
    from megatron_elastic.testing import tiny_config

    return tiny_config(num_attention_heads=8, num_query_groups=2, kv_channels=16, **kw)


def _reference(q, k, v, mask_allowed):
    """float64 softmax attention on [s, b, heads, d] tensors; K/V heads repeated per query group by hand."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k = torch.cat([k[:, :, g : g + 1].expand(-1, -1, rep, -1) for g in range(k.shape[2])], dim=2)
    v = torch.cat([v[:, :, g : g + 1].expand(-1, -1, rep, -1) for g in range(v.shape[2])], dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask_allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _qkv(sq, sk, heads, groups, d=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, d, generator=g, requires_grad=True)
    k = torch.randn(sk, b, groups, d, generator=g, requires_grad=True)
    v = torch.randn(sk, b, groups, d, generator=g, requires_grad=True)
    return q, k, v


def _megatron_at(core, heads):
    """Megatron's core attention at ``heads`` active query heads (what ElasticSelfAttention sets)."""
    core.num_attention_heads_per_partition = heads
    core.hidden_size_per_partition = heads * core.hidden_size_per_attention_head
    return core


@pytest.mark.parametrize("heads", [8, 6, 4, 2])
def test_equals_megatron_dot_product_attention_fp32(single_process_parallel, heads):
    cfg = _config()
    ours = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    theirs = _megatron_at(DotProductAttention(cfg, 1, AttnMaskType.causal, "self"), heads)
    s = 37
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    q, k, v = _qkv(s, s, heads, 2)
    got = ours(q, k, v, mask)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want = theirs(q, k, v, mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref = _reference(q, k, v, ~mask[0, 0])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq,sk", [(1, 11), (4, 11), (11, 11)])
def test_causal_queries_are_the_last_positions_of_the_keys(single_process_parallel, sq, sk):
    """Decoding with a KV cache (one query, or a chunk of queries, after the cached keys)."""
    ours = SDPAttention(_config(), 1, AttnMaskType.causal, "self").eval()
    q, k, v = _qkv(sq, sk, 8, 2, seed=sq)
    allowed = torch.arange(sk)[None, :] <= torch.arange(sk - sq, sk)[:, None]
    torch.testing.assert_close(ours(q, k, v, None).double(), _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_padding_mask_type_applies_the_given_mask(single_process_parallel):
    ours = SDPAttention(_config(), 1, AttnMaskType.padding, "self")
    s = 9
    masked = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(3)) < 0.3
    masked[..., 0] = False  # every query sees at least one key
    q, k, v = _qkv(s, s, 8, 2, seed=5)
    got = ours(q, k, v, masked)
    want = torch.stack(
        [_reference(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], ~masked[i, 0])[:, 0] for i in (0, 1)], 1
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_local_specs_use_it(single_process_parallel):
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _config()
    for model in (build_hybrid_model(cfg, backend="local"), build_elastic_model(cfg)):
        cores = [m for m in model.modules() if isinstance(m, DotProductAttention)]
        assert cores and all(type(m) is SDPAttention for m in cores)


@pytest.mark.parametrize("seed", range(2))
def test_elastic_model_at_a_random_choice_equals_megatron_core_attention(single_process_parallel, seed):
    """The whole elastic model (sliced heads, widths, skipped layers): logits and every gradient with SDPA ==
    with Megatron's DotProductAttention in every attention layer."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from tests.elastic.test_elastic_model import _args, _cfg, random_heterogeneous_arch

    cfg = _cfg()
    arch = random_heterogeneous_arch(cfg, random.Random(7 + seed)).validate(cfg)
    torch.manual_seed(seed)
    ours = build_elastic_model(cfg)
    theirs = build_elastic_model(cfg)
    theirs.load_state_dict(ours.state_dict())
    swapped = 0
    for m in theirs.modules():
        if isinstance(m, SDPAttention):
            m.__class__ = DotProductAttention
            swapped += 1
    assert swapped == cfg.hybrid_pattern.count("*")
    ids, pos, mask = _args(seq=23, seed=seed)
    results = []
    for model in (ours, theirs):
        with use_arch(model, arch):
            logits = model(ids, pos, mask)
        logits.float().square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-5, msg=name)
