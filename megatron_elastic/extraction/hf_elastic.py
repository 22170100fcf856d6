"""One Hugging Face checkpoint, every budget (``extract --format hf-elastic``): the elastic model's full weights
(the sorted, trained parent) in NemotronH names, and in ``config.json`` a table budget -> sub-model. The shipped
remote-code module (``hf_model.py``) builds any listed budget with ``transformers`` alone, slicing at load time::

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True, elastic_budget="0.5")

Each table entry holds the sub-model's NemotronH config and, for every sub-model tensor, the parent tensor it comes
from and the kept index ranges along each sliced dimension. The ranges are not a second copy of the slicing rules:
they are read off our own slicing (``elastic.slicing``) applied to index tensors (a tensor whose values are
their own positions along one dimension), through the same NemotronH name mapping as the ordinary export, so an
``hf-elastic`` budget is by construction what ``extract --format hf`` writes for it (tests compare the logits).

Listed: every trained budget, every ``--budget`` asked for, and the router's choice every ``table_step`` between
the smallest trained budget and 1 (``router:<fraction>``); a fraction not listed loads the largest listed one
below it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.choose import choose_budgets
from megatron_elastic.elastic.slicing import iter_sliced, kept_layers, sub_model_job
from megatron_elastic.elastic.source import load_source
from megatron_elastic.errors import ConfigError
from megatron_elastic.extraction.hf import (
    REMOTE_MODULE,
    from_hf_state_dict,
    hf_config,
    save_hf_checkpoint,
    to_hf_state_dict,
)
from megatron_elastic.store.reader import CheckpointTensorReader


def export_hf_elastic(
    checkpoint: str, out: str, budgets: Optional[List[str]] = None, table_step: float = 0.05
) -> List[dict]:
    """``extract --format hf-elastic``: ``out/hf-elastic`` with the full weights and the budget table (every
    trained budget, every one of ``budgets``, the router's choice every ``table_step``); one row per table entry."""
    if not 0 < table_step <= 1:
        raise ConfigError(f"--table-step {table_step}: a fraction in (0, 1], e.g. 0.05")
    src = load_source(checkpoint, with_model=False)
    if src.router is None:
        raise ConfigError(f"{src.path}: --format hf-elastic needs an elastic-training checkpoint (its router)")
    entries = {}  # name -> arch, its metadata and the budget fraction (of the router's kind) it answers
    for name, (arch, about) in src.sub_models(budgets).items():
        entries[name] = {
            "arch": arch,
            **src.describe(name, arch, about),
            "budget_fraction": _as_fraction(name),
        }
    listed = {e["budget_fraction"] for e in entries.values()}
    lo = min(src.router.budgets)
    grid = [
        f for f in (round(lo + k * table_step, 6) for k in range(int((1.0 - lo) / table_step) + 1)) if f not in listed
    ]
    for f, choice in choose_budgets(src.router, grid).items():
        about = {"budget": f"{f:g}", "trained": choice.trained, "between": list(choice.between)}
        meta = src.describe(f"{f:g}", choice.arch, about)
        entries[f"router:{f:g}"] = {"arch": choice.arch, **meta, "budget_fraction": f}
    reader = CheckpointTensorReader(src.path)
    state = {n: reader.load(n) for n in reader.names() if not n.endswith("_extra_state")}
    dest = save_hf_elastic(os.path.join(out, "hf-elastic"), src.job, src.config, state, entries, src.tokenizer[0])
    return [
        {"name": name, **{k: v for k, v in e.items() if k != "arch"}, "hf-elastic": dest} for name, e in entries.items()
    ]


def _as_fraction(name: str) -> Optional[float]:
    try:
        return float(name)
    except ValueError:
        return None


def index_ranges(index: torch.Tensor) -> List[List[int]]:
    """``[[start, stop), ...]`` of a 1-D index tensor, consecutive runs merged."""
    out: List[List[int]] = []
    for i in index.tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _positions(shape: Tuple[int, ...], dim: int) -> torch.Tensor:
    """A tensor of ``shape`` whose values are their own index along ``dim`` (a stride-0 view: no memory)."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim], dtype=torch.int64).view(view).expand(shape)


def _layer_groups(names: List[str]) -> Dict[str, List[str]]:
    """HF tensor names grouped by layer (attention's q/k/v must map together), non-layer tensors alone."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" else n
        groups.setdefault(key, []).append(n)
    return groups


def budget_entry(job: dict, config, arch: ElasticArch, hf_shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """The table entry of one sub-model: its NemotronH ``config`` and, per sub-model tensor, ``from`` (the parent
    tensor) and ``dims`` (kept ranges per sliced dimension; a dimension kept whole is left out)."""
    arch = arch.validate(config)
    _, sub_cfg = sub_model_job(job, config, arch)
    parent_layer = {new: old for old, new in kept_layers(config, arch).items()}
    source = {}  # sub-model HF name -> parent HF name
    dims: Dict[str, Dict[str, List[List[int]]]] = {}
    for group in _layer_groups(list(hf_shapes)).values():
        for d in range(max(len(hf_shapes[n]) for n in group)):
            idx = {n: _positions(hf_shapes[n], min(d, len(hf_shapes[n]) - 1)) for n in group}
            ours = from_hf_state_dict(idx, config)
            sliced = dict(iter_sliced(iter(ours), ours.__getitem__, config, arch))
            if not sliced:
                break  # a skipped layer
            for name, t in to_hf_state_dict(sliced, sub_cfg).items():
                parent = _parent_name(name, parent_layer)
                source[name] = parent
                if d >= t.dim():
                    continue
                kept = t.movedim(d, 0).reshape(t.shape[d], -1)[:, 0]
                if not torch.equal(kept, torch.arange(hf_shapes[parent][d])):
                    dims.setdefault(name, {})[str(d)] = index_ranges(kept)
    return {
        "config": hf_config(sub_cfg),
        "tensors": {n: {"from": p, "dims": dims.get(n, {})} for n, p in source.items()},
    }


def _parent_name(sub_name: str, parent_layer: Dict[int, int]) -> str:
    """The parent tensor of a sub-model tensor (its layer index mapped back through ``parent_layer``)."""
    parts = sub_name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        parts[2] = str(parent_layer[int(parts[2])])
    return ".".join(parts)


def save_hf_elastic(
    out_dir: str,
    job: dict,
    config,
    state_dict: Dict[str, torch.Tensor],
    entries: Dict[str, dict],
    tokenizer: Optional[str] = None,
):
    """Write the full model (``extraction.hf.save_hf_checkpoint``, with ``tokenizer``) and the budget table
    ``entries`` (name -> ``{"arch": ElasticArch, **about}``) into one directory, with the remote-code module.
    Returns ``out_dir``."""
    save_hf_checkpoint(out_dir, config, state_dict, tokenizer)
    hf_shapes = {n: tuple(t.shape) for n, t in to_hf_state_dict(state_dict, config).items()}
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(
        architectures=["ElasticNemotronHForCausalLM"],
        model_type="elastic_nemotron_h",
        auto_map={
            "AutoConfig": f"{REMOTE_MODULE}.ElasticNemotronHConfig",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.ElasticNemotronHForCausalLM",
        },
        elastic_budgets={
            name: {**{k: v for k, v in e.items() if k != "arch"}, **budget_entry(job, config, e["arch"], hf_shapes)}
            for name, e in entries.items()
        },
    )
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copyfile(
        os.path.join(os.path.dirname(__file__), "hf_model.py"), os.path.join(out_dir, f"{REMOTE_MODULE}.py")
    )
    return out_dir
