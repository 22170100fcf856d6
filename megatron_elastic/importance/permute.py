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

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.model.layouts import HIDDEN_DIMS, MODEL_HIDDEN_DIMS, index_layer_tensor, layer_unit_index
from megatron_elastic.parallel import tensor_parallel


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


def _layer_units(config, sym: str, perm: Permutation, i: int) -> Dict[str, torch.Tensor]:
    """Layer ``i``'s units in their new order (identity where ``perm`` has no entry), checked for validity."""
    if sym == MAMBA:
        nh, hd = config.mamba_num_heads, config.mamba_head_dim
        heads = perm.mamba_heads.get(i, torch.arange(nh))
        chans = perm.mamba_head_dim.get(i, torch.arange(hd))
        _check_within_groups(heads, nh, config.mamba_num_groups, f"mamba heads of layer {i}")
        _check_within_groups(chans, hd, 1, f"mamba head channels of layer {i}")
        return {"heads": heads, "head_channels": chans}
    if sym == ATTENTION:
        q, g = config.num_attention_heads, config.num_query_groups
        heads = perm.attention_heads.get(i, torch.arange(q))
        _check_within_groups(heads, q, g, f"attention heads of layer {i}")
        return {"heads": heads}
    f = config.ffn_hidden_size
    neurons = perm.ffn.get(i, torch.arange(f))
    _check_within_groups(neurons, f, config.elastic_ffn_groups, f"FFN neurons of layer {i}")
    return {"neurons": neurons}


def permute_state_dict(sd: Dict[str, torch.Tensor], config, perm: Permutation) -> Dict[str, torch.Tensor]:
    """A new state dict with ``perm`` applied (``sd`` is not modified). Keys are the model's own
    (``model.state_dict()`` at TP=1, PP=1); ``_extra_state`` entries pass through."""
    out = dict(sd)
    H = config.hidden_size
    hid = perm.hidden

    if hid is not None:
        _check_within_groups(hid, H, 1, "hidden permutation")
        for name, dim in MODEL_HIDDEN_DIMS.items():
            if name in out:
                out[name] = out[name].index_select(dim, hid)

    for i, sym in enumerate(config.hybrid_pattern):
        p = f"decoder.layers.{i}."
        units = _layer_units(config, sym, perm, i)
        index = layer_unit_index(config, sym, units)
        for name in index:
            if p + name in out:
                out[p + name] = index_layer_tensor(config, sym, name, out[p + name], units, index)
        if hid is not None:
            for name, dim in HIDDEN_DIMS[sym].items():
                out[p + name] = out[p + name].index_select(dim, hid)
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


def _rank_shard(order: torch.Tensor, tp_size: int, tp_rank: int, what: str) -> torch.Tensor:
    """The part of a within-group ``order`` that lies in TP rank ``tp_rank``'s contiguous shard, as local indices."""
    per = order.numel() // tp_size
    local = order[tp_rank * per : (tp_rank + 1) * per] - tp_rank * per
    if sorted(local.tolist()) != list(range(per)):
        raise ValueError(f"{what}: the order moves units between tensor-parallel ranks")
    return local


def _local_view(config, tp_size: int):
    """``config`` as one TP rank's shard sees it: Megatron's per-rank tensors are the TP=1 layout of a model with
    1/tp of the heads, groups and neurons (Mamba ``[z|x|B|C|dt]``, QKV interleaved per local KV group)."""
    from types import SimpleNamespace

    view = SimpleNamespace(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    for name in ("num_attention_heads", "num_query_groups", "mamba_num_heads", "mamba_num_groups", "ffn_hidden_size"):
        if getattr(view, name):
            setattr(view, name, getattr(view, name) // tp_size)
    view.elastic_ffn_groups = max(1, config.elastic_ffn_groups // tp_size)
    view.tensor_model_parallel_size = 1
    return view


@torch.no_grad()
def permute_model(model, perm: Permutation) -> None:
    """Apply ``perm`` (global unit ids, as :meth:`WidthScores.to_permutation` gives) to ``model``'s weights in place,
    at any TP size: every rank permutes its own shard (groups never straddle TP ranks: Mamba B/C groups and KV groups
    are whole on a rank); FFN neurons, whose ``elastic_ffn_groups`` may be fewer than the TP ranks, are gathered over
    TP one layer at a time when they must move between ranks. Equals :func:`permute_state_dict` on the TP=1 model."""
    config = model.config
    if config.layer_overrides:
        raise ValueError("the sort needs a homogeneous parent (no layer_overrides)")
    tp_size, tp_rank, group = tensor_parallel()
    ffn_moves = config.elastic_ffn_groups % tp_size != 0
    local = Permutation(hidden=perm.hidden)
    for i, order in perm.mamba_heads.items():
        local.mamba_heads[i] = _rank_shard(order, tp_size, tp_rank, f"mamba heads of layer {i}")
    local.mamba_head_dim = dict(perm.mamba_head_dim)
    for i, order in perm.attention_heads.items():
        local.attention_heads[i] = _rank_shard(order, tp_size, tp_rank, f"attention heads of layer {i}")
    if not ffn_moves:
        for i, order in perm.ffn.items():
            local.ffn[i] = _rank_shard(order, tp_size, tp_rank, f"FFN neurons of layer {i}")
    sd = permute_state_dict(model.state_dict(), _local_view(config, tp_size), local)
    if ffn_moves:
        for i, order in perm.ffn.items():
            _permute_ffn_across_ranks(sd, config, i, order, tp_size, tp_rank, group)
    model.load_state_dict(sd)


def _permute_ffn_across_ranks(sd, config, i: int, order: torch.Tensor, tp_size: int, tp_rank: int, group) -> None:
    """Layer ``i``'s FFN neurons in ``order``: fc1 rows and fc2 columns gathered over TP, permuted, re-sharded."""
    import torch.distributed as dist

    def gather(t: torch.Tensor, dim: int) -> list:
        parts = [torch.empty_like(t) for _ in range(tp_size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return parts

    p = f"decoder.layers.{i}.mlp."
    halves = 2 if config.gated_linear_unit else 1
    for name, dim in (("linear_fc1.weight", 0), ("linear_fc1.bias", 0), ("linear_fc2.weight", 1)):
        if p + name not in sd:
            continue
        parts = gather(sd[p + name], dim)
        k = halves if name.startswith("linear_fc1") else 1  # a gated fc1 shard is [gate_r | up_r]
        full = [torch.cat([q.chunk(k, dim)[h] for q in parts], dim).index_select(dim, order) for h in range(k)]
        sd[p + name] = torch.cat([f.chunk(tp_size, dim)[tp_rank] for f in full], dim).contiguous()
