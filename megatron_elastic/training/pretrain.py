"""Pretraining the parent: Megatron's forward/backward schedules, DDP and optimizer, on CPU or GPU."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_elastic.data.loader import build_gpt_datasets, eval_bits_per_byte, make_loader
from megatron_elastic.errors import ConfigError, InputNotFoundError
from megatron_elastic.model.builder import parameter_count
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_elastic.store.job_config import PretrainConfig
from megatron_elastic.training.lm import lm_forward_step
from megatron_elastic.training.metrics import MetricsLog
from megatron_elastic.training.setup import build_training_components


def unigram_entropy_nats(source, max_tokens_per_prefix: int = 1 << 24) -> float:
    """Entropy (nats/token) of the training data's unigram distribution (the blend's prefixes mixed by their
    weights, each counted on its first ``max_tokens_per_prefix`` tokens): the loss of the best model that ignores
    context. A trained LM must end well below it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = source.train[0], source.train[1]
    mix = np.zeros(1, dtype=np.float64)
    for i, prefix in enumerate(prefixes):
        ds = IndexedDataset(prefix, mmap=True)
        tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")[:max_tokens_per_prefix]
        counts = np.bincount(tokens).astype(np.float64)
        p = counts / max(counts.sum(), 1)
        w = weights[i] / sum(weights) if weights else len(tokens)
        if len(p) > len(mix):
            mix = np.pad(mix, (0, len(p) - len(mix)))
        mix[: len(p)] += w * p
    p = mix[mix > 0] / mix.sum()
    return float(-(p * np.log(p)).sum())


def _mean_reported(losses_reduced, key: str = "lm loss") -> Optional[float]:
    """Average a reported scalar over micro-batches (last PP stage) and data-parallel ranks; None elsewhere."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    val = torch.stack([d[key] for d in losses_reduced]).mean()
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(val, group=parallel_state.get_data_parallel_group())
        val /= parallel_state.get_data_parallel_world_size()
    return float(val)


def _broadcast_from_last_stage(value: Optional[float]) -> float:
    """Make a last-stage scalar known on every rank (for logging and checkpoints)."""
    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    t = torch.tensor([value if value is not None else 0.0])
    dist.broadcast(
        t,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return float(t)


def evaluate(
    model, loader_iter, num_batches: int, num_microbatches: int, seq_length: int, micro_batch_size: int
) -> float:
    """Mean validation loss (nats/token) over ``num_batches`` global batches."""
    fb = get_forward_backward_func()
    model.eval()
    values = []
    with torch.no_grad():
        for _ in range(num_batches):
            losses = fb(
                forward_step_func=lm_forward_step,
                data_iterator=loader_iter,
                model=[model],
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
            values.append(_mean_reported(losses))
    model.train()
    if values[0] is None:
        return _broadcast_from_last_stage(None)
    return _broadcast_from_last_stage(float(np.mean(values)))


def _resume(ckpt_dir: str, comps, is_logger: bool) -> dict:
    """The trainer state of the latest checkpoint in ``ckpt_dir``, with the model, optimizer and LR schedule
    restored from it."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise InputNotFoundError(
            f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); drop --resume to start fresh"
        )
    state = load_checkpoint(path, comps.unwrapped, comps.optimizer)
    comps.scheduler.load_state_dict(state["scheduler"])
    if is_logger:
        print(f"resumed from {path} at iteration {state['iteration']}")
    return state


def _data(cfg: PretrainConfig, vocab_size: int, consumed_samples: int):
    """(training micro-batch iterator from ``consumed_samples`` on, a function starting a validation pass, the
    bits/byte unit of that validation text) for this data-parallel rank."""
    t, seq = cfg.train, cfg.data.seq_length
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    train_samples = t.train_iters * t.global_batch_size
    valid_samples = (t.train_iters // t.eval_interval + 2) * t.eval_iters * t.global_batch_size
    train_ds, valid_ds = build_gpt_datasets(
        cfg.data.source(cfg.checkpoint.dir), seq, train_samples, valid_samples, seed=t.seed, model_vocab_size=vocab_size
    )
    train = make_loader(train_ds, consumed_samples, t.micro_batch_size, dp_rank, dp, cfg.data.num_workers)
    bits = eval_bits_per_byte(valid_ds, t.eval_iters * t.global_batch_size)
    return iter(train), lambda: iter(make_loader(valid_ds, 0, t.micro_batch_size, dp_rank, dp)), bits


def _train_iteration(comps, forward_backward, train_iter, num_micro: int, seq: int, micro_batch_size: int):
    """One optimizer step over ``num_micro`` micro-batches (Megatron's schedule); returns (mean loss, grad norm)."""
    comps.model.zero_grad_buffer()
    comps.optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=lm_forward_step,
        data_iterator=train_iter,
        model=[comps.model],
        num_microbatches=num_micro,
        seq_length=seq,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = comps.optimizer.step()
    comps.scheduler.step(increment=1)
    return _broadcast_from_last_stage(_mean_reported(losses)), grad_norm


def _window_record(it: int, losses: list, t0: float, tokens_per_iter: int, optimizer, grad_norm) -> dict:
    """The metrics record of the iterations since ``t0``: mean training loss, LR, grad norm, throughput."""
    return {
        "iteration": it,
        "train_loss": float(np.mean(losses)),
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": len(losses) * tokens_per_iter / max(time.time() - t0, 1e-9),
    }


def _save(cfg: PretrainConfig, comps, iteration: int, state: dict) -> None:
    trainer_state = {
        **{k: v for k, v in state.items() if k != "iteration"},
        "scheduler": comps.scheduler.state_dict(),
        "config": cfg.to_dict(),
    }
    save_checkpoint(
        cfg.checkpoint.dir,
        iteration,
        comps.unwrapped,
        comps.optimizer,
        trainer_state,
        keep_last=cfg.checkpoint.keep_last,
        optimizer_sharding=cfg.checkpoint.optimizer_sharding,
    )


def _write_summary(
    cfg: PretrainConfig, seconds: float, n_params: int, unigram: float, state, last_valid, is_logger, bits
):  # noqa: E501
    """The run's summary (also ``summary.json`` in the checkpoint directory, written by the logging rank)."""
    t = cfg.train
    summary = {
        "parameters": n_params,
        "train_iters": t.train_iters,
        "tokens": t.train_iters * t.global_batch_size * cfg.data.seq_length,
        "wall_time_s": seconds,
        **bits.record(),
        "unigram_bpb": bits(unigram),
        "initial_valid_bpb": bits(state.get("initial_valid_loss", float("nan"))),
        "final_valid_bpb": bits(last_valid) if last_valid is not None else None,
        "checkpoint": latest_checkpoint(cfg.checkpoint.dir),
    }
    if is_logger:
        with open(os.path.join(cfg.checkpoint.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train the parent described by ``cfg``. With ``resume``, continue from the latest checkpoint in
    ``cfg.checkpoint.dir``. Returns a summary (parameters, tokens, wall time, losses)."""
    t0 = time.time()
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    cfg.parallel.check()  # before the process groups take its timeout
    if cfg.checkpoint.async_save:
        raise ConfigError(
            "checkpoint.async_save: only `train` (elastic distillation) writes checkpoints asynchronously; "
            "pretraining saves synchronously: set it to false"
        )
    initialize_parallel(tp, pp, seed=cfg.train.seed, timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    world = dist.get_world_size()
    cfg.validate(world)
    model_cfg = cfg.model_config()
    t, seq = cfg.train, cfg.data.seq_length
    num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    is_logger = dist.get_rank() == world - 1  # last rank: last PP stage, knows the loss

    comps = build_training_components(model_cfg, t)
    model, optimizer = comps.model, comps.optimizer
    model_cfg.finalize_model_grads_func = finalize_model_grads
    model_cfg.no_sync_func = model.no_sync
    n_params = parameter_count(comps.unwrapped)
    ckpt_dir = cfg.checkpoint.dir
    state = (
        _resume(ckpt_dir, comps, is_logger) if resume else {"iteration": 0, "consumed_train_samples": 0, "history": []}
    )
    train_iter, valid_loader_start, bits = _data(cfg, model_cfg.vocab_size, state["consumed_train_samples"])

    unigram = unigram_entropy_nats(cfg.data.source(cfg.checkpoint.dir))
    fb = get_forward_backward_func()
    tokens_per_iter = t.global_batch_size * seq
    os.makedirs(ckpt_dir, exist_ok=True)
    log = MetricsLog(ckpt_dir, is_logger).log

    def run_eval():
        return evaluate(model, valid_loader_start(), t.eval_iters, num_micro, seq, t.micro_batch_size)

    start_iter = state["iteration"]
    if start_iter == 0:
        v0 = state["initial_valid_loss"] = run_eval()
        log({"iteration": 0, "valid_loss": v0, "valid_bpb": bits(v0), "unigram_bpb": bits(unigram), **bits.record()})
        if is_logger:
            print(
                f"parameters: {int(n_params):,}  tokens/iter: {tokens_per_iter:,}  tokenizer: {bits.tokenizer} "
                f"({bits.bytes_per_token:.2f} bytes/token)  unigram baseline: {bits(unigram):.3f} bits/byte  "
                f"initial valid: {bits(v0):.3f} bits/byte"
            )

    bar = tqdm(
        total=t.train_iters, initial=start_iter, desc="pretrain", unit="it", disable=not (progress and is_logger)
    )
    loss_window, window_t0 = [], time.time()
    last_valid = state.get("last_valid_loss")
    for it in range(start_iter + 1, t.train_iters + 1):
        loss, grad_norm = _train_iteration(comps, fb, train_iter, num_micro, seq, t.micro_batch_size)
        state["consumed_train_samples"] += t.global_batch_size
        loss_window.append(loss)
        if it % t.log_interval == 0 or it == t.train_iters:
            rec = _window_record(it, loss_window, window_t0, tokens_per_iter, optimizer, grad_norm)
            log(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            loss_window, window_t0 = [], time.time()
        if it % t.eval_interval == 0 or it == t.train_iters:
            last_valid = run_eval()
            state["last_valid_loss"] = last_valid
            log({"iteration": it, "valid_loss": last_valid, "valid_bpb": bits(last_valid)})
            if is_logger:
                bar.write(f"iteration {it}: valid loss {last_valid:.4f} nats/token = {bits(last_valid):.3f} bits/byte")
        if it % cfg.checkpoint.save_interval == 0 or it == t.train_iters:
            state["iteration"] = it
            _save(cfg, comps, it, state)
        bar.update(1)
    bar.close()
    return _write_summary(cfg, time.time() - t0, int(n_params), unigram, state, last_valid, is_logger, bits)
