"""The 12B recipe's parent is Nemotron Nano V2 12B (12.31B parameters); `plan` resolves it and refuses layouts
that cannot fit, naming the reason."""

import os

import pytest

RECIPE = os.path.join(os.path.dirname(__file__), "..", "examples", "nemotron_nano_v2_12b", "elastic.yaml")


def test_12b_parent_count_matches_nemotron_nano_v2_12b():
    from megatron_elastic.plan import Hardware, make_plan

    plan = make_plan(RECIPE, Hardware(nodes=16))
    # NVIDIA-Nemotron-Nano-12B-v2: 12.31B parameters (embeddings and LM head untied).
    assert plan.parent_parameters == pytest.approx(12.31e9, rel=0.01)
    assert (plan.tp, plan.pp, plan.dp) == (8, 1, 16)
    targets = {b: r["target"] / 1e9 for b, r in plan.budgets.items()}
    assert targets["0.7311"] == pytest.approx(9.0, rel=0.01) and targets["0.4874"] == pytest.approx(6.0, rel=0.01)
    for r in plan.budgets.values():
        assert 0.97 * r["target"] <= r["parameters"] <= r["target"]
    s1, s2 = plan.stages
    assert (s1.seq_length, s1.global_batch_size, s2.seq_length, s2.global_batch_size) == (8192, 1536, 49152, 512)
    assert s1.tokens == pytest.approx(65e9, rel=0.001) and s2.tokens == pytest.approx(45e9, rel=0.001)
    assert s2.memory["activations"] > s1.memory["activations"]
    assert all(s.total_memory < 80 * 2**30 for s in plan.stages)


def test_plan_refuses_what_cannot_fit():
    from megatron_elastic.plan import Hardware, PlanError, make_plan

    with pytest.raises(PlanError, match="long-context.*activations.*recompute"):
        make_plan(RECIPE, Hardware(nodes=16), ["train.recompute=false"])
    with pytest.raises(PlanError, match="not a multiple of TP"):
        make_plan(RECIPE, Hardware(nodes=1, gpus_per_node=4))
    with pytest.raises(Exception, match="divisible by tensor_model_parallel_size"):
        make_plan(RECIPE, Hardware(nodes=16), ["parallel.tensor_model_parallel_size=16"])


def test_plan_counts_recompute_and_sequence_parallelism_and_prints_its_kernels():
    """Recompute adds one student forward to the work (GPU-hours); sequence parallelism divides the layer inputs
    kept under recompute by TP; the kernel path printed is the one `train` builds on that machine."""
    from megatron_elastic.elastic.cost import arch_flops_per_token
    from megatron_elastic.plan import Hardware, format_plan, make_plan

    roomy = Hardware(nodes=16, gpu_memory_gib=400)
    on, off = make_plan(RECIPE, roomy), make_plan(RECIPE, roomy, ["train.recompute=false"])
    no_sp = make_plan(RECIPE, roomy, ["parallel.sequence_parallel=false"])
    config = None
    for s_on, s_off, stage_weights in zip(on.stages, off.stages, ([1, 1, 1], [0.5, 0.3, 0.2])):
        archs = [r["arch"] for r in on.budgets.values()]
        if config is None:
            from megatron_elastic.elastic.config import load_elastic_config
            from megatron_elastic.plan import _parent_config

            config = _parent_config(load_elastic_config(RECIPE), os.path.dirname(RECIPE))
        w = [x / sum(stage_weights) for x in stage_weights]
        student = sum(wi * arch_flops_per_token(config, a, s_on.seq_length) for wi, a in zip(w, archs))
        assert s_on.flops - s_off.flops == pytest.approx(s_on.tokens * student, rel=1e-9)
    assert on.stages[1].memory["activations"] < no_sp.stages[1].memory["activations"] / 4
    text = format_plan(on, roomy)
    assert (
        "student kernels: local spec: attention sdpa, Mamba scan mamba_ssm" in text and "sequence parallel on" in text
    )
    assert "teacher kernels: te spec" in text
    assert "attention sdpa, Mamba scan torch" in format_plan(make_plan(RECIPE, roomy, kernels="reference"), roomy)
    # A trainable teacher (Eq. 15) in stage 2: the full budget's forward and backward, and its activations kept too.
    trainable = make_plan(RECIPE, roomy, ["distill.teacher=[frozen, trainable]"])
    teacher = arch_flops_per_token(config, archs[0], on.stages[1].seq_length)
    assert trainable.stages[0].flops == on.stages[0].flops
    assert trainable.stages[1].flops - on.stages[1].flops == pytest.approx(3 * on.stages[1].tokens * teacher, rel=1e-9)
    assert trainable.stages[1].memory["activations"] == pytest.approx(2 * on.stages[1].memory["activations"])


@pytest.mark.parametrize("pattern, hidden, seq, mbs", [("M-*-", 256, 512, 4), ("*-M-M", 256, 256, 8)])
def test_memory_estimate_is_within_15_percent_of_the_measured_cpu_peak(tmp_path, pattern, hidden, seq, mbs):
    """A real elastic training run (student + frozen teacher + DDP + Adam, fp32) in a fresh process: its peak of
    live tensor bytes (every allocation and free of torch's CPU allocator, not process RSS) against `plan`'s
    per-GPU estimate for the same config with the reference (CPU) kernels."""
    import json
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "mem.json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "plan_memory_check.py"),
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
            "--pattern",
            pattern,
            "--hidden",
            str(hidden),
            "--seq",
            str(seq),
            "--mbs",
            str(mbs),
        ],
        check=True,
        capture_output=True,
        cwd=root,
        timeout=600,
    )
    r = json.loads(out.read_text())
    assert r["measured_peak_bytes"] > 2**27  # the run is big enough for the comparison to mean something
    assert 0.85 <= r["ratio"] <= 1.15, r


def test_plan_sizes_budgets_of_every_kind():
    """`plan --budget`: a memory budget of the 12B parent at 32k context, batch 8, is met by a sub-model whose
    weights (bf16) plus KV caches and Mamba states, counted here from the Nemotron-H layout, fit it; a FLOPs budget
    likewise; the memory budget of a job stated in memory equals the parent's memory times its fraction."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.plan import Hardware, _parent_config, make_plan

    plan = make_plan(RECIPE, Hardware(nodes=16), extra_budgets=["16GiB@32768x8", "15GFLOP@8192"])
    mem, flops = plan.budgets["16GiB@32768x8"], plan.budgets["15GFLOP@8192"]
    assert (mem["kind"], flops["kind"]) == ("memory@32768x8", "flops@8192") and not mem["trained"]
    assert 0.98 * 16 * 2**30 <= mem["costs"]["memory_bytes"] <= 16 * 2**30
    assert 0.98 * 15e9 <= flops["costs"]["flops_per_token"] <= 15e9
    # independent count for the memory row: bf16 weights + per attention layer K,V [32768, 8, groups, kv_channels]
    # + per Mamba layer conv window [8, d_inner + 2*groups*state, kernel] (bf16) and SSM state (fp32)
    from megatron_elastic.elastic.config import load_elastic_config

    config = _parent_config(load_elastic_config(RECIPE), os.path.dirname(RECIPE))
    arch = mem["arch"]
    kept = [i for i in range(len(config.hybrid_pattern)) if i not in arch.skipped_layers]
    cache = 0
    for i in kept:
        if config.hybrid_pattern[i] == "*":
            cache += 2 * 32768 * 8 * config.num_query_groups * config.kv_channels * 2
        elif config.hybrid_pattern[i] == "M":
            d_inner = arch.mamba_num_heads[i] * arch.mamba_head_dim[i]
            bc = 2 * config.mamba_num_groups * config.mamba_state_dim
            cache += 8 * ((d_inner + bc) * config.mamba_conv_kernel * 2 + d_inner * config.mamba_state_dim * 4)
    assert mem["costs"]["memory_bytes"] == 2 * mem["parameters"] + cache
    assert mem["parameters"] < plan.parent_parameters and ElasticArch.full(config) != arch


def test_plan_states_the_stop_checkpoint_and_the_slurm_times_it_needs():
    """The 12B stop checkpoint (weights, fp32 master and Adam: 14 bytes a parameter) split over the nodes, its
    write time at the stated bandwidth, and the margin train keeps: 1.5 x (longest step + checkpoint); the lead
    plan compares it with is the sbatch script's own `--signal`."""
    import re

    from megatron_elastic.plan import SBATCH_SIGNAL_LEAD_S, Hardware, format_plan, make_plan

    script = os.path.join(os.path.dirname(RECIPE), "..", "..", "launch", "slurm", "megatron_elastic.sbatch")
    assert re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", open(script).read(), re.M).group(1) == str(
        SBATCH_SIGNAL_LEAD_S
    )
    hw = Hardware(nodes=16, checkpoint_write_gbps=2.0)
    plan = make_plan(RECIPE, hw)
    stop = plan.stop
    assert stop.checkpoint_bytes == pytest.approx(14 * plan.parent_parameters, rel=1e-3)
    assert stop.write_seconds == pytest.approx(14 * plan.parent_parameters / 16 / 2e9, rel=1e-3)
    longest = max(s.flops / s.steps for s in plan.stages) / (128 * hw.mfu * hw.peak_tflops * 1e12)
    assert stop.margin_seconds == pytest.approx(1.5 * (longest + stop.write_seconds), rel=1e-6)
    text = format_plan(plan, hw)
    assert f"GraceTime >= {stop.margin_seconds:,.0f} s" in text and "covers it" in text
    # the importance options it names for the paper's scoring are the importance command's own
    from megatron_elastic.cli import build_parser

    line = next(x for x in text.splitlines() if "the paper's scoring" in x)
    args = build_parser().parse_args(
        [
            "importance",
            "--checkpoint",
            "c",
            "--out",
            "o",
            *line.split("importance ... ")[1]
            .replace("(Eq. 2)", "")
            .replace("(Eq. 5)", "")
            .replace("(Eq. 4)", "")
            .split(),
        ]
    )
    assert (args.ffn_source, args.iterative_depth, args.calib_tokens) == ("fc1_output", True, 1024 * 8192)
    assert args.mamba_head_channels == 40  # the recipe's smallest head-dim choice: 0.5 x 80
    slow = Hardware(nodes=16, checkpoint_write_gbps=0.01)  # 1,077 s to write: more than the script's lead
    assert "submit with --signal=B:USR1@" in format_plan(make_plan(RECIPE, slow), slow)
