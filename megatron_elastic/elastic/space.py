"""The search space of Nemotron Elastic: the allowed sizes of every elastic axis (ascending) and the depth ranking
(most important layer first), from which the router chooses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from megatron_elastic.compat import ATTENTION, MAMBA, MLP
from megatron_elastic.elastic.arch import AXIS_FIELD, ElasticArch

AXES = ("hidden", *AXIS_FIELD, "depth")


@dataclass
class ElasticSpace:
    """The allowed sizes of every axis (ascending) and the depth ranking (most important first)."""

    hidden: List[int]
    mamba_heads: List[int]
    mamba_head_dim: List[int]
    attention_heads: List[int]
    ffn: List[int]
    num_layers: List[int]
    depth_ranking: List[int]
    heterogeneous: Union[bool, List[str]] = True  # or the width axes chosen per layer (``space.heterogeneous``)

    @classmethod
    def default(
        cls,
        config,
        fractions: Sequence[float] = (0.5, 0.625, 0.75, 0.875, 1.0),
        depth_fractions: Union[Sequence[float], str] = (0.75, 0.875, 1.0),
        depth_ranking: Optional[List[int]] = None,
        heterogeneous: Union[bool, List[str]] = True,
    ) -> "ElasticSpace":
        """Choices at ``fractions`` of every width axis (snapped to valid multiples) and ``depth_fractions`` of
        the layers (``"all"``: every depth from 1 to N layers); ``depth_ranking`` defaults to the layer order (pass
        the importance ranking)."""

        def snap(full, multiple):
            return sorted({max(multiple, min(full, int(round(full * f / multiple)) * multiple)) for f in fractions})

        n = len(config.hybrid_pattern)
        return cls(
            hidden=snap(config.hidden_size, 8 if config.hidden_size >= 64 else 1),
            mamba_heads=snap(config.mamba_num_heads, config.mamba_num_groups) if MAMBA in config.hybrid_pattern else [],
            mamba_head_dim=snap(config.mamba_head_dim, 1) if MAMBA in config.hybrid_pattern else [],
            attention_heads=snap(config.num_attention_heads, config.num_query_groups)
            if ATTENTION in config.hybrid_pattern
            else [],
            ffn=snap(config.ffn_hidden_size, config.elastic_ffn_groups) if MLP in config.hybrid_pattern else [],
            num_layers=list(range(1, n + 1))
            if depth_fractions == "all"
            else sorted({max(1, min(n, int(round(n * f)))) for f in depth_fractions}),
            depth_ranking=list(depth_ranking) if depth_ranking is not None else list(range(n)),
            heterogeneous=heterogeneous,
        )

    def per_layer(self, axis: str) -> bool:
        """Whether ``axis`` (a width axis of ``AXIS_FIELD``) is chosen for each layer of its type or once for all."""
        het = self.heterogeneous
        return axis in het if isinstance(het, list) else bool(het)

    def smallest_arch(self, config) -> ElasticArch:
        """Every axis at its smallest choice: the smallest sub-model this space reaches."""
        arch = ElasticArch.full(config)
        if self.hidden:
            arch.hidden_size = self.hidden[0]
        for field_name, choices in (
            ("mamba_num_heads", self.mamba_heads),
            ("mamba_head_dim", self.mamba_head_dim),
            ("num_attention_heads", self.attention_heads),
            ("ffn_hidden_size", self.ffn),
        ):
            if choices:
                d = getattr(arch, field_name)
                for k in d:
                    d[k] = choices[0]
        if self.num_layers:
            arch.skipped_layers = tuple(sorted(self.depth_ranking[self.num_layers[0] :]))
        return arch.validate(config)

    def layers_of(self, config, symbol: str) -> List[int]:
        return [i for i, s in enumerate(config.hybrid_pattern) if s == symbol]
