"""Layers that build themselves from their own per-layer config (``HybridConfig.for_layer``), so one stack can
hold layers of different sizes: a heterogeneous sub-model extracted from an elastic parent is an ordinary
(non-elastic) Megatron model with these layers.

Megatron's hybrid stack passes Mamba layers their global layer number and transformer (attention/MLP) layers
their number within the pipeline stage (they add the stage offset themselves); the global index is recovered
accordingly. Stages hold equal layer counts (``HybridConfig`` requires it).
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.transformer_layer import TransformerLayer


def _stage_offset(config) -> int:
    pp = config.pipeline_model_parallel_size
    if pp == 1 or not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_pipeline_model_parallel_rank() * (config.num_layers // pp)


def _layer_config(config, index: int):
    return config.for_layer(index) if hasattr(config, "for_layer") else config


class PerLayerMambaLayer(MambaLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(_layer_config(config, layer_number - 1), submodules, layer_number=layer_number, **kwargs)


class PerLayerTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        index = layer_number - 1 + _stage_offset(config)
        super().__init__(_layer_config(config, index), submodules, layer_number=layer_number, **kwargs)


class PerLayerMLPLayer(MLPLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        index = layer_number - 1 + _stage_offset(config)
        super().__init__(_layer_config(config, index), submodules, layer_number=layer_number, **kwargs)
