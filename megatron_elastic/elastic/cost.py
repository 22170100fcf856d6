"""Analytic parameter and FLOP counts of a nested sub-model (``ElasticArch``) of a ``HybridConfig``.

These are the costs the router's resource loss and the planner use; tests check the parameter count
against a plain model built at the smaller shape.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.model.config import LAYER_FIELDS


def layer_parameter_count(config, sym: str, hidden, sizes: Dict[str, Any]):
    """Parameters of one layer of type ``sym`` (pre-norm included) at ``hidden`` width and its ``sizes``
    (``LAYER_FIELDS[sym]`` -> value). Plain arithmetic: integers give the exact count, tensors (the router's
    expected sizes) a differentiable one."""
    h = hidden
    if sym == MAMBA:
        heads, dim = sizes["mamba_num_heads"], sizes["mamba_head_dim"]
        d_inner, bc = heads * dim, config.mamba_num_groups * config.mamba_state_dim
        in_proj = h * (2 * d_inner + 2 * bc + heads)
        conv = (d_inner + 2 * bc) * (config.mamba_conv_kernel + 1)  # weight + bias
        per_head = 3 * heads  # dt_bias, A_log, D
        return h + in_proj + conv + per_head + d_inner + d_inner * h  # pre-norm, ..., gated norm, out_proj
    if sym == ATTENTION:
        q, hn = sizes["num_attention_heads"], config.kv_channels
        g = config.num_query_groups or config.num_attention_heads
        return h + h * (q + 2 * g) * hn + q * hn * h
    f = sizes["ffn_hidden_size"]
    return h + h * f * (2 if config.gated_linear_unit else 1) + f * h


def non_layer_parameters(config, hidden, include_embeddings: bool = True):
    """Parameters outside the layers at ``hidden`` width: the final norm and the embedding / output layer."""
    n = hidden
    if include_embeddings:
        vocab_params = config.vocab_size * hidden
        n = n + (vocab_params if config.share_embeddings_and_output_weights else 2 * vocab_params)
    return n


def layer_parameters(config, arch: ElasticArch, i: int) -> int:
    """Parameters of layer ``i`` at ``arch`` (0 if skipped), including its pre-norm."""
    if i in arch.skipped_layers:
        return 0
    sym = config.hybrid_pattern[i]
    return layer_parameter_count(config, sym, arch.hidden_size, {f: getattr(arch, f)[i] for f in LAYER_FIELDS[sym]})


def arch_parameters(config, arch: ElasticArch, include_embeddings: bool = True) -> int:
    """Total parameters of the sub-model ``arch`` (what the extracted plain model holds)."""
    layers = sum(layer_parameters(config, arch, i) for i in range(len(config.hybrid_pattern)))
    return layers + non_layer_parameters(config, arch.hidden_size, include_embeddings)


def layer_flops_per_token(config, sym: str, hidden, sizes: Dict[str, Any], seq_length: int):
    """Forward FLOPs per token of one layer (2 per multiply-add): its matmuls, the causal attention product (a
    token attends to ``seq_length / 2`` keys on average) and the SSD chunked scan (chunk ``Q``: 2*Q per channel
    within a chunk plus state terms). Integers or tensors, as :func:`layer_parameter_count`."""
    flops = 2.0 * (layer_parameter_count(config, sym, hidden, sizes) - hidden)  # every weight but the pre-norm
    if sym == MAMBA:
        heads, dim, n = sizes["mamba_num_heads"], sizes["mamba_head_dim"], config.mamba_state_dim
        q = min(config.mamba_chunk_size, seq_length)
        flops = flops + 2.0 * (q * config.mamba_num_groups * n + q * heads * dim + 3 * heads * dim * n)
    elif sym == ATTENTION:
        flops = flops + 2.0 * 2 * (seq_length / 2) * sizes["num_attention_heads"] * config.kv_channels
    return flops


def layer_cache_bytes(config, sym: str, sizes: Dict[str, Any], context: int, batch: int, dtype_bytes: int):
    """Bytes of one layer's decoding state for ``batch`` sequences of up to ``context`` tokens, as ``generate``
    allocates it (``serving.decode``): an attention layer's K and V caches (every KV group, the serving dtype), a
    Mamba layer's conv window (``conv_kernel`` columns of x/B/C, the serving dtype) and SSM state (float32)."""
    if sym == MAMBA:
        heads, dim = sizes["mamba_num_heads"], sizes["mamba_head_dim"]
        bc = config.mamba_num_groups * config.mamba_state_dim
        conv = (heads * dim + 2 * bc) * config.mamba_conv_kernel * dtype_bytes
        return batch * (conv + heads * dim * config.mamba_state_dim * 4)
    if sym == ATTENTION:
        groups = config.num_query_groups or config.num_attention_heads
        return 2 * context * batch * groups * config.kv_channels * dtype_bytes
    return 0


def dtype_bytes(config) -> int:
    """Bytes per weight and cache element in the model's dtype (bf16/fp16: 2, else 4)."""
    return 2 if getattr(config, "bf16", False) or getattr(config, "fp16", False) else 4


class Cost:
    """A resource a budget bounds, written once per layer type: :meth:`layer` and :meth:`non_layer` take plain
    integers (the exact cost of an architecture, :meth:`of`) or tensors (the router's differentiable expectation
    under its choice probabilities). Subclasses: :class:`Parameters`, :class:`ServingMemory`,
    :class:`FlopsPerToken`."""

    kind = ""

    def layer(self, config, sym: str, hidden, sizes: Dict[str, Any]):
        raise NotImplementedError

    def non_layer(self, config, hidden):
        raise NotImplementedError

    def of(self, config, arch: ElasticArch) -> float:
        total = self.non_layer(config, arch.hidden_size)
        for i, sym in enumerate(config.hybrid_pattern):
            if i not in arch.skipped_layers:
                total += self.layer(config, sym, arch.hidden_size, {f: getattr(arch, f)[i] for f in LAYER_FIELDS[sym]})
        return total

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind}


class Parameters(Cost):
    """Parameters (the paper's budgets)."""

    kind = "params"

    def layer(self, config, sym, hidden, sizes):
        return layer_parameter_count(config, sym, hidden, sizes)

    def non_layer(self, config, hidden):
        return non_layer_parameters(config, hidden)


class ServingMemory(Cost):
    """Deployment memory: the weights in the serving dtype plus the decoding state (KV caches, Mamba conv and
    SSM states) of ``batch`` sequences of ``context`` tokens."""

    kind = "memory"

    def __init__(self, context: int, batch: int = 1, dtype_bytes: int = 2):
        self.context, self.batch, self.dtype_bytes = int(context), int(batch), int(dtype_bytes)

    def layer(self, config, sym, hidden, sizes):
        weights = self.dtype_bytes * layer_parameter_count(config, sym, hidden, sizes)
        return weights + layer_cache_bytes(config, sym, sizes, self.context, self.batch, self.dtype_bytes)

    def non_layer(self, config, hidden):
        return self.dtype_bytes * non_layer_parameters(config, hidden)

    def to_dict(self):
        return {"kind": self.kind, "context": self.context, "batch": self.batch, "dtype_bytes": self.dtype_bytes}


class FlopsPerToken(Cost):
    """Forward FLOPs per token of a sequence of ``context`` tokens (the output layer included)."""

    kind = "flops"

    def __init__(self, context: int):
        self.context = int(context)

    def layer(self, config, sym, hidden, sizes):
        return layer_flops_per_token(config, sym, hidden, sizes, self.context)

    def non_layer(self, config, hidden):
        return 2.0 * hidden * config.vocab_size

    def to_dict(self):
        return {"kind": self.kind, "context": self.context}


PARAMETERS = Parameters()


def cost_from_dict(d: Dict[str, Any]) -> Cost:
    """The inverse of ``Cost.to_dict`` (a checkpoint's router records the kind it was trained on)."""
    kind = d.get("kind", "params")
    if kind == "params":
        return PARAMETERS
    if kind == "memory":
        return ServingMemory(d["context"], d.get("batch", 1), d.get("dtype_bytes", 2))
    if kind == "flops":
        return FlopsPerToken(d["context"])
    raise ValueError(f"unknown budget kind {kind!r}: params, memory or flops")


def arch_flops_per_token(config, arch: ElasticArch, seq_length: int) -> float:
    """Forward FLOPs per token of the sub-model ``arch`` at ``seq_length`` (:class:`FlopsPerToken`). An estimate
    for ratios and MFU."""
    return float(FlopsPerToken(seq_length).of(config, arch))


def scaled_arch(config, fraction: float) -> ElasticArch:
    """A homogeneous nested choice with every width axis scaled by ``fraction`` (rounded to valid values)."""

    def snap(full: int, multiple: int) -> int:
        return max(multiple, min(full, int(round(full * fraction / multiple)) * multiple))

    full = ElasticArch.full(config)
    return ElasticArch(
        hidden_size=snap(config.hidden_size, 8 if config.hidden_size >= 64 else 1),
        mamba_num_heads={i: snap(config.mamba_num_heads, config.mamba_num_groups) for i in full.mamba_num_heads},
        mamba_head_dim=dict(full.mamba_head_dim),
        num_attention_heads={
            i: snap(config.num_attention_heads, config.num_query_groups or 1) for i in full.num_attention_heads
        },
        ffn_hidden_size={i: snap(config.ffn_hidden_size, config.elastic_ffn_groups) for i in full.ffn_hidden_size},
    ).validate(config)
