"""Loading a checkpoint never runs code: every pickled file a run holds is read as plain data.

A checkpoint directory (``iter_*``) holds:

* ``trainer_state.json``, ``manifest.json``, ``dist/metadata.json``: JSON;
* ``dist/*.distcp``: raw tensor bytes, and byte items (pickled ``_extra_state`` and Megatron sharded objects) that
  torch's load planner unpickles without restriction: each is checked with a weights-only read first;
* ``dist/common.pt``, ``extra.pt`` (router, router optimizer and scheduler, search space), ``rng_rank<r>.pt``:
  ``torch.save`` files of tensors, numbers, strings and plain containers, read with ``weights_only=True``;
* ``dist/.metadata``: torch.distributed.checkpoint's index, a plain pickle that torch itself loads with
  ``pickle.load``; it is checked first with an unpickler that admits only the index's own classes (the
  byte items are found through it).

:func:`check_checkpoint_is_data` checks every one of those files before any of them is used, and a file that holds
anything else is refused with :class:`~megatron_elastic.errors.UnsafeCheckpointError` naming it.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

from megatron_elastic.errors import UnsafeCheckpointError

DCP_METADATA = ".metadata"
# The classes torch.distributed.checkpoint pickles into its .metadata index (found by reading real ones).
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_TORCH_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout")}


def _refuse(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint file {path} holds {what}, not plain data (tensors, numbers, strings, containers); it was not "
        f"loaded. Re-create the checkpoint, or load an earlier iteration written by megatron-elastic"
    )


def legacy_rng_globals() -> list:
    """RNG files written before checkpoints were plain data held numpy's generator state as an ndarray: exactly
    these numpy types (array reconstruction, uint32 dtype) are admitted for them, nothing else."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_plain(path: str, allow: tuple = ()) -> Any:
    """``torch.load`` of a file that may hold only tensors, numbers, strings and containers (weights-only);
    ``allow``: further globals admitted for this file (torch's safe globals, scoped to this load)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise _refuse(path, f"an object of another kind ({first.strip()[:200]})") from None


class _IndexUnpickler(pickle.Unpickler):
    """Admits only torch.distributed.checkpoint's index classes, torch.Size and torch dtypes."""

    def find_class(self, module: str, name: str):
        allowed = (
            module in _DCP_MODULES
            or (module, name) in _TORCH_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        obj = super().find_class(module, name)
        if module in _DCP_MODULES and not isinstance(obj, type):
            raise pickle.UnpicklingError(f"{module}.{name} is not a class")
        return obj


def check_dcp_index(dist_dir: str) -> None:
    """Refuse a torch.distributed.checkpoint directory whose index (``.metadata``) holds anything but its own
    classes, or whose byte items (pickled objects inside ``*.distcp``: Megatron's ``_extra_state`` and sharded
    objects, which torch's load planner unpickles without restriction) hold anything but plain data."""
    path = os.path.join(dist_dir, DCP_METADATA)
    if not os.path.isfile(path):
        return  # the load itself reports a missing index
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as e:
        raise _refuse(path, f"an object of another kind ({e})") from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for key, info in index.storage_data.items():
        if not isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue
        where = os.path.join(dist_dir, str(info.relative_path))
        if os.path.basename(str(info.relative_path)) != info.relative_path or getattr(
            info, "transform_descriptors", None
        ):
            raise _refuse(
                path, f"an item {key.fqn!r} stored as {info.relative_path!r} in a form this loader does not read"
            )
        with open(where, "rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        try:
            torch.load(blob, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise _refuse(where, f"an object of another kind in item {key.fqn!r} ({last.strip()[:200]})") from None


def check_checkpoint_is_data(path: str, rank: int = 0) -> None:
    """Check every pickled file of checkpoint ``path`` that this rank will read; raise naming the first bad one."""
    dist_dir = os.path.join(path, "dist")
    check_dcp_index(dist_dir)
    for name, allow in (
        (os.path.join("dist", "common.pt"), ()),
        ("extra.pt", ()),
        (f"rng_rank{rank}.pt", tuple(legacy_rng_globals())),
    ):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            load_plain(f, allow)
