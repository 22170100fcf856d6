"""Read a ``dist_checkpointing`` checkpoint one tensor at a time, under the local spec's (TP=1) names, so an
extraction never holds more than one full-size parent tensor.

Checkpoint keys differ from local names in two ways: the pre-norms are stored under TransformerEngine's fused
names (``mixer.in_proj.layer_norm_weight`` ...), and the Mamba ``in_proj``/``conv1d`` tensors are split into
``.z/.x/.B/.C/.dt`` (``.x/.B/.C``) parts (see ``model/mamba_mixer.py``); both are undone here.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List

import torch

from megatron_elastic.model.layouts import PRE_NORM_PREFIX, MambaLayout
from megatron_elastic.store.safe_files import check_checkpoint_is_data

_FUSED_NORM = {fused + "layer_norm_weight": local + "weight" for local, fused in PRE_NORM_PREFIX.values()}
_SPLITS = {
    "mixer.in_proj.weight": MambaLayout.IN_PROJ_PARTS,
    "mixer.conv1d.weight": MambaLayout.CONV_PARTS,
    "mixer.conv1d.bias": MambaLayout.CONV_PARTS,
}


class CheckpointTensorReader:
    def __init__(self, checkpoint_dir: str):
        from megatron.core import dist_checkpointing

        self.dist_dir = os.path.join(checkpoint_dir, "dist")
        check_checkpoint_is_data(checkpoint_dir)
        self.meta = {
            k: v
            for k, v in dist_checkpointing.load_tensors_metadata(self.dist_dir).items()
            if not k.startswith("optimizer.")
        }
        self.keys: Dict[str, List[str]] = {}
        for key in sorted(self.meta):
            m = re.match(r"^(decoder\.layers\.\d+\.)(.+)$", key)
            name, parts = key, [key]
            if m:
                prefix, rest = m.groups()
                if rest in _FUSED_NORM:
                    name = prefix + _FUSED_NORM[rest]
                for local, suffixes in _SPLITS.items():
                    if any(rest == f"{local}.{s}" for s in suffixes):
                        name, parts = prefix + local, [f"{prefix}{local}.{s}" for s in suffixes]
            self.keys[name] = parts

    def names(self) -> List[str]:
        """Local names in layer order (embedding first)."""

        def order(n):
            m = re.match(r"^decoder\.layers\.(\d+)\.", n)
            return (1, int(m.group(1)), n) if m else ((0, 0, n) if n.startswith("embedding") else (2, 0, n))

        return sorted(self.keys, key=order)

    def load(self, name: str) -> torch.Tensor:
        """One full tensor (concatenating its checkpoint parts)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {}
        for key in self.keys[name]:
            md = self.meta[key]
            request[key] = ShardedTensor.from_rank_offsets(
                key, torch.empty(md.global_shape, dtype=md.dtype), replica_id=0
            )
        loaded = dist_checkpointing.load(request, self.dist_dir)
        parts = [loaded[k] for k in self.keys[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
