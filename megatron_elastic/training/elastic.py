"""Elastic distillation (``megatron-elastic train``): one run trains every budget of the sorted parent.

Per optimizer step:

1. The curriculum gives the stage (sequence length, global batch, budget weights) from the tokens consumed so
   far, and the router temperature/logit scale. Each micro-batch gets a budget (``sample``: drawn with the
   stage's weights, one per micro-batch of the global batch; ``all``: every budget on every micro-batch). With
   ``curriculum.between_share``, that share of the micro-batches trains the step's untrained budget between the
   trained ones (``Curriculum.between_budget``), drawn nested between its trained neighbours' draws.
2. Megatron's forward/backward schedule runs the (student, frozen teacher) pair. In each micro-batch the
   router samples its budget's architecture with Gumbel noise fixed per (step, budget) (so every micro-batch,
   TP rank and PP stage draws the same one), nested inside the draw of every larger budget of the step
   (``Router.sample_nested``), the student runs that sub-model with the router's straight-through gates, and the
   loss is KD(teacher || student) (+ optional LM loss). A ``fixed_arch`` run trains one given sub-model instead.
3. Router gradients are summed over pipeline stages (each stage gates its own layers) and averaged over
   data-parallel replicas; then the resource loss (every budget's expected cost - parameters, serving memory or
   FLOPs per token, the job's ``budget_kind`` - vs its target) adds its gradient, and the router's Adam steps.
   The student steps with Megatron's optimizer.

Checkpoints (``dist_checkpointing``) hold the student, its optimizer and LR schedule, the router and its
optimizer, the data position of every stage, the tokens consumed (the curriculum position) and RNG states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from tqdm import tqdm

from megatron_elastic.data.loader import build_gpt_datasets, eval_bits_per_byte, make_loader
from megatron_elastic.data.tokenizer import BitsPerByte
from megatron_elastic.distill import kd_loss
from megatron_elastic.errors import InputNotFoundError
from megatron_elastic.model.budget import every_cost, kind_text, report_shape
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.config import ConfigError
from megatron_elastic.model.cost import arch_parameters
from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.elastic_model import build_elastic_model, set_arch
from megatron_elastic.model.kernels import Machine, teacher_kernels
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.router import ElasticSpace, Router, resource_loss
from megatron_elastic.training.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_checkpoint,
    load_extra,
    load_model_weights,
)
from megatron_elastic.training.elastic_config import MAX_BUDGETS, ElasticJobConfig
from megatron_elastic.training.lm import batch_to_device, masked_mean
from megatron_elastic.training.memory_check import check_this_gpu
from megatron_elastic.training.metrics import MetricsLog
from megatron_elastic.training.preemption import StopSignals, WallTimeLimit, any_rank
from megatron_elastic.training.pretrain import evaluate
from megatron_elastic.training.runs import config_from_checkpoint
from megatron_elastic.training.setup import build_training_components
from megatron_elastic.training.teacher import DistillationPair

NOISE_SEED_STRIDE = 1_000_003


def noise_generator(seed: int, step: int, budget_index: int) -> torch.Generator:
    """The Gumbel-noise generator of (step, budget): identical on every rank and every micro-batch. Slot
    ``len(budgets)`` is the step's untrained budget between them (``MAX_BUDGETS`` keeps every index below 16)."""
    assert 0 <= budget_index <= MAX_BUDGETS
    return torch.Generator().manual_seed((seed * NOISE_SEED_STRIDE + step) * 16 + budget_index)


def sync_router_grads(router: torch.nn.Module, sequence_parallel: bool = False) -> None:
    """Sum router gradients over pipeline stages (each stage holds the gates of its own layers), average over
    data-parallel replicas. Without sequence parallelism tensor-parallel ranks already hold identical gradients
    (gates act on replicated activations); with it each rank's gates act on its part of the sequence, so the
    gradients are summed over the TP group."""
    params = list(router.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not dist.is_initialized():
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    if sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        flat /= dp
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


@dataclass
class ElasticComponents:
    config: ElasticJobConfig
    model_config: object
    student: torch.nn.Module  # DDP-wrapped elastic student
    teacher: torch.nn.Module  # the frozen parent (plain TE or local model) with the sorted weights
    pair: DistillationPair
    optimizer: object
    scheduler: object
    router: Router
    router_optimizer: torch.optim.Optimizer
    router_scheduler: torch.optim.lr_scheduler.LambdaLR
    full_parameters: int


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _build_parent(model_cfg, src: str, backend: str = "local"):
    """This pipeline stage of the sorted parent at ``src``: an elastic model on the local backend, a plain
    TransformerEngine model on ``te``."""
    stage = dict(
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage()
    )
    model = (
        build_elastic_model(model_cfg, **stage)
        if backend == "local"
        else build_hybrid_model(model_cfg, backend=backend, **stage)
    )
    load_model_weights(src, model)
    return model


def build_elastic_components(cfg: ElasticJobConfig) -> ElasticComponents:
    """Parallel state, student (from the sorted parent), teacher, pair, optimizers and the router."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    initialize_parallel(tp, pp, seed=cfg.train.seed, timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    cfg.validate(dist.get_world_size())
    src = latest_checkpoint(cfg.sorted_checkpoint)
    if src is None or not os.path.isfile(cfg.ranking_file):
        raise InputNotFoundError(
            f"parent: {cfg.parent} lacks sorted/latest or ranking.json; run "
            f"`megatron-elastic importance --out {cfg.parent}` first"
        )
    job = config_from_checkpoint(src)
    job.parallel = dataclasses.replace(cfg.parallel)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model_cfg = job.model_config(**(recompute if cfg.train.recompute else {}))
    if not cfg.data.names_data():
        cfg.data.take_source(job.data)
    check_this_gpu(cfg, model_cfg, parallel_state.get_data_parallel_world_size())
    with open(cfg.ranking_file) as f:
        depth_ranking = json.load(f)["depth_ranking"]

    def build_student(config, pre_process, post_process):
        model = build_elastic_model(config, pre_process=pre_process, post_process=post_process)
        load_model_weights(src, model)
        return model

    comps = build_training_components(model_cfg, cfg.train, build_model=build_student)
    # The frozen teacher is the whole parent, never sliced: TransformerEngine's spec where it runs (same checkpoint
    # keys), else the plain local spec (kernels.teacher_kernels decides, as it does for `plan`).
    # (Local: the elastic model at its full choice, which also scores the pruned sub-models in the summary.)
    teacher_backend = teacher_kernels(Machine.here(), model_cfg.sequence_parallel).backend
    teacher = _build_parent(model_cfg, src, teacher_backend)
    pair = DistillationPair(
        comps.model,
        teacher,
        model_cfg,
        parallel_state.is_pipeline_first_stage(),
        parallel_state.is_pipeline_last_stage(),
    )
    model_cfg.finalize_model_grads_func = lambda _models, *a, **k: finalize_model_grads([comps.model], *a, **k)
    model_cfg.no_sync_func = comps.model.no_sync

    space = ElasticSpace.default(
        model_cfg, cfg.space.fractions, cfg.space.depth_fractions, depth_ranking, cfg.space.heterogeneous
    )
    smallest = space.smallest_arch(model_cfg)
    lowest = arch_parameters(model_cfg, smallest) / arch_parameters(model_cfg, ElasticArch.full(model_cfg))
    if min(cfg.budgets) < lowest - 1e-9:
        raise ConfigError(
            f"budgets: {min(cfg.budgets)} is below the smallest sub-model the space allows ({lowest:.3f} "
            f"of the parent: every axis at its smallest choice); add smaller space.fractions or "
            f"space.depth_fractions, or raise the budget"
        )
    same_layout = teacher_backend == "local"  # TE fuses the norms into the linears: other parameters, same keys
    for (name, p_student), p_teacher in zip(comps.model.module.named_parameters(), teacher.parameters()):
        if not same_layout:
            break
        if p_student.dtype != p_teacher.dtype or p_student.shape != p_teacher.shape:
            raise ConfigError(
                f"teacher and student differ at {name}: {p_teacher.dtype}{tuple(p_teacher.shape)} vs "
                f"{p_student.dtype}{tuple(p_student.shape)}"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # identical router on every rank
        router = Router(
            model_cfg, space, cfg.budgets, cfg.router.hidden, _fixed_arch(cfg), cost=cfg.cost(model_cfg)
        ).to(_device())
    router_opt = torch.optim.Adam(router.parameters(), lr=cfg.router.lr)
    warm = cfg.router.warmup_iters
    router_sched = torch.optim.lr_scheduler.LambdaLR(router_opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    full = arch_parameters(model_cfg, ElasticArch.full(model_cfg))
    return ElasticComponents(
        cfg,
        model_cfg,
        comps.model,
        teacher,
        pair,
        comps.optimizer,
        comps.scheduler,
        router,
        router_opt,
        router_sched,
        full,
    )


def _fixed_arch(cfg: ElasticJobConfig) -> Optional[ElasticArch]:
    """The sub-model a ``fixed_arch`` run trains (None: the router searches)."""
    if not cfg.fixed_arch:
        return None
    with open(cfg.fixed_arch) as f:
        return ElasticArch.from_json(f.read())


def make_forward_step(c: ElasticComponents, step: int, tau: float, scale: float):
    """Megatron ``forward_step_func`` for one optimizer step: items are (micro-batch, budget index)."""
    cfg = c.config
    tp_group = (
        parallel_state.get_tensor_model_parallel_group() if c.model_config.tensor_model_parallel_size > 1 else None
    )

    def forward_step(data_iterator, model):
        item = next(data_iterator)
        bi, budget = item["budget_index"], item["budget"]
        batch = batch_to_device(item["batch"])
        drawn = nested_draws(c, step, tau, scale, only=budget)[budget]
        set_arch(c.student, drawn.arch, drawn.gates)
        tokens = batch["tokens"]
        out = model(tokens, batch["position_ids"], None, cache_key=item["key"])

        def loss_func(output):
            student_logits, teacher_logits = output
            kd = kd_loss(student_logits, teacher_logits, cfg.distill.temperature, batch["loss_mask"], tp_group)
            # Reports are copies: Megatron divides the returned loss by the micro-batch count in place.
            loss, report = kd, {"kd": kd.detach().clone()}
            if cfg.distill.lm_loss_weight > 0:
                ce = vocab_parallel_cross_entropy(student_logits.float(), batch["labels"])
                lm = masked_mean(ce, batch["loss_mask"])
                loss = loss + cfg.distill.lm_loss_weight * lm
                report["lm"] = lm.detach().clone()
            report["budget_index"] = torch.tensor(bi)
            return loss, report

        return out, loss_func

    return forward_step


class StageData:
    """The training stream of one curriculum stage (its own sequence length), resumable by sample count."""

    def __init__(self, cfg: ElasticJobConfig, source, stage_index: int, consumed: int, vocab_size: int):
        stage, steps = cfg.curriculum.stages[stage_index], cfg.stage_steps()[stage_index]
        self.seq_length = stage.seq_length
        train, _ = build_gpt_datasets(
            source,
            stage.seq_length,
            steps * stage.global_batch_size,
            1,
            seed=cfg.train.seed + stage_index,
            model_vocab_size=vocab_size,
        )
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        self.iterator = iter(make_loader(train, consumed, cfg.train.micro_batch_size, rank, dp, cfg.data.num_workers))


def step_items(cfg: ElasticJobConfig, data: StageData, step: int, tokens: int, num_micro: int) -> List[dict]:
    """The step's Megatron micro-batches on this rank: (data micro-batch, budget, its index in the per-budget
    report - ``len(budgets)`` for the step's untrained budget between the trained ones -, teacher cache key)."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    n_b = len(cfg.budgets)
    items = []
    if cfg.distill.budgets_per_step == "all":
        for j in range(num_micro):
            batch = next(data.iterator)
            items += [
                {"batch": batch, "budget": b, "budget_index": bi, "key": (step, j)} for bi, b in enumerate(cfg.budgets)
            ]
    else:
        # One draw per global micro-batch in data order: the sampler gives rank r its j-th micro-batch from
        # global position j*dp + r, so every data-parallel layout trains the same (sample, budget) pairs.
        drawn = cfg.curriculum.sample_budgets(tokens, num_micro * dp, step)
        for j in range(num_micro):
            b = drawn[j * dp + rank]
            items.append(
                {
                    "batch": next(data.iterator),
                    "budget": b,
                    "budget_index": cfg.budgets.index(b) if b in cfg.budgets else n_b,
                    "key": (step, j),
                }
            )
    return items


def nested_draws(c: "ElasticComponents", step: int, tau: float, scale: float, only: Optional[float] = None):
    """The step's nested Gumbel draws of every budget (``Router.sample_nested``) and of the step's untrained budget
    between them (``Curriculum.between_budget``, when trained): the same on every rank and micro-batch, each
    smaller budget within the next larger one's draw."""
    seed = c.config.train.seed
    return c.router.sample_nested(
        tau,
        scale,
        lambda bi: noise_generator(seed, step, bi),
        only=only,
        between=c.config.curriculum.between_budget(step),
    )


def nesting_record(draws) -> Dict[str, float]:
    """Per step, from its ``nested_draws``: whether the sampled set is nested (checked on the architectures,
    ``ElasticArch.is_within``) and whether the router's unmasked choices of the same noise would have been."""
    order = sorted(draws, reverse=True)
    pairs = list(zip(order, order[1:]))
    return {
        "sampled_nested": float(all(draws[s].arch.is_within(draws[b].arch) for b, s in pairs)),
        "free_nested": float(all(draws[s].free_arch.is_within(draws[b].free_arch) for b, s in pairs)),
    }


def router_resource_step(c: ElasticComponents, draws) -> Dict[float, float]:
    """Add the resource loss of every budget (``draws``: the step's ``nested_draws``, the same Gumbel noise as its
    KD samples) to the synced router gradients and step the router. Returns each budget's expected parameter
    fraction."""
    cfg = c.config
    losses, fractions = [], {}
    for b, d in draws.items():
        probs = d.probs
        if probs is None:  # the full budget: the parent itself
            fractions[b] = 1.0
            continue
        expected = c.router.expected_cost(probs)
        losses.append(resource_loss(expected, b * c.router.full_cost))
        fractions[b] = float(expected.detach()) / c.router.full_cost
    if losses:
        (cfg.router.loss_weight * torch.stack(losses).mean()).backward()
    c.router_optimizer.step()
    c.router_scheduler.step()
    c.router_optimizer.zero_grad(set_to_none=True)
    return fractions


def _nonfinite_anywhere(kd: Optional[List[Optional[float]]], student, router) -> bool:
    """True on every rank when any rank saw a non-finite KD loss, student gradient or router gradient."""
    bad = kd is not None and any(v is not None and not math.isfinite(v) for v in kd)
    if not bad:
        for p in student.module.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None and not torch.isfinite(g).all():
                bad = True
                break
    if not bad:
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in router.parameters())
    return any_rank(bad)[0]


def _per_budget_means(losses: list, key: str, n_budgets: int) -> Optional[List[Optional[float]]]:
    """Mean of ``key`` per budget over this step's micro-batches, summed over data-parallel ranks (last PP
    stage only; None elsewhere). Entries are None for budgets that got no micro-batch."""
    if not parallel_state.is_pipeline_last_stage() or not losses or key not in losses[0]:
        return None
    sums = torch.zeros(n_budgets, dtype=torch.float64)
    counts = torch.zeros(n_budgets, dtype=torch.float64)
    for d in losses:
        sums[int(d["budget_index"])] += float(d[key])
        counts[int(d["budget_index"])] += 1
    if parallel_state.get_data_parallel_world_size() > 1:
        both = torch.stack([sums, counts])
        dist.all_reduce(both, group=parallel_state.get_data_parallel_group())
        sums, counts = both
    return [float(s / n) if n else None for s, n in zip(sums, counts)]


def evaluate_budgets(
    c: ElasticComponents, model, archs: Dict[float, ElasticArch], valid_ds, num_batches: int, global_batch: int
) -> Dict[float, float]:
    """Validation LM loss (nats/token) of ``model`` (student or teacher) at every budget's architecture."""
    t = c.config.train
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num_micro = global_batch // (t.micro_batch_size * dp)
    out = {}
    was_teacher = model is c.teacher
    for b, arch in archs.items():
        set_arch(model, arch)
        it = iter(make_loader(valid_ds, 0, t.micro_batch_size, rank, dp))
        out[b] = evaluate(model, it, num_batches, num_micro, c.config.eval_seq_length, t.micro_batch_size)
        set_arch(model, None)
    if was_teacher:
        c.teacher.eval()
    return out


def sampled_share(c: ElasticComponents, archs: Dict[float, ElasticArch], draws: int = 16) -> Dict[float, float]:
    """Per budget: the share of ``draws`` nested draws at the end of the run's temperature and logit-scale schedule
    (noise of the steps after the last) whose architecture is exactly ``archs``' (the extracted ones)."""
    cfg = c.config
    tau, scale = (
        cfg.curriculum.tau_at(cfg.curriculum.total_tokens),
        cfg.curriculum.logit_scale_at(cfg.curriculum.total_tokens),
    )
    hits = defaultdict(int)
    with torch.no_grad():
        for k in range(draws):
            for b, d in nested_draws(c, cfg.train.train_iters + 1 + k, tau, scale).items():
                hits[b] += int(b in archs and d.arch == archs[b])
    return {b: hits[b] / draws for b in cfg.budgets}


def _arch_summary(c: ElasticComponents, archs: Dict[float, ElasticArch]) -> Dict[str, float]:
    """Each budget's chosen architecture as a fraction of the parent's cost of the router's kind."""
    return {f"{b:g}": c.router.cost.of(c.model_config, a) / c.router.full_cost for b, a in archs.items()}


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
        run.announce()
        if run.state["iteration"] == 0:
            run.evaluate(0)
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
                last_valid = run.evaluate(step)
            limit.step_done(time.time() - step_t0)
            signalled, out_of_time = any_rank(signals.received, limit.near())
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
    return run.summary(t0, last_valid)


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

    def announce(self) -> None:
        """Print the run's shape (parameters, router size, budgets, stages) and a note if data repeats."""
        if not self.is_logger:
            return
        c, cur = self.c, self.cfg.curriculum
        data_tokens = self.source.train_tokens()
        if data_tokens and cur.total_tokens > data_tokens:
            print(
                f"note: the curriculum reads {cur.total_tokens:,} tokens, {cur.total_tokens / data_tokens:.1f}x the "
                f"training split ({data_tokens:,}): documents repeat (Megatron's GPTDataset epochs)"
            )
        if c.router.fixed_arch is not None:
            n = arch_parameters(c.model_config, c.router.fixed_arch)
            print(
                f"fixed architecture {self.cfg.fixed_arch}: {n:,} parameters ({n / c.full_parameters:.3f} of the "
                f"parent), trained as budget {min(self.cfg.budgets):g}; the router is not used"
            )
        rp = sum(p.numel() for p in c.router.parameters())
        stages = ", ".join(
            f"{s.name}: {n} steps x {s.global_batch_size} x {s.seq_length}"
            for s, n in zip(cur.stages, self.cfg.stage_steps())
        )
        kind = ""
        if c.router.cost.kind != "params":
            from megatron_elastic.model.budget import format_cost, kind_text

            kind = f" of {kind_text(c.router.cost)} (the parent: {format_cost(c.router.full_cost, c.router.cost)})"
        print(
            f"parent {c.full_parameters:,} parameters; router {rp:,} ({100 * rp / c.full_parameters:.2f}%); "
            f"budgets {self.cfg.budgets}{kind}; stages {stages}"
        )

    def evaluate(self, it: int) -> Dict[float, float]:
        """Validation loss of every budget's current choice; logged with the chosen sizes."""
        c = self.c
        archs = c.router.choose_all()
        losses = evaluate_budgets(c, c.student, archs, self.valid_ds, self.cfg.train.eval_iters, self.eval_gbs)
        rec = {"iteration": it, "tokens": self.state["tokens"], **(self.bits.record() if it == 0 else {})}
        rec.update({f"valid_loss/{b:g}": v for b, v in losses.items()})
        rec.update({f"valid_bpb/{b:g}": self.bits(v) for b, v in losses.items()})
        rec.update({f"chosen_fraction/{b}": v for b, v in _arch_summary(c, archs).items()})
        self.metrics.log(rec)
        if self.is_logger:
            cells = "  ".join(
                f"{b:g}: {self.bits(v):.3f} bpb @ {arch_parameters(c.model_config, archs[b]) / c.full_parameters:.3f}"
                for b, v in losses.items()
            )
            tqdm.write(f"step {it}: valid {cells}")
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
            forward_step_func=make_forward_step(c, step, tau, scale),
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
        kd = _per_budget_means(losses, "kd", len(cfg.budgets) + 1)  # the last: the untrained budget between
        sync_router_grads(c.router, c.model_config.sequence_parallel)
        bad = _nonfinite_anywhere(kd, c.student, c.router)
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
        rec.update({f"chosen_fraction/{b}": v for b, v in _arch_summary(c, c.router.choose_all()).items()})
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

    def summary(self, t0: float, last_valid: Optional[Dict[float, float]]) -> dict:
        """Every budget's final choice, size and validation loss before (sliced teacher) and after training."""
        c, cfg, t = self.c, self.cfg, self.cfg.train
        evaluate = lambda model, archs: evaluate_budgets(c, model, archs, self.valid_ds, t.eval_iters, self.eval_gbs)
        archs = c.router.choose_all()
        free = {b: c.router.choose(b) for b in cfg.budgets}
        sampled = sampled_share(c, archs)
        # The pruned, untrained sub-models: slices of the parent (the local teacher is elastic; a TE teacher is not,
        # so an elastic copy of the parent is built for this once).
        parent = c.teacher if hasattr(c.teacher.decoder, "set_elastic") else None  # the teacher is never DDP-wrapped
        parent = parent or _build_parent(c.model_config, latest_checkpoint(cfg.sorted_checkpoint)).eval()
        before = evaluate(parent, archs)
        parent_loss = evaluate(parent, {1.0: ElasticArch.full(c.model_config)})[1.0]
        after = last_valid if last_valid is not None else evaluate(c.student, archs)
        shape = report_shape([c.router.cost], max(s.seq_length for s in cfg.curriculum.stages))
        summary = {
            "steps": t.train_iters,
            "tokens": self.state["tokens"],
            "wall_time_s": time.time() - t0,
            "parent_parameters": c.full_parameters,
            "parent_valid_loss": parent_loss,
            "eval_tokens": t.eval_iters * self.eval_gbs * cfg.eval_seq_length,
            **self.bits.record(),
            # True when the router's free argmax choices were already nested (choose_all did not have to clip).
            "nested_without_clipping": all(free[b] == archs[b] for b in cfg.budgets),
            # Share of nested draws at the final temperature that are exactly the extracted architectures (1.0: the
            # extracted sub-models are what training samples).
            "extracted_sampled": float(np.mean(list(sampled.values()))),
            "budget_kind": kind_text(c.router.cost),
            "budgets": {
                f"{b:g}": {
                    "parameters": arch_parameters(c.model_config, archs[b]),
                    "fraction": arch_parameters(c.model_config, archs[b]) / c.full_parameters,
                    "cost_fraction": c.router.cost.of(c.model_config, archs[b]) / c.router.full_cost,
                    "costs": every_cost(c.model_config, archs[b], *shape),
                    "valid_loss_before": before[b],
                    "valid_loss_after": after[b],
                    "extracted_sampled": sampled[b],
                    "arch": archs[b].to_dict(),
                }
                for b in cfg.budgets
            },
            "checkpoint": latest_checkpoint(self.ckpt_dir),
        }
        if self.is_logger:
            with open(os.path.join(self.ckpt_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.metrics.close()
        return summary


def results_table(summary: dict) -> str:
    """Per budget: parameters, validation loss (bits/byte) of the same sub-model before and after."""
    bits = BitsPerByte(summary["bytes_per_token"], summary["tokenizer"])
    lines = [
        f"validation on {summary['eval_tokens']:,} tokens (tokenizer {bits.tokenizer}, {bits.bytes_per_token:.2f} "
        f"bytes/token); the parent (teacher): {bits(summary['parent_valid_loss']):.3f} bits/byte",
        f"{'budget':>6} {'params':>10} {'fraction':>8} {'before bpb':>10} {'after bpb':>9}",
    ]
    for b, r in summary["budgets"].items():
        lines.append(
            f"{b:>6} {r['parameters']:>10,} {r['fraction']:>8.3f} {bits(r['valid_loss_before']):>10.3f} "
            f"{bits(r['valid_loss_after']):>9.3f}"
        )
    return "\n".join(lines)
