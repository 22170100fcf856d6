"""The elastic model at a choice == an independently built plain model of the smaller shape whose weights the
test slices itself (index logic written here, loop by loop); logits and gradients."""

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.elastic.arch import ElasticArch, ElasticArchError

PATTERN = "M-*M-*-M"


def _cfg(**kw):
    from megatron_elastic.testing import tiny_config

    base = dict(
        hybrid_pattern=PATTERN,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=4,
        mamba_num_heads=8,
        mamba_head_dim=6,
        mamba_num_groups=2,
        mamba_state_dim=5,
        mamba_chunk_size=7,
    )
    base.update(kw)
    return tiny_config(**base)


def _args(seq=19, batch=2, seed=0):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    ids = torch.randint(0, 260, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids, position_ids_for(ids), causal_attention_mask(seq)


# ---- index logic, written independently of megatron_elastic's ------------------------------------------
def mamba_rows(cfg, k_per_group, p_active):
    """Kept heads and channels of a Megatron MambaMixer at TP=1 (heads of a group are contiguous)."""
    r = cfg.mamba_num_heads // cfg.mamba_num_groups
    heads = [g * r + j for g in range(cfg.mamba_num_groups) for j in range(k_per_group)]
    chans = [h * cfg.mamba_head_dim + c for h in heads for c in range(p_active)]
    return heads, chans


def slice_parent(parent_sd, cfg, arch):
    """The state dict of the plain smaller model: kept layers renumbered, every tensor sliced."""
    h = arch.hidden_size
    out = {
        "embedding.word_embeddings.weight": parent_sd["embedding.word_embeddings.weight"][:, :h],
        "output_layer.weight": parent_sd["output_layer.weight"][:, :h],
        "decoder.final_norm.weight": parent_sd["decoder.final_norm.weight"][:h],
    }
    kept = [i for i in range(len(cfg.hybrid_pattern)) if i not in arch.skipped_layers]
    d_inner, bc = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
    for new, old in enumerate(kept):
        src, dst = f"decoder.layers.{old}.", f"decoder.layers.{new}."
        sym = cfg.hybrid_pattern[old]
        if sym == "M":
            heads, chans = mamba_rows(cfg, arch.mamba_num_heads[old] // cfg.mamba_num_groups, arch.mamba_head_dim[old])
            rows = (
                chans
                + [d_inner + c for c in chans]
                + list(range(2 * d_inner, 2 * d_inner + 2 * bc))
                + [2 * d_inner + 2 * bc + hh for hh in heads]
            )
            conv = chans + list(range(d_inner, d_inner + 2 * bc))
            m = "mixer."
            out[dst + "norm.weight"] = parent_sd[src + "norm.weight"][:h]
            out[dst + m + "in_proj.weight"] = parent_sd[src + m + "in_proj.weight"][rows][:, :h]
            out[dst + m + "conv1d.weight"] = parent_sd[src + m + "conv1d.weight"][conv]
            out[dst + m + "conv1d.bias"] = parent_sd[src + m + "conv1d.bias"][conv]
            for name in ("dt_bias", "A_log", "D"):
                out[dst + m + name] = parent_sd[src + m + name][heads]
            out[dst + m + "norm.weight"] = parent_sd[src + m + "norm.weight"][chans]
            out[dst + m + "out_proj.weight"] = parent_sd[src + m + "out_proj.weight"][:h][:, chans]
        elif sym == "*":
            hn, groups = cfg.kv_channels, cfg.num_query_groups
            hpg = cfg.num_attention_heads // groups
            k = arch.num_attention_heads[old] // groups
            rows, cols = [], []
            for g in range(groups):
                base = g * (hpg + 2) * hn
                rows += list(range(base, base + k * hn))  # its first k query heads
                rows += list(range(base + hpg * hn, base + (hpg + 2) * hn))  # its k and v
                cols += list(range(g * hpg * hn, (g * hpg + k) * hn))
            a = "self_attention."
            out[dst + "input_layernorm.weight"] = parent_sd[src + "input_layernorm.weight"][:h]
            out[dst + a + "linear_qkv.weight"] = parent_sd[src + a + "linear_qkv.weight"][rows][:, :h]
            out[dst + a + "linear_proj.weight"] = parent_sd[src + a + "linear_proj.weight"][:h][:, cols]
        else:
            f = arch.ffn_hidden_size[old]
            out[dst + "pre_mlp_layernorm.weight"] = parent_sd[src + "pre_mlp_layernorm.weight"][:h]
            out[dst + "mlp.linear_fc1.weight"] = parent_sd[src + "mlp.linear_fc1.weight"][:f, :h]
            out[dst + "mlp.linear_fc2.weight"] = parent_sd[src + "mlp.linear_fc2.weight"][:h, :f]
    return out


def random_homogeneous_arch(cfg, rng):
    """One size per layer type (so a plain Megatron config can express it), random skipped layers."""
    pattern = cfg.hybrid_pattern
    mh = rng.choice(range(cfg.mamba_num_groups, cfg.mamba_num_heads + 1, cfg.mamba_num_groups))
    md = rng.randint(1, cfg.mamba_head_dim)
    ah = rng.choice(range(cfg.num_query_groups, cfg.num_attention_heads + 1, cfg.num_query_groups))
    ff = rng.randint(1, cfg.ffn_hidden_size)
    skipped = tuple(i for i in range(len(pattern)) if rng.random() < 0.25)
    if len(skipped) == len(pattern):
        skipped = skipped[1:]
    return ElasticArch(
        hidden_size=rng.randint(4, cfg.hidden_size),
        mamba_num_heads={i: mh for i, s in enumerate(pattern) if s == "M"},
        mamba_head_dim={i: md for i, s in enumerate(pattern) if s == "M"},
        num_attention_heads={i: ah for i, s in enumerate(pattern) if s == "*"},
        ffn_hidden_size={i: ff for i, s in enumerate(pattern) if s == "-"},
        skipped_layers=skipped,
    )


def plain_config_for(cfg, arch):
    kept = "".join(s for i, s in enumerate(cfg.hybrid_pattern) if i not in arch.skipped_layers)
    first = lambda d, default: next(iter(d.values()), default)
    return _cfg(
        hybrid_pattern=kept,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=first(arch.ffn_hidden_size, cfg.ffn_hidden_size),
        num_attention_heads=first(arch.num_attention_heads, cfg.num_attention_heads),
        mamba_num_heads=first(arch.mamba_num_heads, cfg.mamba_num_heads),
        mamba_head_dim=first(arch.mamba_head_dim, cfg.mamba_head_dim),
    )


def _loss(logits):
    w = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    return (logits * w).sum()


def test_full_choice_is_exactly_the_plain_model(single_process_parallel):
    from megatron_elastic.elastic.layers.model import build_elastic_model, set_arch
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    torch.manual_seed(0)
    plain = build_hybrid_model(cfg)
    elastic = build_elastic_model(cfg)
    elastic.load_state_dict(plain.state_dict())
    set_arch(elastic, ElasticArch.full(cfg))
    args = _args()
    a, b = plain(*args), elastic(*args)
    assert torch.equal(a, b)
    _loss(a).backward()
    _loss(b).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), elastic.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("seed", range(4))
def test_random_choice_equals_sliced_plain_model(single_process_parallel, seed):
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    arch = random_homogeneous_arch(cfg, random.Random(seed))
    torch.manual_seed(seed)
    elastic = build_elastic_model(cfg)
    parent_sd = {k: v for k, v in elastic.state_dict().items() if not k.endswith("_extra_state")}
    small = build_hybrid_model(plain_config_for(cfg, arch))
    small.load_state_dict(slice_parent(parent_sd, cfg, arch), strict=False)
    args = _args(seed=seed)
    with use_arch(elastic, arch):
        got = elastic(*args)
    want = small(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Gradients: the elastic parent's grads, sliced the same way, equal the small model's grads.
    _loss(got).backward()
    _loss(want).backward()
    parent_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in elastic.named_parameters()}
    sliced_grads = slice_parent(parent_grads, cfg, arch)
    for n, p in small.named_parameters():
        torch.testing.assert_close(sliced_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # ... and nothing outside the active slice received gradient.
    total = sum(float(g.abs().sum()) for g in parent_grads.values())
    active = sum(float(g.abs().sum()) for g in sliced_grads.values())
    assert active == pytest.approx(total, rel=1e-5)


def test_gate_gradient_matches_finite_differences(single_process_parallel):
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch

    cfg = _cfg(params_dtype=torch.float64)
    torch.manual_seed(3)
    model = build_elastic_model(cfg).double()
    arch = random_homogeneous_arch(cfg, random.Random(11))
    arch.skipped_layers = ()
    keys = ["hidden", "mamba_heads.0", "mamba_head_dim.3", "attention_heads.2", "ffn.4", "depth.7"]
    args = _args(seq=9)

    def loss_at(values):
        gates = {k: v for k, v in zip(keys, values)}
        with use_arch(model, arch, gates):
            return _loss(model(*args))

    ones = [torch.tensor(1.0, dtype=torch.float64, requires_grad=True) for _ in keys]
    loss = loss_at(ones)
    assert torch.equal(loss, loss_at([torch.tensor(1.0, dtype=torch.float64)] * len(keys))), (
        "unit gates must leave the forward pass exactly the sliced sub-model"
    )
    grads = torch.autograd.grad(loss, ones)
    eps = 1e-6
    for j, key in enumerate(keys):
        plus = [torch.tensor(1.0 + (eps if i == j else 0.0), dtype=torch.float64) for i in range(len(keys))]
        minus = [torch.tensor(1.0 - (eps if i == j else 0.0), dtype=torch.float64) for i in range(len(keys))]
        with torch.no_grad():
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        assert float(grads[j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7), key
        assert abs(float(grads[j])) > 0, key


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(hidden_size=33), "hidden_size=33"),
        (dict(mamba_num_heads={0: 3, 3: 8, 7: 8}), "mamba_num_heads\\[0\\]=3: must be a multiple of mamba_num_groups"),
        (dict(mamba_num_heads={0: 10, 3: 8, 7: 8}), "mamba_num_heads\\[0\\]=10"),
        (dict(mamba_head_dim={0: 0, 3: 6, 7: 6}), "mamba_head_dim\\[0\\]=0"),
        (
            dict(num_attention_heads={2: 3, 5: 8}),
            "num_attention_heads\\[2\\]=3: must be a multiple of num_query_groups",
        ),
        (dict(ffn_hidden_size={1: 49, 4: 48, 6: 48}), "ffn_hidden_size\\[1\\]=49"),
        (dict(ffn_hidden_size={1: 48, 4: 48}), "ffn_hidden_size: needs exactly the layers \\[1, 4, 6\\]"),
        (dict(num_attention_heads={2: 8, 3: 8, 5: 8}), "not of that type \\[3\\]"),
        (dict(skipped_layers=(8,)), "skipped_layers \\[8\\]"),
        (dict(skipped_layers=tuple(range(8))), "cannot skip every layer"),
    ],
)
def test_invalid_choices_are_rejected(change, message):
    cfg = _cfg()
    arch = ElasticArch.full(cfg)
    for k, v in change.items():
        setattr(arch, k, v)
    with pytest.raises(ElasticArchError, match=message):
        arch.validate(cfg)


def test_ffn_choice_must_respect_ffn_groups():
    cfg = _cfg(tensor_model_parallel_size=2, elastic_ffn_groups=4)
    arch = ElasticArch.full(cfg)
    arch.ffn_hidden_size = {1: 46, 4: 48, 6: 48}
    with pytest.raises(ElasticArchError, match="multiple of elastic_ffn_groups \\(4\\)"):
        arch.validate(cfg)


@pytest.mark.parametrize("groups,tp,active", [(1, 2, 40), (2, 2, 40), (4, 2, 12), (1, 4, 10), (8, 4, 24)])
def test_ffn_local_index_is_the_global_choice_split_over_ranks(groups, tp, active):
    from megatron_elastic.model.layouts import FFNLayout

    ffn_local_index = lambda f, groups, active, tp, rank: FFNLayout(f, groups).local_neurons(active, tp, rank)
    F_ = 64
    want = sorted(g * (F_ // groups) + j for g in range(groups) for j in range(active // groups))
    shard = F_ // tp
    got = sorted(int(i) + r * shard for r in range(tp) for i in ffn_local_index(F_, groups, active, tp, r))
    assert got == want
    counts = [len(ffn_local_index(F_, groups, active, tp, r)) for r in range(tp)]
    if groups % tp == 0:
        assert len(set(counts)) == 1, "ffn_groups a multiple of TP balances the ranks"


def test_arch_json_round_trip_and_table():
    cfg = _cfg()
    arch = random_homogeneous_arch(cfg, random.Random(5))
    again = ElasticArch.from_json(arch.to_json())
    assert again == arch
    table = arch.table(cfg)
    assert f"hidden_size {arch.hidden_size}/32" in table and len(table.splitlines()) == 2 + len(PATTERN)
    with pytest.raises(ElasticArchError, match="unknown field"):
        ElasticArch.from_dict({"hidden_size": 3, "depth": 2})


# ---- heterogeneous choices against a float64 reference written here --------------------------------------
def reference_forward(sd, cfg, arch, ids):
    """Pure-PyTorch float64 forward of the sliced sub-model (per-layer sizes from ``arch``)."""
    from tests.model.test_mamba_mixer import reference_mixer

    sd = {k: v if v.dtype == torch.float64 else v.double() for k, v in sd.items()}
    rms = lambda x, w: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    x = sd["embedding.word_embeddings.weight"][ids].transpose(0, 1)  # [s, b, h]
    s = x.shape[0]
    kept = [i for i in range(len(cfg.hybrid_pattern)) if i not in arch.skipped_layers]
    for new, old in enumerate(kept):
        p = f"decoder.layers.{new}."
        sym = cfg.hybrid_pattern[old]
        if sym == "M":
            mixer_sd = {k[len(p + "mixer.") :]: v for k, v in sd.items() if k.startswith(p + "mixer.")}
            x = x + reference_mixer(
                mixer_sd,
                rms(x, sd[p + "norm.weight"]),
                arch.mamba_num_heads[old],
                arch.mamba_head_dim[old],
                cfg.mamba_num_groups,
                cfg.mamba_state_dim,
            )
        elif sym == "*":
            hn, groups = cfg.kv_channels, cfg.num_query_groups
            k = arch.num_attention_heads[old] // groups
            qkv = rms(x, sd[p + "input_layernorm.weight"]) @ sd[p + "self_attention.linear_qkv.weight"].T
            qkv = qkv.reshape(s, -1, groups, (k + 2) * hn)
            q, kk, v = qkv.split([k * hn, hn, hn], dim=-1)
            q = q.reshape(s, -1, groups, k, hn)
            scores = torch.einsum("sbgkd,tbgd->bgkst", q, kk) / hn**0.5
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            ctx = torch.einsum("bgkst,tbgd->sbgkd", scores.softmax(-1), v).reshape(s, -1, groups * k * hn)
            x = x + ctx @ sd[p + "self_attention.linear_proj.weight"].T
        else:
            hdn = rms(x, sd[p + "pre_mlp_layernorm.weight"]) @ sd[p + "mlp.linear_fc1.weight"].T
            x = x + F.relu(hdn).pow(2) @ sd[p + "mlp.linear_fc2.weight"].T
    x = rms(x, sd["decoder.final_norm.weight"])
    return (x @ sd["output_layer.weight"].T).transpose(0, 1)


def random_heterogeneous_arch(cfg, rng):
    arch = random_homogeneous_arch(cfg, rng)
    for i in arch.mamba_num_heads:
        arch.mamba_num_heads[i] = rng.choice(range(cfg.mamba_num_groups, cfg.mamba_num_heads + 1, cfg.mamba_num_groups))
        arch.mamba_head_dim[i] = rng.randint(1, cfg.mamba_head_dim)
    for i in arch.num_attention_heads:
        arch.num_attention_heads[i] = rng.choice(
            range(cfg.num_query_groups, cfg.num_attention_heads + 1, cfg.num_query_groups)
        )
    for i in arch.ffn_hidden_size:
        arch.ffn_hidden_size[i] = rng.randint(1, cfg.ffn_hidden_size)
    return arch


@pytest.mark.parametrize("seed", range(3))
def test_heterogeneous_choice_equals_float64_reference(single_process_parallel, seed):
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch

    cfg = _cfg()
    arch = random_heterogeneous_arch(cfg, random.Random(100 + seed)).validate(cfg)
    assert len(set(arch.ffn_hidden_size.values())) > 1 or len(set(arch.mamba_num_heads.values())) > 1
    torch.manual_seed(seed)
    model = build_elastic_model(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ids, pos, mask = _args(seq=13, seed=seed)
    with use_arch(model, arch):
        got = model(ids, pos, mask)
    sliced = {k: v.detach().double().requires_grad_(True) for k, v in slice_parent(sd, cfg, arch).items()}
    want = reference_forward(sliced, cfg, arch, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    # Gradients of the same loss: the elastic parent's grads, sliced by the test, equal the reference's.
    _loss(got).backward()
    _loss(want).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    for name, g in slice_parent(grads, cfg, arch).items():
        torch.testing.assert_close(g.double(), sliced[name].grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("seed", range(3))
def test_arch_parameters_equals_plain_model_count(single_process_parallel, seed):
    from megatron_elastic.elastic.cost import arch_parameters
    from megatron_elastic.model.builder import build_hybrid_model, parameter_count

    cfg = _cfg()
    arch = random_homogeneous_arch(cfg, random.Random(seed))
    small = build_hybrid_model(plain_config_for(cfg, arch))
    assert arch_parameters(cfg, arch) == parameter_count(small)
    full = build_hybrid_model(cfg)
    assert arch_parameters(cfg, ElasticArch.full(cfg)) == parameter_count(full)


def test_is_within_orders_nested_choices():
    cfg = _cfg()
    full = ElasticArch.full(cfg)
    small = ElasticArch.full(cfg)
    small.hidden_size, small.ffn_hidden_size[1], small.skipped_layers = 16, 24, (5,)
    assert small.is_within(full) and full.is_within(full)
    assert not full.is_within(small)
    wider_but_skips_more = ElasticArch.full(cfg)
    wider_but_skips_more.skipped_layers = (2,)  # small keeps layer 2, so small is not nested in it
    assert not small.is_within(wider_but_skips_more)
    bigger_ffn = ElasticArch.from_dict(small.to_dict())
    bigger_ffn.ffn_hidden_size[1] = 48
    assert small.is_within(bigger_ffn) and not bigger_ffn.is_within(small)


def test_a_frozen_model_on_one_sequence_never_copies_a_weight_per_token(single_process_parallel):
    """The frozen teacher, evaluation and importance run one sequence per micro-batch at 12B. With a weight
    without gradient, ``[s, 1, h] @ w.T`` on a ``transpose(0, 1)`` of ``[1, s, h]`` is not folded into one matrix
    product by torch: the CPU kernel copies ``w`` ``s`` times (1.6 GiB per Mamba ``out_proj`` shard at the
    12B's width, s = 128). One sequence must need at most the memory of two, and compute the same logits."""
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.testing import peak_live_tensor_bytes

    cfg = _cfg(hidden_size=64, ffn_hidden_size=128, vocab_size=512, params_dtype=torch.bfloat16, bf16=True)
    torch.manual_seed(0)
    model = build_elastic_model(cfg).eval().requires_grad_(False)  # bf16: the CPU's oneDNN product copies
    ids, pos, mask = _args(seq=128, batch=2)
    with torch.no_grad():
        both, peak_two = peak_live_tensor_bytes(lambda: model(ids, pos, mask))
        one, peak_one = peak_live_tensor_bytes(lambda: model(ids[:1], pos[:1], mask))
    torch.testing.assert_close(one[0], both[0], rtol=0.02, atol=0.02)
    assert peak_one <= peak_two, f"one sequence peaked at {peak_one} B of live tensors, two at {peak_two} B"
