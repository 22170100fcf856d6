"""Stopping a training job cleanly when the cluster asks: SIGTERM / SIGUSR1 (Slurm preemption or time limit)
set a flag; every rank checks it after a step (one all-reduce), checkpoints and exits with
``REQUEUE_EXIT_CODE``; rank 0 also writes the file ``$MEGATRON_ELASTIC_REQUEUE_MARKER`` names (the launch
script requeues the job when it exists: exit codes do not survive ``srun --kill-on-bad-exit``, which ends the
other ranks with 143 once the first one exits)."""

from __future__ import annotations

import os
import signal
import threading

REQUEUE_EXIT_CODE = 99  # the run checkpointed on a signal and wants to be requeued (launch/slurm reads it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_MARKER_ENV = "MEGATRON_ELASTIC_REQUEUE_MARKER"


def mark_for_requeue() -> None:
    """After the stop checkpoint (whose last barrier every rank passed): on global rank 0, write the requeue
    marker if the launcher asked for one."""
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if path and int(os.environ.get("RANK", "0")) == 0:
        with open(path, "w") as f:
            f.write("checkpointed on a stop signal; requeue\n")


def any_rank(local: bool) -> bool:
    """True on every rank when ``local`` is true on any rank (one tiny all-reduce)."""
    import torch  # here: the CLI installs the handlers before anything heavy is imported
    import torch.distributed as dist

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
