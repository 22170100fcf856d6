"""Opening a trained checkpoint in one process (TP=1, PP=1) for the jobs that read it (importance's
benchmark, extraction, evaluation, serving): the elastic model with its weights and, for an elastic-training
checkpoint, the router that chooses every budget's sub-model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import yaml

from megatron_elastic.data.source import exported_tokenizer
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import every_cost, parse_kind, report_shape, stated_costs
from megatron_elastic.elastic.choose import budget_archs
from megatron_elastic.elastic.cost import arch_parameters
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
    tokenizer: Tuple[Optional[str], str]  # what an export copies: (spec or None, what a summary says of it)

    def sub_models(
        self, budgets: Optional[List[str]] = None, arch_file: Optional[str] = None
    ) -> Dict[str, Tuple[ElasticArch, dict]]:
        """name -> (architecture, what ``arch.json`` says of it besides its size): the architecture in
        ``arch_file``, or the router's choice for each of ``budgets`` (default: every trained one)."""
        if arch_file:
            with open(arch_file) as f:
                return {os.path.splitext(os.path.basename(arch_file))[0]: (ElasticArch.from_json(f.read()), {})}
        return {
            name: (c.arch, {"budget": name, "trained": c.trained, "between": list(c.between)})
            for name, c in budget_archs(self.router, budgets or ["all"], self.path).items()
        }

    def describe(self, name: str, arch: ElasticArch, about: dict) -> dict:
        """What an export says of sub-model ``name``: parameters, fraction of the parent, ``about`` and its costs
        (those ``name`` states and the router's kind, at the parent's sequence length)."""
        count = arch_parameters(self.config, arch)
        full = arch_parameters(self.config, ElasticArch.full(self.config))
        kinds = [self.router.cost] if self.router is not None else []
        shape = report_shape([*stated_costs(name), *kinds], self.job["data"]["seq_length"])
        return {"parameters": count, "fraction": count / full, **about, "costs": every_cost(self.config, arch, *shape)}


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
    return ElasticSource(path, job, model_cfg, model, router, exported_tokenizer(job.get("data") or {}))


def load_parent(checkpoint: str):
    """(elastic model at TP=1, PP=1 with the checkpoint's weights, its PretrainConfig, checkpoint path)."""
    path, job = single_process_job(checkpoint)
    model = build_elastic_model(job.model_config())
    load_checkpoint(path, model, optimizer=None, load_rng=False)
    return model, job, path
