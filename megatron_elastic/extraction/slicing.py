"""Slice a sub-model (``ElasticArch``) out of a sorted parent: the config of the plain model that holds it and
its weights, tensor by tensor.

Works on the parent's full (TP=1) Megatron state dict with the local spec's names
(``decoder.layers.<i>.mixer.in_proj.weight``, ...). Skipped layers are dropped and the kept layers renumbered;
per-layer sizes that differ from the new config's base sizes go to ``HybridConfig.layer_overrides``.
The kept units are exactly those the elastic blocks use at run time (``mamba_head_index`` & co.).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Dict, Iterator, Tuple

import torch

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.elastic_attention import proj_col_index, qkv_row_index
from megatron_elastic.model.elastic_mamba import head_channel_index, mamba_head_index
from megatron_elastic.model.elastic_mlp import ffn_local_index
from megatron_elastic.model.specs import LOCAL_PRE_NORM_WEIGHT

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_FIELDS = {MAMBA: ("mamba_num_heads", "mamba_head_dim"), ATTENTION: ("num_attention_heads",), "-": ("ffn_hidden_size",)}


def kept_layers(config, arch: ElasticArch) -> Dict[int, int]:
    """Parent layer index -> index in the extracted model."""
    kept = [i for i in range(len(config.hybrid_pattern)) if i not in set(arch.skipped_layers)]
    return {old: new for new, old in enumerate(kept)}


def sub_model_dict(model_dict: Dict[str, Any], config, arch: ElasticArch) -> Dict[str, Any]:
    """The ``model:`` section of the extracted model: the parent's section with the kept pattern, the active
    hidden size, base per-layer sizes (the most common value among kept layers) and ``layer_overrides``."""
    arch = arch.validate(config)
    remap = kept_layers(config, arch)
    out = {k: v for k, v in model_dict.items() if k != "layer_overrides"}
    out["hybrid_pattern"] = "".join(config.hybrid_pattern[i] for i in remap)
    out["hidden_size"] = arch.hidden_size
    overrides: Dict[int, Dict[str, int]] = {}
    for symbol, fields in _FIELDS.items():
        layers = [i for i in remap if config.hybrid_pattern[i] == symbol]
        for f in fields:
            values = {i: getattr(arch, f)[i] for i in layers}
            if not values:
                continue
            base = Counter(values.values()).most_common(1)[0][0]
            out[f] = base
            for i, v in values.items():
                if v != base:
                    overrides.setdefault(remap[i], {})[f] = v
    if "ffn_hidden_size" in out and out.get("elastic_ffn_groups", 1) > 1:
        sizes = [out["ffn_hidden_size"]] + [o["ffn_hidden_size"] for o in overrides.values() if "ffn_hidden_size" in o]
        if any(s % out["elastic_ffn_groups"] for s in sizes):
            out["elastic_ffn_groups"] = 1
    out["layer_overrides"] = overrides or None
    return out


def _mamba_indices(config, heads: int, headdim: int):
    g, nh, hd, n = config.mamba_num_groups, config.mamba_num_heads, config.mamba_head_dim, config.mamba_state_dim
    head_idx = mamba_head_index(nh, g, heads // g)
    ch = head_channel_index(head_idx, hd, headdim)
    d_inner, bc = nh * hd, g * n
    bc_rows = torch.arange(2 * bc)
    in_rows = torch.cat([ch, d_inner + ch, 2 * d_inner + bc_rows, 2 * d_inner + 2 * bc + head_idx])
    conv = torch.cat([ch, d_inner + bc_rows])
    return head_idx, ch, in_rows, conv


def slice_tensor(name: str, tensor: torch.Tensor, config, arch: ElasticArch) -> torch.Tensor:
    """The part of parent tensor ``name`` that the sub-model ``arch`` keeps (a new contiguous tensor)."""
    h = arch.hidden_size
    if name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.weight"):
        return tensor[:, :h].contiguous()
    if name == "decoder.final_norm.weight":
        return tensor[:h].clone()
    m = _LAYER_KEY.match(name)
    if not m:
        raise KeyError(f"slice_tensor: unexpected parent tensor {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    sym = config.hybrid_pattern[i]
    if rest == LOCAL_PRE_NORM_WEIGHT[sym]:
        return tensor[:h].clone()
    if sym == MAMBA:
        head_idx, ch, in_rows, conv = _mamba_indices(config, arch.mamba_num_heads[i], arch.mamba_head_dim[i])
        if rest == "mixer.in_proj.weight":
            return tensor[in_rows][:, :h].contiguous()
        if rest in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
            return tensor[conv].contiguous()
        if rest in ("mixer.dt_bias", "mixer.A_log"):
            return tensor[head_idx].clone()
        if rest == "mixer.D":
            return tensor[ch if tensor.numel() == config.mamba_num_heads * config.mamba_head_dim else head_idx].clone()
        if rest == "mixer.norm.weight":
            return tensor[ch].clone()
        if rest == "mixer.out_proj.weight":
            return tensor[:h][:, ch].contiguous()
    elif sym == ATTENTION:
        g = config.num_query_groups or config.num_attention_heads
        hpg, k, hn = config.num_attention_heads // g, arch.num_attention_heads[i] // g, config.kv_channels
        if rest == "self_attention.linear_qkv.weight":
            return tensor[qkv_row_index(g, hpg, k, hn)][:, :h].contiguous()
        if rest == "self_attention.linear_qkv.bias":
            return tensor[qkv_row_index(g, hpg, k, hn)].clone()
        if rest == "self_attention.linear_proj.weight":
            return tensor[:h][:, proj_col_index(g, hpg, k, hn)].contiguous()
        if rest == "self_attention.linear_proj.bias":
            return tensor[:h].clone()
    else:
        rows = ffn_local_index(config.ffn_hidden_size, config.elastic_ffn_groups, arch.ffn_hidden_size[i], 1, 0)
        if rest in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
            if config.gated_linear_unit:
                rows = torch.cat([rows, config.ffn_hidden_size + rows])
            return tensor[rows][:, :h].contiguous() if tensor.dim() == 2 else tensor[rows].clone()
        if rest == "mlp.linear_fc2.weight":
            return tensor[:h][:, rows].contiguous()
        if rest == "mlp.linear_fc2.bias":
            return tensor[:h].clone()
    raise KeyError(f"slice_tensor: no slicing rule for {name!r} on a {sym!r} layer")


def iter_sliced(
    names: Iterator[str], load: Callable[[str], torch.Tensor], config, arch: ElasticArch
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(sub-model name, sliced tensor) for every parent tensor name; ``load(name)`` fetches one parent tensor
    at a time, so only one full-size tensor is alive at once. Skipped layers are never loaded."""
    remap = kept_layers(config, arch)
    for name in names:
        if name.endswith("_extra_state"):
            continue
        m = _LAYER_KEY.match(name)
        if m and int(m.group(1)) not in remap:
            continue
        new = f"decoder.layers.{remap[int(m.group(1))]}.{m.group(2)}" if m else name
        yield new, slice_tensor(name, load(name), config, arch)


def slice_state_dict(state_dict: Dict[str, torch.Tensor], config, arch: ElasticArch) -> Dict[str, torch.Tensor]:
    """The sub-model's state dict (local-spec names, renumbered layers) from the parent's full state dict."""
    arch = arch.validate(config)
    return dict(iter_sliced(iter(state_dict), state_dict.__getitem__, config, arch))
