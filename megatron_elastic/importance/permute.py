"""The function-preserving sort: permute a parent's weights so that every elastic axis lists its most
important units first, and every nested budget becomes a prefix.

Works on a full (TP=1 layout) state dict of the hybrid model with megatron_elastic's parameter names; the
result is loaded at any TP/PP through Megatron's distributed checkpoint. Permutations that keep every
budget valid and the function unchanged:

* hidden channels: one permutation for the network (embedding, every norm, every projection's input or
  output, the final norm and the output layer);
* Mamba heads: within each B/C group (a group keeps its heads, in a new order); head channels: one
  permutation shared by every head of the layer (x, z, conv x-channels, gated-norm weight, out_proj inputs);
* attention query heads: within each KV group (linear_qkv rows in Megatron's interleaved layout,
  linear_proj inputs);
* FFN neurons: within each of ``elastic_ffn_groups`` groups (fc1 rows, both halves if gated; fc2 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_elastic.compat import ATTENTION, MAMBA


@dataclass
class Permutation:
    """New order of every axis: ``new[j] = old[order[j]]``. Per-layer entries keyed by global layer index."""

    hidden: Optional[torch.Tensor] = None
    mamba_heads: Dict[int, torch.Tensor] = field(default_factory=dict)  # global head ids, per group
    mamba_head_dim: Dict[int, torch.Tensor] = field(default_factory=dict)
    attention_heads: Dict[int, torch.Tensor] = field(default_factory=dict)  # global query head ids
    ffn: Dict[int, torch.Tensor] = field(default_factory=dict)


def _check_within_groups(order: torch.Tensor, n: int, groups: int, what: str) -> None:
    per = n // groups
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"{what}: not a permutation of range({n})")
    if not torch.equal(
        order.view(groups, per).div(per, rounding_mode="floor"), torch.arange(groups)[:, None].expand(groups, per)
    ):
        raise ValueError(f"{what}: must permute only within each of the {groups} groups")


def permute_state_dict(sd: Dict[str, torch.Tensor], config, perm: Permutation) -> Dict[str, torch.Tensor]:
    """A new state dict with ``perm`` applied (``sd`` is not modified). Keys are the model's own
    (``model.state_dict()`` at TP=1, PP=1); ``_extra_state`` entries pass through."""
    out = dict(sd)
    H = config.hidden_size
    hid = perm.hidden

    def rows(key, idx):
        out[key] = out[key].index_select(0, idx)

    def cols(key, idx):
        out[key] = out[key].index_select(1, idx)

    if hid is not None:
        _check_within_groups(hid, H, 1, "hidden permutation")
        cols("embedding.word_embeddings.weight", hid)
        if "output_layer.weight" in out:
            cols("output_layer.weight", hid)
        rows("decoder.final_norm.weight", hid)

    d_inner = config.mamba_num_heads * config.mamba_head_dim if config.mamba_num_heads else 0
    bc = config.mamba_num_groups * config.mamba_state_dim
    for i, sym in enumerate(config.hybrid_pattern):
        p = f"decoder.layers.{i}."
        if sym == MAMBA:
            m = p + "mixer."
            nh, hd = config.mamba_num_heads, config.mamba_head_dim
            heads = perm.mamba_heads.get(i, torch.arange(nh))
            chans = perm.mamba_head_dim.get(i, torch.arange(hd))
            _check_within_groups(heads, nh, config.mamba_num_groups, f"mamba heads of layer {i}")
            _check_within_groups(chans, hd, 1, f"mamba head channels of layer {i}")
            x = (heads[:, None] * hd + chans[None, :]).flatten()
            rest = torch.arange(2 * d_inner, 2 * d_inner + 2 * bc)
            rows(m + "in_proj.weight", torch.cat([x, d_inner + x, rest, 2 * d_inner + 2 * bc + heads]))
            conv = torch.cat([x, torch.arange(d_inner, d_inner + 2 * bc)])
            rows(m + "conv1d.weight", conv)
            if m + "conv1d.bias" in out:
                rows(m + "conv1d.bias", conv)
            for name in ("dt_bias", "A_log"):
                rows(m + name, heads)
            rows(m + "D", x if out[m + "D"].numel() == d_inner else heads)
            rows(m + "norm.weight", x)
            cols(m + "out_proj.weight", x)
            norm_key, first, last = p + "norm.weight", m + "in_proj.weight", m + "out_proj.weight"
        elif sym == ATTENTION:
            a = p + "self_attention."
            q, g, hn = config.num_attention_heads, config.num_query_groups, config.kv_channels
            hpg = q // g
            heads = perm.attention_heads.get(i, torch.arange(q))
            _check_within_groups(heads, q, g, f"attention heads of layer {i}")
            qkv = []
            for grp in range(g):
                base = grp * (hpg + 2) * hn
                for h in heads[grp * hpg : (grp + 1) * hpg].tolist():
                    qkv.append(torch.arange(base + (h - grp * hpg) * hn, base + (h - grp * hpg + 1) * hn))
                qkv.append(torch.arange(base + hpg * hn, base + (hpg + 2) * hn))
            rows(a + "linear_qkv.weight", torch.cat(qkv))
            cols(a + "linear_proj.weight", (heads[:, None] * hn + torch.arange(hn)[None, :]).flatten())
            norm_key, first, last = p + "input_layernorm.weight", a + "linear_qkv.weight", a + "linear_proj.weight"
        else:
            f = config.ffn_hidden_size
            neurons = perm.ffn.get(i, torch.arange(f))
            _check_within_groups(neurons, f, config.elastic_ffn_groups, f"FFN neurons of layer {i}")
            fc1 = torch.cat([neurons, f + neurons]) if config.gated_linear_unit else neurons
            rows(p + "mlp.linear_fc1.weight", fc1)
            cols(p + "mlp.linear_fc2.weight", neurons)
            norm_key, first, last = (
                p + "pre_mlp_layernorm.weight",
                p + "mlp.linear_fc1.weight",
                p + "mlp.linear_fc2.weight",
            )
        if hid is not None:
            rows(norm_key, hid)
            cols(first, hid)
            rows(last, hid)
    return out


def order_within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Indices sorting ``scores`` descending inside each of ``groups`` contiguous groups (ties keep order)."""
    n = scores.numel()
    per = n // groups
    s = scores.view(groups, per)
    idx = torch.sort(-s, dim=1, stable=True).indices
    return (idx + torch.arange(groups)[:, None] * per).flatten()


def random_permutation(config, generator: Optional[torch.Generator] = None) -> Permutation:
    """A random valid permutation of every axis (the random-ranking baseline; also used by tests)."""
    within = lambda n, groups: order_within_groups(torch.rand(n, generator=generator), groups)
    perm = Permutation(hidden=torch.randperm(config.hidden_size, generator=generator))
    for i, sym in enumerate(config.hybrid_pattern):
        if sym == MAMBA:
            perm.mamba_heads[i] = within(config.mamba_num_heads, config.mamba_num_groups)
            perm.mamba_head_dim[i] = torch.randperm(config.mamba_head_dim, generator=generator)
        elif sym == ATTENTION:
            perm.attention_heads[i] = within(config.num_attention_heads, config.num_query_groups)
        else:
            perm.ffn[i] = within(config.ffn_hidden_size, config.elastic_ffn_groups)
    return perm
