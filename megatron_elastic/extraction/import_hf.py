"""The ``import-hf`` job: a Hugging Face NemotronH checkpoint (e.g. NVIDIA's Nemotron Nano V2 release format) ->
a Megatron checkpoint of our hybrid model, so a released parent can start the pipeline (``importance``).

Note: ``transformers``' NemotronH clamps the SSM step ``dt`` from below at ``time_step_min``; Megatron's
kernels (and ours) do not. The two agree wherever ``softplus(dt + dt_bias) >= time_step_min``.
"""

from __future__ import annotations

import os
from typing import Optional

import yaml

from megatron_elastic.data.tokenizer import tokenizer_library
from megatron_elastic.errors import HFExportError
from megatron_elastic.extraction.hf import from_hf_state_dict, model_dict_from_hf, read_hf_checkpoint
from megatron_elastic.model.builder import build_hybrid_model, parameter_count
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import save_checkpoint
from megatron_elastic.store.job_config import PretrainConfig, load_pretrain_config

# What a job config gives the imported parent's job besides its data: how the jobs that read the parent run it
# (``importance``: micro-batch, seed, TP/PP/DP layout), and the model fields that are our choices, not the release's.
CARRIED_SECTIONS = ("train", "parallel")
CARRIED_MODEL_FIELDS = ("elastic_ffn_groups",)


def import_hf(hf_dir: str, out: str, data: Optional[dict] = None, job_config: Optional[dict] = None) -> dict:
    """Convert ``hf_dir`` into a checkpoint under ``out`` (``latest`` + ``iter_0000000``); returns a summary.

    ``data`` becomes the job's data section (what ``importance`` calibrates on by default): ``{"path": DIR}`` or a
    Megatron blend; a blend without a tokenizer gets the one inside ``hf_dir``. ``job_config`` (a job YAML as a
    mapping, e.g. ``examples/nemotron_nano_v2_12b/parent.yaml``): its ``train`` and ``parallel`` sections and
    ``model.elastic_ffn_groups`` are carried into the imported job; the rest of its model section must agree
    with ``config.json`` where it states the architecture."""
    hf_cfg, tensors = read_hf_checkpoint(hf_dir)
    model_dict = model_dict_from_hf(hf_cfg)
    dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    model_dict["params_dtype"] = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    # Megatron's mixed precision for a half-precision release: half weights, fp32 main weights in the optimizer
    # (without the flag its optimizer would step the half weights themselves, and mixed-dtype models break).
    model_dict["bf16"] = model_dict["params_dtype"] == "bfloat16"
    model_dict["fp16"] = model_dict["params_dtype"] == "float16"
    job_config = job_config or {}
    stated = job_config.get("model") or {}
    for name in CARRIED_MODEL_FIELDS:
        if name in stated:
            model_dict[name] = stated[name]
    clash = {k: (v, model_dict[k]) for k, v in stated.items() if k in model_dict and model_dict[k] != v}
    clash.pop("params_dtype", None)  # the release's dtype wins: its weights are stored in it
    if clash:
        shown = ", ".join(f"{k}: config {a!r} vs config.json {b!r}" for k, (a, b) in sorted(clash.items())[:4])
        raise HFExportError(
            f"{hf_dir}: the job config's model section disagrees with config.json ({shown}); fix the job config "
            f"(the imported architecture is config.json's)"
        )
    job = PretrainConfig(model=model_dict).to_dict()
    for section in CARRIED_SECTIONS:
        job[section].update(job_config.get(section) or {})
    data = dict(data or {"path": "runs/data"})
    if data.get("blend") and not data.get("tokenizer"):
        tokenizer_library(hf_dir)  # the release ships its tokenizer; refuse clearly if this one does not
        data["tokenizer"] = os.path.abspath(hf_dir)
    job["data"].update(data)
    initialize_parallel(1, 1, seed=job["train"]["seed"])
    config = load_pretrain_config(text=yaml.safe_dump(job)).model_config()
    model = build_hybrid_model(config)
    state = from_hf_state_dict(tensors, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise HFExportError(
            f"{hf_dir}: tensors do not fit the model its config describes: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    path = save_checkpoint(out, 0, model, trainer_state={"config": job, "imported_from": hf_dir})
    source = {k: v for k, v in job["data"].items() if k in ("path", "blend", "split", "valid_blend", "tokenizer") and v}
    return {
        "checkpoint": path,
        "parameters": parameter_count(model),
        "hybrid_pattern": config.hybrid_pattern,
        "data": source,
    }
