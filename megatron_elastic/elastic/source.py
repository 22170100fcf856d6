"""Opening a trained checkpoint in one process (TP=1, PP=1) for the jobs that read it (importance's
benchmark, extraction, evaluation, serving): the elastic model with its weights and, for an elastic-training
checkpoint, the router that chooses every budget's sub-model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import parse_kind
from megatron_elastic.elastic.layers.model import build_elastic_model
from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.space import ElasticSpace
from megatron_elastic.errors import CheckpointError
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import EXTRA, load_checkpoint, load_extra, resolve_checkpoint
from megatron_elastic.store.job_config import load_pretrain_config
from megatron_elastic.store.open_run import single_process_job


@dataclass
class ElasticSource:
    path: str  # the checkpoint directory (iter_*)
    job: dict  # the parent's pretraining job config (PretrainConfig dict)
    config: object  # the parent's HybridConfig at TP=1
    model: Optional[torch.nn.Module]  # elastic model at TP=1, PP=1 with the checkpoint's weights (or None)
    router: Optional[Router]  # None for a checkpoint without one (a sorted parent)


def load_source(checkpoint: str, with_model: bool = True) -> ElasticSource:
    """Load an elastic-training checkpoint (model + router) or a pretrain/sorted one (model only) at TP=1.
    ``with_model=False`` skips the weights (``model`` is None; read tensors with ``CheckpointTensorReader``)."""
    path = resolve_checkpoint(checkpoint)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    job = state.get("parent_config") or state.get("config")
    if not job or "model" not in job:
        raise CheckpointError(f"{path}/trainer_state.json has no model config; was it written by megatron-elastic?")
    job_cfg = load_pretrain_config(text=yaml.safe_dump(job))
    job_cfg.parallel.tensor_model_parallel_size = job_cfg.parallel.pipeline_model_parallel_size = 1
    job = job_cfg.to_dict()
    initialize_parallel(1, 1, seed=job_cfg.train.seed)
    model_cfg = job_cfg.model_config()
    model = None
    if with_model:
        model = build_elastic_model(model_cfg)
        load_checkpoint(path, model, optimizer=None, load_rng=False)
        model.eval()
    router = None
    if "parent_config" in state and os.path.isfile(os.path.join(path, EXTRA)):
        extra = load_extra(path)
        space = ElasticSpace(**extra["space"])
        fixed = extra.get("fixed_arch")
        router = Router(
            model_cfg,
            space,
            state["budgets"],
            hidden=state["config"].get("router", {}).get("hidden", 256),
            fixed_arch=ElasticArch.from_dict(fixed) if fixed else None,
            cost=parse_kind(state["config"].get("budget_kind", "params"), model_cfg),
        )
        router.load_state_dict(extra["router"])
    return ElasticSource(path, job, model_cfg, model, router)


def load_parent(checkpoint: str):
    """(elastic model at TP=1, PP=1 with the checkpoint's weights, its PretrainConfig, checkpoint path)."""
    path, job = single_process_job(checkpoint)
    model = build_elastic_model(job.model_config())
    load_checkpoint(path, model, optimizer=None, load_rng=False)
    return model, job, path
