"""``ElasticArch``: one nested sub-model of a parent, i.e. the active size of every elastic axis.

Per-layer entries are keyed by the layer's global index (0-based position in ``hybrid_pattern``). Every
choice is a prefix of the (importance-sorted) parent axis, taken group-aware where the parent has groups:

* ``mamba_num_heads[i]``: total active heads of Mamba layer i, a multiple of ``mamba_num_groups``; every
  B/C group keeps the same number of its own first heads (groups and ``d_state`` never shrink).
* ``mamba_head_dim[i]``: the first channels of every head of Mamba layer i.
* ``num_attention_heads[i]``: active query heads of attention layer i, a multiple of ``num_query_groups``;
  every KV group keeps its own first query heads, all KV heads stay.
* ``ffn_hidden_size[i]``: active neurons of MLP layer i, a multiple of ``elastic_ffn_groups``; every FFN
  group keeps its first neurons (one group: a plain prefix).
* ``hidden_size``: the first residual channels, for the whole network.
* ``skipped_layers``: layers that become identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, Tuple

from megatron_elastic.compat import ATTENTION, MAMBA, MLP
from megatron_elastic.errors import ElasticArchError  # noqa: F401

# The per-layer width axes: axis name (router, search space, importance scores and permutations, gate keys) ->
# the ElasticArch / HybridConfig field it sizes, and the layer type it belongs to. The model-wide axes are
# "hidden" (hidden_size) and "depth" (skipped_layers).
AXIS_FIELD = {
    "mamba_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "attention_heads": "num_attention_heads",
    "ffn": "ffn_hidden_size",
}
AXIS_SYMBOL = {"mamba_heads": MAMBA, "mamba_head_dim": MAMBA, "attention_heads": ATTENTION, "ffn": MLP}


# What an extracted ``arch.json`` says about the architecture besides its sizes (read back, they are ignored):
# the budget's name, whether training sampled it (False: chosen zero-shot between the trained budgets ``between``),
# its parameter count and fraction of the parent, and its cost in every kind (``elastic.budget.every_cost``).
METADATA_FIELDS = ("budget", "trained", "between", "parameters", "fraction", "costs")


def _int_keys(d: Dict) -> Dict[int, int]:
    return {int(k): int(v) for k, v in d.items()}


@dataclass
class ElasticArch:
    hidden_size: int
    mamba_num_heads: Dict[int, int] = field(default_factory=dict)
    mamba_head_dim: Dict[int, int] = field(default_factory=dict)
    num_attention_heads: Dict[int, int] = field(default_factory=dict)
    ffn_hidden_size: Dict[int, int] = field(default_factory=dict)
    skipped_layers: Tuple[int, ...] = ()

    def __post_init__(self):
        self.mamba_num_heads = _int_keys(self.mamba_num_heads)
        self.mamba_head_dim = _int_keys(self.mamba_head_dim)
        self.num_attention_heads = _int_keys(self.num_attention_heads)
        self.ffn_hidden_size = _int_keys(self.ffn_hidden_size)
        self.skipped_layers = tuple(sorted(int(i) for i in self.skipped_layers))

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def full(cls, config) -> "ElasticArch":
        """The parent itself: every axis at its maximum."""
        p = config.hybrid_pattern
        return cls(
            hidden_size=config.hidden_size,
            mamba_num_heads={i: config.mamba_num_heads for i, s in enumerate(p) if s == MAMBA},
            mamba_head_dim={i: config.mamba_head_dim for i, s in enumerate(p) if s == MAMBA},
            num_attention_heads={i: config.num_attention_heads for i, s in enumerate(p) if s == ATTENTION},
            ffn_hidden_size={i: config.ffn_hidden_size for i, s in enumerate(p) if s == MLP},
        )

    def is_full(self, config) -> bool:
        return self == ElasticArch.full(config)

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self, config) -> "ElasticArch":
        """Check every entry against the parent ``config`` (a HybridConfig), including TP divisibility.
        Returns self; raises :class:`ElasticArchError` naming the entry and the rule."""
        p = config.hybrid_pattern
        if not 1 <= self.hidden_size <= config.hidden_size:
            raise ElasticArchError(f"hidden_size={self.hidden_size}: must be in [1, {config.hidden_size}]")
        for name, symbol in (
            ("mamba_num_heads", MAMBA),
            ("mamba_head_dim", MAMBA),
            ("num_attention_heads", ATTENTION),
            ("ffn_hidden_size", MLP),
        ):
            want = {i for i, s in enumerate(p) if s == symbol}
            have = set(getattr(self, name))
            if have != want:
                raise ElasticArchError(
                    f"{name}: needs exactly the layers {sorted(want)} of pattern {p!r} (type {symbol!r}); "
                    f"missing {sorted(want - have)}, not of that type {sorted(have - want)}"
                )
        for i, h in self.mamba_num_heads.items():
            g, n = config.mamba_num_groups, config.mamba_num_heads
            if h % g or not g <= h <= n:
                raise ElasticArchError(
                    f"mamba_num_heads[{i}]={h}: must be a multiple of mamba_num_groups ({g}) in "
                    f"[{g}, {n}] (heads are trimmed evenly inside every B/C group)"
                )
        for i, d in self.mamba_head_dim.items():
            if not 1 <= d <= config.mamba_head_dim:
                raise ElasticArchError(f"mamba_head_dim[{i}]={d}: must be in [1, {config.mamba_head_dim}]")
        for i, h in self.num_attention_heads.items():
            g, n = config.num_query_groups or config.num_attention_heads, config.num_attention_heads
            if h % g or not g <= h <= n:
                raise ElasticArchError(
                    f"num_attention_heads[{i}]={h}: must be a multiple of num_query_groups ({g}) "
                    f"in [{g}, {n}] (query heads are trimmed evenly inside every KV group)"
                )
        for i, f in self.ffn_hidden_size.items():
            g = config.elastic_ffn_groups
            if not 1 <= f <= config.ffn_hidden_size or f % g:
                raise ElasticArchError(
                    f"ffn_hidden_size[{i}]={f}: must be a multiple of elastic_ffn_groups ({g}) in "
                    f"[{g}, {config.ffn_hidden_size}]"
                )
        bad = [i for i in self.skipped_layers if not 0 <= i < len(p)]
        if bad:
            raise ElasticArchError(f"skipped_layers {bad}: layer indices must be in [0, {len(p) - 1}]")
        if len(set(self.skipped_layers)) == len(p):
            raise ElasticArchError("skipped_layers: cannot skip every layer")
        return self

    def is_within(self, other: "ElasticArch") -> bool:
        """True when this sub-model is nested in ``other``: no axis larger, and every layer ``other`` skips
        skipped here too (both prefixes of the same sorted parent)."""
        le = lambda a, b: a.keys() == b.keys() and all(a[k] <= b[k] for k in a)
        return (
            self.hidden_size <= other.hidden_size
            and le(self.mamba_num_heads, other.mamba_num_heads)
            and le(self.mamba_head_dim, other.mamba_head_dim)
            and le(self.num_attention_heads, other.num_attention_heads)
            and le(self.ffn_hidden_size, other.ffn_hidden_size)
            and set(other.skipped_layers) <= set(self.skipped_layers)
        )

    # ---- (de)serialisation and display ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "skipped_layers": list(self.skipped_layers),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ElasticArch":
        known = {
            "hidden_size",
            "mamba_num_heads",
            "mamba_head_dim",
            "num_attention_heads",
            "ffn_hidden_size",
            "skipped_layers",
        }
        unknown = sorted(set(d) - known - set(METADATA_FIELDS))
        if unknown:
            raise ElasticArchError(f"unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self, **metadata) -> str:
        """The architecture as JSON, with optional ``metadata`` (the keys of ``METADATA_FIELDS``; ignored when read)."""
        bad = sorted(set(metadata) - set(METADATA_FIELDS))
        if bad:
            raise ValueError(f"unknown metadata {bad}; known: {list(METADATA_FIELDS)}")
        return json.dumps({**self.to_dict(), **metadata}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ElasticArch":
        return cls.from_dict(json.loads(text))

    def table(self, config) -> str:
        """One row per layer: type, active sizes / parent sizes, skipped."""
        rows = [
            f"hidden_size {self.hidden_size}/{config.hidden_size}",
            f"{'layer':>5} {'type':9} {'active / parent':28} {'skipped':7}",
        ]
        for i, s in enumerate(config.hybrid_pattern):
            if s == MAMBA:
                desc = (
                    f"heads {self.mamba_num_heads[i]}/{config.mamba_num_heads} x "
                    f"dim {self.mamba_head_dim[i]}/{config.mamba_head_dim}"
                )
                kind = "mamba"
            elif s == ATTENTION:
                desc, kind = f"q-heads {self.num_attention_heads[i]}/{config.num_attention_heads}", "attention"
            else:
                desc, kind = f"ffn {self.ffn_hidden_size[i]}/{config.ffn_hidden_size}", "mlp"
            rows.append(f"{i:5d} {kind:9} {desc:28} {'yes' if i in self.skipped_layers else '':7}")
        return "\n".join(rows)


def active_layers(arch: ElasticArch, indices: Iterable[int]):
    """The layer indices of ``indices`` that ``arch`` keeps."""
    skipped = set(arch.skipped_layers)
    return [i for i in indices if i not in skipped]
