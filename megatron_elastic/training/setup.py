"""Model, Megatron DDP wrapper, Megatron optimizer and LR schedule for a training job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_elastic import compat
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.config import HybridConfig


@dataclass
class TrainingComponents:
    model: torch.nn.Module  # the DDP-wrapped model (call this one)
    optimizer: object  # Megatron optimizer
    scheduler: OptimizerParamScheduler

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module


# The fields of an OptimizationConfig that Megatron's OptimizerConfig takes under the same names.
_ADAM_FIELDS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad")


def build_training_components(
    model_cfg: HybridConfig, train_cfg, build_model: Callable = build_hybrid_model
) -> TrainingComponents:
    """Build the model for this pipeline stage with ``build_model(config, pre_process=, post_process=)`` (load
    initial weights there: the optimizer copies them), wrap it in Megatron's DDP and create the optimizer and
    LR/weight-decay schedule from ``train_cfg`` (``lr``, ``min_lr``, ``weight_decay``, ``adam_beta1/2``,
    ``clip_grad``, ``lr_warmup_iters``, ``train_iters``, ``lr_decay_style``)."""
    model = build_model(
        model_cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    dist_opt = bool(getattr(train_cfg, "distributed_optimizer", False))
    ddp = DistributedDataParallel(
        model_cfg,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt
        ),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            **{name: getattr(train_cfg, name) for name in _ADAM_FIELDS},
            **{name: getattr(model_cfg, name) for name in ("bf16", "fp16", "params_dtype")},
            use_distributed_optimizer=dist_opt,
        ),
        [ddp],
    )
    compat.support_mixed_dtype_parameters(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.lr_warmup_iters,
        lr_decay_steps=train_cfg.train_iters,
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=train_cfg.train_iters,
        wd_incr_style="constant",
    )
    return TrainingComponents(ddp, optimizer, scheduler)
