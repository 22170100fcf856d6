"""NemotronH with per-layer sizes (a heterogeneous sub-model extracted by megatron-elastic), as a transformers model.

Each layer listed in ``config.layer_overrides`` is rebuilt from transformers' own ``NemotronHBlock`` with a copy
of the config carrying that layer's sizes; nothing else differs from ``NemotronHForCausalLM``. Caveat:
transformers' Mamba cache is sized from the top-level config, so generate with ``use_cache=False`` when Mamba
layers differ in size.

This file imports only transformers. ``megatron-elastic extract`` ships it, as ``modeling_elastic_nemotron_h.py``,
next to every heterogeneous export, for ``trust_remote_code=True`` loading where megatron_elastic is not
installed; where it is, ``import megatron_elastic`` imports it when transformers is imported, which registers
these classes with transformers' Auto classes (:func:`register`), and ``AutoModelForCausalLM.from_pretrained(dir)``
needs no remote code.

An ``extract --format hf-elastic`` checkpoint holds the full weights and a table of budgets (``elastic_budgets``):
``from_pretrained(dir, elastic_budget="0.5")`` builds that sub-model and loads its slices of the stored tensors
(:meth:`ElasticNemotronHForCausalLM.from_elastic`), with transformers alone.
"""

import copy
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHForCausalLM


class ElasticNemotronHConfig(NemotronHConfig):
    """NemotronHConfig plus ``layer_overrides``: {layer index (str): {size field: value}}."""

    model_type = "elastic_nemotron_h"


class ElasticNemotronHForCausalLM(NemotronHForCausalLM):
    config_class = ElasticNemotronHConfig

    def __init__(self, config):
        super().__init__(config)
        for index, sizes in (getattr(config, "layer_overrides", None) or {}).items():
            layer_config = copy.deepcopy(config)
            for name, value in sizes.items():
                setattr(layer_config, name, value)
            self.model.layers[int(index)] = NemotronHBlock(layer_config, layer_idx=int(index))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, elastic_budget=None, **kwargs):
        """With ``elastic_budget`` (a name or fraction listed in an ``extract --format hf-elastic`` checkpoint's
        ``elastic_budgets``), build that sub-model and load its slices of the stored weights; without it, the
        checkpoint's full model (the standard path)."""
        if elastic_budget is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return cls.from_elastic(pretrained_model_name_or_path, elastic_budget, kwargs.get("torch_dtype"))

    @classmethod
    def from_elastic(cls, directory, budget, torch_dtype=None):
        """The sub-model ``budget`` of a local hf-elastic checkpoint ``directory`` (see ``from_pretrained``)."""
        with open(os.path.join(directory, "config.json")) as f:
            entry = elastic_entry(json.load(f), budget)
        from transformers import initialization

        sub = ElasticNemotronHConfig(**{k: v for k, v in entry["config"].items() if k not in ("auto_map",)})
        with initialization.no_init_weights():  # every weight is loaded below (as from_pretrained does)
            model = cls(sub)
        tensors = {}
        for name, t in _read_sliced(directory, entry["tensors"]):
            tensors[name.replace("backbone.", "model.", 1)] = t
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and sub.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"hf-elastic budget {budget!r}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        if sub.tie_word_embeddings:
            model.tie_weights()
        if torch_dtype is not None and torch_dtype != "auto":
            model = model.to(torch_dtype)
        return model.eval()


def elastic_entry(config: dict, budget) -> dict:
    """The table entry of ``budget`` in an hf-elastic ``config.json``: by name, else the largest listed budget
    fraction at most ``budget``."""
    table = config.get("elastic_budgets") or {}
    if not table:
        raise ValueError("this checkpoint has no elastic_budgets table (not written by extract --format hf-elastic)")
    if str(budget) in table:
        return table[str(budget)]
    try:
        wanted = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"elastic_budget {budget!r}: not one of {sorted(table)} and not a fraction") from None
    below = [
        e for e in table.values() if e.get("budget_fraction") is not None and e["budget_fraction"] <= wanted + 1e-9
    ]
    if not below:
        raise ValueError(f"elastic_budget {budget!r}: below every listed budget {sorted(table)}")
    return max(below, key=lambda e: e["budget_fraction"])


def _read_sliced(directory, tensors: dict):
    """(sub-model name, tensor) for every entry: the parent tensor ``from``, cut to its ``dims`` ranges."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = json.load(f)["weight_map"]
    else:
        files = None
    handles = {}
    try:
        for name, spec in tensors.items():
            fname = files[spec["from"]] if files else "model.safetensors"
            if fname not in handles:
                handles[fname] = safe_open(os.path.join(directory, fname), framework="pt")
            t = handles[fname].get_tensor(spec["from"])
            for dim, ranges in spec["dims"].items():
                t = torch.cat([t.narrow(int(dim), a, b - a) for a, b in ranges], int(dim))
            yield name, t.contiguous()
    finally:
        handles.clear()


def register() -> None:
    """Make ``model_type: elastic_nemotron_h`` load through AutoConfig / AutoModelForCausalLM, with NemotronH's
    checkpoint key renames (``backbone.`` -> ``model.``). Idempotent; runs when this module is imported."""
    from transformers import conversion_mapping

    AutoConfig.register(ElasticNemotronHConfig.model_type, ElasticNemotronHConfig, exist_ok=True)
    AutoModelForCausalLM.register(ElasticNemotronHConfig, ElasticNemotronHForCausalLM, exist_ok=True)
    renames = conversion_mapping.get_checkpoint_conversion_mapping(NemotronHConfig.model_type)
    if renames is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(
            ElasticNemotronHConfig.model_type, renames, overwrite=True
        )


register()
