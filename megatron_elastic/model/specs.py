"""ModuleSpecs for the hybrid stack: ``local`` (plain PyTorch / Megatron local layers, runs on CPU) and
``te`` (TransformerEngine layers with fused norms, GPU). Both use megatron_elastic's ``MambaMixer``.

The local spec keeps separate norm modules but maps their checkpoint keys onto TE's fused names
(``mixer.in_proj.layer_norm_weight``, ``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``), so a distributed checkpoint written by either spec loads into the other.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_elastic.compat import HybridStackSubmodules
from megatron_elastic.model.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron_elastic.model.stack import HybridStack

BACKENDS = ("local", "te")


def _local_spec(mixer_cls=MambaMixer) -> ModuleSpec:
    norm = WrappedTorchNorm
    return ModuleSpec(
        module=HybridStack,
        params={"final_norm": norm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=ModuleSpec(module=mixer_cls, submodules=MambaMixerSubmodules(
                        in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                           core_attention=DotProductAttention,
                                                           linear_proj=RowParallelLinear),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                        linear_fc2=RowParallelLinear)),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
        ),
    )


def _te_spec(mixer_cls=MambaMixer) -> ModuleSpec:
    # Imported lazily: these classes raise at construction without TransformerEngine.
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=HybridStack,
        params={"final_norm": TENorm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(module=mixer_cls, submodules=MambaMixerSubmodules(
                        in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear)),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(linear_qkv=TELayerNormColumnParallelLinear,
                                                           core_attention=TEDotProductAttention,
                                                           linear_proj=TERowParallelLinear),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                        linear_fc2=TERowParallelLinear)),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def hybrid_stack_spec(backend: str = "local") -> ModuleSpec:
    """The hybrid stack spec for ``backend`` in ``("local", "te")``."""
    if backend == "local":
        return _local_spec()
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ImportError("backend='te' needs TransformerEngine (pip install megatron-elastic[gpu]); "
                              "use backend='local' on machines without it") from e
        return _te_spec()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_backend() -> str:
    """'te' when CUDA and TransformerEngine are available, else 'local'."""
    import torch

    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401

            return "te"
        except ImportError:
            pass
    return "local"
