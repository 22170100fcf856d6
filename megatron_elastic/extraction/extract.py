"""The ``extract`` job: slice trained budgets out of an elastic checkpoint (or any architecture out of a sorted
parent) into standalone Megatron and Hugging Face checkpoints.

Output per sub-model ``<out>/<name>/``: ``megatron/`` (a ``dist_checkpointing`` checkpoint of a plain
hybrid model, loadable at any TP/PP, with its job config in ``trainer_state.json``), ``hf/``
(``config.json`` + ``model.safetensors``), ``arch.json``. The parent is read tensor by tensor from its checkpoint
and never materialised: peak memory is about one sub-model plus one parent tensor.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from megatron_elastic.data.source import job_tokenizer_spec
from megatron_elastic.data.tokenizer import BYTE, copy_tokenizer, special_token_ids, tokenizer_library
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import every_cost, report_shape, stated_costs
from megatron_elastic.elastic.choose import budget_archs, choose_budgets
from megatron_elastic.elastic.cost import arch_parameters
from megatron_elastic.elastic.slicing import SubModel, carve
from megatron_elastic.elastic.source import load_source
from megatron_elastic.extraction.hf import save_hf_checkpoint, write_token_ids
from megatron_elastic.extraction.hf_elastic import save_hf_elastic
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.config import ConfigError
from megatron_elastic.store.checkpoint import save_checkpoint
from megatron_elastic.store.reader import CheckpointTensorReader

FORMATS = ("megatron", "hf", "both", "hf-elastic")


def extract(
    checkpoint: str,
    out: str,
    budgets: Optional[List[str]] = None,
    arch_file: Optional[str] = None,
    fmt: str = "both",
    table_step: float = 0.05,
) -> List[dict]:
    """Write the requested sub-models; returns one row per sub-model (name, parameters, paths). ``hf-elastic``
    writes one Hugging Face directory holding the full weights and every requested budget plus the router's choice
    every ``table_step`` (``extraction.hf_elastic``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    src = load_source(checkpoint, with_model=False)
    config = src.config
    reader = CheckpointTensorReader(src.path)  # streams parent tensors: one full-size tensor alive at a time
    tokenizer, tokenizer_said = _tokenizer_to_export(src.job)  # one tokenizer travels with every export
    if arch_file:
        with open(arch_file) as f:  # name -> (architecture, what arch.json says of it besides its size)
            archs = {os.path.splitext(os.path.basename(arch_file))[0]: (ElasticArch.from_json(f.read()), {})}
    else:
        archs = {
            name: (c.arch, {"budget": name, "trained": c.trained, "between": list(c.between)})
            for name, c in budget_archs(src.router, budgets or ["all"], src.path).items()
        }
    full = arch_parameters(config, ElasticArch.full(config))
    kinds = [src.router.cost] if src.router is not None else []

    def metadata(name, arch, about):
        count = arch_parameters(config, arch)
        shape = report_shape([*stated_costs(name), *kinds], src.job["data"]["seq_length"])
        return {"parameters": count, "fraction": count / full, **about, "costs": every_cost(config, arch, *shape)}

    if fmt == "hf-elastic":
        return _extract_hf_elastic(src, reader, out, archs, metadata, table_step, tokenizer)
    rows = []
    for name, (arch, about) in archs.items():
        sub = carve(src.job, config, arch, reader.names(), reader.load)
        meta = metadata(name, sub.arch, about)
        dest = os.path.join(out, f"budget_{name}" if not arch_file else name)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "arch.json"), "w") as f:
            f.write(sub.arch.to_json(**meta))
        row = {"name": name, **meta}
        if fmt in ("megatron", "both"):
            row["megatron"] = _write_megatron(os.path.join(dest, "megatron"), sub, {**meta, "extracted_from": src.path})
        if fmt in ("hf", "both"):
            row["hf"] = save_hf_checkpoint(os.path.join(dest, "hf"), sub.config, sub.state)
            _write_tokenizer(tokenizer, row["hf"])
            row["tokenizer"] = tokenizer_said
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


def _extract_hf_elastic(
    src, reader, out: str, archs: dict, metadata, table_step: float, tokenizer: Optional[str]
) -> List[dict]:
    """``extract --format hf-elastic``: ``out/hf-elastic`` with the full weights and the budget table."""
    if src.router is None:
        raise ConfigError(f"{src.path}: --format hf-elastic needs an elastic-training checkpoint (its router)")
    if not 0 < table_step <= 1:
        raise ConfigError(f"--table-step {table_step}: a fraction in (0, 1], e.g. 0.05")
    entries = {}  # name -> arch, its metadata and the budget fraction (of the router's kind) it answers
    for name, (arch, about) in archs.items():
        entries[name] = {"arch": arch, **metadata(name, arch, about), "budget_fraction": _as_fraction(name)}
    listed = {e["budget_fraction"] for e in entries.values()}
    lo = min(src.router.budgets)
    grid = [
        f for f in (round(lo + k * table_step, 6) for k in range(int((1.0 - lo) / table_step) + 1)) if f not in listed
    ]
    for f, choice in choose_budgets(src.router, grid).items():
        about = {"budget": f"{f:g}", "trained": choice.trained, "between": list(choice.between)}
        entries[f"router:{f:g}"] = {"arch": choice.arch, **metadata(f"{f:g}", choice.arch, about), "budget_fraction": f}
    state = {n: reader.load(n) for n in reader.names() if not n.endswith("_extra_state")}
    dest = save_hf_elastic(os.path.join(out, "hf-elastic"), src.job, src.config, state, entries)
    _write_tokenizer(tokenizer, dest)
    return [
        {"name": name, **{k: v for k, v in e.items() if k != "arch"}, "hf-elastic": dest} for name, e in entries.items()
    ]


def _as_fraction(name: str) -> Optional[float]:
    try:
        return float(name)
    except ValueError:
        return None


def _tokenizer_to_export(job: dict) -> Tuple[Optional[str], str]:
    """The tokenizer the parent was trained with, to travel with every Hugging Face export (``transformers`` then
    loads model and tokenizer from one directory): its spec (None: nothing to write) and what the summary says."""
    data = job.get("data") or {}
    try:
        spec = job_tokenizer_spec(data)
    except (OSError, ValueError) as e:  # the parent's data directory is gone: say so, the weights are fine
        return None, f"not copied: the parent's data ({data.get('path')}) cannot be read: {e}"
    if spec is None:
        return None, "not copied: the parent's job names no data"
    if spec == BYTE:
        return BYTE, "byte (no tokenizer files: ids 0-255 are UTF-8 bytes, <eod> 256, <pad> 257)"
    library, _ = tokenizer_library(spec)
    if library != "huggingface":
        return None, f"not copied: {library} tokenizers are not loadable by transformers ({spec})"
    return spec, spec


def _write_tokenizer(spec: Optional[str], hf_dir: str) -> None:
    """Copy the tokenizer files of ``spec`` into ``hf_dir`` (none for the byte tokenizer) and write its bos/eos/pad
    ids into ``config.json`` and ``generation_config.json``."""
    if spec is None:
        return
    if spec != BYTE:
        copy_tokenizer(spec, hf_dir)
    write_token_ids(hf_dir, special_token_ids(BYTE if spec == BYTE else hf_dir))
