"""The hybrid model split over PP=2 stages (two gloo processes, Megatron's 1F1B schedule) computes the same
loss and gradients as PP=1 with the same weights."""

import torch

from megatron_elastic.testing import run_multiprocess
from tests.model.test_tensor_parallel import _grad, _save

SEQ, MBS, NUM_MICRO = 20, 2, 2


def _loss_and_grads(model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_elastic.training.lm import lm_forward_step

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


# Three micro-batches, each at its own sub-model (as elastic training samples a budget per micro-batch).
MICRO_ARCHS = [
    None,  # the full parent
    {
        "hidden_size": 20,
        "mamba_num_heads": {0: 4, 3: 8, 5: 2},
        "mamba_head_dim": {0: 8, 3: 3, 5: 8},
        "num_attention_heads": {2: 2},
        "ffn_hidden_size": {1: 64, 4: 16},
        "skipped_layers": [4],
    },
    {
        "hidden_size": 28,
        "mamba_num_heads": {0: 2, 3: 4, 5: 6},
        "mamba_head_dim": {0: 3, 3: 8, 5: 5},
        "num_attention_heads": {2: 4},
        "ffn_hidden_size": {1: 8, 4: 48},
        "skipped_layers": [1],
    },
]


def _per_micro_batch_grads(model, gates, batches):
    """Megatron's schedule over len(batches) micro-batches, micro-batch k at MICRO_ARCHS[k] with router-like
    gates (a slice of ``gates`` per micro-batch) on the hidden width and on layers 0, 2 and 5 (two on layer 5:
    the layer multiplies by their product, as with the router's axis and depth gates)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.layers.model import set_arch
    from megatron_elastic.training.lm import lm_forward_step

    counter = iter(range(len(batches)))

    def forward_step(data_iterator, model):
        k = next(counter)
        arch = ElasticArch.from_dict(MICRO_ARCHS[k]) if MICRO_ARCHS[k] else None
        g = gates[5 * k : 5 * k + 5]
        keys = ("hidden", "mamba_heads.0", "attention_heads.2", "mamba_heads.5", "depth.5")
        set_arch(model, arch, dict(zip(keys, g)))
        return lm_forward_step(data_iterator, model)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    set_arch(model, None)
    return torch.stack([d["lm loss"] for d in losses]) if losses else None


def _pp_recompute_job(rank, world, tmp):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    pattern, n = "M-*M-M", len(MICRO_ARCHS)
    batches = [_batches()[0], _batches()[1], _batches()[0]]
    initialize_parallel(1, 1, seed=3)
    ref = build_elastic_model(tiny_config(hybrid_pattern=pattern))
    ref_gates = torch.nn.Parameter(torch.linspace(0.7, 1.3, 5 * n))
    ref_losses = _per_micro_batch_grads(ref, ref_gates, batches)
    _save(ref, f"{tmp}/weights")
    ref_grads = {name: _grad(p) for name, p in ref.named_parameters()}

    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    initialize_parallel(1, 2, seed=5)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    cfg = tiny_config(hybrid_pattern=pattern, pipeline_model_parallel_size=2, **recompute)
    model = build_elastic_model(cfg, pre_process=first, post_process=last)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/weights"), strict=False)
    gates = torch.nn.Parameter(torch.linspace(0.7, 1.3, 5 * n))
    losses = _per_micro_batch_grads(model, gates, batches)
    if last:
        torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-6)
    # each stage holds the gradient of the gates of its own layers: sum over the stages, as the router's is
    dist.all_reduce(gates.grad, group=parallel_state.get_pipeline_model_parallel_group())
    torch.testing.assert_close(gates.grad, ref_gates.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_grad(p))
    _save(model, f"{tmp}/grads")
    initialize_parallel(1, 1, seed=3)
    back = build_elastic_model(tiny_config(hybrid_pattern=pattern))
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), f"{tmp}/grads"), strict=False)
    for name, p in back.named_parameters():
        torch.testing.assert_close(p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_pp2_recompute_with_a_sub_model_per_micro_batch_matches_pp1(tmp_path):
    """1F1B runs micro-batch k+1's forward before micro-batch k's backward; with full recompute, k's layers re-run
    in that backward. Losses, every weight gradient and the gates' gradients equal PP=1 without recompute."""
    run_multiprocess(2, _pp_recompute_job, str(tmp_path))
