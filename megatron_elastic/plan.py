"""``megatron-elastic plan``: a dry run of an elastic job on a cluster (no GPU needed).

Resolves the config, checks the parallel layout, counts the parameters of the parent and of each budget's
largest admissible architecture, estimates per-GPU memory at each curriculum stage and the GPU-hours of the run
from a stated MFU. Refuses layouts that cannot fit, naming the reason.

Memory model (bytes per GPU, the largest pipeline stage):

* student weights (2 B/param in bf16, 4 in fp32), main grads (4, fp32), optimizer: fp32 master (bf16 only) +
  Adam moments (4 + 4), divided by the data-parallel size with the distributed optimizer;
* teacher weights (same dtype, no grads, no optimizer);
* activations kept for backward per micro-batch (per layer type, below), times the micro-batches in flight
  (1F1B: the pipeline depth on the first stage); with ``recompute`` only each layer's input is kept plus one
  layer's activations;
* logits of student and teacher at the last stage (bf16 output, fp32 softmax/KL buffers, fp32 grad);
* backward transients: the gradients of one layer's saved activations while that layer runs backward (the
  largest layer's activations);
* a fixed allowance (CUDA context, NCCL buffers, fragmentation), ``overhead_gib``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.errors import ConfigError, PlanError
from megatron_elastic.model.cost import arch_flops_per_token, arch_parameters, layer_parameters, scaled_arch
from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.kernels import MACHINES, KernelPath, student_kernels, teacher_kernels
from megatron_elastic.training.elastic_config import ElasticJobConfig, load_elastic_config

GIB = 2**30


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # H100 SXM 80 GB
    peak_tflops: float = 989.0  # H100 SXM dense BF16
    mfu: float = 0.35  # assumed model-FLOPs utilisation
    overhead_gib: float = 4.0  # CUDA context, NCCL buffers, allocator slack

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

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def _bytes_per_param(config) -> int:
    return 2 if config.bf16 or config.fp16 else 4


KERNELS = tuple(MACHINES)


def student_path(kernels: str, sequence_parallel: bool = False) -> KernelPath:
    """The student's kernel path on the machine ``kernels`` names (see ``model.kernels.MACHINES``)."""
    if kernels not in MACHINES:
        raise ConfigError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return student_kernels(MACHINES[kernels], sequence_parallel)


def layer_activation_bytes(config, i: int, seq: int, mbs: int, tp: int, path: KernelPath) -> float:
    """Bytes one layer keeps for backward (one micro-batch, no recompute), for the kernels of ``path``.

    Counted tensor by tensor from what autograd saves. Hidden-size tensors (the layer input, the norm's
    output, and the unfused norm's normalised input) are split over TP with sequence parallelism (Megatron's
    sequence-parallel linears save their local input and gather it again in backward). Attention (SDPA or TE)
    keeps Q/K/V (views of the QKV output), its output and a float32 log-sum-exp per query and head, never the
    ``s x s`` probabilities. The ``mamba_ssm`` scan recomputes its chunk states in backward; the pure-PyTorch
    scan keeps its intra-chunk decay matrices, contiguous einsum operands and chunk states, in float32.
    """
    e = _bytes_per_param(config)
    sb, h = seq * mbs, config.hidden_size
    lc = config.for_layer(i)
    sym = config.hybrid_pattern[i]
    hidden = (2 if path.norm == "te" else 3) * h / (tp if path.sequence_parallel else 1)
    if sym == MAMBA:
        H, p = lc.mamba_num_heads / tp, lc.mamba_head_dim
        d, g, n, q = H * p, config.mamba_num_groups / tp, config.mamba_state_dim, config.mamba_chunk_size
        bc = g * n
        in_proj_out = 2 * d + 2 * bc + H
        if path.mamba_scan == "mamba_ssm":  # conv output, scan output, gated-norm output, fp32 dt/dA_cumsum
            return e * sb * (hidden + in_proj_out + (d + 2 * bc) + 3 * d) + 4 * sb * 2 * H
        # conv: its contiguous input, pre- and post-activation; gated norm: y, gated y, normalised y, its
        # output and out_proj's contiguous input
        model_dtype = hidden + in_proj_out + 3 * (d + 2 * bc) + 5 * d
        # the scan (float32): decay matrix and its product with C.B (2 H q), C.B (g q), contiguous B/C
        # copies (3 g n), x copies (3 d), B*decay (H n), chunk states entering/leaving (2 d n / q), dt terms
        scan = 2 * H * q + g * q + 3 * bc + 3 * d + H * n + 2 * d * n / q + 4 * H
        if e != 4:
            scan += d + 2 * bc  # float32 copies of x, B, C
        return e * sb * model_dtype + 4 * sb * scan
    if sym == ATTENTION:
        qh, g, hn = (
            lc.num_attention_heads / tp,
            (config.num_query_groups or lc.num_attention_heads) / tp,
            config.kv_channels,
        )
        # the fused QKV output (Q/K/V are views of it), the kernel's output and its [s, b, heads*hn] copy
        # (linear_proj's input), the float32 log-sum-exp
        return e * sb * (hidden + (qh + 2 * g) * hn + 2 * qh * hn) + 4 * sb * qh
    return e * sb * (hidden + 2 * lc.ffn_hidden_size / tp)


def _stage_layers(config, pp: int) -> List[List[int]]:
    n = len(config.hybrid_pattern)
    per = n // pp
    return [list(range(k * per, (k + 1) * per)) for k in range(pp)]


def memory_per_gpu(
    config,
    tp: int,
    pp: int,
    dp: int,
    seq: int,
    mbs: int,
    num_micro: int,
    distributed_optimizer: bool = True,
    recompute: bool = False,
    path: Optional[KernelPath] = None,
    overhead_gib: float = 0.0,
) -> Dict[str, float]:
    """Per-GPU bytes by component for the most loaded pipeline stage (see the module docstring), for the student
    kernels ``path`` (default: the ``fused`` machine, no sequence parallelism)."""
    path = path or student_path("fused")
    full = ElasticArch.full(config)
    e = _bytes_per_param(config)
    emb = config.vocab_size * config.hidden_size
    worst: Dict[str, float] = {}
    for k, layers in enumerate(_stage_layers(config, pp)):
        params = sum(layer_parameters(config, full, i) for i in layers)
        if k == 0:
            params += emb
        if k == pp - 1:
            params += config.hidden_size + (0 if config.share_embeddings_and_output_weights else emb)
        params /= tp
        opt = (4 if e == 2 else 0) + 8
        acts = [layer_activation_bytes(config, i, seq, mbs, tp, path) for i in layers]
        if recompute:  # each layer's input (split over TP with sequence parallelism) + one layer's activations
            layer_input = e * seq * mbs * config.hidden_size / (tp if path.sequence_parallel else 1)
            act = layer_input * len(layers) + max(acts)
        else:
            act = sum(acts)
        in_flight = min(pp - k, num_micro) if pp > 1 else 1
        m = {
            "weights": e * params,
            "grads": 4 * params,
            "optimizer": opt * params / (dp if distributed_optimizer else 1),
            "teacher": e * params,
            "activations": act * in_flight,
            "logits": (22 * seq * mbs * config.vocab_size / tp) if k == pp - 1 else 0.0,
            "backward": max(acts),
            "overhead": overhead_gib * GIB,
        }
        if sum(m.values()) > sum(worst.values()):
            worst = m
    return worst


def largest_admissible(config, target: float) -> ElasticArch:
    """The largest uniformly scaled architecture with at most ``target`` parameters (a fine search)."""
    best = None
    for step in range(1000, 99, -1):
        arch = scaled_arch(config, step / 1000)
        if arch_parameters(config, arch) <= target:
            if best is None or arch_parameters(config, arch) > arch_parameters(config, best):
                best = arch
            if arch_parameters(config, arch) >= 0.98 * target:
                break
    return best or scaled_arch(config, 0.1)


def _parent_config(cfg: ElasticJobConfig, config_dir: str):
    from megatron_elastic.training.config import load_pretrain_config

    ref = cfg.raw.get("plan_parent_config")
    if ref:
        path = ref if os.path.isabs(ref) else os.path.join(config_dir, ref)
        job = load_pretrain_config(path)
    else:
        from megatron_elastic.training.checkpoint import latest_checkpoint
        from megatron_elastic.training.runs import config_from_checkpoint

        src = latest_checkpoint(cfg.sorted_checkpoint) if os.path.isdir(cfg.sorted_checkpoint) else None
        if src is None:
            raise PlanError(
                f"plan: no parent architecture; set plan_parent_config (a parent YAML) or run importance "
                f"into {cfg.parent} first"
            )
        job = config_from_checkpoint(src)
    job.parallel = dataclasses.replace(cfg.parallel)
    return job.model_config()


def stage_memory(cfg: ElasticJobConfig, config, dp: int, path: KernelPath, overhead_gib: float):
    """Per-GPU bytes by component at every curriculum stage of ``cfg`` (model ``config``, student ``path``)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    return [
        memory_per_gpu(
            config,
            tp,
            pp,
            dp,
            stage.seq_length,
            cfg.train.micro_batch_size,
            stage.global_batch_size // (cfg.train.micro_batch_size * dp),
            cfg.train.distributed_optimizer,
            cfg.train.recompute,
            path,
            overhead_gib,
        )
        for stage in cfg.curriculum.stages
    ]


def check_fits(cfg: ElasticJobConfig, memories: List[Dict[str, float]], gpu_memory_gib: float, dp: int) -> None:
    """Raise :class:`PlanError` naming the stage, its largest component and the fixes when a stage needs more
    than ``gpu_memory_gib`` per GPU (what ``plan`` refuses and ``train`` checks before its first step)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    for stage, mem in zip(cfg.curriculum.stages, memories):
        total = sum(mem.values())
        if total > gpu_memory_gib * GIB:
            top = max((k for k in mem if k != "overhead"), key=mem.get)
            fixes = [] if cfg.train.recompute else ["train.recompute=true"]
            if tp > 1 and not cfg.parallel.sequence_parallel:
                fixes.append("parallel.sequence_parallel=true")
            fixes.append("a larger parallel.tensor_model_parallel_size")
            if not cfg.train.distributed_optimizer:
                fixes.append("train.distributed_optimizer=true")
            raise PlanError(
                f"stage {stage.name!r} needs {total / GIB:.1f} GiB per GPU (largest: {top} "
                f"{mem[top] / GIB:.1f} GiB) > {gpu_memory_gib:g} GiB at TP={tp}, PP={pp}, DP={dp}; "
                f"try {', '.join(fixes)}"
            )


def make_plan(config_path: str, hw: Hardware, overrides: Optional[List[str]] = None, kernels: str = "fused") -> Plan:
    """Resolve and check ``config_path`` for ``hw``, whose GPUs have the packages ``kernels`` names; raises
    :class:`PlanError` when it cannot fit."""
    cfg = load_elastic_config(config_path, overrides)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if hw.world % (tp * pp):
        raise PlanError(f"{hw.world} GPUs is not a multiple of TP*PP = {tp * pp}; change --nodes/--gpus-per-node")
    dp = hw.world // (tp * pp)
    cfg.validate(hw.world)
    config = _parent_config(cfg, os.path.dirname(os.path.abspath(config_path)))
    full_arch = ElasticArch.full(config)
    full = arch_parameters(config, full_arch)
    budgets = {}
    for b in cfg.budgets:
        arch = full_arch if b >= 1.0 else largest_admissible(config, b * full)
        budgets[f"{b:g}"] = {"target": b * full, "arch": arch, "parameters": arch_parameters(config, arch)}
    student = student_path(kernels, cfg.parallel.sequence_parallel)
    teacher = teacher_kernels(MACHINES[kernels], cfg.parallel.sequence_parallel)
    plan = Plan(tp, pp, dp, hw.world, full, budgets, student, teacher)
    memories = stage_memory(cfg, config, dp, student, hw.overhead_gib)
    for stage, steps, mem in zip(cfg.curriculum.stages, cfg.stage_steps(), memories):
        tokens = steps * stage.global_batch_size * stage.seq_length
        w = [x / sum(stage.budget_weights) for x in stage.budget_weights]
        teacher_flops = arch_flops_per_token(config, full_arch, stage.seq_length)
        student_flops = sum(
            wi * arch_flops_per_token(config, budgets[f"{b:g}"]["arch"], stage.seq_length)
            for wi, b in zip(w, cfg.budgets)
        )
        flops = tokens * (teacher_flops + 3 * student_flops)
        hours = flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600
        plan.stages.append(
            StagePlan(stage.name, stage.seq_length, stage.global_batch_size, steps, tokens, mem, flops, hours)
        )
    check_fits(cfg, memories, hw.gpu_memory_gib, dp)
    return plan


def format_plan(plan: Plan, hw: Hardware) -> str:
    g = lambda b: f"{b / GIB:7.1f}"
    lines = [
        f"layout: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {plan.world}; TP={plan.tp} PP={plan.pp} DP={plan.dp}",
        f"parent: {plan.parent_parameters:,} parameters ({plan.parent_parameters / 1e9:.2f}B)",
        f"student kernels: {plan.student.describe()}",
        f"teacher kernels: {plan.teacher.describe()}",
        f"{'budget':>7} {'target':>16} {'largest uniform arch':>22}",
    ]
    for b, r in plan.budgets.items():
        lines.append(f"{b:>7} {r['target']:>16,.0f} {r['parameters']:>22,}")
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
    lines.append(
        f"total: {plan.gpu_hours:,.0f} GPU-hours at {hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s "
        f"(~{plan.gpu_hours / plan.world / 24:.1f} days on {plan.world} GPUs)"
    )
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    return {
        "tp": plan.tp,
        "pp": plan.pp,
        "dp": plan.dp,
        "world": plan.world,
        "parent_parameters": plan.parent_parameters,
        "kernels": {"student": dataclasses.asdict(plan.student), "teacher": dataclasses.asdict(plan.teacher)},
        "budgets": {b: {"target": r["target"], "parameters": r["parameters"]} for b, r in plan.budgets.items()},
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
    }


def dump_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan_to_dict(plan), sort_keys=False)
