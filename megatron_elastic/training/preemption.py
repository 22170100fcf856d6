"""Stopping a training job cleanly when the cluster asks: SIGTERM / SIGUSR1 (Slurm preemption or time limit)
set a flag; every rank checks it after a step (one all-reduce), checkpoints and exits with
``REQUEUE_EXIT_CODE`` so the launch script requeues the job."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 99  # the run checkpointed on a signal and wants to be requeued (launch/slurm reads it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def any_rank(local: bool) -> bool:
    """True on every rank when ``local`` is true on any rank (one tiny all-reduce)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StopSignals:
    """A context in which SIGTERM/SIGUSR1 request a stop instead of killing the process (main thread only;
    elsewhere signals cannot be caught and nothing is installed). The previous handlers come back on exit."""

    def __init__(self):
        self.received = False
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every rank when any rank received a stop signal."""
        return any_rank(self.received)
