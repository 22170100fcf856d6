"""The ``import-hf`` job: a Hugging Face NemotronH checkpoint (e.g. NVIDIA's Nemotron Nano V2 release format) ->
a Megatron checkpoint of our hybrid model, so a released parent can start the pipeline (``importance``).

Note: ``transformers``' NemotronH clamps the SSM step ``dt`` from below at ``time_step_min``; Megatron's
kernels (and ours) do not. The two agree wherever ``softplus(dt + dt_bias) >= time_step_min``.
"""

from __future__ import annotations

import yaml

from megatron_elastic.errors import HFExportError
from megatron_elastic.extraction.hf import from_hf_state_dict, model_dict_from_hf, read_hf_checkpoint
from megatron_elastic.model.builder import build_hybrid_model, parameter_count
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.training.checkpoint import save_checkpoint
from megatron_elastic.training.config import PretrainConfig, load_pretrain_config


def import_hf(hf_dir: str, out: str, data_path: str = "runs/data") -> dict:
    """Convert ``hf_dir`` into a checkpoint under ``out`` (``latest`` + ``iter_0000000``); returns a summary."""
    hf_cfg, tensors = read_hf_checkpoint(hf_dir)
    model_dict = model_dict_from_hf(hf_cfg)
    dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    model_dict["params_dtype"] = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    job = PretrainConfig(model=model_dict).to_dict()
    job["data"]["path"] = data_path
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
    return {"checkpoint": path, "parameters": parameter_count(model), "hybrid_pattern": config.hybrid_pattern}
