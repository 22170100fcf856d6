"""The hybrid model at TP=2 (two gloo processes) equals the same weights at TP=1: logits and gradients.

Weights move between TP sizes through Megatron's distributed checkpoint (TP-independent keys), and so do
the TP=2 gradients on their way back for comparison, so a wrong shard layout in ``sharded_state_dict`` or a
wrong local slicing in the forward shows up as a mismatch.
"""

import torch
import torch.nn.functional as F

from megatron_elastic.testing import run_multiprocess


def _loss_and_logits(model, ids):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    logits = model(ids, position_ids_for(ids), causal_attention_mask(ids.shape[1]))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss, logits


def _grads_as_params(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)


def _save(model, path):
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _tp_job(rank, world, tmp, overrides):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    torch.manual_seed(0)
    ids = torch.randint(0, 260, (2, 21))  # 21: not a multiple of the chunk size

    # Reference at TP=1 (both ranks compute it; they are data-parallel replicas).
    initialize_parallel(1, 1, seed=7)
    ref = build_hybrid_model(tiny_config(**overrides), parallel_output=False)
    ref_loss, ref_logits = _loss_and_logits(ref, ids)
    ref_loss.backward()
    _save(ref, f"{tmp}/weights")
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    # Same weights at TP=2.
    initialize_parallel(2, 1, seed=11)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    model = build_hybrid_model(tiny_config(tensor_model_parallel_size=2, **overrides), parallel_output=False)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/weights"), strict=False)
    loss, logits = _loss_and_logits(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    _grads_as_params(model)
    _save(model, f"{tmp}/grads")

    # Gather the TP=2 grads back into the TP=1 layout and compare parameter by parameter.
    initialize_parallel(1, 1, seed=7)
    back = build_hybrid_model(tiny_config(**overrides), parallel_output=False)
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), f"{tmp}/grads"), strict=False)
    for name, p in back.named_parameters():
        torch.testing.assert_close(p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_tp2_matches_tp1_gqa_and_mamba_groups(tmp_path):
    run_multiprocess(2, _tp_job, str(tmp_path), {})


def test_tp2_matches_tp1_more_groups_than_ranks(tmp_path):
    # 4 Mamba groups over 2 ranks (2 local groups each), 8 query heads in 4 KV groups.
    run_multiprocess(2, _tp_job, str(tmp_path), dict(mamba_num_groups=4, num_attention_heads=8,
                                                     num_query_groups=4, kv_channels=4))
