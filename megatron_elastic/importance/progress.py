"""Resumable importance: every rank's running sums (width statistics, the depth search) saved together, so a
killed ``importance`` job continues where its last save left it and ends with the same ranking.

Layout (``<out>/progress/``)::

    state.json            {"save": k, "fingerprint": {...}}: the newest complete save, written last (atomically)
    rank<r>.<k>.pt        rank r's state at save k (plain tensors, numbers, strings; read weights-only)

A save writes every rank's file, waits for all of them, then moves ``state.json``; the previous save's files are
removed only after that, so a kill at any moment leaves a complete save. Saves are taken at the same batch on
every rank (rank 0 decides when one is due and tells the others), so tensor-parallel ranks resume in step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_elastic.errors import ConfigError
from megatron_elastic.parallel import rank, world_size

STATE = "state.json"


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class ImportanceProgress:
    """Save and load one importance job's state. ``fingerprint``: what the sums depend on (checkpoint, data,
    calibration size, layout, sources, iterative); a save made with another one is refused, naming the fix.
    ``every_minutes``: how often a save is due (0: after every batch)."""

    def __init__(self, out: str, fingerprint: dict, every_minutes: float = 10.0):
        self.dir = os.path.join(out, "progress")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.every_s = 60.0 * every_minutes
        self.last = time.monotonic()
        self.save_id = 0

    def load(self) -> Optional[dict]:
        """This rank's state of the newest complete save, or None when there is none."""
        path = os.path.join(self.dir, STATE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            state = json.load(f)
        if state["fingerprint"] != self.fingerprint:
            diff = {
                k: (state["fingerprint"].get(k), v)
                for k, v in self.fingerprint.items()
                if state["fingerprint"].get(k) != v
            }
            shown = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items())[:4])
            raise ConfigError(
                f"{self.dir} holds the progress of another importance run ({shown}); run it with the same settings "
                f"to resume, or delete {self.dir} to start over"
            )
        self.save_id = int(state["save"])
        return torch.load(self._file(self.save_id), weights_only=True)

    def maybe_save(self, state: dict, force: bool = False) -> bool:
        """Save ``state`` (this rank's) when a save is due; collective (every rank calls it at the same point)."""
        if not _agree(force or time.monotonic() - self.last >= self.every_s):
            return False
        k = self.save_id + 1
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._file(k) + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._file(k))
        if dist.is_initialized():
            dist.barrier()
        if rank() == 0:
            with open(os.path.join(self.dir, STATE + ".tmp"), "w") as f:
                json.dump({"save": k, "fingerprint": self.fingerprint}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(self.dir, STATE + ".tmp"), os.path.join(self.dir, STATE))
        if dist.is_initialized():
            dist.barrier()
        if os.path.isfile(self._file(self.save_id)):
            os.remove(self._file(self.save_id))
        self.save_id, self.last = k, time.monotonic()
        return True

    def clear(self) -> None:
        """Remove the progress once the job's outputs are written (collective)."""
        if dist.is_initialized():
            dist.barrier()
        if rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _file(self, k: int) -> str:
        return os.path.join(self.dir, f"rank{rank()}.{k}.pt")
