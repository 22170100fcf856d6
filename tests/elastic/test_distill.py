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


def test_a_trainable_teacher_pair_gives_the_gradients_of_kd_plus_alpha_ce_of_the_full_budget(
    single_process_parallel,
):
    """Eq. 15 through the pair: the teacher half is the student at its full budget (with gradients), the student
    half the drawn sub-model; KD(sub || full, detached) + alpha CE(full) gives every weight the gradient of the same
    loss written out with torch's log-softmax and cross-entropy on two forwards of an identical copy (float64; the KD
    loss itself computes in float32, hence the tolerance)."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.elastic.router import Router
    from megatron_elastic.elastic.space import ElasticSpace
    from megatron_elastic.elastic.teacher import DistillationPair
    from megatron_elastic.model.builder import position_ids_for
    from tests.importance.test_permute import _cfg

    cfg = _cfg(params_dtype=torch.float64)
    torch.manual_seed(0)
    model, twin, frozen = (build_elastic_model(cfg).double() for _ in range(3))
    twin.load_state_dict(model.state_dict())
    router = Router(cfg, ElasticSpace.default(cfg, depth_ranking=[0, 3, 1, 2, 4, 5]), (1.0, 0.6), hidden=16).double()
    arch, gates, _ = router.sample(0.6, tau=0.5, generator=torch.Generator().manual_seed(3))
    assert arch != arch.full(cfg)
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    alpha = 0.7

    pair = DistillationPair(model, frozen, cfg, True, True)
    pair.trainable_teacher = True
    student_logits, teacher_logits = pair(ids, position_ids_for(ids), None, choice=(arch, gates))
    ce = F.cross_entropy(teacher_logits.reshape(-1, teacher_logits.shape[-1]), labels.reshape(-1))
    (kd_loss(student_logits, teacher_logits) + alpha * ce).backward()

    with use_arch(twin, None):
        full = twin(ids, position_ids_for(ids), None)
    with use_arch(twin, arch, {k: g.detach() for k, g in gates.items()}):
        sub = twin(ids, position_ids_for(ids), None)
    p_full = F.log_softmax(full.detach(), -1)
    kl = (p_full.exp() * (p_full - F.log_softmax(sub, -1))).sum(-1).mean()
    (kl + alpha * F.cross_entropy(full.reshape(-1, full.shape[-1]), labels.reshape(-1))).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), (name, p.grad is None, q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in pair.teacher.parameters()), "the frozen copy is not used"
