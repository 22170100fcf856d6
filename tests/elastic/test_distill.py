"""KD loss == torch's KL divergence at TP=1 (value and gradient), and the vocab-parallel loss at TP=2 == TP=1."""

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.elastic.distill import kd_loss
from megatron_elastic.testing import run_multiprocess


def _reference(student, teacher, T, mask):
    kl = F.kl_div(
        F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True, reduction="none"
    ).sum(-1)
    return (kl * mask).sum() / mask.sum() * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_matches_torch_kl(T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    ours = kd_loss(s, t, T, mask)
    ref = _reference(s.float(), t.float(), T, mask.float())
    assert float(ours.detach()) == pytest.approx(float(ref), rel=1e-5)
    (g1,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(_reference(s2, t, T, mask), s2)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


def _tp_job(rank, world):
    from megatron.core import parallel_state

    from megatron_elastic.parallel import initialize_parallel

    initialize_parallel(2, 1)
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(2, 4, 10, generator=g)
    t_full = torch.randn(2, 4, 10, generator=g)
    ref_s = s_full.clone().requires_grad_(True)
    ref = kd_loss(ref_s, t_full, 1.5)
    ref.backward()
    shard = slice(rank * 5, (rank + 1) * 5)
    s = s_full[..., shard].clone().requires_grad_(True)
    loss = kd_loss(s, t_full[..., shard], 1.5, tp_group=parallel_state.get_tensor_model_parallel_group())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, ref_s.grad[..., shard], rtol=1e-5, atol=1e-7)


def test_vocab_parallel_kd_loss_at_tp2_equals_tp1():
    run_multiprocess(2, _tp_job)
