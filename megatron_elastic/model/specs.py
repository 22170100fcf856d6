"""ModuleSpecs for the hybrid stack: ``local`` (plain PyTorch / Megatron local layers, runs on CPU) and
``te`` (TransformerEngine layers with fused norms, GPU). Both use megatron_elastic's ``MambaMixer``.

The local spec keeps separate norm modules but maps their checkpoint keys onto TE's fused names
(``mixer.in_proj.layer_norm_weight``, ``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``), so a distributed checkpoint written by either spec loads into the other.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayerSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_elastic.compat import ATTENTION, MAMBA, HybridStackSubmodules, mlp_submodule
from megatron_elastic.compat import MLP as MLP_SYMBOL
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.layouts import PRE_NORM_PREFIX
from megatron_elastic.model.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron_elastic.model.norms import RMSNorm
from megatron_elastic.model.per_layer import PerLayerMambaLayer, PerLayerMLPLayer, PerLayerTransformerLayer
from megatron_elastic.model.sdpa_attention import SDPAttention
from megatron_elastic.model.stack import HybridStack

BACKENDS = ("local", "te")


def stack_spec(
    *,
    norm,
    column_linear,
    row_linear,
    core_attention,
    fused_norm_linear=None,
    mixer_cls=MambaMixer,
    stack_cls=HybridStack,
    attention_cls=SelfAttention,
) -> ModuleSpec:
    """The hybrid stack spec (layers built from their per-layer config, see ``per_layer.py``). With
    ``fused_norm_linear`` (TE's LayerNorm+Linear) the pre-norms live inside
    ``in_proj``/``linear_qkv``/``linear_fc1``; otherwise they are separate ``norm`` modules whose checkpoint
    keys are mapped onto those fused names."""
    fused = fused_norm_linear is not None
    first_linear = fused_norm_linear if fused else column_linear
    pre_norm = IdentityOp if fused else norm

    def keys_map(local_prefix: str, fused_prefix: str) -> dict:
        return {} if fused else {local_prefix: f"{fused_prefix}layer_norm_"}

    return ModuleSpec(
        module=stack_cls,
        params={"final_norm": norm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=PerLayerMambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=pre_norm,
                    mixer=ModuleSpec(
                        module=mixer_cls, submodules=MambaMixerSubmodules(in_proj=first_linear, out_proj=row_linear)
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_map(*PRE_NORM_PREFIX[MAMBA]),
                ),
            ),
            attention_layer=ModuleSpec(
                module=PerLayerTransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=pre_norm,
                    self_attention=ModuleSpec(
                        module=attention_cls,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=first_linear, core_attention=core_attention, linear_proj=row_linear
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_map(*PRE_NORM_PREFIX[ATTENTION]),
                ),
            ),
            mlp_layer=ModuleSpec(
                module=PerLayerMLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=pre_norm,
                    mlp=mlp_submodule(MLP, MLPSubmodules(linear_fc1=first_linear, linear_fc2=row_linear)),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_map(*PRE_NORM_PREFIX[MLP_SYMBOL]),
                ),
            ),
        ),
    )


def _local_spec() -> ModuleSpec:
    return stack_spec(
        norm=RMSNorm,
        column_linear=ColumnParallelLinear,
        row_linear=RowParallelLinear,
        core_attention=SDPAttention,
    )


def _te_spec() -> ModuleSpec:
    # Imported lazily: these classes raise at construction without TransformerEngine.
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    return stack_spec(
        norm=TENorm,
        column_linear=TEColumnParallelLinear,
        row_linear=TERowParallelLinear,
        core_attention=TEDotProductAttention,
        fused_norm_linear=TELayerNormColumnParallelLinear,
    )


def hybrid_stack_spec(backend: str = "local") -> ModuleSpec:
    """The hybrid stack spec for ``backend`` in ``("local", "te")``."""
    if backend == "local":
        return _local_spec()
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "backend='te' needs TransformerEngine (pip install megatron-elastic[gpu]); "
                "use backend='local' on machines without it"
            ) from e
        return _te_spec()
    raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_backend() -> str:
    """'te' when CUDA and TransformerEngine are available, else 'local' (``kernels.teacher_kernels`` decides)."""
    from megatron_elastic.model.kernels import Machine, teacher_kernels

    return teacher_kernels(Machine.here()).backend
