"""Importance at TP=2 and at DP=2 equals importance at TP=1 (same scores, same global ranking), and a parent
sorted at TP=1 has unchanged logits when loaded at TP=2."""

import math

import torch

from megatron_elastic.testing import run_multiprocess
from tests.importance.test_importance import _batches, _forward
from tests.importance.test_permute import _cfg
from tests.model.test_tensor_parallel import _save


def _assert_scores_close(a, b, scale=1.0):
    torch.testing.assert_close(a.hidden, b.hidden * scale, rtol=1e-5, atol=1e-6)
    for name in ("mamba_heads", "mamba_head_dim", "attention_heads", "ffn"):
        da, db = getattr(a, name), getattr(b, name)
        assert da.keys() == db.keys()
        for i in da:
            torch.testing.assert_close(da[i], db[i] * scale, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}[{i}]: {m}")


def _job(rank, world, tmp):
    from megatron.core import dist_checkpointing

    from megatron_elastic.importance.permute import permute_state_dict
    from megatron_elastic.importance.width import collect_width_scores
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.parallel import initialize_parallel

    batches = _batches(4)
    # TP=1, DP=2. Every rank on every batch: the DP sum doubles the accumulators (scores x sqrt 2).
    initialize_parallel(1, 1, seed=9)
    model = build_hybrid_model(_cfg())
    reference = collect_width_scores(model, batches, _forward)
    # DP=2 proper: each rank half of the batches.
    dp = collect_width_scores(model, batches[rank::2], _forward)
    _assert_scores_close(dp, reference, 1 / math.sqrt(2))
    _save(model, f"{tmp}/weights")
    perm = reference.to_permutation(model.config)
    model.load_state_dict(permute_state_dict(model.state_dict(), model.config, perm))
    _save(model, f"{tmp}/sorted")

    # TP=2 (DP=1): both ranks see all batches; sharded accumulators are gathered in rank order.
    initialize_parallel(2, 1, seed=9)
    tp_model = build_hybrid_model(_cfg(tensor_model_parallel_size=2), parallel_output=False)
    tp_model.load_state_dict(dist_checkpointing.load(tp_model.sharded_state_dict(), f"{tmp}/weights"), strict=False)
    tp = collect_width_scores(tp_model, batches, _forward)
    _assert_scores_close(tp, reference, 1 / math.sqrt(2))
    assert torch.equal(tp.to_permutation(tp_model.config).hidden, perm.hidden)
    before = torch.cat([_forward(tp_model, b) for b in batches])
    tp_model.load_state_dict(dist_checkpointing.load(tp_model.sharded_state_dict(), f"{tmp}/sorted"), strict=False)
    after = torch.cat([_forward(tp_model, b) for b in batches])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_importance_tp2_dp2_equal_tp1_and_sorted_parent_loads_at_tp2(tmp_path):
    run_multiprocess(2, _job, str(tmp_path))
