"""Full activation recomputation gives the same loss and gradients and keeps fewer activations."""

import torch

from tests.elastic.test_elastic_model import _args
from tests.importance.test_permute import _cfg


def _loss_and_grads(model, ids, pos, mask):
    model.zero_grad()
    loss = model(ids, pos, mask).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_matches_and_saves_memory(single_process_parallel):
    from megatron_elastic.model.builder import build_hybrid_model

    ids, pos, mask = _args(seq=64, batch=2)
    torch.manual_seed(0)
    plain = build_hybrid_model(_cfg())
    torch.manual_seed(0)
    recomputed = build_hybrid_model(
        _cfg(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    )
    recomputed.load_state_dict(plain.state_dict())
    l1, g1 = _loss_and_grads(plain, ids, pos, mask)
    l2, g2 = _loss_and_grads(recomputed, ids, pos, mask)
    torch.testing.assert_close(l2, l1, rtol=0, atol=0)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-6, atol=1e-7, msg=k)

    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, pos, mask).float().pow(2).mean()
        return sum(total)

    assert saved_bytes(recomputed) < 0.5 * saved_bytes(plain)


def test_recompute_with_skipped_layers_matches_the_plain_elastic_model(single_process_parallel):
    """Depth choices under recompute (the 12B recipe's setting): a sub-model with skipped layers gives the same
    loss and gradients as without recompute. megatron-core >= 0.18 recomputes inside its own stack, looping over
    the stage's layer count, so skipped layers must shorten that count too."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from tests.elastic.test_elastic_model import _cfg as elastic_cfg

    ids, pos, mask = _args(seq=21, batch=2)
    cfg = elastic_cfg()
    full = ElasticArch.full(cfg)
    arch = ElasticArch(
        hidden_size=24,
        mamba_num_heads=full.mamba_num_heads,
        mamba_head_dim=full.mamba_head_dim,
        num_attention_heads=full.num_attention_heads,
        ffn_hidden_size={i: 32 for i in full.ffn_hidden_size},
        skipped_layers=(1, 3, 6),
    )
    torch.manual_seed(0)
    plain = build_elastic_model(cfg)
    recomputed = build_elastic_model(
        elastic_cfg(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    )
    recomputed.load_state_dict(plain.state_dict())
    with use_arch(plain, arch):
        l1, g1 = _loss_and_grads(plain, ids, pos, mask)
    with use_arch(recomputed, arch):
        l2, g2 = _loss_and_grads(recomputed, ids, pos, mask)
    torch.testing.assert_close(l2, l1, rtol=0, atol=0)
    assert g1.keys() == g2.keys()
    for i in arch.skipped_layers:
        assert not any(k.startswith(f"decoder.layers.{i}.") for k in g1), "a skipped layer received gradients"
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-6, atol=1e-7, msg=k)


def test_recompute_still_matches_after_the_sequence_length_changes(single_process_parallel):
    """A curriculum stage switch changes the sequence length: Megatron's compiled fused functions then see a second
    shape. Recomputation must re-run each layer exactly as its forward ran, at every length, in either order."""
    from megatron_elastic.model.builder import build_hybrid_model

    torch.manual_seed(0)
    plain = build_hybrid_model(_cfg())
    recomputed = build_hybrid_model(
        _cfg(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    )
    recomputed.load_state_dict(plain.state_dict())
    for seq in (64, 96, 64, 128, 96):
        ids, pos, mask = _args(seq=seq, batch=2)
        l1, g1 = _loss_and_grads(plain, ids, pos, mask)
        l2, g2 = _loss_and_grads(recomputed, ids, pos, mask)
        torch.testing.assert_close(l2, l1, rtol=0, atol=0)
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-6, atol=1e-7, msg=k)
