"""Analytic parameter and FLOP counts of a nested sub-model (``ElasticArch``) of a ``HybridConfig``.

These are the costs the router's resource loss and the planner use; tests check the parameter count
against a plain model built at the smaller shape.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.model.config import LAYER_FIELDS
from megatron_elastic.model.elastic_arch import ElasticArch


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


def arch_flops_per_token(config, arch: ElasticArch, seq_length: int) -> float:
    """Forward FLOPs per token (2 per multiply-add): matmuls, the causal attention product and the SSD
    chunked scan (chunk ``Q``: 2*Q per channel within a chunk plus state terms). An estimate for ratios."""
    h, flops = arch.hidden_size, 2.0 * arch.hidden_size * config.vocab_size  # output layer
    for i, sym in enumerate(config.hybrid_pattern):
        if i in arch.skipped_layers:
            continue
        matmul = layer_parameters(config, arch, i) - h
        flops += 2.0 * matmul
        if sym == MAMBA:
            heads, dim, n = arch.mamba_num_heads[i], arch.mamba_head_dim[i], config.mamba_state_dim
            q = min(config.mamba_chunk_size, seq_length)
            g = config.mamba_num_groups
            flops += 2.0 * (q * g * n + q * heads * dim + 3 * heads * dim * n)
        elif sym == ATTENTION:
            flops += 2.0 * 2 * (seq_length / 2) * arch.num_attention_heads[i] * config.kv_channels
    return flops


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
