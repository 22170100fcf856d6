"""The ``extract`` job: slice trained budgets out of an elastic checkpoint (or any architecture out of a sorted
parent) into standalone Megatron and Hugging Face checkpoints.

Output per sub-model ``<out>/<name>/``: ``megatron/`` (a ``dist_checkpointing`` checkpoint of a plain
hybrid model, loadable at any TP/PP, with its job config in ``trainer_state.json``), ``hf/``
(``config.json`` + ``model.safetensors``), ``arch.json``. The parent is read tensor by tensor from its checkpoint
and never materialised: peak memory is about one sub-model plus one parent tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import yaml

from megatron_elastic.data.source import job_tokenizer_spec
from megatron_elastic.errors import CheckpointError
from megatron_elastic.extraction.hf import save_hf_checkpoint
from megatron_elastic.extraction.reader import CheckpointTensorReader
from megatron_elastic.extraction.slicing import iter_sliced, sub_model_dict
from megatron_elastic.model.budget import (
    Budget,
    every_cost,
    format_cost,
    parse_budget,
    parse_kind,
    report_shape,
    same_kind,
    stated_costs,
)
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.config import ConfigError
from megatron_elastic.model.cost import arch_parameters
from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.elastic_model import build_elastic_model
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.router import BudgetChoice, ElasticSpace, Router
from megatron_elastic.training.checkpoint import (
    EXTRA,
    load_checkpoint,
    load_extra,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_elastic.training.config import load_pretrain_config

FORMATS = ("megatron", "hf", "both", "hf-elastic")


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


def budget_archs(router: Optional[Router], budgets: List[str], where: str = "") -> Dict[str, BudgetChoice]:
    """Name -> the router's choice for each requested budget: ``all`` (every trained budget, nested), fractions
    (of the router's kind: parameters, or the memory/FLOPs its job was trained on), trained or not
    (``Router.choose_budgets``: an untrained one between its trained neighbours, zero-shot), or budgets stated in
    any kind (``model.budget``: ``6GiB@32768``, ``1.5GFLOP@4096``): one of the router's own kind is its fraction of
    the parent; another kind gets the largest sub-model the router gives whose cost of that kind is within it
    (:func:`fraction_within`). Bad values raise a one-line ``ConfigError``."""
    if router is None:
        raise ConfigError(f"{where} has no router (not an elastic-training checkpoint); pass --arch FILE.json")
    out = {}
    if "all" in budgets:
        out = {f"{b:g}": BudgetChoice(a, True, (b, b)) for b, a in router.choose_all().items()}
    named = {}
    for text in [b for b in budgets if b != "all"]:
        try:
            stated = parse_budget(text, router.config)
        except ConfigError as e:
            raise ConfigError(f"--budget: {e}, or 'all'") from None
        if stated.kind == "params":  # a bare fraction: of the router's own kind, as the job's budgets are
            named[_name(text, stated)] = stated.value
        elif same_kind(stated.cost, router.cost):
            named[_name(text, stated)] = stated.fraction(router.config)
        else:
            named[_name(text, stated)] = fraction_within(router, stated)
    choices = router.choose_budgets(sorted(set(named.values()), reverse=True))
    out.update({name: choices[f] for name, f in named.items() if name not in out})
    return out


def _name(text: str, stated: Budget) -> str:
    return f"{stated.value:g}" if stated.kind == "params" else str(text).strip()


def fraction_within(router: Router, stated: Budget, steps: int = 24) -> float:
    """The largest budget fraction of ``router``'s kind whose chosen sub-model costs at most ``stated`` in its own
    kind (bisection: a larger fraction's sub-model contains a smaller one's choices, so the cost grows with it);
    1.0 when the parent itself fits. A budget below the smallest trained sub-model's cost is a ``ConfigError``."""
    config, target = router.config, stated.target(router.config)
    cost_at = lambda f: float(stated.cost.of(config, router.choose_budgets([f])[f].arch))
    lo, hi = min(router.budgets), 1.0
    if cost_at(hi) <= target:
        return hi
    smallest = cost_at(lo)
    if smallest > target:
        raise ConfigError(
            f"--budget {stated}: the smallest sub-model this router gives (budget {lo:g}) needs "
            f"{format_cost(smallest, stated.cost)}; state a larger budget"
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_at(mid) <= target else (lo, mid)
    return lo


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
        return _extract_hf_elastic(src, reader, out, archs, metadata, table_step)
    rows = []
    for name, (arch, about) in archs.items():
        arch = arch.validate(config)
        meta = metadata(name, arch, about)
        dest = os.path.join(out, f"budget_{name}" if not arch_file else name)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "arch.json"), "w") as f:
            f.write(arch.to_json(**meta))
        sub_job = {**src.job, "model": sub_model_dict(src.job["model"], config, arch)}
        sub_cfg = load_pretrain_config(text=yaml.safe_dump(sub_job)).model_config()
        sliced = dict(iter_sliced(iter(reader.names()), reader.load, config, arch))
        row = {"name": name, **meta}
        if fmt in ("megatron", "both"):
            plain = build_hybrid_model(sub_cfg)
            missing, unexpected = plain.load_state_dict(sliced, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(
                    f"sliced weights do not fit the plain model: missing {missing[:4]}, unexpected {unexpected[:4]}"
                )
            save_checkpoint(
                os.path.join(dest, "megatron"),
                0,
                plain,
                trainer_state={"config": sub_job, "arch": arch.to_dict(), **meta, "extracted_from": src.path},
            )
            row["megatron"] = os.path.join(dest, "megatron")
        if fmt in ("hf", "both"):
            row["hf"] = save_hf_checkpoint(os.path.join(dest, "hf"), sub_cfg, sliced)
            row["tokenizer"] = _export_tokenizer(src.job, row["hf"])
        rows.append(row)
    return rows


def _extract_hf_elastic(src, reader, out: str, archs: dict, metadata, table_step: float) -> List[dict]:
    """``extract --format hf-elastic``: ``out/hf-elastic`` with the full weights and the budget table."""
    from megatron_elastic.extraction.hf_elastic import save_hf_elastic

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
    for f, choice in src.router.choose_budgets(grid).items():
        about = {"budget": f"{f:g}", "trained": choice.trained, "between": list(choice.between)}
        entries[f"router:{f:g}"] = {"arch": choice.arch, **metadata(f"{f:g}", choice.arch, about), "budget_fraction": f}
    state = {n: reader.load(n) for n in reader.names() if not n.endswith("_extra_state")}
    dest = save_hf_elastic(os.path.join(out, "hf-elastic"), src.job, src.config, state, entries)
    _export_tokenizer(src.job, dest)
    return [
        {"name": name, **{k: v for k, v in e.items() if k != "arch"}, "hf-elastic": dest} for name, e in entries.items()
    ]


def _as_fraction(name: str) -> Optional[float]:
    try:
        return float(name)
    except ValueError:
        return None


def _export_tokenizer(job: dict, hf_dir: str) -> str:
    """Copy the tokenizer the parent was trained with into the Hugging Face export (``transformers`` then loads
    model and tokenizer from one directory) and write its bos/eos/pad ids into ``config.json`` and
    ``generation_config.json``; returns what was done, for the summary."""
    from megatron_elastic.data.tokenizer import BYTE, copy_tokenizer, special_token_ids, tokenizer_library
    from megatron_elastic.extraction.hf import write_token_ids

    data = job.get("data") or {}
    try:
        spec = job_tokenizer_spec(data)
    except (OSError, ValueError) as e:  # the parent's data directory is gone: say so, the weights are fine
        return f"not copied: the parent's data ({data.get('path')}) cannot be read: {e}"
    if spec is None:
        return "not copied: the parent's job names no data"
    if spec == BYTE:
        write_token_ids(hf_dir, special_token_ids(BYTE))
        return "byte (no tokenizer files: ids 0-255 are UTF-8 bytes, <eod> 256, <pad> 257)"
    library, _ = tokenizer_library(spec)
    if library != "huggingface":
        return f"not copied: {library} tokenizers are not loadable by transformers ({spec})"
    copy_tokenizer(spec, hf_dir)
    write_token_ids(hf_dir, special_token_ids(hf_dir))
    return spec
