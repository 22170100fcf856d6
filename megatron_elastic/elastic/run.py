"""The elastic training run (``megatron-elastic train``): one run trains every budget of the sorted parent, built
(``components.py``) -> stepped (``step.py``) -> looped here: resume, evaluate, save, stop on signals, the wall-time
limit or a stage's end, and the summary (``report.py``).

Checkpoints (``dist_checkpointing``) hold the student, its optimizer and LR schedule, the router and its
optimizer, the data position of every stage, the tokens consumed (the curriculum position) and RNG states.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from typing import Dict, Optional

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_elastic.data.loader import build_gpt_datasets, eval_bits_per_byte
from megatron_elastic.elastic.choose import choose_all
from megatron_elastic.elastic.components import ElasticComponents, build_elastic_components
from megatron_elastic.elastic.config import ElasticJobConfig
from megatron_elastic.elastic.layers.model import set_arch
from megatron_elastic.elastic.report import announce, arch_summary, evaluate_run, summarize
from megatron_elastic.elastic.step import (
    StageData,
    make_forward_step,
    nested_draws,
    nesting_record,
    nonfinite_anywhere,
    per_budget_means,
    router_resource_step,
    step_items,
    sync_router_grads,
)
from megatron_elastic.errors import ConfigError, InputNotFoundError
from megatron_elastic.store.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_checkpoint,
    load_extra,
)
from megatron_elastic.store.open_run import config_from_checkpoint
from megatron_elastic.training.metrics import MetricsLog
from megatron_elastic.training.preemption import StopSignals, WallTimeLimit, any_rank


def train_elastic(
    cfg: ElasticJobConfig,
    resume: bool = False,
    progress: bool = True,
    until_stage: Optional[int] = None,
    signals: Optional[StopSignals] = None,
) -> dict:
    """Run (or with ``resume`` continue) the elastic distillation described by ``cfg``; returns a summary.

    ``until_stage=k`` stops with a checkpoint once curriculum stage ``k`` (1-based) is done (one job per stage).
    SIGTERM/SIGUSR1 (Slurm preemption or time limit) make every rank stop after the current step with a
    checkpoint, and so does the wall-time limit (``train.exit_duration_minutes``, the job end Slurm gives;
    :class:`WallTimeLimit`); the summary then has ``stopped="preempted"`` or ``"time_limit"`` (the CLI exits with
    ``REQUEUE_EXIT_CODE``). Pass
    ``signals`` (an entered :class:`StopSignals`) to count signals from before the call, as the CLI does."""
    t0 = time.time()
    # Handlers first: a signal during start-up (model build, resume, first evaluation) stops after the first step.
    with contextlib.nullcontext(signals) if signals is not None else StopSignals() as signals:
        limit = WallTimeLimit(cfg.train.exit_duration_minutes, started=signals.started)
        run = ElasticRun(cfg, build_elastic_components(cfg))
        if resume:
            load_t0 = time.time()
            run.resume()
            limit.load = time.time() - load_t0
        announce(run)
        limit.eval_done(run.state.get("eval_seconds", 0.0))  # measured by an earlier job of this run
        if run.state["iteration"] == 0:
            run.timed_evaluation(limit, 0)
        return _train_loop(run, cfg, signals, limit, progress, until_stage, t0)


def _train_loop(run: "ElasticRun", cfg: ElasticJobConfig, signals, limit, progress, until_stage, t0) -> dict:
    """Steps until the end of the curriculum, a stop signal, the wall-time limit or the end of ``until_stage``;
    every stop but the last writes a checkpoint at the current step first."""
    last_valid = None
    limit.startup = time.time() - limit.started
    with run.progress_bar(progress) as bar:
        for step in range(run.state["iteration"] + 1, cfg.train.train_iters + 1):
            step_t0 = time.time()
            run.train_step(step)
            if step % cfg.train.eval_interval == 0 or step == cfg.train.train_iters:
                last_valid = run.timed_evaluation(limit, step)
            limit.step_done(time.time() - step_t0)
            signalled, out_of_time = any_rank(
                signals.received, limit.near(next_is_last=step + 1 == cfg.train.train_iters)
            )
            stage_done = until_stage is not None and step < cfg.train.train_iters and run.stage_index() >= until_stage
            stop = signalled or out_of_time or stage_done
            run.writer.poll()  # completes a finished asynchronous save
            if step % cfg.checkpoint.save_interval == 0 or step == cfg.train.train_iters or stop:
                save_t0 = time.time()
                run.save(step)
                if stop or step == cfg.train.train_iters:
                    run.writer.wait()  # the stop path and the end leave a complete checkpoint
                limit.save_done(max(time.time() - save_t0, run.writer.slowest_s))
            if signalled:
                return run.stopped(step, "preempted", "preempted: a stop signal")
            if out_of_time:
                return run.stopped(step, "time_limit", f"wall-time limit: {limit.describe()}")
            if stage_done:
                return run.stopped(step, "stage", f"stage {until_stage} done")
            bar.update(1)
    return summarize(run, t0, last_valid)


class ElasticRun:
    """The state of one elastic training run and the steps of its loop (see :func:`train_elastic`)."""

    def __init__(self, cfg: ElasticJobConfig, c: ElasticComponents):
        self.cfg, self.c = cfg, c
        self.is_logger = dist.get_rank() == dist.get_world_size() - 1
        self.dp = parallel_state.get_data_parallel_world_size()
        self.ckpt_dir = cfg.checkpoint.dir
        os.makedirs(self.ckpt_dir, exist_ok=True)
        self.writer = CheckpointWriter(cfg.checkpoint.async_save, cfg.checkpoint.optimizer_sharding)
        self.state = {"iteration": 0, "tokens": 0, "stage_consumed_samples": [0] * len(cfg.curriculum.stages)}
        self.eval_gbs = cfg.curriculum.stages[0].global_batch_size
        self.source = cfg.data.source(cfg.checkpoint.dir)  # resolved once: every stage and the validation read it
        _, self.valid_ds = build_gpt_datasets(
            self.source,
            cfg.eval_seq_length,
            1,
            (cfg.train.eval_iters + 1) * self.eval_gbs,
            seed=cfg.train.seed,
            model_vocab_size=c.model_config.vocab_size,
        )
        self.bits = eval_bits_per_byte(self.valid_ds, cfg.train.eval_iters * self.eval_gbs)
        self.metrics = MetricsLog(self.ckpt_dir, self.is_logger, tensorboard=True)
        self.parent_config = config_from_checkpoint(latest_checkpoint(cfg.sorted_checkpoint)).to_dict()
        self.forward_backward = get_forward_backward_func()
        self.data, self.data_stage = None, None
        self.window: Dict[str, list] = defaultdict(list)
        self.window_t0, self.window_tokens = time.time(), 0
        self.bar = None

    # ---- resume, announce, evaluate, save -------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the latest checkpoint of ``checkpoint.dir`` (model, optimizers, schedules, router, data)."""
        c, path = self.c, latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise InputNotFoundError(
                f"--resume: no checkpoint in {self.ckpt_dir} (no 'latest' file); drop --resume to start fresh"
            )
        with open(os.path.join(path, "trainer_state.json")) as f:
            saved_budgets = json.load(f).get("budgets")
        if saved_budgets is not None and [float(b) for b in saved_budgets] != self.cfg.budgets:
            raise ConfigError(
                f"--resume: {path} was trained for budgets {saved_budgets}, the config has "
                f"{self.cfg.budgets}; use the same budgets or a new checkpoint.dir"
            )
        self.state = load_checkpoint(path, c.student.module, c.optimizer)
        c.scheduler.load_state_dict(self.state["scheduler"])
        extra = load_extra(path)
        c.router.load_state_dict(extra["router"])
        c.router_optimizer.load_state_dict(extra["router_optimizer"])
        c.router_scheduler.load_state_dict(extra["router_scheduler"])
        if self.is_logger:
            print(f"resumed from {path} at step {self.state['iteration']} ({self.state['tokens']:,} tokens)")

    def timed_evaluation(self, limit, step: int) -> Dict[float, float]:
        """:func:`evaluate_run`, its time given to the wall-time ``limit`` and kept in the run's state (the next
        job of the run knows how long its end takes before it measures it)."""
        t0 = time.time()
        losses = evaluate_run(self, step)
        limit.eval_done(time.time() - t0)
        self.state["eval_seconds"] = limit.slowest_eval
        return losses

    def save(self, step: int) -> None:
        c, state = self.c, self.state
        trainer_state = {
            **{k: v for k, v in state.items() if k not in ("iteration", "scheduler", "config")},
            "scheduler": c.scheduler.state_dict(),
            "config": self.cfg.raw,
            "parent_config": self.parent_config,
            "budgets": self.cfg.budgets,
        }
        extra = {
            "router": c.router.state_dict(),
            "router_optimizer": c.router_optimizer.state_dict(),
            "router_scheduler": c.router_scheduler.state_dict(),
            "space": c.router.space.__dict__,
            "fixed_arch": c.router.fixed_arch.to_dict() if c.router.fixed_arch is not None else None,
        }
        self.writer.save(
            self.ckpt_dir,
            step,
            c.student.module,
            c.optimizer,
            trainer_state,
            keep_last=self.cfg.checkpoint.keep_last,
            extra=extra,
        )

    @contextlib.contextmanager
    def progress_bar(self, progress: bool):
        self.bar = tqdm(
            total=self.cfg.train.train_iters,
            initial=self.state["iteration"],
            desc="elastic",
            unit="step",
            disable=not (progress and self.is_logger),
            dynamic_ncols=True,
        )
        try:
            yield self.bar
        finally:
            self.bar.close()

    # ---- one step ---------------------------------------------------------------------------------------------
    def stage_index(self) -> int:
        return self.cfg.curriculum.stage_at(self.state["tokens"])[0]

    def _stage_data(self, step: int):
        """(stage index, stage) at the current token count, with its data stream opened when the stage starts."""
        stage_index, stage = self.cfg.curriculum.stage_at(self.state["tokens"])
        if self.data_stage != stage_index:
            consumed = self.state["stage_consumed_samples"][stage_index]
            self.data = StageData(self.cfg, self.source, stage_index, consumed, self.c.model_config.vocab_size)
            self.data_stage = stage_index
            if self.is_logger and step > 1:
                tqdm.write(
                    f"step {step}: stage {stage.name!r} (seq {stage.seq_length}, global batch "
                    f"{stage.global_batch_size}, budget weights {stage.budget_weights})"
                )
        return stage_index, stage

    def train_step(self, step: int) -> None:
        """One optimizer step of the student and one router step, the NaN guard, the counters and the log."""
        c, cfg, state, t = self.c, self.cfg, self.state, self.cfg.train
        stage_index, stage = self._stage_data(step)
        tau, scale = cfg.curriculum.tau_at(state["tokens"]), cfg.curriculum.logit_scale_at(state["tokens"])
        items = step_items(
            cfg, self.data, step, state["tokens"], stage.global_batch_size // (t.micro_batch_size * self.dp)
        )
        c.student.zero_grad_buffer()
        c.optimizer.zero_grad()
        c.router_optimizer.zero_grad(set_to_none=True)
        losses = self.forward_backward(
            forward_step_func=make_forward_step(c, step, tau, scale, cfg.trainable_teacher(stage_index)),
            data_iterator=iter(items),
            model=[c.pair],
            num_microbatches=len(items),
            seq_length=stage.seq_length,
            micro_batch_size=2 * t.micro_batch_size,
            forward_only=False,
        )
        c.pair.clear_cache()
        set_arch(c.student, None)
        draws = nested_draws(c, step, tau, scale)  # the step's draws again, for the resource loss and the log
        for k, v in nesting_record(draws).items():
            self.window[k].append(v)
        kd = per_budget_means(losses, "kd", len(cfg.budgets) + 1)  # the last: the untrained budget between
        sync_router_grads(c.router, c.model_config.sequence_parallel)
        bad = nonfinite_anywhere(kd, c.student, c.router)
        grad_norm, expected = None, {}
        if bad:
            self._skip_update(step)
        else:
            state["bad_steps"] = 0
            ok, grad_norm, _ = c.optimizer.step()
            expected = router_resource_step(c, draws)
        c.scheduler.step(increment=1)
        tokens = stage.global_batch_size * stage.seq_length
        state["iteration"] = step
        state["tokens"] += tokens
        state["stage_consumed_samples"][stage_index] += stage.global_batch_size
        self.window_tokens += tokens
        if bad and state["bad_steps"] >= t.max_bad_steps:
            self.save(step)
            self.writer.wait()
            raise FloatingPointError(
                f"step {step}: {state['bad_steps']} consecutive steps with non-finite loss or gradients; the last good "
                f"state is checkpointed in {latest_checkpoint(self.ckpt_dir)}. Lower train.lr or router.lr (or check "
                f"the data), then rerun with --resume"
            )
        if kd is not None and not bad:
            for name, v in zip([f"{b:g}" for b in cfg.budgets] + ["between"], kd):
                if v is not None:
                    self.window[f"kd/{name}"].append(v)
            teacher_ce = [
                v for v in per_budget_means(losses, "teacher_ce", len(cfg.budgets) + 1) or [] if v is not None
            ]
            if teacher_ce:  # a trainable teacher's own CE (Eq. 15), over the step's micro-batches
                self.window["teacher_ce"].append(float(np.mean(teacher_ce)))
        for b, f in expected.items():
            if b in cfg.budgets:
                self.window[f"expected_fraction/{b:g}"].append(f)
            else:  # the step's untrained budget: how far its expected size is from its target
                self.window["expected_fraction/between_offset"].append(f - b)
        if step % t.log_interval == 0 or step == t.train_iters:
            self._log_window(step, stage_index, stage, tau, scale, grad_norm)

    def _skip_update(self, step: int) -> None:
        """NaN/Inf in a loss or gradient: the weights, optimizers and router keep their last good state; the data
        and LR schedule move on. Too many in a row stop the run (see :meth:`train_step`)."""
        state = self.state
        state["bad_steps"] = state.get("bad_steps", 0) + 1
        state["skipped_steps"] = state.get("skipped_steps", 0) + 1
        self.c.router_optimizer.zero_grad(set_to_none=True)
        self.metrics.log(
            {
                "iteration": step,
                "skipped": True,
                "reason": "non-finite loss or gradient",
                "consecutive_bad_steps": state["bad_steps"],
            }
        )
        if self.is_logger:
            tqdm.write(
                f"step {step}: non-finite loss or gradient, update skipped "
                f"({state['bad_steps']} in a row, limit {self.cfg.train.max_bad_steps})"
            )

    def _log_window(self, step, stage_index, stage, tau, scale, grad_norm) -> None:
        """One metrics record for the steps since the last: means of the KD losses and expected sizes, rates."""
        c = self.c
        elapsed = time.time() - self.window_t0
        rec = {
            "iteration": step,
            "tokens": self.state["tokens"],
            "stage": stage_index,
            "seq_length": stage.seq_length,
            "tau": tau,
            "logit_scale": scale,
            "lr": c.optimizer.param_groups[0]["lr"],
            "router_lr": c.router_optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.window_tokens / max(elapsed, 1e-9),
        }
        rec.update({k: float(np.mean(v)) for k, v in self.window.items()})
        rec.update({f"chosen_fraction/{b}": v for b, v in arch_summary(c, choose_all(c.router)).items()})
        self.metrics.log(rec)
        self.bar.set_postfix({f"kd{b:g}": f"{rec[f'kd/{b:g}']:.3f}" for b in self.cfg.budgets if f"kd/{b:g}" in rec})
        self.window, self.window_t0, self.window_tokens = defaultdict(list), time.time(), 0

    # ---- the end ----------------------------------------------------------------------------------------------
    def stopped(self, step: int, why: str, reason: str) -> dict:
        """The summary of a run stopped with a checkpoint: ``why`` is ``preempted``, ``time_limit`` (both want a
        requeue) or ``stage`` (``--until-stage``)."""
        checkpoint = latest_checkpoint(self.ckpt_dir)
        if self.is_logger:
            print(f"stopping at step {step} ({reason}); checkpoint {checkpoint}; rerun with --resume")
        self.metrics.close()
        return {"stopped": why, "steps": step, "tokens": self.state["tokens"], "checkpoint": checkpoint}
