"""The hybrid model at TP=2 (two gloo processes) equals the same weights at TP=1: logits and gradients.

Weights move between TP sizes through Megatron's distributed checkpoint (TP-independent keys), and so do
the TP=2 gradients on their way back for comparison, so a wrong shard layout in ``sharded_state_dict`` or a
wrong local slicing in the forward shows up as a mismatch.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.testing import run_multiprocess


def _loss_and_logits(model, ids):
    from megatron_elastic.model.builder import causal_attention_mask, position_ids_for

    logits = model(ids, position_ids_for(ids), causal_attention_mask(ids.shape[1]))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss, logits


def _grad(p):
    """A parameter's gradient; zeros for one outside the active sub-model (e.g. in a skipped layer)."""
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _grads_as_params(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_grad(p))


def _save(model, path):
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _builder(arch_dict):
    """The plain builder, or the elastic one set to ``arch_dict`` (an ElasticArch as a dict)."""
    from megatron_elastic.model.builder import build_hybrid_model

    if arch_dict is None:
        return build_hybrid_model

    def build(cfg, **kw):
        from megatron_elastic.elastic.arch import ElasticArch
        from megatron_elastic.elastic.layers.model import build_elastic_model, set_arch

        model = build_elastic_model(cfg, **kw)
        set_arch(model, ElasticArch.from_dict(arch_dict))
        return model

    return build


def _sum_sequence_parallel_grads(model):
    """What Megatron's finalize_model_grads does for weights marked ``sequence_parallel`` (replicated weights that
    each rank applies to its part of the sequence): sum their gradients over the TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    marked = [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    for p in marked:
        if p.grad is not None:  # None: a skipped layer's norm
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    return len(marked)


def _tp_job(rank, world, tmp, overrides, arch_dict=None, sequence_parallel=False):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    build_hybrid_model = _builder(arch_dict)

    torch.manual_seed(0)
    # not a multiple of the chunk size; with sequence parallelism a multiple of the TP size
    ids = torch.randint(0, 260, (2, 22 if sequence_parallel else 21))

    # Reference at TP=1 (both ranks compute it; they are data-parallel replicas).
    initialize_parallel(1, 1, seed=7)
    ref = build_hybrid_model(tiny_config(**overrides), parallel_output=False)
    ref_loss, ref_logits = _loss_and_logits(ref, ids)
    ref_loss.backward()
    _save(ref, f"{tmp}/weights")
    ref_grads = {n: _grad(p) for n, p in ref.named_parameters()}

    # Same weights at TP=2.
    initialize_parallel(2, 1, seed=11)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    tp2 = tiny_config(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, **overrides)
    model = build_hybrid_model(tp2, parallel_output=False)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/weights"), strict=False)
    loss, logits = _loss_and_logits(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    summed = _sum_sequence_parallel_grads(model)
    if sequence_parallel:
        assert summed == len(tp2.hybrid_pattern) + 1, "every pre-norm and the final norm are marked"
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
    run_multiprocess(
        2, _tp_job, str(tmp_path), dict(mamba_num_groups=4, num_attention_heads=8, num_query_groups=4, kv_channels=4)
    )


SUB_BUDGET = {
    "hidden_size": 24,
    "mamba_num_heads": {0: 4, 4: 6},
    "mamba_head_dim": {0: 5, 4: 8},
    "num_attention_heads": {2: 2},
    "ffn_hidden_size": {1: 40, 3: 64, 5: 10},
    "skipped_layers": [3],
}


@pytest.mark.parametrize("ffn_groups", [1, 2])
def test_tp2_matches_tp1_elastic_sub_budget(tmp_path, ffn_groups):
    # The elastic model at a heterogeneous sub-budget (fewer heads per group, channels, query heads, FFN,
    # hidden, a skipped layer): every TP rank slices its own shard. ffn_groups=1: the FFN choice is a prefix
    # (rank 0 does more); ffn_groups=2: both ranks keep the same number of neurons.
    run_multiprocess(2, _tp_job, str(tmp_path), {"elastic_ffn_groups": ffn_groups}, SUB_BUDGET)


@pytest.mark.parametrize("case", ["plain", "elastic-full", "elastic-sub-budget", "elastic-random"])
def test_tp2_sequence_parallel_matches_tp1(tmp_path, case):
    """TP=2 with sequence parallelism (activations between the TP linears split along the sequence): logits,
    loss and every gradient equal the TP=1 model's, for the plain model, the elastic model at its full choice,
    at a fixed heterogeneous sub-budget (sliced hidden, heads, channels, FFN, a skipped layer) and at a random one."""
    arch = None
    if case == "elastic-full":
        from megatron_elastic.elastic.arch import ElasticArch
        from megatron_elastic.testing import tiny_config

        arch = ElasticArch.full(tiny_config()).to_dict()
    elif case == "elastic-sub-budget":
        arch = SUB_BUDGET
    elif case == "elastic-random":
        import random

        from megatron_elastic.testing import tiny_config
        from tests.elastic.test_elastic_model import random_heterogeneous_arch

        cfg = tiny_config(tensor_model_parallel_size=2)
        arch = random_heterogeneous_arch(cfg, random.Random(2024)).validate(cfg).to_dict()
    run_multiprocess(2, _tp_job, str(tmp_path), {}, arch, True)
