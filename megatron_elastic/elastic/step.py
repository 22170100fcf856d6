"""One step of elastic distillation (``megatron-elastic train``; the loop around it: ``run.py``).

Per optimizer step:

1. The curriculum gives the stage (sequence length, global batch, budget weights) from the tokens consumed so
   far, and the router temperature/logit scale. Each micro-batch gets a budget (``sample``: drawn with the
   stage's weights, one per micro-batch of the global batch; ``all``: every budget on every micro-batch). With
   ``curriculum.between_share``, that share of the micro-batches trains the step's untrained budget between the
   trained ones (``Curriculum.between_budget``), drawn nested between its trained neighbours' draws.
2. Megatron's forward/backward schedule runs the (student, teacher) pair: the frozen parent, or in a stage with a
   trainable teacher (``distill.teacher``, Eq. 15) the student's own full budget, trained with alpha x CE. In each
   micro-batch the router samples its budget's architecture with Gumbel noise fixed per (step, budget) (so every
   micro-batch, TP rank and PP stage draws the same one), nested inside the draw of every larger budget of the step
   (``Router.sample_nested``), the student runs that sub-model with the router's gates (straight-through, or the
   chosen probabilities with ``router.mask_mode: scaled``, the paper's Mode 1), and the
   loss is KD(teacher || student) (+ optional LM loss). A ``fixed_arch`` run trains one given sub-model instead.
3. Router gradients are summed over pipeline stages (each stage gates its own layers) and averaged over
   data-parallel replicas; then the resource loss (every budget's expected cost - parameters, serving memory or
   FLOPs per token, the job's ``budget_kind`` - vs its target) adds its gradient, and the router's Adam steps.
   The student steps with Megatron's optimizer.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_elastic.data.loader import build_gpt_datasets, make_loader
from megatron_elastic.elastic.components import ElasticComponents
from megatron_elastic.elastic.config import MASK_MODES, MAX_BUDGETS, ElasticJobConfig
from megatron_elastic.elastic.distill import kd_loss
from megatron_elastic.elastic.layers.model import set_arch
from megatron_elastic.elastic.resource_loss import expected_cost, resource_loss
from megatron_elastic.training.lm import batch_to_device, masked_mean
from megatron_elastic.training.preemption import any_rank

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


def make_forward_step(c: ElasticComponents, step: int, tau: float, scale: float, trainable_teacher: bool = False):
    """Megatron ``forward_step_func`` for one optimizer step: items are (micro-batch, budget index). With
    ``trainable_teacher`` (Eq. 15) the teacher is the student's full budget, trained by ``teacher_ce_weight`` x CE."""
    cfg = c.config
    c.pair.trainable_teacher = trainable_teacher
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
        choice = {"choice": (drawn.arch, drawn.gates)} if trainable_teacher else {}
        out = model(tokens, batch["position_ids"], None, cache_key=item["key"], **choice)

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
            if trainable_teacher:  # Eq. 15: alpha x CE of the full budget, the teacher the sub-models distil from
                ce = masked_mean(
                    vocab_parallel_cross_entropy(teacher_logits.float(), batch["labels"]), batch["loss_mask"]
                )
                loss = loss + cfg.distill.teacher_ce_weight * ce
                report["teacher_ce"] = ce.detach().clone()
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
        hard=MASK_MODES[c.config.router.mask_mode],
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
        expected = expected_cost(c.router, probs)
        losses.append(resource_loss(expected, b * c.router.full_cost))
        fractions[b] = float(expected.detach()) / c.router.full_cost
    if losses:
        (cfg.router.loss_weight * torch.stack(losses).mean()).backward()
    c.router_optimizer.step()
    c.router_scheduler.step()
    c.router_optimizer.zero_grad(set_to_none=True)
    return fractions


def nonfinite_anywhere(kd: Optional[List[Optional[float]]], student, router) -> bool:
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


def per_budget_means(losses: list, key: str, n_budgets: int) -> Optional[List[Optional[float]]]:
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
