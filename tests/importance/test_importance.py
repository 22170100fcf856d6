"""Width scores match a direct computation; the sort by them keeps the function; depth ranks a no-op layer last."""

import pytest
import torch

from megatron_elastic.errors import ConfigError
from tests.importance.test_permute import _cfg, _logits


def _batches(n=3, seq=15, batch=2):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 260, (batch, seq), generator=g)
        out.append((ids, position_ids_for(ids), causal_attention_mask(seq)))
    return out


def _forward(model, batch):
    return model(*batch)


def _hidden(model, batch):
    from megatron_elastic.training.lm import final_hidden

    return final_hidden(model, *batch)


def test_width_scores_match_direct_computation(single_process_parallel):
    from megatron_elastic.importance.width import collect_width_scores
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_hybrid_model(cfg)
    batches = _batches()
    scores = collect_width_scores(model, batches, _forward)
    # Direct: recompute the FFN input of layer 1 and the attention context of layer 2 by capturing them.
    captured = {}
    h1 = model.decoder.layers[1].mlp.linear_fc2.register_forward_pre_hook(
        lambda m, i: captured.setdefault("ffn", []).append(i[0].detach())
    )
    h2 = model.decoder.layers[2].self_attention.linear_proj.register_forward_pre_hook(
        lambda m, i: captured.setdefault("attn", []).append(i[0].detach())
    )
    with torch.no_grad():
        for b in batches:
            model(*b)
    h1.remove(), h2.remove()
    agg = lambda acts: torch.stack([a.abs().mean(0).pow(2).sum(0) for a in acts]).sum(0).sqrt()
    torch.testing.assert_close(scores.ffn[1], agg(captured["ffn"]))
    attn = agg(captured["attn"]).view(cfg.num_attention_heads, cfg.kv_channels).norm(dim=1)
    torch.testing.assert_close(scores.attention_heads[2], attn)
    assert scores.hidden.shape == (cfg.hidden_size,) and (scores.hidden > 0).all()
    assert scores.mamba_heads[0].shape == (cfg.mamba_num_heads,)
    assert scores.mamba_head_dim[3].shape == (cfg.mamba_head_dim,)


def test_mamba_heads_scored_over_the_top_channels_d_top(single_process_parallel):
    """Eq. 3-4: channel scores are the L2 over heads of the x activations; with ``mamba_head_channels=K`` a head's
    score is the L2 over the K top channels only (captured and computed here), which can reorder the heads."""
    from megatron_elastic.importance.width import WidthStatistics, accumulate_width
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_hybrid_model(cfg)
    stats = accumulate_width(model, _batches(), _forward, WidthStatistics())
    mixer, captured = model.decoder.layers[0].mixer, []
    x = mixer.layout.in_proj_part("x")
    hook = mixer.in_proj.register_forward_hook(lambda m, i, o: captured.append(o[0][..., x].detach()))
    with torch.no_grad():
        for b in _batches():
            model(*b)
    hook.remove()
    grid = torch.stack([a.abs().mean(0).pow(2).sum(0) for a in captured]).sum(0).sqrt()
    grid = grid.view(cfg.mamba_num_heads, cfg.mamba_head_dim)
    channels = grid.norm(dim=0)
    orders = set()
    for k in (0, 1, 2, cfg.mamba_head_dim):
        scores = stats.scores(cfg, mamba_head_channels=k)
        top = torch.sort(-channels, stable=True).indices[: k or cfg.mamba_head_dim]
        torch.testing.assert_close(scores.mamba_head_dim[0], channels)
        torch.testing.assert_close(scores.mamba_heads[0], grid[:, top].norm(dim=1))
        orders.add(tuple(scores.to_permutation(cfg).mamba_heads[0].tolist()))
    assert len(orders) > 1, "D_top changes which heads come first on this model"
    with pytest.raises(ConfigError, match="--mamba-head-channels"):
        stats.scores(cfg, mamba_head_channels=cfg.mamba_head_dim + 1)


def test_sort_by_scores_keeps_logits_and_puts_important_units_first(single_process_parallel):
    from megatron_elastic.importance.permute import permute_state_dict
    from megatron_elastic.importance.width import collect_width_scores
    from megatron_elastic.model.builder import build_hybrid_model

    cfg = _cfg()
    torch.manual_seed(2)
    model = build_hybrid_model(cfg)
    before = _logits(model)
    scores = collect_width_scores(model, _batches(), _forward)
    model.load_state_dict(permute_state_dict(model.state_dict(), cfg, scores.to_permutation(cfg)))
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    again = collect_width_scores(model, _batches(), _forward)
    assert (again.hidden.diff() <= 1e-5).all(), "hidden scores must now be descending"
    assert (again.ffn[1].diff() <= 1e-5).all()
    per_group = again.mamba_heads[0].view(cfg.mamba_num_groups, -1)
    assert (per_group.diff(dim=1) <= 1e-5).all(), "Mamba heads descending within every group"


@pytest.mark.parametrize("iterative", [False, True])
def test_depth_ranks_an_exact_noop_layer_last(single_process_parallel, iterative):
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.importance.depth import depth_scores

    cfg = _cfg()
    torch.manual_seed(3)
    model = build_elastic_model(cfg)
    with torch.no_grad():
        model.decoder.layers[4].mlp.linear_fc2.weight.zero_()  # layer 4 now adds exactly nothing
    scores, ranking = depth_scores(model, _batches(2), _hidden, iterative=iterative)
    assert ranking[-1] == 4
    assert float(scores[4]) == 0.0
    assert (scores[torch.arange(len(scores)) != 4] > 0).all()
    assert sorted(ranking) == list(range(len(cfg.hybrid_pattern)))


def test_depth_nmse_from_logit_chunks_equals_float64_on_whole_logits_and_never_makes_them(single_process_parallel):
    """The memory-bounded depth score (logits a few tokens at a time, vocab-sharded, only float64 sums kept) equals
    NMSE computed in float64 on every batch's whole logits, and no logits tensor longer than a chunk is made."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.importance.depth import depth_scores

    cfg = _cfg()
    torch.manual_seed(4)
    model = build_elastic_model(cfg).eval()
    batches = _batches(2, seq=33, batch=3)
    n = len(cfg.hybrid_pattern)
    num, den = torch.zeros(n, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            full = model(*b).double()
            den += full.pow(2).sum()
            for j in range(n):
                arch = ElasticArch.full(cfg)
                arch.skipped_layers = (j,)
                with use_arch(model, arch):
                    num[j] += (full - model(*b).double()).pow(2).sum()
    reference = num / den

    rows = []
    hook = model.output_layer.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
    chunk = 5  # tokens per chunk: 33 tokens in 7 chunks
    scores, ranking = depth_scores(model, batches, _hidden, chunk_bytes=4 * cfg.vocab_size * 3 * chunk)
    hook.remove()
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=0)
    assert ranking == torch.sort(-reference, stable=True).indices.tolist()
    assert rows and max(rows) == chunk


def test_a_depth_batch_holds_less_than_one_copy_of_its_float32_logits(single_process_parallel):
    """With a vocabulary much wider than the model (the 12B's 131,072 ids over 5,120 channels, scaled down), one
    depth batch's peak of live tensor bytes stays below the float32 logits of the batch: they are never made whole."""
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.importance.depth import DepthSearch
    from megatron_elastic.testing import peak_live_tensor_bytes

    cfg = _cfg(vocab_size=16384)
    torch.manual_seed(5)
    model = build_elastic_model(cfg).eval()
    (batch,) = _batches(1, seq=128, batch=2)
    search = DepthSearch(len(cfg.hybrid_pattern))
    with torch.no_grad():
        _, peak = peak_live_tensor_bytes(
            lambda: search.add_batch(model, batch, _hidden, chunk_bytes=4 * 16384 * 2 * 16)
        )
    whole = 4 * 128 * 2 * cfg.vocab_size
    assert peak < whole / 2, f"peak {peak:,} bytes vs the batch's float32 logits {whole:,}"


@pytest.mark.parametrize("iterative", [False, True])
def test_plan_counts_the_passes_the_importance_job_makes(single_process_parallel, iterative):
    """``plan``'s importance GPU-hours rest on a count of forward passes per token: the one the width pass and a
    real depth search make (counted by hooks on the stack and the output layer) is that count."""
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.importance.depth import depth_scores
    from megatron_elastic.importance.width import collect_width_scores
    from megatron_elastic.plan import importance_passes

    cfg = _cfg()
    model = build_elastic_model(cfg)
    batches = _batches(2, seq=16, batch=2)
    tokens = sum(b[0].numel() for b in batches)
    seen = {"body": 0, "output": 0}
    count = lambda key: lambda m, i, o: seen.__setitem__(key, seen[key] + (o[0] if key == "output" else o).shape[0])
    hooks = [
        model.decoder.register_forward_hook(count("body")),
        model.output_layer.register_forward_hook(count("output")),
    ]
    collect_width_scores(model, batches, _hidden)
    depth_scores(model, batches, _hidden, iterative=iterative)
    for h in hooks:
        h.remove()
    body, output = importance_passes(len(cfg.hybrid_pattern), iterative)
    assert (seen["body"] * 2, seen["output"] * 2) == (body * tokens, output * tokens)  # [s, b]: rows are s, b = 2
