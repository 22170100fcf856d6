"""The hybrid model split over PP=2 stages (two gloo processes, Megatron's 1F1B schedule) computes the same
loss and gradients as PP=1 with the same weights."""

import torch

from megatron_elastic.testing import run_multiprocess
from tests.model.test_tensor_parallel import _grad, _save

SEQ, MBS, NUM_MICRO = 20, 2, 2


def _loss_and_grads(model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_elastic.compat import cuda_to_cpu
    from megatron_elastic.training.lm import lm_forward_step

    with cuda_to_cpu():
        losses = get_forward_backward_func()(
            forward_step_func=lm_forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=NUM_MICRO,
            seq_length=SEQ,
            micro_batch_size=MBS,
            forward_only=False,
        )
    return torch.stack([d["lm loss"] for d in losses]).mean() if losses else None


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_MICRO):
        t = torch.randint(0, 260, (MBS, SEQ + 1), generator=g)
        out.append(
            {
                "tokens": t[:, :-1],
                "labels": t[:, 1:],
                "loss_mask": torch.ones(MBS, SEQ),
                "position_ids": torch.arange(SEQ).expand(MBS, -1),
            }
        )
    return out


def _pp_job(rank, world, tmp, arch_dict=None, layer_overrides=None):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config
    from tests.model.test_tensor_parallel import _builder

    build_hybrid_model = _builder(arch_dict)

    pattern, sizes = "M-*M-M", {"layer_overrides": layer_overrides} if layer_overrides else {}
    initialize_parallel(1, 1, seed=3)
    ref = build_hybrid_model(tiny_config(hybrid_pattern=pattern, **sizes))
    ref_loss = _loss_and_grads(ref, _batches())
    _save(ref, f"{tmp}/weights")
    ref_grads = {n: _grad(p) for n, p in ref.named_parameters()}

    initialize_parallel(1, 2, seed=5)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = build_hybrid_model(
        tiny_config(hybrid_pattern=pattern, pipeline_model_parallel_size=2, **sizes),
        pre_process=first,
        post_process=last,
    )
    assert len(model.decoder.layers) == 3
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/weights"), strict=False)
    loss = _loss_and_grads(model, _batches())
    if last:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # Each stage's grads, stored under global layer numbers, compared with the PP=1 grads.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_grad(p))
    _save(model, f"{tmp}/grads")
    initialize_parallel(1, 1, seed=3)
    back = build_hybrid_model(tiny_config(hybrid_pattern=pattern, **sizes))
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), f"{tmp}/grads"), strict=False)
    for name, p in back.named_parameters():
        torch.testing.assert_close(p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_pp2_matches_pp1(tmp_path):
    run_multiprocess(2, _pp_job, str(tmp_path))


def test_pp2_matches_pp1_elastic_with_skipped_layer_per_stage(tmp_path):
    # Layers 0-2 on stage 0, 3-5 on stage 1; one skipped on each; smaller hidden crosses the stage boundary.
    arch = {
        "hidden_size": 20,
        "mamba_num_heads": {0: 4, 3: 8, 5: 2},
        "mamba_head_dim": {0: 8, 3: 3, 5: 8},
        "num_attention_heads": {2: 2},
        "ffn_hidden_size": {1: 64, 4: 16},
        "skipped_layers": [1, 4],
    }
    run_multiprocess(2, _pp_job, str(tmp_path), arch)


def test_pp2_matches_pp1_heterogeneous_layers(tmp_path):
    """An extracted sub-model's per-layer sizes on both stages: stage 1's layers get their own global layer's
    sizes (a wrong layer index builds the parent's sizes, and the PP=1 weights then fail to load)."""
    overrides = {
        1: {"ffn_hidden_size": 24},
        2: {"num_attention_heads": 2},
        3: {"mamba_num_heads": 4},
        4: {"ffn_hidden_size": 16},
        5: {"mamba_head_dim": 4},
    }
    run_multiprocess(2, _pp_job, str(tmp_path), None, overrides)
