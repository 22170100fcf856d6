"""The model and elastic training on one GPU (and two, for TP=2 + sequence parallelism over NCCL), against their
CPU twins. Skipped, with the reason, without CUDA (or TransformerEngine for the TE teacher). Run on a GPU machine
with ``pip install .[gpu,test]`` and ``pytest -m gpu -v``."""

import os
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.parametrize("heads", [8, 4])
def test_sdpa_flash_kernels_match_megatron_attention_bf16(single_process_parallel, heads):
    """SDPA's CUDA kernels (flash / cuDNN / memory-efficient, GQA without K/V copies) at the full and a sliced
    head count against Megatron's DotProductAttention in float32 on the same inputs."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_elastic.model.sdpa_attention import SDPAttention
    from megatron_elastic.testing import tiny_config

    cfg = tiny_config(num_attention_heads=8, num_query_groups=2, kv_channels=64)
    ours = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    ref.num_attention_heads_per_partition, ref.hidden_size_per_partition = heads, heads * 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(512, 2, heads, 64, device="cuda", generator=g)
    k, v = (torch.randn(512, 2, 2, 64, device="cuda", generator=g) for _ in range(2))
    mask = torch.ones(512, 512, dtype=torch.bool, device="cuda").triu(1)[None, None]
    got = ours(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    want = ref(q, k, v, mask)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_one_elastic_step_on_cuda_equals_its_cpu_twin(single_process_parallel):
    """The elastic model at a random sub-model: loss and gradients on CUDA (the mamba_ssm / causal_conv1d kernels
    when installed, SDPA's CUDA kernels) against the same weights on the CPU (pure-PyTorch twins), in float32."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from tests.elastic.test_elastic_model import _args, _cfg, random_heterogeneous_arch

    cfg = _cfg(mamba_chunk_size=8)
    arch = random_heterogeneous_arch(cfg, random.Random(3)).validate(cfg)
    torch.manual_seed(0)
    gpu = build_elastic_model(cfg).cuda()
    cpu = build_elastic_model(cfg)
    cpu.load_state_dict(gpu.state_dict())
    cpu = cpu.cpu()
    ids, pos, _ = _args(seq=64)
    results = []
    for model, device in ((gpu, "cuda"), (cpu, "cpu")):
        with use_arch(model, arch):
            logits = model(ids.to(device), pos.to(device), None)
        logits.float().square().mean().backward()
        results.append((logits.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.skipif(not _have_te(), reason="TransformerEngine is not installed")
def test_te_teacher_equals_the_local_teacher(single_process_parallel, tmp_path):
    """The frozen teacher is built with TransformerEngine's spec on a GPU with TE: the same checkpoint loaded
    into the TE and the local spec gives the same logits (bf16 tolerance)."""
    from megatron.core import dist_checkpointing

    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.model.kernels import Machine, teacher_kernels
    from megatron_elastic.testing import tiny_config
    from tests.elastic.test_elastic_model import _args

    assert teacher_kernels(Machine.here()).backend == "te"
    cfg = tiny_config(bf16=True, params_dtype=torch.bfloat16)
    local = build_hybrid_model(cfg, backend="local").cuda()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    te = build_hybrid_model(cfg, backend="te")
    te.load_state_dict(dist_checkpointing.load(te.sharded_state_dict(), str(tmp_path)), strict=False)
    ids, pos, _ = _args(seq=64)
    with torch.no_grad():
        a = local(ids.cuda(), pos.cuda(), None).float()
        b = te(ids.cuda(), pos.cuda(), None).float()
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_train_refuses_a_layout_that_does_not_fit_this_gpu(parent, tmp_path):
    """`train` runs `plan`'s memory check before its first step on CUDA: a stage far beyond this GPU is refused
    with the planner's message, before any model is built."""
    from megatron_elastic.elastic.run import train_elastic
    from megatron_elastic.errors import PlanError
    from tests.elastic.test_elastic_training import _config

    huge = (
        "curriculum.stages=[{name: s, tokens: 1000000000, seq_length: 262144, global_batch_size: 64, "
        "budget_weights: [1, 1, 1]}]"
    )
    cfg = _config(parent, str(tmp_path / "run"), overrides=[huge, "train.micro_batch_size=64"])
    with pytest.raises(PlanError, match="needs .* GiB per GPU"):
        train_elastic(cfg, progress=False)


def test_tiny_pipeline_end_to_end_on_one_gpu_bf16(tmp_path):
    """The demo's whole pipeline (data, pretraining, importance, elastic training, extraction, evaluation) on one
    GPU with bf16 parameters and the fused kernels: it finishes and every score is finite."""
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    bf16 = ["--precision", "bfloat16"]
    subprocess.run(
        [sys.executable, "-m", "megatron_elastic.cli", "demo", "--quick", "--out", str(out), "--no-progress", *bf16],
        check=True,
        timeout=1800,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")},
    )
    summary = json.loads((out / "elastic" / "summary.json").read_text())
    assert all(v["valid_loss_after"] == v["valid_loss_after"] for v in summary["budgets"].values())
    assert (out / "report.md").is_file()


def _sp_job(rank, world, tmp):
    from tests.model.test_tensor_parallel import _tp_job

    _tp_job(rank, world, tmp, {}, None, True)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="TP=2 with sequence parallelism over NCCL needs 2 GPUs (or no CUDA)"
)
def test_tp2_sequence_parallel_nccl_matches_tp1(tmp_path):
    from megatron_elastic.testing import run_multiprocess

    run_multiprocess(2, _sp_job, str(tmp_path))
