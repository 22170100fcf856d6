"""What an elastic run reports: its shape at the start, every budget's validation loss during training, and the
summary at the end (each budget's final choice, size, and validation loss before and after training)."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Dict, Optional

import numpy as np
import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_elastic.data.loader import make_loader
from megatron_elastic.data.tokenizer import BitsPerByte
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.budget import every_cost, format_cost, kind_text, report_shape
from megatron_elastic.elastic.choose import choose, choose_all
from megatron_elastic.elastic.components import ElasticComponents, build_parent
from megatron_elastic.elastic.cost import arch_parameters
from megatron_elastic.elastic.layers.model import set_arch
from megatron_elastic.elastic.step import nested_draws
from megatron_elastic.store.checkpoint import (
    latest_checkpoint,
)
from megatron_elastic.training.pretrain import evaluate


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


def arch_summary(c: ElasticComponents, archs: Dict[float, ElasticArch]) -> Dict[str, float]:
    """Each budget's chosen architecture as a fraction of the parent's cost of the router's kind."""
    return {f"{b:g}": c.router.cost.of(c.model_config, a) / c.router.full_cost for b, a in archs.items()}


def announce(run) -> None:
    """Print the run's shape (parameters, router size, budgets, stages) and a note if data repeats."""
    if not run.is_logger:
        return
    c, cur = run.c, run.cfg.curriculum
    data_tokens = run.source.train_tokens()
    if data_tokens and cur.total_tokens > data_tokens:
        print(
            f"note: the curriculum reads {cur.total_tokens:,} tokens, {cur.total_tokens / data_tokens:.1f}x the "
            f"training split ({data_tokens:,}): documents repeat (Megatron's GPTDataset epochs)"
        )
    if c.router.fixed_arch is not None:
        n = arch_parameters(c.model_config, c.router.fixed_arch)
        print(
            f"fixed architecture {run.cfg.fixed_arch}: {n:,} parameters ({n / c.full_parameters:.3f} of the "
            f"parent), trained as budget {min(run.cfg.budgets):g}; the router is not used"
        )
    rp = sum(p.numel() for p in c.router.parameters())
    stages = ", ".join(
        f"{s.name}: {n} steps x {s.global_batch_size} x {s.seq_length}"
        for s, n in zip(cur.stages, run.cfg.stage_steps())
    )
    kind = ""
    if c.router.cost.kind != "params":
        kind = f" of {kind_text(c.router.cost)} (the parent: {format_cost(c.router.full_cost, c.router.cost)})"
    print(
        f"parent {c.full_parameters:,} parameters; router {rp:,} ({100 * rp / c.full_parameters:.2f}%); "
        f"budgets {run.cfg.budgets}{kind}; stages {stages}"
    )


def evaluate_run(run, it: int) -> Dict[float, float]:
    """Validation loss of every budget's current choice; logged with the chosen sizes."""
    c = run.c
    archs = choose_all(c.router)
    losses = evaluate_budgets(c, c.student, archs, run.valid_ds, run.cfg.train.eval_iters, run.eval_gbs)
    rec = {"iteration": it, "tokens": run.state["tokens"], **(run.bits.record() if it == 0 else {})}
    rec.update({f"valid_loss/{b:g}": v for b, v in losses.items()})
    rec.update({f"valid_bpb/{b:g}": run.bits(v) for b, v in losses.items()})
    rec.update({f"chosen_fraction/{b}": v for b, v in arch_summary(c, archs).items()})
    run.metrics.log(rec)
    if run.is_logger:
        cells = "  ".join(
            f"{b:g}: {run.bits(v):.3f} bpb @ {arch_parameters(c.model_config, archs[b]) / c.full_parameters:.3f}"
            for b, v in losses.items()
        )
        tqdm.write(f"step {it}: valid {cells}")
    return losses


def summarize(run, t0: float, last_valid: Optional[Dict[float, float]]) -> dict:
    """Every budget's final choice, size and validation loss before (sliced teacher) and after training."""
    c, cfg, t = run.c, run.cfg, run.cfg.train
    evaluate = lambda model, archs: evaluate_budgets(c, model, archs, run.valid_ds, t.eval_iters, run.eval_gbs)
    archs = choose_all(c.router)
    free = {b: choose(c.router, b) for b in cfg.budgets}
    sampled = sampled_share(c, archs)
    # The pruned, untrained sub-models: slices of the parent (the local teacher is elastic; a TE teacher is not,
    # so an elastic copy of the parent is built for this once).
    parent = c.teacher if hasattr(c.teacher.decoder, "set_elastic") else None  # the teacher is never DDP-wrapped
    parent = parent or build_parent(c.model_config, latest_checkpoint(cfg.sorted_checkpoint)).eval()
    before = evaluate(parent, archs)
    parent_loss = evaluate(parent, {1.0: ElasticArch.full(c.model_config)})[1.0]
    after = last_valid if last_valid is not None else evaluate(c.student, archs)
    shape = report_shape([c.router.cost], max(s.seq_length for s in cfg.curriculum.stages))
    summary = {
        "steps": t.train_iters,
        "tokens": run.state["tokens"],
        "wall_time_s": time.time() - t0,
        "parent_parameters": c.full_parameters,
        "parent_valid_loss": parent_loss,
        "eval_tokens": t.eval_iters * run.eval_gbs * cfg.eval_seq_length,
        **run.bits.record(),
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
        "checkpoint": latest_checkpoint(run.ckpt_dir),
    }
    if run.is_logger:
        with open(os.path.join(run.ckpt_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    run.metrics.close()
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
