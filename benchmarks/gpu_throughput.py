"""Throughput, MFU and peak memory on one GPU: pretraining of a ~1B hybrid and elastic training steps (frozen
teacher + 3 budgets) at 8K tokens, with the kernels this machine has; peak memory against `plan`'s estimate.

    python benchmarks/gpu_throughput.py [--seq 8192] [--hidden 2048] [--pattern 'M-M-M*-M-M-M*-M-M-M*-M-M-M*-']
                                        [--steps 6] [--peak-tflops 989] [--json out.json]

Needs CUDA (exits 2 with the reason otherwise); ``--cpu-smoke`` runs the same code on the CPU at toy sizes to
check it, with meaningless numbers. Reports tokens/s, MFU (training FLOPs = 3 x the forward FLOPs of
``elastic.cost.arch_flops_per_token``; for the elastic step the teacher's forward plus 3x each budget's, weighted as
sampled), ``torch.cuda.max_memory_allocated()`` and ``elastic.memory.memory_per_gpu`` for the same layout.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plan_memory_check import PARENT, _write_sorted_parent  # noqa: E402

ELASTIC = """
parent: {parent}
budgets: [1.0, 0.75, 0.5]
router: {{hidden: 64, warmup_iters: 1}}
curriculum:
  stages: [{{name: s, tokens: {tokens}, seq_length: {seq}, global_batch_size: {gbs}, budget_weights: [1, 1, 1]}}]
train: {{micro_batch_size: 1, lr: 0.0001, min_lr: 0.00001, lr_warmup_iters: 0, log_interval: 1, eval_interval: 1000,
        eval_iters: 1, memory_check: false}}
checkpoint: {{dir: {ckpt}, save_interval: 1000}}
"""


def _peak_bytes(device: str) -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) if device == "cuda" else float("nan")


def _pretrain_throughput(config, seq: int, steps: int, device: str) -> dict:
    """Optimizer steps of the plain model (Megatron DDP + Adam) on random tokens: tokens/s after one warm-up."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_elastic.store.job_config import TrainConfig
    from megatron_elastic.training.lm import lm_forward_step
    from megatron_elastic.training.setup import build_training_components

    comps = build_training_components(config, TrainConfig(train_iters=steps + 1, lr_warmup_iters=0))
    fb = get_forward_backward_func()
    batch = {
        "tokens": torch.randint(0, config.vocab_size, (1, seq), device=device),
        "position_ids": torch.arange(seq, device=device)[None],
        "loss_mask": torch.ones(1, seq, device=device),
    }
    batch["labels"] = batch["tokens"].roll(-1, 1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        comps.model.zero_grad_buffer()
        comps.optimizer.zero_grad()
        fb(
            forward_step_func=lm_forward_step,
            data_iterator=iter([batch]),
            model=[comps.model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=False,
        )
        comps.optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += (time.perf_counter() - t0) if i else 0.0
    return {"tokens_per_s": steps * seq / seconds, "peak_bytes": _peak_bytes(device)}


def _elastic_throughput(work: str, data: str, seq: int, steps: int, device: str):
    """`train_elastic` steps (teacher + a sampled budget per micro-batch, 3 micro-batches a step): tokens/s from
    its metrics (after the first step) and the peak allocated memory; and the job config it ran."""
    import torch

    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.elastic.run import train_elastic

    ckpt = os.path.join(work, "elastic")
    text = ELASTIC.format(parent=os.path.join(work, "imp"), tokens=steps * 3 * seq, seq=seq, gbs=3, ckpt=ckpt)
    cfg = load_elastic_config(text=text.replace("DATA", data), overrides=[f"data.path={data}"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_elastic(cfg, progress=False)
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "tokens_per_s" in r and r.get("iteration", 0) > 1]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in recs) / len(recs), "peak_bytes": _peak_bytes(device)}, cfg


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size; FFN 4x, 64-dim heads (default: %(default)s)")
    p.add_argument("--pattern", default="M-M-M*-" * 4, help="hybrid pattern (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU at toy sizes (checks the code only)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    import torch

    if args.cpu_smoke:
        device, args.seq, args.hidden, args.pattern, args.steps = "cpu", 128, 256, "M-*-", 2
    elif not torch.cuda.is_available():
        print(
            "gpu_throughput: needs a CUDA device (none here); --cpu-smoke checks the code on the CPU", file=sys.stderr
        )
        return 2
    else:
        device = "cuda"

    from megatron_elastic.data.corpus import iter_stdlib_documents
    from megatron_elastic.data.indexed import write_split_datasets
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.cost import arch_flops_per_token, arch_parameters, scaled_arch
    from megatron_elastic.elastic.memory import GIB, memory_per_gpu
    from megatron_elastic.model.kernels import Machine, student_kernels
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.job_config import load_pretrain_config

    work = tempfile.mkdtemp()
    data = os.path.join(work, "data")
    write_split_datasets(data, iter_stdlib_documents(max_bytes=2_000_000), "byte", valid_every=5, progress=False)
    h = args.hidden
    text = PARENT.format(pattern=args.pattern, h=h, f=4 * h, a=h // 64, mh=h // 32, seq=args.seq).replace("DATA", data)
    if device == "cuda":
        text = text.replace("mamba_chunk_size: 64}", "mamba_chunk_size: 128, bf16: true, params_dtype: bfloat16}")
    job = load_pretrain_config(text=text)
    initialize_parallel(1, 1, seed=1)
    config = job.model_config()
    full = ElasticArch.full(config)
    fwd = arch_flops_per_token(config, full, args.seq)
    print(f"parent: {arch_parameters(config, full):,} parameters, {args.pattern}, seq {args.seq}; {Machine.here()}")

    pre = _pretrain_throughput(config, args.seq, args.steps, device)
    pre["mfu"] = 3 * fwd * pre["tokens_per_s"] / (args.peak_tflops * 1e12)
    _write_sorted_parent(job, config, os.path.join(work, "imp"))
    el, cfg = _elastic_throughput(work, data, args.seq, args.steps, device)
    budgets_fwd = [
        arch_flops_per_token(config, scaled_arch(config, b) if b < 1 else full, args.seq) for b in cfg.budgets
    ]
    el["mfu"] = (fwd + 3 * sum(budgets_fwd) / len(budgets_fwd)) * el["tokens_per_s"] / (args.peak_tflops * 1e12)
    path = student_kernels(Machine.here(), False)
    est = memory_per_gpu(config, 1, 1, 1, args.seq, 1, 3, False, False, path, 0.0)
    el["plan_estimate_bytes"] = sum(est.values())
    out = {"device": device, "parameters": arch_parameters(config, full), "pretrain": pre, "elastic_step": el}
    for name, r in (("pretrain", pre), ("elastic step", el)):
        line = f"{name:>13}: {r['tokens_per_s']:>10,.0f} tokens/s  MFU {r['mfu']:6.1%}"
        line += f"  peak {r['peak_bytes'] / GIB:6.2f} GiB"
        print(line + (f"  (plan: {r['plan_estimate_bytes'] / GIB:.2f} GiB)" if "plan_estimate_bytes" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
