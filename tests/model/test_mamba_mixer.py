"""Our MambaMixer loads a state dict with Megatron MambaMixer's names and shapes (built by hand here) and
computes the Mamba-2 mixer exactly as a float64 token-by-token reference written from those raw tensors."""

import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_ssd_scan import sequential_conv, sequential_ssd


def megatron_mixer_state_dict(d_model, nheads, headdim, ngroups, d_state, d_conv, gen, conv="conv1d."):
    """Names and shapes of megatron.core.ssm.mamba_mixer.MambaMixer at TP=1 (in_proj = [z|x|B|C|dt]).
    ``conv``: "conv1d." (megatron-core 0.16/0.17, an nn.Conv1d) or "conv1d_" (0.18+, two parameters)."""
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3
    return {
        "in_proj.weight": r(2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "in_proj._extra_state": None,
        f"{conv}weight": r(conv_dim, 1, d_conv),
        f"{conv}bias": r(conv_dim),
        "dt_bias": r(nheads),
        "A_log": torch.rand(nheads, generator=gen).log(),
        "D": r(nheads),
        "norm.weight": 1 + r(d_inner),
        "out_proj.weight": r(d_model, d_inner),
        "out_proj._extra_state": None,
    }


def reference_mixer(sd, hidden, nheads, headdim, ngroups, d_state):
    """float64, token by token, from the raw tensors (hidden: [s, b, d_model])."""
    sd = {k: v.double() for k, v in sd.items() if v is not None}
    h = hidden.double().transpose(0, 1)  # b s d
    d_inner, bc = nheads * headdim, ngroups * d_state
    zxbcdt = h @ sd["in_proj.weight"].T
    z, xBC, dt = zxbcdt.split([d_inner, d_inner + 2 * bc, nheads], dim=-1)
    xBC = sequential_conv(xBC.transpose(1, 2), sd["conv1d.weight"][:, 0], sd["conv1d.bias"]).transpose(1, 2)
    x, B, C = xBC.split([d_inner, bc, bc], dim=-1)
    b, s = x.shape[:2]
    y, _ = sequential_ssd(
        x.reshape(b, s, nheads, headdim),
        dt,
        -sd["A_log"].exp(),
        B.reshape(b, s, ngroups, d_state),
        C.reshape(b, s, ngroups, d_state),
        sd["D"],
        None,
        sd["dt_bias"],
        torch.zeros(b, nheads, headdim, d_state, dtype=torch.float64),
    )
    y = y.reshape(b, s, d_inner) * F.silu(z)
    gs = d_inner // ngroups
    yg = y.reshape(b, s, ngroups, gs)
    y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, s, d_inner) * sd["norm.weight"]
    return (y @ sd["out_proj.weight"].T).transpose(0, 1)


@pytest.mark.parametrize("conv", ["conv1d.", "conv1d_"], ids=["mcore0.16-names", "mcore0.18-names"])
def test_megatron_state_dict_loads_and_matches_reference(single_process_parallel, conv):
    from megatron_elastic.testing import tiny_config

    cfg = tiny_config(mamba_num_heads=8, mamba_head_dim=4, mamba_num_groups=4, mamba_state_dim=6, mamba_chunk_size=5)
    from megatron_elastic.model.builder import build_hybrid_model

    model = build_hybrid_model(cfg)
    mixer = model.decoder.layers[0].mixer
    sd = megatron_mixer_state_dict(cfg.hidden_size, 8, 4, 4, 6, 4, torch.Generator().manual_seed(0), conv)
    missing, unexpected = mixer.load_state_dict(dict(sd), strict=True)
    assert not missing and not unexpected
    hidden = torch.randn(17, 2, cfg.hidden_size)
    out, bias = mixer(hidden)
    assert bias is None
    ref = reference_mixer({k.replace("conv1d_", "conv1d."): v for k, v in sd.items()}, hidden, 8, 4, 4, 6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_sharded_state_dict_uses_megatron_split_keys(single_process_parallel):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.testing import tiny_config

    model = build_hybrid_model(tiny_config())
    sd = model.sharded_state_dict()
    factory = sd["decoder.layers.0.mixer.in_proj.weight"]
    assert isinstance(factory, ShardedTensorFactory)
    parts = factory.build()
    assert [p.key.rsplit(".", 1)[1] for p in parts] == ["z", "x", "B", "C", "dt"]
    assert sum(p.data.shape[0] for p in parts) == factory.data.shape[0]
    conv_parts = sd["decoder.layers.0.mixer.conv1d.weight"].build()
    assert [p.key.rsplit(".", 1)[1] for p in conv_parts] == ["x", "B", "C"]
    # Separate norms are stored under TransformerEngine's fused names, as Megatron's checkpoints have them.
    assert sd["decoder.layers.0.norm.weight"].key == "decoder.layers.0.mixer.in_proj.layer_norm_weight"
    assert sd["decoder.layers.1.pre_mlp_layernorm.weight"].key == "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"


def test_mixer_reports_megatron_part_sizes_and_state_shapes(single_process_parallel):
    """What megatron-core >= 0.18 asks of a mixer: TP-local part sizes on the packed parameters (resharding) and
    per-request state shapes (dynamic inference), here checked against the sizes written out by hand."""
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.testing import tiny_config

    cfg = tiny_config(mamba_num_heads=8, mamba_head_dim=4, mamba_num_groups=2, mamba_state_dim=6)
    mixer = build_hybrid_model(cfg).decoder.layers[0].mixer
    assert mixer.in_proj.weight.partition_sizes == [32, 32, 12, 12, 8]  # z, x (8*4), B, C (2*6), dt (8)
    assert mixer.conv1d.weight.partition_sizes == [32, 12, 12]  # x, B, C
    assert sum(mixer.in_proj.weight.partition_sizes) == mixer.in_proj.weight.shape[0]
    assert mixer.mamba_state_shapes_per_request() == ((56, 4), (8, 4, 6))
