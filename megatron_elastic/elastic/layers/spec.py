"""The elastic hybrid stack's ModuleSpec: Megatron's hybrid stack (``model.specs.stack_spec``, the one spec
for local, TransformerEngine and elastic layers) with elastic mixer, attention, MLP, linears, norms and stack."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_elastic.elastic.layers.attention import ElasticSelfAttention
from megatron_elastic.elastic.layers.linear import (
    ElasticColumnParallelLinear,
    ElasticRMSNorm,
    ElasticRowParallelLinear,
)
from megatron_elastic.elastic.layers.mamba import ElasticMambaMixer
from megatron_elastic.elastic.layers.stack import ElasticHybridStack
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.sdpa_attention import SDPAttention
from megatron_elastic.model.specs import stack_spec


def elastic_hybrid_stack_spec(backend: str = "local") -> ModuleSpec:
    """The elastic hybrid stack: Megatron's layers with elastic mixer, attention, MLP, linears, norms and
    stack (any nested choice runs on sliced weights; see ``layers.model.set_arch``).
    Swap it for :func:`hybrid_stack_spec` to make a Megatron hybrid model elastic. Only the ``local`` backend
    is elastic so far."""
    if backend != "local":
        raise ConfigError("elastic_hybrid_stack_spec: only backend='local' is implemented so far")
    return stack_spec(
        norm=ElasticRMSNorm,
        column_linear=ElasticColumnParallelLinear,
        row_linear=ElasticRowParallelLinear,
        core_attention=SDPAttention,
        mixer_cls=ElasticMambaMixer,
        stack_cls=ElasticHybridStack,
        attention_cls=ElasticSelfAttention,
    )
