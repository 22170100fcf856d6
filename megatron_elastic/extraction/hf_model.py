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
"""

import copy

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
