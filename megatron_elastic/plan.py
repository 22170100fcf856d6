"""``megatron-elastic plan``: a dry run of an elastic job on a cluster (no GPU needed).

Resolves the config, checks the parallel layout, counts the parameters of the parent and of each budget's
largest admissible architecture, estimates per-GPU memory at each curriculum stage and the GPU-hours of the run
from a stated MFU. Refuses layouts that cannot fit, naming the reason.

The memory model is ``elastic.memory`` (also used by ``train``'s check before its first step).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import (
    Budget,
    every_cost,
    format_cost,
    format_costs,
    kind_text,
    parse_budget,
    parse_kind,
    report_shape,
)
from megatron_elastic.elastic.config import ElasticJobConfig, load_elastic_config, parent_model_config
from megatron_elastic.elastic.cost import PARAMETERS, Cost, arch_flops_per_token, arch_parameters, scaled_arch
from megatron_elastic.elastic.memory import GIB, checkpoint_bytes, importance_memory_per_gpu, student_path
from megatron_elastic.elastic.memory_check import check_fits, stage_memory
from megatron_elastic.elastic.space import ElasticSpace
from megatron_elastic.errors import ConfigError, PlanError
from megatron_elastic.importance.depth import CHUNK_BYTES
from megatron_elastic.model.kernels import MACHINES, KernelPath, teacher_kernels
from megatron_elastic.training.preemption import WallTimeLimit


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # H100 SXM 80 GB
    peak_tflops: float = 989.0  # H100 SXM dense BF16
    mfu: float = 0.35  # assumed utilisation of peak FLOPs on the work done (recompute's extra forward included)
    overhead_gib: float = 4.0  # CUDA context, NCCL buffers, allocator slack
    checkpoint_write_gbps: float = 1.0  # per node, to the checkpoint file system (benchmarks/checkpoint_io.py)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class StagePlan:
    name: str
    seq_length: int
    global_batch_size: int
    steps: int
    tokens: int
    memory: Dict[str, float]  # bytes per GPU by component
    flops: float  # training FLOPs of the stage
    gpu_hours: float

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    world: int
    parent_parameters: int
    budgets: Dict[str, dict]
    student: KernelPath
    teacher: KernelPath
    stages: List[StagePlan] = field(default_factory=list)
    importance: Optional["ImportancePlan"] = None
    stop: Optional["StopPlan"] = None

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def largest_admissible(config, target: float, cost: Cost = PARAMETERS) -> ElasticArch:
    """The largest uniformly scaled architecture costing at most ``target`` (parameters by default; any
    ``elastic.cost`` kind) - a fine search."""
    best, best_cost = None, None
    for step in range(1000, 99, -1):
        arch = scaled_arch(config, step / 1000)
        value = cost.of(config, arch)
        if value <= target:
            if best is None or value > best_cost:
                best, best_cost = arch, value
            if value >= 0.98 * target:
                break
    return best or scaled_arch(config, 0.1)


def _size_budget(config, budget: Budget, shape, trained: bool) -> dict:
    """A budget's largest uniformly scaled sub-model (the parent at 1.0) and its cost in every kind."""
    full = ElasticArch.full(config)
    target = budget.target(config)
    arch = full if budget.cost.of(config, full) <= target else largest_admissible(config, target, budget.cost)
    return {
        "target": target,
        "kind": kind_text(budget.cost),
        "arch": arch,
        "parameters": arch_parameters(config, arch),
        "costs": every_cost(config, arch, *shape),
        "trained": trained,
    }


def _parent_config(cfg: ElasticJobConfig, config_dir: str):
    try:
        return parent_model_config(cfg.raw, config_dir, cfg.parallel)
    except ConfigError as e:
        raise PlanError(f"plan: {e}") from None


def make_plan(
    config_path: str,
    hw: Hardware,
    overrides: Optional[List[str]] = None,
    kernels: str = "fused",
    extra_budgets: Optional[List[str]] = None,
    importance: tuple = (1024 * 8192, 8192, 1),
) -> Plan:
    """Resolve and check ``config_path`` for ``hw``, whose GPUs have the packages ``kernels`` names; raises
    :class:`PlanError` when it cannot fit. ``extra_budgets`` (any kind, ``elastic.budget``) are sized too, not
    trained."""
    cfg = load_elastic_config(config_path, overrides)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if hw.world % (tp * pp):
        raise PlanError(f"{hw.world} GPUs is not a multiple of TP*PP = {tp * pp}; change --nodes/--gpus-per-node")
    dp = hw.world // (tp * pp)
    cfg.validate(hw.world)
    config = _parent_config(cfg, os.path.dirname(os.path.abspath(config_path)))
    full_arch = ElasticArch.full(config)
    full = arch_parameters(config, full_arch)
    cost = cfg.cost(config)
    full_cost = cost.of(config, full_arch)
    shape = report_shape([cost], max(s.seq_length for s in cfg.curriculum.stages))
    names = [cfg.budget_labels.get(b, f"{b:g}") for b in cfg.budgets]
    budgets = {
        name: _size_budget(config, Budget(b if cost.kind == "params" else b * full_cost, cost), shape, trained=True)
        for name, b in zip(names, cfg.budgets)
    }
    for text in extra_budgets or []:
        budget = parse_budget(text, config)
        budgets[str(text)] = _size_budget(config, budget, report_shape([budget.cost], shape[0]), trained=False)
    student = student_path(kernels, cfg.parallel.sequence_parallel)
    teacher = teacher_kernels(MACHINES[kernels], cfg.parallel.sequence_parallel)
    plan = Plan(tp, pp, dp, hw.world, full, budgets, student, teacher)
    memories = stage_memory(cfg, config, dp, student, hw.overhead_gib)
    for i, (stage, steps, mem) in enumerate(zip(cfg.curriculum.stages, cfg.stage_steps(), memories)):
        tokens = steps * stage.global_batch_size * stage.seq_length
        w = [x / sum(stage.budget_weights) for x in stage.budget_weights]
        teacher_flops = arch_flops_per_token(config, full_arch, stage.seq_length)
        student_flops = sum(
            wi * arch_flops_per_token(config, budgets[name]["arch"], stage.seq_length) for wi, name in zip(w, names)
        )
        # The work the GPUs do: the teacher's forward, the student's forward and backward (3 forwards' worth), plus
        # one more student forward when every layer is recomputed in the backward pass. A trainable teacher (Eq. 15)
        # is the student's full budget: forward and backward too.
        student_passes = 4 if cfg.train.recompute else 3
        teacher_passes = student_passes if cfg.trainable_teacher(i) else 1
        flops = tokens * (teacher_passes * teacher_flops + student_passes * student_flops)
        hours = flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600
        plan.stages.append(
            StagePlan(stage.name, stage.seq_length, stage.global_batch_size, steps, tokens, mem, flops, hours)
        )
    check_fits(cfg, memories, hw.gpu_memory_gib, dp)
    space = ElasticSpace.default(config, cfg.space.fractions, cfg.space.depth_fractions)
    plan.importance = importance_plan(config, hw, tp, *importance, d_top=(space.mamba_head_dim or [0])[0])
    plan.stop = stop_plan(config, hw, max(s.flops / max(s.steps, 1) for s in plan.stages))
    return plan


# The lead of `#SBATCH --signal=B:USR1@600` in launch/slurm/megatron_elastic.sbatch (a test holds them equal).
SBATCH_SIGNAL_LEAD_S = 600


@dataclass
class StopPlan:
    """What stopping with a checkpoint takes (preemption, the time limit, a requeue): the checkpoint's size and
    write time, the longest step, and the margin ``train`` keeps before the job's end (``WallTimeLimit.SAFETY``)."""

    checkpoint_bytes: float
    per_node_bytes: float
    write_seconds: float
    step_seconds: float
    margin_seconds: float


def stop_plan(config, hw: Hardware, step_flops: float) -> StopPlan:
    """The stop checkpoint of the parent: every node writes its share in parallel at ``hw.checkpoint_write_gbps``."""
    total = checkpoint_bytes(config)
    per_node = total / hw.nodes
    write = per_node / (hw.checkpoint_write_gbps * 1e9)
    step = step_flops / (hw.world * hw.mfu * hw.peak_tflops * 1e12)
    return StopPlan(total, per_node, write, step, WallTimeLimit.SAFETY * (step + write))


def format_stop(p: StopPlan, hw: Hardware) -> str:
    lead = SBATCH_SIGNAL_LEAD_S
    verdict = (
        f"the script's --signal=B:USR1@{lead} covers it"
        if p.margin_seconds <= lead
        else f"more than the script's --signal=B:USR1@{lead}: submit with --signal=B:USR1@{p.margin_seconds * 1.2:.0f}"
    )
    return "\n".join(
        [
            f"stop checkpoint: {p.checkpoint_bytes / 1e9:,.1f} GB (weights, fp32 master, Adam), "
            f"{p.per_node_bytes / 1e9:,.1f} GB per node written in parallel: ~{p.write_seconds:,.0f} s at "
            f"{hw.checkpoint_write_gbps:g} GB/s per node (--checkpoint-write-gbps; benchmarks/checkpoint_io.py "
            f"measures yours); longest step ~{p.step_seconds:,.1f} s",
            f"  a stop needs {WallTimeLimit.SAFETY:g} x (step + checkpoint) = {p.margin_seconds:,.0f} s: {verdict}; "
            f"ask for GraceTime >= {p.margin_seconds:,.0f} s (preemption) and KillWait >= {p.margin_seconds:,.0f} s "
            "(scontrol requeue; Slurm's default is 30 s), else such a stop loses the steps since the last checkpoint",
        ]
    )


@dataclass
class ImportancePlan:
    """The ``importance`` job on the plan's parent at the plan's TP (DP = the rest of the GPUs)."""

    tokens: int
    seq_length: int
    micro_batch_size: int
    tp: int
    dp: int
    memory: Dict[str, float]  # bytes per GPU by component
    one_shot_gpu_hours: float
    iterative_gpu_hours: float
    d_top: int = 0  # the Mamba head channels a head is scored over (Eq. 4): the smallest head dim the space keeps


def importance_plan(config, hw: Hardware, tp: int, tokens: int, seq: int, mbs: int, d_top: int = 0) -> ImportancePlan:
    """Memory and GPU-hours of scoring the parent (:func:`importance_passes`); ``d_top``: see ``ImportancePlan``."""

    forward = arch_flops_per_token(config, ElasticArch.full(config), seq)
    output = 2.0 * config.hidden_size * config.vocab_size
    passes = {k: importance_passes(len(config.hybrid_pattern), k == "iterative") for k in ("one-shot", "iterative")}
    flops = {k: tokens * ((forward - output) * body + output * out) for k, (body, out) in passes.items()}
    hours = lambda flops: flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600
    memory = importance_memory_per_gpu(config, tp, seq, mbs, CHUNK_BYTES)
    memory["overhead"] = hw.overhead_gib * GIB
    return ImportancePlan(
        tokens, seq, mbs, tp, hw.world // tp, memory, hours(flops["one-shot"]), hours(flops["iterative"]), d_top
    )


def importance_passes(num_layers: int, iterative: bool) -> tuple:
    """(passes through the layers, passes through the output layer) per calibration token of ``importance``: the
    width pass; per round the full model (its logits once, for the denominator) and each candidate (its logits and
    the full model's remade: two). One-shot: one round of N candidates; iterative: N-1 rounds of N, N-1, ..., 2.
    (A candidate skips one layer; counted as a whole pass.)"""
    rounds = range(num_layers, 1, -1) if iterative else [num_layers]
    body = 1 + sum(1 + c for c in rounds)
    return body, sum(1 + 2 * c for c in rounds)


def format_importance(p: ImportancePlan, hw: Hardware) -> str:
    comps = " ".join(f"{k} {v / GIB:.1f}" for k, v in p.memory.items())
    per_gpu = lambda h: f"{h:,.0f} GPU-hours (~{h / (p.tp * p.dp):.1f} h on {p.tp * p.dp} GPUs)"
    return "\n".join(
        [
            f"importance: {p.tokens:,} calibration tokens at {p.seq_length} x {p.micro_batch_size}, TP={p.tp} "
            f"DP={p.dp}: per-GPU memory {sum(p.memory.values()) / GIB:.1f} GiB ({comps})",
            f"  one-shot depth {per_gpu(p.one_shot_gpu_hours)}; iterative depth {per_gpu(p.iterative_gpu_hours)}, "
            f"at {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s",
            f"  the paper's scoring (Sec. 2.1): importance ... --calib-tokens {p.tokens} --ffn-source fc1_output "
            "(Eq. 2) --iterative-depth (Eq. 5)"
            + (
                f" --mamba-head-channels {p.d_top} (Eq. 4)\n  (D_top of Eq. 4: a Mamba head is scored over the "
                f"{p.d_top} channels every sub-model keeps, the space's smallest head dim)"
                if p.d_top
                else ""
            ),
        ]
    )


def format_plan(plan: Plan, hw: Hardware) -> str:
    g = lambda b: f"{b / GIB:7.1f}"
    lines = [
        f"layout: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {plan.world}; TP={plan.tp} PP={plan.pp} DP={plan.dp}",
        f"parent: {plan.parent_parameters:,} parameters ({plan.parent_parameters / 1e9:.2f}B)",
        f"student kernels: {plan.student.describe()}",
        f"teacher kernels: {plan.teacher.describe()}",
        "budgets (the largest uniformly scaled sub-model within each; memory, FLOPs per token at the context shown):",
        f"{'budget':>16} {'kind':>14} {'target':>20} {'parameters':>16} {'memory':>20} {'FLOPs/token':>18} trained",
    ]
    for b, r in plan.budgets.items():
        target = format_cost(r["target"], parse_kind(r["kind"]))
        memory, flops = format_costs(r["costs"])
        trained = "yes" if r["trained"] else "no"
        lines.append(
            f"{b:>16} {r['kind']:>14} {target:>20} {r['parameters']:>16,} {memory:>20} {flops:>18} {trained:>7}"
        )
    comps = list(plan.stages[0].memory)
    lines.append(f"per-GPU memory (GiB) {'stage':>14} " + " ".join(f"{c:>11}" for c in comps) + f" {'total':>8}")
    for s in plan.stages:
        lines.append(
            f"{'':20} {s.name:>14} "
            + " ".join(f"{s.memory[c] / GIB:>11.1f}" for c in comps)
            + f" {g(s.total_memory):>8}"
        )
    lines.append(f"{'stage':>14} {'seq':>7} {'batch':>6} {'steps':>8} {'tokens':>18} {'GPU-hours':>10}")
    for s in plan.stages:
        lines.append(
            f"{s.name:>14} {s.seq_length:>7} {s.global_batch_size:>6} {s.steps:>8,} {s.tokens:>18,} "
            f"{s.gpu_hours:>10,.0f}"
        )
    low, high = (plan.gpu_hours * hw.mfu / u for u in (hw.mfu + 0.1, max(hw.mfu - 0.1, 0.05)))
    lines.append(
        f"total: {plan.gpu_hours:,.0f} GPU-hours at {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s on the work done "
        f"(recompute included) (~{plan.gpu_hours / plan.world / 24:.1f} days on {plan.world} GPUs); "
        f"{low:,.0f}-{high:,.0f} GPU-hours at {hw.mfu + 0.1:.0%}-{max(hw.mfu - 0.1, 0.05):.0%}"
    )
    if plan.importance is not None:
        lines.append(format_importance(plan.importance, hw))
    if plan.stop is not None:
        lines.append(format_stop(plan.stop, hw))
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    return {
        "tp": plan.tp,
        "pp": plan.pp,
        "dp": plan.dp,
        "world": plan.world,
        "parent_parameters": plan.parent_parameters,
        "kernels": {"student": dataclasses.asdict(plan.student), "teacher": dataclasses.asdict(plan.teacher)},
        "budgets": {
            b: {k: r[k] for k in ("target", "kind", "parameters", "costs", "trained")} for b, r in plan.budgets.items()
        },
        "stages": [
            {
                "name": s.name,
                "seq_length": s.seq_length,
                "steps": s.steps,
                "tokens": s.tokens,
                "memory_bytes": s.memory,
                "gpu_hours": s.gpu_hours,
            }
            for s in plan.stages
        ],
        "gpu_hours": plan.gpu_hours,
        "importance": dataclasses.asdict(plan.importance) if plan.importance else None,
        "stop": dataclasses.asdict(plan.stop) if plan.stop else None,
    }


def dump_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan_to_dict(plan), sort_keys=False)
