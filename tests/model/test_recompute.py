"""Full activation recomputation gives the same loss and gradients and keeps fewer activations."""

import torch

from tests.importance.test_permute import _cfg
from tests.model.test_elastic_model import _args


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
    recomputed = build_hybrid_model(_cfg(recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=1))
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
