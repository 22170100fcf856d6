"""``HybridConfig``: Megatron's ``TransformerConfig`` plus what a hybrid Mamba-2/attention LM needs
(layer pattern, vocabulary, Mamba conv/chunk sizes), validated before anything is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_elastic.compat import SUPPORTED_SYMBOLS
from megatron_elastic.errors import ConfigError  # noqa: F401  (raised here; imported from here by callers)

ACTIVATIONS = {
    "relu2": squared_relu,
    "squared_relu": squared_relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


# The sizes that may differ per layer (HybridConfig.layer_overrides), by layer symbol.
LAYER_FIELDS = {"M": ("mamba_num_heads", "mamba_head_dim"), "*": ("num_attention_heads",), "-": ("ffn_hidden_size",)}


# TransformerConfig options the elastic method (importance sort, cost model, slicing, extraction, HF export)
# does not handle: refused when the config is built, rather than giving silently wrong sorts, counts or
# extracted models. {field: (the value that is supported, why the others are not)}.
ELASTIC_UNSUPPORTED = {
    "add_bias_linear": (
        False,
        "linear biases are not permuted by the importance sort, counted by the cost "
        "model or sliced by extraction (Nemotron-H has none)",
    ),
    "add_qkv_bias": (False, "QKV biases are not permuted, counted or sliced (Nemotron-H has none)"),
    "qk_layernorm": (False, "Q/K norms are not counted by the cost model nor exported (Nemotron-H has none)"),
    "layernorm_zero_centered_gamma": (False, "the elastic RMSNorm uses the weight as it is"),
    "apply_residual_connection_post_layernorm": (False, "the hybrid layers are pre-norm"),
    "multi_latent_attention": (False, "only grouped-query attention is elastic"),
    "num_moe_experts": (None, "MoE layers are not elastic yet"),
    "context_parallel_size": (1, "the Mamba-2 mixer has no context-parallel path yet"),
}


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {msg}")


@dataclass
class HybridConfig(TransformerConfig):
    """Architecture of a hybrid Mamba-2 / attention / MLP language model (Nemotron-H family).

    ``hybrid_pattern`` uses Megatron's symbols: ``M`` Mamba-2, ``*`` attention, ``-`` MLP; one symbol per
    layer, so ``num_layers`` is derived from it.
    """

    hybrid_pattern: str = ""
    vocab_size: int = 0
    max_sequence_length: int = 4096
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128  # the scan kernel's chunk on CUDA (a blocking choice; the CPU picks its own)
    position_embedding_type: str = "none"
    share_embeddings_and_output_weights: bool = False
    activation: str = "relu2"
    # Elastic FFN axis: the FFN is cut into this many contiguous groups and a nested choice keeps the first
    # neurons of every group (as Mamba heads per B/C group). A multiple of the TP size balances sub-budget
    # compute across TP ranks; 1 makes every choice a plain prefix.
    elastic_ffn_groups: int = 1
    # Per-layer sizes of a heterogeneous model (an extracted sub-model): {layer index: {field: value}} with
    # fields in LAYER_FIELDS; the other layers use the config's own sizes. Built by the per-layer specs.
    layer_overrides: Optional[Dict[int, Dict[str, int]]] = None

    def for_layer(self, index: int) -> "HybridConfig":
        """The config layer ``index`` (0-based, global) is built with: this one with its overrides applied."""
        ov = (self.layer_overrides or {}).get(index)
        if not ov:
            return self
        cache = self.__dict__.setdefault("_layer_configs", {})
        if index not in cache:
            cache[index] = dataclasses.replace(self, layer_overrides=None, **ov)
        return cache[index]

    def __post_init__(self):
        _require(bool(self.hybrid_pattern), "hybrid_pattern", "is empty; give one symbol per layer, e.g. 'M-M*-'")
        bad = sorted({c for c in self.hybrid_pattern if c not in SUPPORTED_SYMBOLS})
        _require(not bad, "hybrid_pattern", f"unknown symbol(s) {bad}; use 'M' (Mamba-2), '*' (attention), '-' (MLP)")
        self.num_layers = len(self.hybrid_pattern)
        _require(self.vocab_size > 0, "vocab_size", "must be a positive integer (e.g. 257 for the byte tokenizer)")
        _require(self.hidden_size > 0, "hidden_size", "must be positive")
        _require(self.activation in ACTIVATIONS, "activation", f"must be one of {sorted(ACTIVATIONS)}")
        self.activation_func = ACTIVATIONS[self.activation]
        _require(
            self.position_embedding_type in ("none", "rope"),
            "position_embedding_type",
            "must be 'none' (Nemotron-H) or 'rope'; learned absolute position embeddings are not sorted, "
            "counted or sliced by the elastic method",
        )
        _require(
            self.normalization == "RMSNorm",
            "normalization",
            f"{self.normalization!r} is not supported; the elastic norms are RMSNorm (as in Nemotron-H)",
        )
        for name, (supported, why) in ELASTIC_UNSUPPORTED.items():
            _require(
                getattr(self, name) == supported,
                name,
                f"{getattr(self, name)!r} is not supported: {why}; set it to {supported!r}",
            )
        tp = self.tensor_model_parallel_size
        pp = self.pipeline_model_parallel_size
        _require(
            not self.sequence_parallel or tp >= 2,
            "sequence_parallel",
            "needs tensor_model_parallel_size >= 2 (it splits the sequence over the TP ranks); set it to False or "
            "raise the TP size",
        )
        self._check_layer_types(tp)
        if self.layer_overrides:
            self.layer_overrides = {int(k): dict(v) for k, v in self.layer_overrides.items()}
            for i, ov in self.layer_overrides.items():
                _require(0 <= i < self.num_layers, "layer_overrides", f"layer {i} is outside 0..{self.num_layers - 1}")
                bad = sorted(set(ov) - set(LAYER_FIELDS.get(self.hybrid_pattern[i], ())))
                _require(
                    not bad,
                    f"layer_overrides.{i}",
                    f"field(s) {bad} cannot vary on a "
                    f"{self.hybrid_pattern[i]!r} layer; allowed: {LAYER_FIELDS.get(self.hybrid_pattern[i], ())}",
                )
        _require(
            self.num_layers % pp == 0,
            "pipeline_model_parallel_size",
            f"({pp}) must divide the number of layers ({self.num_layers})",
        )
        self.is_hybrid_model = True
        super().__post_init__()

    def _check_layer_types(self, tp: int) -> None:
        """Attention, Mamba and MLP sizes (for the layer types in the pattern) against each other and TP."""
        if "*" in self.hybrid_pattern:
            h, g = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
            _require(h % g == 0, "num_query_groups", f"({g}) must divide num_attention_heads ({h})")
            _require(
                h % tp == 0, "num_attention_heads", f"({h}) must be divisible by tensor_model_parallel_size ({tp})"
            )
            _require(g % tp == 0, "num_query_groups", f"({g}) must be divisible by tensor_model_parallel_size ({tp})")
        if "M" in self.hybrid_pattern:
            nh, ng = self.mamba_num_heads, self.mamba_num_groups
            _require(nh is not None and nh > 0, "mamba_num_heads", "must be set to a positive integer")
            _require(nh % ng == 0, "mamba_num_heads", f"({nh}) must be divisible by mamba_num_groups ({ng})")
            _require(nh % tp == 0, "mamba_num_heads", f"({nh}) must be divisible by tensor_model_parallel_size ({tp})")
            _require(
                ng % tp == 0,
                "mamba_num_groups",
                f"({ng}) must be divisible by tensor_model_parallel_size ({tp}); each rank needs whole groups",
            )
            _require(self.mamba_chunk_size > 0, "mamba_chunk_size", "must be positive")
            _require(self.mamba_conv_kernel > 0, "mamba_conv_kernel", "must be positive")
        if "-" in self.hybrid_pattern:
            _require(
                self.ffn_hidden_size is not None and self.ffn_hidden_size % tp == 0,
                "ffn_hidden_size",
                f"({self.ffn_hidden_size}) must be set and divisible by tensor_model_parallel_size ({tp})",
            )
            _require(
                self.elastic_ffn_groups >= 1 and self.ffn_hidden_size % self.elastic_ffn_groups == 0,
                "elastic_ffn_groups",
                f"({self.elastic_ffn_groups}) must be >= 1 and divide ffn_hidden_size ({self.ffn_hidden_size})",
            )

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **overrides: Any) -> "HybridConfig":
        """Build from a plain dict (a YAML ``model:`` section); unknown keys are an error naming them."""
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {unknown}; see megatron_elastic.model.config.HybridConfig")
        for key in ("params_dtype", "pipeline_dtype"):
            if isinstance(d.get(key), str):
                if not isinstance(getattr(torch, d[key], None), torch.dtype):
                    raise ConfigError(f"{key}: {d[key]!r} is not a torch dtype; use float32, bfloat16 or float16")
                d[key] = getattr(torch, d[key])
        if d.get("pipeline_model_parallel_size", 1) > 1 and d.get("pipeline_dtype") is None:
            d["pipeline_dtype"] = d.get("params_dtype", torch.float32)
        d.setdefault("num_layers", len(d.get("hybrid_pattern", "")) or 1)
        return cls(**d)

    def architecture_dict(self) -> Dict[str, Any]:
        """The fields that define the architecture (what a checkpoint must match)."""
        keys = [
            "hybrid_pattern",
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "mamba_num_heads",
            "mamba_head_dim",
            "mamba_num_groups",
            "mamba_state_dim",
            "mamba_conv_kernel",
            "mamba_chunk_size",
            "position_embedding_type",
            "share_embeddings_and_output_weights",
            "activation",
            "normalization",
            "layernorm_epsilon",
            "add_bias_linear",
            "gated_linear_unit",
            "elastic_ffn_groups",
            "layer_overrides",
        ]
        return {k: getattr(self, k) for k in keys}


def tiny_defaults() -> Dict[str, Any]:
    """Defaults shared by every config we build: RMSNorm, no biases, no dropout, Nemotron-H style."""
    return dict(
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
    )
