"""Layers that build themselves from their own per-layer config (``HybridConfig.for_layer``), so one stack can
hold layers of different sizes: a heterogeneous sub-model extracted from an elastic parent is an ordinary
(non-elastic) Megatron model with these layers.

Megatron's hybrid stack passes Mamba layers their global layer number. Transformer (attention/MLP) layers get
their number within the pipeline stage and add the stage offset themselves, unless the stack passes
``add_layer_offset=False`` (megatron-core >= 0.18 does: the number is already global); the global index is
recovered by the same rule. Stages hold equal layer counts (``HybridConfig`` requires it).

Each layer can also be *skipped* (``skipped = True``, set by ``ElasticHybridStack.set_elastic`` for a depth
choice): it is then the identity. The flag lives on the layer, so Megatron's own loops over the stack's layers
(forward, and the activation recompute of megatron-core >= 0.18, which re-runs layers by index during the
backward pass) see the same depth choice in both passes.
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


def _global_index(config, layer_number: int, kwargs) -> int:
    """The layer's index in the whole model, by TransformerLayer's own rule for ``add_layer_offset``."""
    return layer_number - 1 + (_stage_offset(config) if kwargs.get("add_layer_offset", True) else 0)


def _layer_config(config, index: int):
    return config.for_layer(index) if hasattr(config, "for_layer") else config


class _Skippable:
    """A layer that is the identity while ``skipped`` (a depth choice); otherwise the Megatron layer."""

    skipped: bool = False
    _returns_context = False  # TransformerLayer returns (hidden_states, context)

    def forward(self, hidden_states, *args, **kwargs):
        if self.skipped:
            return (hidden_states, kwargs.get("context")) if self._returns_context else hidden_states
        return super().forward(hidden_states, *args, **kwargs)


class PerLayerMambaLayer(_Skippable, MambaLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(_layer_config(config, layer_number - 1), submodules, layer_number=layer_number, **kwargs)
        # megatron-core 0.16/0.17 build the Mamba pre-norm with the norm's default eps, 0.18+ with
        # config.layernorm_epsilon (as every other norm): the same model on both, whatever the config says.
        if isinstance(getattr(self.norm, "eps", None), float):
            self.norm.eps = config.layernorm_epsilon


class PerLayerTransformerLayer(_Skippable, TransformerLayer):
    _returns_context = True

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        index = _global_index(config, layer_number, kwargs)
        super().__init__(_layer_config(config, index), submodules, layer_number=layer_number, **kwargs)


class PerLayerMLPLayer(_Skippable, MLPLayer):
    _returns_context = True

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        index = _global_index(config, layer_number, kwargs)
        super().__init__(_layer_config(config, index), submodules, layer_number=layer_number, **kwargs)
