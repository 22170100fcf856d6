"""Building an elastic run: parallel state, the student (from the sorted parent), the frozen teacher, the pair that
runs both through Megatron's schedules, the student's optimizer and LR schedule, the router and its optimizer."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.config import ElasticJobConfig
from megatron_elastic.elastic.cost import arch_parameters
from megatron_elastic.elastic.layers.model import build_elastic_model
from megatron_elastic.elastic.memory_check import check_this_gpu
from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.space import ElasticSpace
from megatron_elastic.elastic.teacher import DistillationPair
from megatron_elastic.errors import ConfigError, InputNotFoundError
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.kernels import Machine, teacher_kernels
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import (
    latest_checkpoint,
    load_model_weights,
)
from megatron_elastic.store.open_run import config_from_checkpoint
from megatron_elastic.training.setup import build_training_components


@dataclass
class ElasticComponents:
    config: ElasticJobConfig
    model_config: object
    student: torch.nn.Module  # DDP-wrapped elastic student
    teacher: torch.nn.Module  # the frozen parent (plain TE or local model) with the sorted weights
    pair: DistillationPair
    optimizer: object
    scheduler: object
    router: Router
    router_optimizer: torch.optim.Optimizer
    router_scheduler: torch.optim.lr_scheduler.LambdaLR
    full_parameters: int


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_parent(model_cfg, src: str, backend: str = "local"):
    """This pipeline stage of the sorted parent at ``src``: an elastic model on the local backend, a plain
    TransformerEngine model on ``te``."""
    stage = dict(
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage()
    )
    model = (
        build_elastic_model(model_cfg, **stage)
        if backend == "local"
        else build_hybrid_model(model_cfg, backend=backend, **stage)
    )
    load_model_weights(src, model)
    return model


def build_elastic_components(cfg: ElasticJobConfig) -> ElasticComponents:
    """Parallel state, student (from the sorted parent), teacher, pair, optimizers and the router."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    initialize_parallel(tp, pp, seed=cfg.train.seed, timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    cfg.validate(dist.get_world_size())
    src = latest_checkpoint(cfg.sorted_checkpoint)
    if src is None or not os.path.isfile(cfg.ranking_file):
        raise InputNotFoundError(
            f"parent: {cfg.parent} lacks sorted/latest or ranking.json; run "
            f"`megatron-elastic importance --out {cfg.parent}` first"
        )
    job = config_from_checkpoint(src)
    job.parallel = dataclasses.replace(cfg.parallel)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model_cfg = job.model_config(**(recompute if cfg.train.recompute else {}))
    if not cfg.data.names_data():
        cfg.data.take_source(job.data)
    check_this_gpu(cfg, model_cfg, parallel_state.get_data_parallel_world_size())
    with open(cfg.ranking_file) as f:
        depth_ranking = json.load(f)["depth_ranking"]

    def build_student(config, pre_process, post_process):
        model = build_elastic_model(config, pre_process=pre_process, post_process=post_process)
        load_model_weights(src, model)
        return model

    comps = build_training_components(model_cfg, cfg.train, build_model=build_student)
    # The frozen teacher is the whole parent, never sliced: TransformerEngine's spec where it runs (same checkpoint
    # keys), else the plain local spec (kernels.teacher_kernels decides, as it does for `plan`).
    # (Local: the elastic model at its full choice, which also scores the pruned sub-models in the summary.)
    teacher_backend = teacher_kernels(Machine.here(), model_cfg.sequence_parallel).backend
    teacher = build_parent(model_cfg, src, teacher_backend)
    pair = DistillationPair(
        comps.model,
        teacher,
        model_cfg,
        parallel_state.is_pipeline_first_stage(),
        parallel_state.is_pipeline_last_stage(),
    )
    model_cfg.finalize_model_grads_func = lambda _models, *a, **k: finalize_model_grads([comps.model], *a, **k)
    model_cfg.no_sync_func = comps.model.no_sync

    if teacher_backend == "local":  # TE fuses the norms into the linears: other parameters, same keys
        _check_same_layout(comps.model.module, teacher)
    router, router_opt, router_sched = _build_router(cfg, model_cfg, depth_ranking)
    full = arch_parameters(model_cfg, ElasticArch.full(model_cfg))
    return ElasticComponents(
        cfg,
        model_cfg,
        comps.model,
        teacher,
        pair,
        comps.optimizer,
        comps.scheduler,
        router,
        router_opt,
        router_sched,
        full,
    )


def _check_same_layout(student, teacher) -> None:
    """The student and the (local) teacher hold the same parameters, dtype and shape."""
    for (name, p_student), p_teacher in zip(student.named_parameters(), teacher.parameters()):
        if p_student.dtype != p_teacher.dtype or p_student.shape != p_teacher.shape:
            raise ConfigError(
                f"teacher and student differ at {name}: {p_teacher.dtype}{tuple(p_teacher.shape)} vs "
                f"{p_student.dtype}{tuple(p_student.shape)}"
            )


def _build_router(cfg: ElasticJobConfig, model_cfg, depth_ranking: List[int]):
    """(router over the job's space, its Adam, its warm-up schedule); the same router on every rank."""
    space = ElasticSpace.default(
        model_cfg, cfg.space.fractions, cfg.space.depth_fractions, depth_ranking, cfg.space.heterogeneous
    )
    smallest = space.smallest_arch(model_cfg)
    lowest = arch_parameters(model_cfg, smallest) / arch_parameters(model_cfg, ElasticArch.full(model_cfg))
    if min(cfg.budgets) < lowest - 1e-9:
        raise ConfigError(
            f"budgets: {min(cfg.budgets)} is below the smallest sub-model the space allows ({lowest:.3f} "
            f"of the parent: every axis at its smallest choice); add smaller space.fractions or "
            f"space.depth_fractions, or raise the budget"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # identical router on every rank
        router = Router(
            model_cfg, space, cfg.budgets, cfg.router.hidden, _fixed_arch(cfg), cost=cfg.cost(model_cfg)
        ).to(_device())
    router_opt = torch.optim.Adam(router.parameters(), lr=cfg.router.lr)
    warm = cfg.router.warmup_iters
    router_sched = torch.optim.lr_scheduler.LambdaLR(router_opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return router, router_opt, router_sched


def _fixed_arch(cfg: ElasticJobConfig) -> Optional[ElasticArch]:
    """The sub-model a ``fixed_arch`` run trains (None: the router searches)."""
    if not cfg.fixed_arch:
        return None
    with open(cfg.fixed_arch) as f:
        return ElasticArch.from_json(f.read())
