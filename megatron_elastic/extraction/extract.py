"""The ``extract`` job: slice trained budgets out of an elastic checkpoint (or any architecture out of a sorted
parent) into standalone Megatron and Hugging Face checkpoints.

Output per sub-model ``<out>/<name>/``: ``megatron/`` (a ``dist_checkpointing`` checkpoint of a plain
hybrid model, loadable at any TP/PP, with its job config in ``trainer_state.json``), ``hf/``
(``config.json`` + ``model.safetensors``), ``arch.json``. The parent is read tensor by tensor from its checkpoint
and never materialised: peak memory is about one sub-model plus one parent tensor.
"""

from __future__ import annotations

import os
from typing import List, Optional

from megatron_elastic.elastic.slicing import SubModel, carve
from megatron_elastic.elastic.source import load_source
from megatron_elastic.errors import ConfigError
from megatron_elastic.extraction.hf import save_hf_checkpoint
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.store.checkpoint import save_checkpoint
from megatron_elastic.store.reader import CheckpointTensorReader

# one checkpoint per sub-model ("vllm": NemotronH as vLLM reads it, hf.hf_config); "hf-elastic" is export_hf_elastic's
FORMATS = ("megatron", "hf", "both", "vllm")


def extract(
    checkpoint: str,
    out: str,
    budgets: Optional[List[str]] = None,
    arch_file: Optional[str] = None,
    fmt: str = "both",
) -> List[dict]:
    """Write the requested sub-models, each as a standalone checkpoint in ``out/budget_<name>/`` (``--arch``:
    ``out/<file name>/``); returns one row per sub-model (name, parameters, paths). One directory holding every
    budget (``extract --format hf-elastic``) is the other job: ``extraction.hf_elastic.export_hf_elastic``."""
    if fmt == "hf-elastic":
        raise ConfigError(
            "fmt='hf-elastic' writes one directory for every budget: call "
            "megatron_elastic.extraction.hf_elastic.export_hf_elastic(checkpoint, out, budgets, table_step)"
        )
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS} (or hf-elastic), got {fmt!r}")
    src = load_source(checkpoint, with_model=False)
    reader = CheckpointTensorReader(src.path)  # streams parent tensors: one full-size tensor alive at a time
    tokenizer, tokenizer_said = src.tokenizer  # one tokenizer travels with every export
    rows = []
    for name, (arch, about) in src.sub_models(budgets, arch_file).items():
        sub = carve(src.job, src.config, arch, reader.names(), reader.load)
        meta = src.describe(name, sub.arch, about)
        dest = os.path.join(out, f"budget_{name}" if not arch_file else name)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "arch.json"), "w") as f:
            f.write(sub.arch.to_json(**meta))
        row = {"name": name, **meta}
        if fmt in ("hf", "both"):
            row["hf"] = save_hf_checkpoint(os.path.join(dest, "hf"), sub.config, sub.state, tokenizer)
            row["tokenizer"] = tokenizer_said
        if fmt == "vllm":
            row["vllm"] = save_hf_checkpoint(
                os.path.join(dest, "vllm"), sub.config, sub.state, tokenizer, runtime="vllm"
            )
        if fmt in ("megatron", "both"):
            row["megatron"] = _write_megatron(os.path.join(dest, "megatron"), sub, {**meta, "extracted_from": src.path})
        rows.append(row)
    return rows


def _write_megatron(dest: str, sub: SubModel, about: dict) -> str:
    """``sub`` as a ``dist_checkpointing`` checkpoint of a plain hybrid model (loadable at any TP/PP), its job
    config and ``about`` in ``trainer_state.json``."""
    plain = build_hybrid_model(sub.config)
    missing, unexpected = plain.load_state_dict(sub.state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(
            f"sliced weights do not fit the plain model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    save_checkpoint(dest, 0, plain, trainer_state={"config": sub.job, "arch": sub.arch.to_dict(), **about})
    return dest
