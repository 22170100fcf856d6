"""Slice a sub-model (``ElasticArch``) out of a sorted parent: the config of the plain model that holds it and
its weights, tensor by tensor.

Works on the parent's full (TP=1) Megatron state dict with the local spec's names
(``decoder.layers.<i>.mixer.in_proj.weight``, ...). Skipped layers are dropped and the kept layers renumbered;
per-layer sizes that differ from the new config's base sizes go to ``HybridConfig.layer_overrides``.
The kept units are exactly those the elastic blocks use at run time (both index through ``model/layouts.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Tuple

import torch
import yaml

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.model.config import LAYER_FIELDS, HybridConfig
from megatron_elastic.model.layouts import (
    HIDDEN_DIMS,
    MODEL_HIDDEN_DIMS,
    index_layer_tensor,
    layer_unit_index,
    nested_units,
)
from megatron_elastic.store.job_config import load_pretrain_config

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass
class SubModel:
    """A sub-model carved out of a sorted parent: what every export writes. ``job`` is the parent's job config with
    the plain model's ``model:`` section (``sub_model_dict``), ``config`` that model's ``HybridConfig``, ``state``
    its weights (local-spec names, TP=1, layers renumbered)."""

    arch: ElasticArch
    job: Dict[str, Any]
    config: HybridConfig
    state: Dict[str, torch.Tensor]


def sub_model_job(job: Dict[str, Any], config, arch: ElasticArch) -> Tuple[Dict[str, Any], HybridConfig]:
    """The job config of the plain model that holds ``arch`` (the parent's ``job`` with its ``model:`` section
    replaced) and that model's validated ``HybridConfig``."""
    sub_job = {**job, "model": sub_model_dict(job["model"], config, arch)}
    return sub_job, load_pretrain_config(text=yaml.safe_dump(sub_job)).model_config()


def carve(
    job: Dict[str, Any], config, arch: ElasticArch, names: Iterable[str], load: Callable[[str], torch.Tensor]
) -> SubModel:
    """Carve ``arch`` out of the parent whose tensors are ``names``, read one at a time by ``load(name)`` (a
    checkpoint reader or a state dict's ``__getitem__``): the sub-model's job, config and weights."""
    arch = arch.validate(config)
    sub_job, sub_config = sub_model_job(job, config, arch)
    return SubModel(arch, sub_job, sub_config, dict(iter_sliced(iter(names), load, config, arch)))


def kept_layers(config, arch: ElasticArch) -> Dict[int, int]:
    """Parent layer index -> index in the extracted model."""
    kept = [i for i in range(len(config.hybrid_pattern)) if i not in set(arch.skipped_layers)]
    return {old: new for new, old in enumerate(kept)}


def sub_model_dict(model_dict: Dict[str, Any], config, arch: ElasticArch) -> Dict[str, Any]:
    """The ``model:`` section of the extracted model: the parent's section with the kept pattern, the active
    hidden size, base per-layer sizes (the most common value among kept layers) and ``layer_overrides``."""
    arch = arch.validate(config)
    remap = kept_layers(config, arch)
    out = {k: v for k, v in model_dict.items() if k != "layer_overrides"}
    out["hybrid_pattern"] = "".join(config.hybrid_pattern[i] for i in remap)
    out["hidden_size"] = arch.hidden_size
    overrides: Dict[int, Dict[str, int]] = {}
    for symbol, fields in LAYER_FIELDS.items():
        layers = [i for i in remap if config.hybrid_pattern[i] == symbol]
        for f in fields:
            values = {i: getattr(arch, f)[i] for i in layers}
            if not values:
                continue
            base = Counter(values.values()).most_common(1)[0][0]
            out[f] = base
            for i, v in values.items():
                if v != base:
                    overrides.setdefault(remap[i], {})[f] = v
    if "ffn_hidden_size" in out and out.get("elastic_ffn_groups", 1) > 1:
        sizes = [out["ffn_hidden_size"]] + [o["ffn_hidden_size"] for o in overrides.values() if "ffn_hidden_size" in o]
        if any(s % out["elastic_ffn_groups"] for s in sizes):
            out["elastic_ffn_groups"] = 1
    out["layer_overrides"] = overrides or None
    return out


def slice_tensor(name: str, tensor: torch.Tensor, config, arch: ElasticArch) -> torch.Tensor:
    """The part of parent tensor ``name`` that the sub-model ``arch`` keeps (a new contiguous tensor)."""
    h = arch.hidden_size
    if name in MODEL_HIDDEN_DIMS:
        return tensor.narrow(MODEL_HIDDEN_DIMS[name], 0, h).contiguous().clone()
    m = _LAYER_KEY.match(name)
    if not m:
        raise KeyError(f"slice_tensor: unexpected parent tensor {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    sym = config.hybrid_pattern[i]
    layer_config = config.for_layer(i) if hasattr(config, "for_layer") else config
    units = nested_units(layer_config, sym, {f: getattr(arch, f)[i] for f in LAYER_FIELDS[sym]})
    index = layer_unit_index(layer_config, sym, units)
    if rest not in HIDDEN_DIMS[sym] and rest not in index:
        raise KeyError(f"slice_tensor: no slicing rule for {name!r} on a {sym!r} layer")
    out = index_layer_tensor(layer_config, sym, rest, tensor, units, index)
    if rest in HIDDEN_DIMS[sym]:
        out = out.narrow(HIDDEN_DIMS[sym][rest], 0, h)
    return out.contiguous().clone()


def iter_sliced(
    names: Iterator[str], load: Callable[[str], torch.Tensor], config, arch: ElasticArch
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(sub-model name, sliced tensor) for every parent tensor name; ``load(name)`` fetches one parent tensor
    at a time, so only one full-size tensor is alive at once. Skipped layers are never loaded."""
    remap = kept_layers(config, arch)
    for name in names:
        if name.endswith("_extra_state"):
            continue
        m = _LAYER_KEY.match(name)
        if m and int(m.group(1)) not in remap:
            continue
        new = f"decoder.layers.{remap[int(m.group(1))]}.{m.group(2)}" if m else name
        yield new, slice_tensor(name, load(name), config, arch)


def slice_state_dict(state_dict: Dict[str, torch.Tensor], config, arch: ElasticArch) -> Dict[str, torch.Tensor]:
    """The sub-model's state dict (local-spec names, renumbered layers) from the parent's full state dict."""
    arch = arch.validate(config)
    return dict(iter_sliced(iter(state_dict), state_dict.__getitem__, config, arch))
