"""Opening a run: resolve a run directory or checkpoint, read its job config, and load its parent model in one
process (TP=1, PP=1), for the jobs that read trained checkpoints (importance, extraction, evaluation, serving)."""

from __future__ import annotations

import json
import os

import yaml

from megatron_elastic.errors import CheckpointError
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import resolve_checkpoint
from megatron_elastic.store.job_config import PretrainConfig, load_pretrain_config


def config_from_checkpoint(path: str) -> PretrainConfig:
    """The job config stored in a checkpoint's ``trainer_state.json``."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if "config" not in state:
        raise CheckpointError(
            f"{path}/trainer_state.json has no 'config'; was it written by megatron-elastic pretrain?"
        )
    return load_pretrain_config(text=yaml.safe_dump(state["config"]))


def single_process_job(checkpoint: str):
    """(resolved checkpoint path, its PretrainConfig at TP=1, PP=1) with Megatron's parallel state initialised
    for one process; ``checkpoint`` is a checkpoint directory or a run directory with a ``latest`` file."""
    path = resolve_checkpoint(checkpoint)
    job = config_from_checkpoint(path)
    job.parallel.tensor_model_parallel_size = job.parallel.pipeline_model_parallel_size = 1
    initialize_parallel(1, 1, seed=job.train.seed)
    return path, job
