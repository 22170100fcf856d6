"""Checkpoint save and load: ours (``store.checkpoint``: manifest hashed by every rank over its share, atomic rename,
RNG and trainer state, the safety checks on load; synchronous and ``async_save``) against plain Megatron
``dist_checkpointing.save`` / ``load`` of the same model and optimizer state, in the same processes.

    python benchmarks/checkpoint_io.py [--hidden 1024 --layers 6 --vocab 32768 --world 2 --repeats 3 --json out.json]
                                      [--optimizer-sharding dp_reshardable|fully_reshardable]

Runs ``--world`` CPU processes (gloo; data parallel with Megatron's distributed optimizer, so the optimizer state
is sharded over the ranks as on a cluster). Per operation: wall time (rank 0, between barriers; the median of
``--repeats`` after a warm-up round) and peak host memory above the level before it (each rank's RSS plus the unique
memory (USS) of the writer processes it forks, sampled every 10 ms; the largest rank). Async: the time ``save``
blocks the step, and until the checkpoint is complete. Goal (issue 32): ours <= 1.2x plain for save and load.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

JOB = """
model: {{hybrid_pattern: "{pattern}", vocab_size: {vocab}, hidden_size: {hidden}, ffn_hidden_size: {ffn},
        num_attention_heads: 16, num_query_groups: 4, kv_channels: 64, mamba_num_heads: {mheads}, mamba_head_dim: 64,
        mamba_num_groups: 4, mamba_state_dim: 64, mamba_chunk_size: 64}}
train: {{lr: 0.0001, min_lr: 0.00001, lr_warmup_iters: 0, train_iters: 10}}
"""


class PeakRSS:
    """Peak host memory (this process's RSS, its children's USS) above the level at entry, sampled in a thread."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self._rss()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):  # forked writers: only what is theirs alone (USS)
            try:
                total += child.memory_full_info().uss
            except Exception:  # noqa: BLE001 - a writer that just exited
                pass
        return total

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above(self):
        return self.peak - self.base


def _measure(fn, barrier):
    barrier()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        barrier()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.above


def _worker(rank, world, args, root, results_file):
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_elastic.compat import contain_checkpoint_writer_processes, prepare_optimizer_for_load
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.checkpoint import CheckpointWriter, _sharded_state, load_checkpoint
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.setup import build_training_components

    initialize_parallel(1, 1, seed=1)
    pattern = ("M-*-" * args.layers)[: args.layers * 2]
    job = load_pretrain_config(
        text=JOB.format(
            pattern=pattern,
            vocab=args.vocab,
            hidden=args.hidden,
            ffn=4 * args.hidden,
            mheads=2 * args.hidden // 64,
        )
    )
    job.train.distributed_optimizer = True  # as the elastic recipes: Adam's state sharded over the DP ranks
    sharding = args.optimizer_sharding
    comps = build_training_components(job.model_config(), job.train)
    model, optimizer = comps.unwrapped, comps.optimizer
    for p in model.parameters():  # an optimizer step, so Adam's state exists
        p.main_grad = torch.randn_like(p, dtype=torch.float32) * 1e-3 if hasattr(p, "main_grad") else None
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    barrier = dist.barrier
    rows = {k: [] for k in ("plain save", "ours save", "ours async: blocks", "ours async: complete")}
    rows.update({"plain load": [], "ours load": []})
    size = 0
    # Both sides use the same writer set-up (our results queue instead of the Manager process Megatron would spawn
    # on its first save, ~10 s once) and a warm-up round that is not measured: what is compared is what a save does.
    contain_checkpoint_writer_processes()
    for rep in range(-1, args.repeats):
        plain, ours, ours_async = (os.path.join(root, f"{k}{rep}") for k in ("plain", "ours", "async"))
        if rank == 0:
            os.makedirs(plain)
        barrier()
        rows["plain save"].append(
            _measure(
                lambda: dist_checkpointing.save(_sharded_state(model, optimizer, False, sharding), plain), barrier
            )[1:]
        )
        rows["ours save"].append(
            _measure(lambda: CheckpointWriter(False, sharding).save(ours, 1, model, optimizer), barrier)[1:]
        )
        writer = CheckpointWriter(async_save=True, optimizer_sharding=sharding)
        t0 = time.perf_counter()
        _, blocks, mem = _measure(lambda: writer.save(ours_async, 1, model, optimizer), barrier)
        rows["ours async: blocks"].append((blocks, mem))
        with PeakRSS() as wait_mem:
            writer.wait()
            barrier()
        rows["ours async: complete"].append((time.perf_counter() - t0, max(mem, wait_mem.above)))

        def plain_load():
            prepare_optimizer_for_load(optimizer)  # what Megatron's own loader does first (megatron_elastic.compat)
            state = dist_checkpointing.load(
                _sharded_state(model, optimizer, True, sharding), plain, strict="assume_ok_unexpected"
            )
            model.load_state_dict(state["model"], strict=False)
            with torch.no_grad():  # as ours: Megatron's per-rank loader copies into leaf views
                optimizer.load_state_dict(state["optimizer"])

        rows["plain load"].append(_measure(plain_load, barrier)[1:])
        rows["ours load"].append(
            _measure(lambda: load_checkpoint(os.path.join(ours, "iter_0000001"), model, optimizer), barrier)[1:]
        )
        if rep < 0:
            rows = {k: [] for k in rows}  # the warm-up round
        if rank == 0:
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(plain) for f in fs)
            for d in (plain, ours, ours_async):
                shutil.rmtree(d, ignore_errors=True)
        barrier()
    peaks = [None] * world
    dist.all_gather_object(peaks, {k: max(m for _, m in v) for k, v in rows.items()})
    if rank == 0:
        out = {
            "parameters": params,
            "checkpoint_bytes": size,
            "world": world,
            "seconds": {k: statistics.median(s for s, _ in v) for k, v in rows.items()},
            "peak_host_bytes": {k: max(p[k] for p in peaks) for k in rows},
        }
        with open(results_file, "w") as f:
            json.dump(out, f, indent=1)


def main():
    from megatron_elastic.store.checkpoint import OPTIMIZER_SHARDINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6, help="pairs of layers (Mamba/attention + MLP)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--optimizer-sharding",
        default="dp_reshardable",
        choices=OPTIMIZER_SHARDINGS,
        help="checkpoint.optimizer_sharding: per rank (the default) or gathered per parameter",
    )
    args = p.parse_args()
    from megatron_elastic.testing import run_multiprocess

    with tempfile.TemporaryDirectory() as root:
        results = os.path.join(root, "results.json")
        run_multiprocess(args.world, _worker, args, os.path.join(root, "ckpt"), results, timeout=3600)
        with open(results) as f:
            out = json.load(f)
    s, m = out["seconds"], out["peak_host_bytes"]
    print(
        f"{out['parameters']:,} parameters, {out['checkpoint_bytes'] / 2**30:.2f} GiB checkpoint (model + Adam), "
        f"{out['world']} ranks (distributed optimizer, {args.optimizer_sharding}), median of {args.repeats}"
    )
    print(f"{'operation':>22} {'seconds':>8} {'vs plain':>8} {'peak host MiB':>14} {'vs plain':>8}")
    for k in s:
        base = "plain load" if "load" in k else "plain save"
        print(f"{k:>22} {s[k]:8.2f} {s[k] / s[base]:8.2f} {m[k] / 2**20:14.0f} {m[k] / max(m[base], 1):8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
