"""Where every unit of an elastic axis lives in a layer's tensors: the one statement of each packed layout.

An elastic choice and the importance sort are the same operation on the weights: index every tensor of a layer
by the rows (or columns) its kept units own. For a nested choice the units are a kept prefix (per group); for the
sort they are a permutation of all of them. The elastic blocks (at run time, on one TP rank's shard), offline
slicing (extraction), the sort, the magnitude scores, the checkpoint split keys and the HF (de)interleave all
index through the layouts below.

Mamba-2 mixer (Megatron's, per TP rank), e.g. nheads=4, headdim=2, ngroups=2, d_state=3 (d_inner=8, bc=6)::

    in_proj rows   z 0-7 | x 8-15 | B 16-21 | C 22-27 | dt 28-31      heads of a group are contiguous:
    conv channels  x 0-7 | B 8-13 | C 14-19                           group 0 = heads 0,1; group 1 = heads 2,3
    head h owns x/z/norm/out_proj channels h*headdim .. h*headdim+headdim-1, and dt/A_log/D entry h;
    B and C (per group) are never sliced.

Grouped-query attention (Megatron's ``linear_qkv``, interleaved per KV group), e.g. 4 query heads, 2 groups::

    rows  [q0 q1 k0 v0 | q2 q3 k1 v1], each block ``kv_channels`` rows; ``linear_proj`` columns q0 q1 q2 q3.

MLP: ``ffn_hidden_size`` neurons in ``elastic_ffn_groups`` contiguous groups; ``linear_fc1`` rows
``[gate | up]`` when gated (both halves keep the same neurons), ``linear_fc2`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from megatron_elastic.compat import ATTENTION, MAMBA, MLP

# Each layer type's pre-norm: its module prefix in the local spec, and the TE fused linear whose ``layer_norm_*``
# checkpoint keys it is stored under.
PRE_NORM_PREFIX = {
    MAMBA: ("norm.", "mixer.in_proj."),
    ATTENTION: ("input_layernorm.", "self_attention.linear_qkv."),
    MLP: ("pre_mlp_layernorm.", "mlp.linear_fc1."),
}
LOCAL_PRE_NORM_WEIGHT = {sym: local + "weight" for sym, (local, _) in PRE_NORM_PREFIX.items()}

# The tensors of a layer (local-spec names, TP=1) that touch the hidden width, and on which dimension.
HIDDEN_DIMS = {
    MAMBA: {LOCAL_PRE_NORM_WEIGHT[MAMBA]: 0, "mixer.in_proj.weight": 1, "mixer.out_proj.weight": 0},
    ATTENTION: {
        LOCAL_PRE_NORM_WEIGHT[ATTENTION]: 0,
        "self_attention.linear_qkv.weight": 1,
        "self_attention.linear_proj.weight": 0,
    },
    MLP: {LOCAL_PRE_NORM_WEIGHT[MLP]: 0, "mlp.linear_fc1.weight": 1, "mlp.linear_fc2.weight": 0},
}
# ... and of the model outside its layers.
MODEL_HIDDEN_DIMS = {"embedding.word_embeddings.weight": 1, "output_layer.weight": 1, "decoder.final_norm.weight": 0}


def grouped_prefix(num_groups: int, per_group: int, keep_per_group: int) -> torch.Tensor:
    """The first ``keep_per_group`` units of each of ``num_groups`` contiguous groups of ``per_group`` units."""
    return (torch.arange(num_groups)[:, None] * per_group + torch.arange(keep_per_group)[None, :]).flatten()


def _blocks(units: torch.Tensor, block: int) -> torch.Tensor:
    """Rows of ``block``-row blocks ``units`` (unit u owns rows u*block .. u*block+block-1), in that order."""
    return (units[:, None] * block + torch.arange(block, device=units.device)[None, :]).flatten()


@dataclass(frozen=True)
class MambaLayout:
    """Megatron's Mamba-2 mixer layout (sizes of one TP rank, or of the whole layer at TP=1)."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int

    IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
    CONV_PARTS = ("x", "B", "C")

    @classmethod
    def of_config(cls, config) -> "MambaLayout":
        """The full (TP=1) layout of a config's Mamba layers."""
        return cls(config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups, config.mamba_state_dim)

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def bc(self) -> int:
        return self.ngroups * self.d_state

    @property
    def in_proj_sizes(self) -> List[int]:
        return [self.d_inner, self.d_inner, self.bc, self.bc, self.nheads]

    @property
    def conv_sizes(self) -> List[int]:
        return [self.d_inner, self.bc, self.bc]

    def in_proj_part(self, part: str) -> slice:
        """The rows of one ``in_proj`` part (``"z"``, ``"x"``, ``"B"``, ``"C"``, ``"dt"``)."""
        i = self.IN_PROJ_PARTS.index(part)
        start = sum(self.in_proj_sizes[:i])
        return slice(start, start + self.in_proj_sizes[i])

    def nested_heads(self, heads: int) -> torch.Tensor:
        """The heads a nested choice of ``heads`` (this layout's count, a multiple of ngroups) keeps: the first
        ``heads / ngroups`` of every B/C group."""
        per = self.nheads // self.ngroups
        return grouped_prefix(self.ngroups, per, heads // self.ngroups)

    def channels(self, heads: torch.Tensor, head_channels: torch.Tensor) -> torch.Tensor:
        """x/z/norm/out_proj channels of ``heads``, each listing ``head_channels`` (indices within a head)."""
        return (heads[:, None] * self.headdim + head_channels[None, :]).flatten()

    def in_proj_rows(self, heads: torch.Tensor, head_channels: torch.Tensor) -> torch.Tensor:
        """``in_proj`` rows of the kept (or reordered) heads and channels: ``[z | x | B | C | dt]``."""
        ch, dev = self.channels(heads, head_channels), heads.device
        bc_rows = torch.arange(2 * self.d_inner, 2 * self.d_inner + 2 * self.bc, device=dev)
        return torch.cat([ch, self.d_inner + ch, bc_rows, 2 * self.d_inner + 2 * self.bc + heads])

    def conv_channels(self, heads: torch.Tensor, head_channels: torch.Tensor) -> torch.Tensor:
        """conv1d channels (weight and bias rows) of the kept heads and channels: ``[x | B | C]``."""
        bc_rows = torch.arange(self.d_inner, self.d_inner + 2 * self.bc, device=heads.device)
        return torch.cat([self.channels(heads, head_channels), bc_rows])


@dataclass(frozen=True)
class QKVLayout:
    """Megatron's interleaved ``linear_qkv`` (per KV group: its query heads, then k, then v)."""

    num_query_groups: int
    heads_per_group: int
    head_dim: int

    @classmethod
    def of_config(cls, config) -> "QKVLayout":
        g = config.num_query_groups or config.num_attention_heads
        return cls(g, config.num_attention_heads // g, config.kv_channels)

    def nested_heads(self, heads: int) -> torch.Tensor:
        """The query heads a nested choice of ``heads`` keeps: the first ``heads / groups`` of every KV group."""
        return grouped_prefix(self.num_query_groups, self.heads_per_group, heads // self.num_query_groups)

    def qkv_rows(self, heads: torch.Tensor) -> torch.Tensor:
        """``linear_qkv`` rows for query heads ``heads`` (group-major: each group's heads in their new order,
        the same number per group); every group keeps its k and v."""
        g, hpg, hn = self.num_query_groups, self.heads_per_group, self.head_dim
        per_group = heads.view(g, -1)
        block = (hpg + 2) * hn
        base = torch.arange(g, device=heads.device)[:, None] * block
        q = base[:, :, None] + (per_group - torch.arange(g, device=heads.device)[:, None] * hpg)[:, :, None] * hn
        q = (q + torch.arange(hn, device=heads.device)).reshape(g, -1)
        kv = base + hpg * hn + torch.arange(2 * hn, device=heads.device)[None, :]
        return torch.cat([q, kv], dim=1).flatten()

    def q_k_v_rows(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All query rows (head order), all key rows and all value rows (group order): the de-interleave."""
        g, hpg, hn = self.num_query_groups, self.heads_per_group, self.head_dim
        base = torch.arange(g)[:, None] * (hpg + 2) * hn
        q = (base + torch.arange(hpg * hn)[None, :]).flatten()
        k = (base + hpg * hn + torch.arange(hn)[None, :]).flatten()
        return q, k, k + hn

    def proj_cols(self, heads: torch.Tensor) -> torch.Tensor:
        """``linear_proj`` columns of query heads ``heads``."""
        return _blocks(heads, self.head_dim)


@dataclass(frozen=True)
class FFNLayout:
    """The FFN axis: ``ffn_hidden_size`` neurons in ``groups`` contiguous groups; ``linear_fc1`` is ``[gate | up]``
    when ``gated``."""

    ffn_hidden_size: int
    groups: int = 1
    gated: bool = False

    @classmethod
    def of_config(cls, config) -> "FFNLayout":
        return cls(config.ffn_hidden_size, config.elastic_ffn_groups, config.gated_linear_unit)

    def nested_neurons(self, active: int) -> torch.Tensor:
        """The neurons a nested choice of ``active`` keeps: the first ``active / groups`` of every group."""
        return grouped_prefix(self.groups, self.ffn_hidden_size // self.groups, active // self.groups)

    def local_neurons(self, active: int, tp_size: int, tp_rank: int) -> torch.Tensor:
        """The kept neurons that lie in TP rank ``tp_rank``'s shard, as indices into that shard. With ``groups`` a
        multiple of the TP size every rank keeps as many; with one group the choice is a plain prefix."""
        kept, shard = self.nested_neurons(active), self.ffn_hidden_size // tp_size
        lo = tp_rank * shard
        return kept[(kept >= lo) & (kept < lo + shard)] - lo

    def fc1_rows(self, neurons: torch.Tensor, fc1_half: int = None) -> torch.Tensor:
        """``linear_fc1`` rows of ``neurons`` (``fc1_half``: rows per half of a gated fc1, default the layout's)."""
        half = fc1_half or self.ffn_hidden_size
        return torch.cat([neurons, half + neurons]) if self.gated else neurons


def layer_unit_index(config, sym: str, units: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, torch.Tensor]]:
    """{tensor name within the layer (local spec, TP=1): (dimension, index)} selecting ``units`` of layer type
    ``sym``: a nested choice's kept units, or the sort's permutation of all of them.

    ``units``: Mamba ``{"heads", "head_channels"}``; attention ``{"heads"}``; MLP ``{"neurons"}``. The layout
    sizes come from ``config`` (a layer's own config for a heterogeneous model).
    """
    if sym == MAMBA:
        lay = MambaLayout.of_config(config)
        heads, chans = units["heads"], units["head_channels"]
        ch, conv = lay.channels(heads, chans), lay.conv_channels(heads, chans)
        return {
            "mixer.in_proj.weight": (0, lay.in_proj_rows(heads, chans)),
            "mixer.conv1d.weight": (0, conv),
            "mixer.conv1d.bias": (0, conv),
            "mixer.dt_bias": (0, heads),
            "mixer.A_log": (0, heads),
            "mixer.D": (0, heads),  # per channel when D_has_hdim (one entry per channel): index_layer_tensor
            "mixer.norm.weight": (0, ch),
            "mixer.out_proj.weight": (1, ch),
        }
    if sym == ATTENTION:
        lay, heads = QKVLayout.of_config(config), units["heads"]
        rows = lay.qkv_rows(heads)
        return {
            "self_attention.linear_qkv.weight": (0, rows),
            "self_attention.linear_qkv.bias": (0, rows),
            "self_attention.linear_proj.weight": (1, lay.proj_cols(heads)),
        }
    lay, neurons = FFNLayout.of_config(config), units["neurons"]
    rows = lay.fc1_rows(neurons)
    return {"mlp.linear_fc1.weight": (0, rows), "mlp.linear_fc1.bias": (0, rows), "mlp.linear_fc2.weight": (1, neurons)}


def nested_units(config, sym: str, sizes: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """The units a nested choice keeps in a layer: ``sizes`` are its ``ElasticArch`` entries for that layer
    (``mamba_num_heads``/``mamba_head_dim``, ``num_attention_heads``, ``ffn_hidden_size``)."""
    if sym == MAMBA:
        lay = MambaLayout.of_config(config)
        return {
            "heads": lay.nested_heads(sizes["mamba_num_heads"]),
            "head_channels": torch.arange(sizes["mamba_head_dim"]),
        }
    if sym == ATTENTION:
        return {"heads": QKVLayout.of_config(config).nested_heads(sizes["num_attention_heads"])}
    return {"neurons": FFNLayout.of_config(config).nested_neurons(sizes["ffn_hidden_size"])}


def index_layer_tensor(
    config,
    sym: str,
    name: str,
    tensor: torch.Tensor,
    units: Dict[str, torch.Tensor],
    index: Dict[str, Tuple[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """``tensor`` (layer tensor ``name``) indexed by ``units`` on its unit dimension (unchanged if it has none).
    ``index``: :func:`layer_unit_index` of the same units, when the caller already has it."""
    index = index if index is not None else layer_unit_index(config, sym, units)
    if name not in index:
        return tensor
    dim, idx = index[name]
    mamba = MambaLayout.of_config(config) if name == "mixer.D" else None
    if mamba is not None and tensor.numel() == mamba.d_inner:  # D_has_hdim: one D per channel
        dim, idx = 0, mamba.channels(units["heads"], units["head_channels"])
    return tensor.index_select(dim, idx.to(tensor.device))
