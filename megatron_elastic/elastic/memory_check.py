"""The memory check of an elastic job: per-GPU bytes at every curriculum stage (``elastic.memory``) against the
GPU's memory, refusing with the fixes. ``plan`` runs it for a cluster it is told about; ``train`` runs it on
CUDA before its first step, with the kernels it really builds."""

from __future__ import annotations

from typing import Dict, List

from megatron_elastic.elastic.config import ElasticJobConfig
from megatron_elastic.elastic.memory import GIB, memory_per_gpu
from megatron_elastic.errors import PlanError
from megatron_elastic.model.kernels import KernelPath, Machine, student_kernels


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
            cfg.trainable_teacher(i),
        )
        for i, stage in enumerate(cfg.curriculum.stages)
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


def check_this_gpu(cfg: ElasticJobConfig, model_config, dp: int, overhead_gib: float = 4.0) -> None:
    """On CUDA, before the first step: refuse (the planner's message) when a stage will not fit this GPU with the
    kernels this machine builds. ``train.memory_check: false`` turns it off; without CUDA nothing is checked."""
    import torch

    if not torch.cuda.is_available() or not cfg.train.memory_check:
        return
    total_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    path = student_kernels(Machine.here(), bool(model_config.sequence_parallel))
    try:
        check_fits(cfg, stage_memory(cfg, model_config, dp, path, overhead_gib), total_gib, dp)
    except PlanError as e:
        raise PlanError(f"{e} (or set train.memory_check=false to try anyway)") from None
