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

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.errors import ConfigError, PlanError
from megatron_elastic.model.cost import arch_flops_per_token, arch_parameters, layer_parameters, scaled_arch
from megatron_elastic.model.elastic_arch import ElasticArch
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
    stages: List[StagePlan] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def _bytes_per_param(config) -> int:
    return 2 if config.bf16 or config.fp16 else 4


KERNELS = ("fused", "reference")


def layer_activation_bytes(config, i: int, seq: int, mbs: int, tp: int, kernels: str = "fused") -> float:
    """Bytes one layer keeps for backward (one micro-batch, no recompute).

    ``kernels="fused"`` is the GPU path (TransformerEngine norms, flash attention, ``mamba_ssm``'s fused SSD scan,
    which recomputes its chunk states in backward). ``"reference"`` is the pure-PyTorch path (the CPU, or a GPU
    without those packages): counted tensor by tensor from what autograd saves in our code: an unfused RMSNorm
    (input, normalised input, output), attention probabilities and GQA-expanded K/V copies for ``bmm``, and the
    chunked SSD scan's intra-chunk decay matrices, contiguous einsum operands and chunk states, in float32.
    """
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    e = _bytes_per_param(config)
    sb, h = seq * mbs, config.hidden_size
    lc = config.for_layer(i)
    sym = config.hybrid_pattern[i]
    ref = kernels == "reference"
    norm = (3 if ref else 2) * h  # layer input (+ normalised input) + the norm's output
    if sym == MAMBA:
        H, p = lc.mamba_num_heads / tp, lc.mamba_head_dim
        d, g, n, q = H * p, config.mamba_num_groups / tp, config.mamba_state_dim, config.mamba_chunk_size
        bc = g * n
        in_proj_out = 2 * d + 2 * bc + H
        if not ref:  # conv output, scan output, gated-norm output (out_proj input), fp32 dt/dA_cumsum
            return e * sb * (norm + in_proj_out + (d + 2 * bc) + 3 * d) + 4 * sb * 2 * H
        # conv: its contiguous input, pre- and post-activation; gated norm: y, gated y, normalised y, its
        # output and out_proj's contiguous input
        model_dtype = norm + in_proj_out + 3 * (d + 2 * bc) + 5 * d
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
        if ref:  # contiguous Q and GQA-expanded K, V copies, the context (proj input), probabilities
            return e * sb * (norm + 4 * qh * hn) + e * mbs * qh * seq * seq
        return e * sb * (norm + (qh + 2 * g) * hn + qh * hn)
    return e * sb * (norm + 2 * lc.ffn_hidden_size / tp)


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
    kernels: str = "fused",
    overhead_gib: float = 0.0,
) -> Dict[str, float]:
    """Per-GPU bytes by component for the most loaded pipeline stage (see the module docstring)."""
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
        acts = [layer_activation_bytes(config, i, seq, mbs, tp, kernels) for i in layers]
        if recompute:
            act = e * seq * mbs * config.hidden_size * len(layers) + max(acts)
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


def _parent_config(cfg: ElasticJobConfig, config_dir: str, tp: int, pp: int):
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
    job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size = tp, pp
    return job.model_config()


def make_plan(config_path: str, hw: Hardware, overrides: Optional[List[str]] = None, kernels: str = "fused") -> Plan:
    """Resolve and check ``config_path`` for ``hw``; raises :class:`PlanError` when it cannot fit."""
    cfg = load_elastic_config(config_path, overrides)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if hw.world % (tp * pp):
        raise PlanError(f"{hw.world} GPUs is not a multiple of TP*PP = {tp * pp}; change --nodes/--gpus-per-node")
    dp = hw.world // (tp * pp)
    cfg.validate(hw.world)
    config = _parent_config(cfg, os.path.dirname(os.path.abspath(config_path)), tp, pp)
    full_arch = ElasticArch.full(config)
    full = arch_parameters(config, full_arch)
    budgets = {}
    for b in cfg.budgets:
        arch = full_arch if b >= 1.0 else largest_admissible(config, b * full)
        budgets[f"{b:g}"] = {"target": b * full, "arch": arch, "parameters": arch_parameters(config, arch)}
    plan = Plan(tp, pp, dp, hw.world, full, budgets)
    for stage, steps in zip(cfg.curriculum.stages, cfg.stage_steps()):
        num_micro = stage.global_batch_size // (cfg.train.micro_batch_size * dp)
        mem = memory_per_gpu(
            config,
            tp,
            pp,
            dp,
            stage.seq_length,
            cfg.train.micro_batch_size,
            num_micro,
            cfg.train.distributed_optimizer,
            cfg.train.recompute,
            kernels,
            hw.overhead_gib,
        )
        tokens = steps * stage.global_batch_size * stage.seq_length
        w = [x / sum(stage.budget_weights) for x in stage.budget_weights]
        teacher = arch_flops_per_token(config, full_arch, stage.seq_length)
        student = sum(
            wi * arch_flops_per_token(config, budgets[f"{b:g}"]["arch"], stage.seq_length)
            for wi, b in zip(w, cfg.budgets)
        )
        flops = tokens * (teacher + 3 * student)
        hours = flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600
        plan.stages.append(
            StagePlan(stage.name, stage.seq_length, stage.global_batch_size, steps, tokens, mem, flops, hours)
        )
    for s in plan.stages:
        if s.total_memory > hw.gpu_memory_gib * GIB:
            top = max((k for k in s.memory if k != "overhead"), key=s.memory.get)
            raise PlanError(
                f"stage {s.name!r} needs {s.total_memory / GIB:.1f} GiB per GPU (largest: {top} "
                f"{s.memory[top] / GIB:.1f} GiB) > {hw.gpu_memory_gib:g} GiB at TP={tp}, PP={pp}, DP={dp}; "
                f"try train.recompute=true, a larger parallel.tensor_model_parallel_size, or "
                f"train.distributed_optimizer=true with more data-parallel ranks"
            )
    return plan


def format_plan(plan: Plan, hw: Hardware) -> str:
    g = lambda b: f"{b / GIB:7.1f}"
    lines = [
        f"layout: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {plan.world}; TP={plan.tp} PP={plan.pp} DP={plan.dp}",
        f"parent: {plan.parent_parameters:,} parameters ({plan.parent_parameters / 1e9:.2f}B)",
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
