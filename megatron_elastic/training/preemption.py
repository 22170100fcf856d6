"""Stopping a training job cleanly before the cluster ends it: SIGTERM / SIGUSR1 (Slurm preemption or time limit)
set a flag, and :class:`WallTimeLimit` says when the job's wall time is nearly up; every rank checks both after a
step (one all-reduce), checkpoints and exits with ``REQUEUE_EXIT_CODE``; each rank first writes the file
``$MEGATRON_ELASTIC_REQUEUE_MARKER`` names (the launch script requeues the job when it exists: exit codes do not
survive ``srun --kill-on-bad-exit``, which ends the other ranks with 143 once the first one exits). For the same
reason a rank that stops on a bad input (exit 2) writes ``$MEGATRON_ELASTIC_BAD_INPUT_MARKER``: the launch script
then exits 2 and never requeues, whatever srun reports for the ranks it killed."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import List, Optional

REQUEUE_EXIT_CODE = 99  # the run checkpointed on a signal and wants to be requeued (launch/slurm reads it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_MARKER_ENV = "MEGATRON_ELASTIC_REQUEUE_MARKER"
BAD_INPUT_MARKER_ENV = "MEGATRON_ELASTIC_BAD_INPUT_MARKER"
JOB_END_ENV = "MEGATRON_ELASTIC_JOB_END_TIME"  # the job's end (seconds since the epoch); launch/slurm sets it


def _write_marker(env: str, text: str) -> None:
    """Write the file ``$env`` names (if the launcher set it) atomically and flushed to disk, so it is there before
    this rank's exit, however srun ends the other ranks."""
    path = os.environ.get(env)
    if not path:
        return
    tmp = f"{path}.{os.environ.get('RANK', '0')}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_for_requeue() -> None:
    """After the stop checkpoint (whose last barrier every rank passed): write the requeue marker if the launcher
    asked for one. Every rank writes it before it exits: with ``srun --kill-on-bad-exit`` the first rank to exit
    gets the others killed, so a marker left to one rank could be lost."""
    _write_marker(REQUEUE_MARKER_ENV, "checkpointed on a stop signal; requeue")


def mark_bad_input(message: str) -> None:
    """A bad input (the CLI's exit 2, one line naming the fix): tell the launcher not to run the job again."""
    _write_marker(BAD_INPUT_MARKER_ENV, message)


def any_rank(*local: bool) -> List[bool]:
    """Element-wise: true on every rank where the flag is true on any rank (one tiny all-reduce)."""
    import torch  # here: the CLI installs the handlers before anything heavy is imported
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flags = torch.tensor([1.0 if f else 0.0 for f in local], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


class StopSignals:
    """A context in which SIGTERM/SIGUSR1 request a stop instead of killing the process (main thread only;
    elsewhere signals cannot be caught and nothing is installed). The previous handlers come back on exit."""

    def __init__(self):
        self.received = False
        self.started = time.time()  # the process's start, for all practical purposes (see WallTimeLimit)
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


class WallTimeLimit:
    """When to stop so that the stop checkpoint is written before the job's wall time runs out.

    The deadline is the earlier of ``started + exit_duration_minutes`` (``train.exit_duration_minutes``, like
    Megatron's ``--exit-duration-in-mins``) and the job's end time in ``$MEGATRON_ELASTIC_JOB_END_TIME`` (the
    Slurm script exports it). The run stops after the step at which ``now + margin`` passes the deadline, where
    ``margin = SAFETY * (slowest loop step + checkpoint time)``, both measured in this process: the checkpoint time
    is the slowest save so far, before the first save the resume load, and before either the start-up (model
    build and parent load, the same order of work). Before the last step the run also needs its end (the final
    validation and the summary's scoring, ``FINISH_EVALS`` validation passes of the slowest one measured, which a
    checkpoint carries over to the resumed job): when that does not fit, it stops one step early and the next job
    finishes."""

    SAFETY = 1.5
    FINISH_EVALS = 3  # the last step's validation, the summary's sliced-parent pass over every budget, the parent

    def __init__(self, exit_duration_minutes: Optional[float], started: float):
        deadlines = []
        if exit_duration_minutes is not None:
            deadlines.append(started + 60.0 * exit_duration_minutes)
        job_end = os.environ.get(JOB_END_ENV, "").strip()
        if job_end:
            try:
                deadlines.append(float(job_end))
            except ValueError:
                raise ValueError(f"${JOB_END_ENV}={job_end!r}: expected seconds since the epoch") from None
        self.started = started
        self.deadline = min(deadlines) if deadlines else None
        self.slowest_step = 0.0
        self.startup = None  # seconds from ``started`` to the first step
        self.slowest_save = None
        self.load = None
        self.slowest_eval = 0.0  # one validation pass over every budget (carried over by the run's checkpoints)

    def step_done(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def eval_done(self, seconds: float) -> None:
        self.slowest_eval = max(self.slowest_eval, seconds)

    def save_done(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save or 0.0, seconds)

    def checkpoint_seconds(self) -> float:
        for measured in (self.slowest_save, self.load, self.startup):
            if measured is not None:
                return measured
        return 0.0

    def margin(self) -> float:
        return self.SAFETY * (self.slowest_step + self.checkpoint_seconds())

    def near(self, now: Optional[float] = None, next_is_last: bool = False) -> bool:
        """True when the next step and the stop checkpoint might not both fit before the deadline (nor, when the
        next step is the last, the run's end: :attr:`FINISH_EVALS` validation passes)."""
        if self.deadline is None:
            return False
        finish = self.SAFETY * self.FINISH_EVALS * self.slowest_eval if next_is_last else 0.0
        return (time.time() if now is None else now) + self.margin() + finish >= self.deadline

    def describe(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        return (
            f"{(now - self.started) / 60:.1f} min in, {(self.deadline - now) / 60:.1f} min to the limit; margin "
            f"{self.margin():.0f} s = {self.SAFETY} x (step {self.slowest_step:.1f} s + checkpoint "
            f"{self.checkpoint_seconds():.1f} s)"
        )
