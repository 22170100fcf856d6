"""Checkpoints: model and optimizer through ``megatron.core.dist_checkpointing`` (weights TP/PP-reshardable; the
optimizer state as ``checkpoint.optimizer_sharding`` says),
plus the trainer state (iteration, data position, LR schedule, RNG) as JSON/pt files.

Layout::

    <dir>/latest                     name of the newest complete checkpoint (written last)
    <dir>/iter_0000300/dist/         dist_checkpointing directory: {"model": ..., "optimizer": ...}
    <dir>/iter_0000300/trainer_state.json
    <dir>/iter_0000300/rng_rank<r>.pt

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and ``latest``
is replaced atomically afterwards, so a crash mid-write never leaves a checkpoint that would be loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_elastic import __version__
from megatron_elastic.compat import (
    async_save_options,
    contain_checkpoint_writer_processes,
    prepare_optimizer_for_load,
)
from megatron_elastic.errors import CheckpointCorruptError, CheckpointError, InputNotFoundError
from megatron_elastic.model.config import HybridConfig, tiny_defaults
from megatron_elastic.parallel import barrier, rank, world_size
from megatron_elastic.store.safe_files import check_checkpoint_is_data, legacy_rng_globals, load_plain

LATEST = "latest"
EXTRA = "extra.pt"
MANIFEST = "manifest.json"


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint under ``ckpt_dir``, or None."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise InputNotFoundError(
            f"{pointer} names {name}, which is incomplete or missing; point {pointer} at an earlier iter_* directory"
        )
    return path


def resolve_checkpoint(checkpoint: str) -> str:
    """The checkpoint directory ``checkpoint`` names: itself, or the newest one of a run directory (``latest``)."""
    path = latest_checkpoint(checkpoint) if os.path.isfile(os.path.join(checkpoint, LATEST)) else checkpoint
    if path is None or not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise InputNotFoundError(f"{checkpoint}: no checkpoint (expected a 'latest' file or trainer_state.json)")
    return path


def rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)  # plain data
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in files written before 2026-11-25
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# How Megatron's DistributedOptimizer writes its data-parallel-sharded state (``checkpoint.optimizer_sharding``; other
# optimizers always write the canonical per-parameter layout):
# * 'dp_reshardable' (Megatron-LM's default): each rank writes its own shard of the optimizer buffers, no gather, no
#   copy; a resume keeps TP and PP (DP may change).
# * 'fully_reshardable': data-parallel rank 0 of each model-parallel group gathers the group's state and writes it
#   per parameter; resumes at any TP/PP/DP and without the distributed optimizer, at the cost of that gather in host
#   memory (its model-parallel shard's fp32 main weights and Adam moments: ~18 GB at 12B/TP=8, more while reordered).
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
PORTABLE = "fully_reshardable"  # what a plain optimizer writes, and what checkpoints before the choice hold


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_layout(optimizer, sharding: str) -> Dict[str, Any]:
    """What a resume must match to read ``optimizer``'s state written with ``sharding`` (stored in trainer_state)."""
    from megatron.core import parallel_state

    distributed = _is_distributed(optimizer)
    return {
        "sharding": sharding if distributed else PORTABLE,
        "distributed_optimizer": distributed,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def _check_optimizer_layout(path: str, stored: Optional[Dict[str, Any]], optimizer) -> str:
    """The sharding ``path``'s optimizer state was written with; refuses a resume that cannot read it."""
    if not stored or stored.get("sharding", PORTABLE) == PORTABLE:
        return PORTABLE
    mine = optimizer_layout(optimizer, stored["sharding"])
    diff = [f"{k} {stored.get(k)} (now {v})" for k, v in mine.items() if k != "sharding" and stored.get(k) != v]
    if diff:
        raise CheckpointError(
            f"{path} holds the distributed optimizer's state per rank (checkpoint.optimizer_sharding: dp_reshardable) "
            f"written at {', '.join(diff)}; resume at the layout it was written at (the data-parallel size may "
            f"change), or have the run write checkpoint.optimizer_sharding: fully_reshardable (its weights alone "
            f"load at any layout: extract, evaluate)"
        )
    return stored["sharding"]


def _sharded_state(model, optimizer, is_loading: bool, sharding: str = PORTABLE):
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": sharding}
        )
    return state


def save_checkpoint(ckpt_dir: str, iteration: int, model, *args, optimizer_sharding: str = PORTABLE, **kwargs) -> str:
    """Write one checkpoint synchronously (the arguments of :meth:`CheckpointWriter.save`); returns its path."""
    return CheckpointWriter(optimizer_sharding=optimizer_sharding).save(ckpt_dir, iteration, model, *args, **kwargs)


class CheckpointWriter:
    """Writes checkpoints, synchronously or (``async_save``) through Megatron's asynchronous ``dist_checkpointing``:
    the tensors are staged and handed to a forked writer, the step goes on, and the checkpoint is completed
    (manifest, rename, ``latest``) when every rank's writer has finished. Collective: every rank calls
    :meth:`save`, :meth:`poll` (once a step) and :meth:`wait` at the same points. A new save and the stop path
    wait for the one in flight; a kill before it completes leaves only its ``.tmp`` directory, which resuming
    ignores (the previous checkpoint stays ``latest``)."""

    def __init__(self, async_save: bool = False, optimizer_sharding: str = PORTABLE):
        self.async_save = async_save
        self.optimizer_sharding = optimizer_sharding
        self.slowest_s = 0.0  # the longest save so far, from its start until it was complete
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def save(
        self,
        ckpt_dir: str,
        iteration: int,
        model,
        optimizer=None,
        trainer_state: Optional[dict] = None,
        keep_last: Optional[int] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> str:
        """Save ``model`` (a Megatron module), ``optimizer`` (a Megatron optimizer) and ``trainer_state``
        (JSON-serialisable) atomically; collective over all ranks. ``extra``: replicated state (identical on every
        rank, e.g. the router and its optimizer), written once by rank 0 to ``extra.pt``. Starts (async) or writes
        (sync) the checkpoint; returns the path it has (async: will have) when complete."""
        self.wait()
        final = os.path.join(ckpt_dir, iteration_dirname(iteration))
        tmp = final + ".tmp"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "dist"))
        barrier()
        contain_checkpoint_writer_processes()
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
        layout = optimizer_layout(optimizer, self.optimizer_sharding) if optimizer is not None else None
        if rank() == 0:
            if extra is not None:
                torch.save(extra, os.path.join(tmp, EXTRA))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"iteration": iteration, **(trainer_state or {}), "optimizer_layout": layout}, f, indent=2)
        sharding = layout["sharding"] if layout else PORTABLE
        state = _sharded_state(model, optimizer, is_loading=False, sharding=sharding)
        started = time.time()

        def complete():
            _complete(ckpt_dir, tmp, final, iteration, keep_last)
            self.slowest_s = max(self.slowest_s, time.time() - started)

        if self._queue is None:
            dist_checkpointing.save(state, os.path.join(tmp, "dist"))
            complete()
        else:
            request = dist_checkpointing.save(
                state, os.path.join(tmp, "dist"), async_sharded_save=True, **async_save_options()
            )
            request.add_finalize_fn(complete)
            self._queue.schedule_async_request(request)
        return final

    def poll(self) -> None:
        """Complete a finished asynchronous save, if any (collective; cheap: one all-reduce)."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight is complete (collective)."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    @property
    def in_flight(self) -> bool:
        return self._queue is not None and self._queue.get_num_unfinalized_calls() > 0


def _complete(ckpt_dir: str, tmp: str, final: str, iteration: int, keep_last: Optional[int]) -> None:
    """Every file written: manifest (each rank hashes its share), rename, move ``latest`` (collective)."""
    barrier()
    write_manifest(tmp, iteration)
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(os.path.basename(final))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        if keep_last:
            _prune(ckpt_dir, keep_last)
    barrier()


def _file_digest(path: str) -> Tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                return size, crc
            crc, size = zlib.crc32(block, crc), size + len(block)


_RANK_FILE = re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$")


def _share(files: List[str], rank: int, world: int) -> List[str]:
    """The files rank ``rank`` of ``world`` hashes: the tensor files it wrote itself (``__<rank>_*.distcp``, still
    in its page cache after a save), the others dealt out in turn; on load at another world size the same rule."""
    mine = []
    for k, rel in enumerate(sorted(files)):
        m = _RANK_FILE.search(rel)
        owner = int(m.group(1)) % world if m else k % world
        if owner == rank:
            mine.append(rel)
    return mine


def _gather(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def write_manifest(path: str, iteration: int) -> None:
    """``manifest.json``: every file's size and CRC32, the iteration and the code version. Collective: rank 0 lists
    the files, every rank hashes and fsyncs its share (:func:`_share`), rank 0 writes the manifest, so no rank
    reads back the whole checkpoint."""

    listing = [None]
    if rank() == 0:
        listing = [sorted(os.path.relpath(os.path.join(r, n), path) for r, _, ns in os.walk(path) for n in ns)]
    if world_size() > 1:
        dist.broadcast_object_list(listing, src=0)
    mine = {}
    for rel in _share(listing[0], rank(), world_size()):
        full = os.path.join(path, rel)
        size, crc = _file_digest(full)
        mine[rel] = {"bytes": size, "crc32": crc}
        with open(full, "rb") as f:
            os.fsync(f.fileno())
    if rank() == 0:
        files = {rel: d for part in _gather(mine) for rel, d in part.items()}
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump(
                {"iteration": iteration, "code_version": __version__, "files": dict(sorted(files.items()))}, f, indent=1
            )
            f.flush()
            os.fsync(f.fileno())
    else:
        _gather(mine)


def _previous_checkpoint(path: str) -> Optional[str]:
    parent, name = os.path.split(os.path.normpath(path))
    older = sorted(d for d in os.listdir(parent) if d.startswith("iter_") and not d.endswith(".tmp") and d < name)
    return os.path.join(parent, older[-1]) if older else None


def verify_checkpoint(path: str, rank: int = 0, world: int = 1) -> None:
    """Check the files of ``manifest.json`` that are rank ``rank``'s share (:func:`_share`; all of them in one
    process): missing, size, CRC32; raises :class:`CheckpointCorruptError` naming the file and the previous
    checkpoint. Checkpoints written before manifests existed pass."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return
    with open(manifest) as f:
        files = json.load(f)["files"]
    for rel in _share(list(files), rank, world):
        want = files[rel]
        full = os.path.join(path, rel)
        problem = None
        if not os.path.isfile(full):
            problem = "is missing"
        else:
            size, crc = _file_digest(full)
            if size != want["bytes"]:
                problem = f"has {size} bytes, the manifest says {want['bytes']} (truncated?)"
            elif crc != want["crc32"]:
                problem = "does not match its checksum (altered or corrupted)"
        if problem:
            prev = _previous_checkpoint(path)
            hint = (
                (
                    f"; load the previous checkpoint instead: echo {os.path.basename(prev)} > "
                    f"{os.path.join(os.path.dirname(os.path.normpath(path)), LATEST)}"
                )
                if prev
                else ""
            )
            raise CheckpointCorruptError(f"checkpoint file {full} {problem}{hint}")


def _verify_everywhere(path: str) -> None:
    """Every rank checks its share of the manifest; the first problem any rank found is raised on all."""
    err = None
    try:
        verify_checkpoint(path, rank(), world_size())
    except CheckpointCorruptError as e:
        err = str(e)
    errors = [e for e in _gather(err) if e]
    if errors:
        raise CheckpointCorruptError(errors[0])


def _prune(ckpt_dir: str, keep_last: int) -> None:
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("iter_") and not d.endswith(".tmp"))
    for d in done[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)


def load_checkpoint(path: str, model, optimizer=None, strict: bool = True, load_rng: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``), at any TP/PP
    layout. Returns the trainer state dict."""
    _verify_everywhere(path)
    check_checkpoint_is_data(path, rank())
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    _check_architecture(path, trainer_state, model)
    sharding = PORTABLE
    if optimizer is not None:
        sharding = _check_optimizer_layout(path, trainer_state.get("optimizer_layout"), optimizer)
        prepare_optimizer_for_load(optimizer)
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, is_loading=True, sharding=sharding),
        os.path.join(path, "dist"),
        strict="assume_ok_unexpected",
    )
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and missing:
        raise CheckpointError(
            f"checkpoint {path} lacks model tensors {missing[:5]}... (was it written for another model?)"
        )
    if optimizer is not None:
        with torch.no_grad():  # Megatron's per-rank (dp_reshardable) loader copies into the main params without it
            optimizer.load_state_dict(state["optimizer"])
    rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
    if load_rng and os.path.isfile(rng_file):
        set_rng_state(load_plain(rng_file, tuple(legacy_rng_globals())))
    return trainer_state


def _check_architecture(path: str, trainer_state: dict, model) -> None:
    """Refuse (before loading anything) a checkpoint written for another architecture."""
    job = trainer_state.get("parent_config") or trainer_state.get("config") or {}
    stored = job.get("model") if isinstance(job, dict) else None
    config = getattr(model, "config", None)
    if not stored or not hasattr(config, "architecture_dict"):
        return

    mine = config.architecture_dict()
    try:
        theirs = HybridConfig.from_dict({**tiny_defaults(), **stored}).architecture_dict()
    except Exception:  # noqa: BLE001 - an unreadable stored config is reported by the load itself
        return
    diff = {k: (theirs[k], mine[k]) for k in mine if k in theirs and theirs[k] != mine[k]}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items())[:6])
        raise CheckpointError(
            f"checkpoint {path} was written for another architecture ({shown}); build the model from "
            f"the checkpoint's config or pick the matching checkpoint"
        )


def load_extra(path: str) -> Dict[str, Any]:
    """The replicated ``extra`` state saved with a checkpoint (see :func:`save_checkpoint`), read weights-only
    (the checkpoint's other files are checked where they are read: ``load_checkpoint``, the tensor reader)."""
    f = os.path.join(path, EXTRA)
    if not os.path.isfile(f):
        raise CheckpointError(f"{path} has no {EXTRA}; it was not written by `megatron-elastic train`")
    return load_plain(f)


def load_model_weights(path: str, model) -> dict:
    """Load only the model weights of a checkpoint (a checkpoint directory or its parent with ``latest``)."""
    return load_checkpoint(resolve_checkpoint(path), model, optimizer=None, load_rng=False)
