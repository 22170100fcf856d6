"""A dress rehearsal of the README's 12B run book on this machine, at the 12B's own layer sizes.

    python benchmarks/rehearsal_12b.py [--workdir DIR] [--pattern 'M*-'] [--train-vocab 8192] [--json out.json]

The model has NVIDIA-Nemotron-Nano-12B-v2's hidden size (5120), Mamba-2 mixer (128 heads of 80 channels, 8 groups,
state 128), attention (40 query heads, 8 KV groups, head dim 128), FFN (20480, squared ReLU) and 131,072-token
vocabulary; only the depth is cut (``--pattern``: one layer of each type by default). It runs the run book's stages as
a user would, as separate commands on the files each leaves, with the run book's own job configs
(``examples/nemotron_nano_v2_12b/{parent,elastic}.yaml``) changed only where this machine needs it (stated below):

1. ``transformers`` writes a NemotronH checkpoint (bf16) and a tokenizer beside it (a release's layout);
2. ``prepare-data`` tokenises the built-in corpus with it; ``import-hf --config parent.yaml``;
3. ``importance`` on 2 processes (DP=2; the run book's TP=8 needs 8 ranks per replica: TP=1 here);
4. elastic ``train`` at TP=8 with sequence parallelism and the distributed optimizer (8 CPU processes), a few steps
   of the two-stage curriculum cut to this machine; SIGUSR1 to every rank after the first checkpoint (what Slurm's
   ``--signal`` does), then the same command resumes and finishes;
5. ``extract`` in every format; ``transformers`` loads each export and generates with its own config and eos.

Changed for this machine: depth (``--pattern``), paths, the data (the built-in corpus instead of the blend), the
curriculum's tokens and context (a few steps at ``--seq``), the calibration size, importance's TP. The vocabulary
of the *training* stage (``--train-vocab``): 2 x 131,072 x 5,120 embedding parameters with Adam state, a student and
a teacher do not fit 24 GiB with 8 processes, so the sorted parent's embedding and output layer are cut to their
first rows (the tokenizer uses fewer ids) for training and everything after it; import and importance run at
131,072. Per stage: wall time and peak host memory (RSS of the process tree, sampled), next to what ``plan`` /
``elastic.memory`` predicts for the same stage at this size, and what they predict for the 12B's 62 layers per GPU.

``--reduced`` runs the same stages at a reduced width (what CI runs: ``tests/launch/test_rehearsal.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
EXAMPLES = os.path.join(ROOT, "examples", "nemotron_nano_v2_12b")
GIB = 2**30

TWELVE_B = dict(
    hidden_size=5120,
    intermediate_size=20480,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    mamba_num_heads=128,
    mamba_head_dim=80,
    n_groups=8,
    ssm_state_size=128,
    vocab_size=131072,
)
REDUCED = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=32,
    mamba_num_heads=16,
    mamba_head_dim=32,
    n_groups=8,
    ssm_state_size=16,
    vocab_size=16384,
)
TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


class TreePeak:
    """Peak host memory of a process and all its descendants: the sum of their PSS (shared pages counted once,
    split between the processes sharing them), sampled every 200 ms."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except Exception:  # noqa: BLE001 - a process that just exited
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def run(stage: str, cmd, report: dict, env=None, until=None) -> int:
    """Run ``cmd`` (the run book's command), record its wall time and peak memory under ``stage``. ``until``: a
    callable; when true, the launcher gets SIGUSR1 (every rank checkpoints and stops) and the exit status is
    returned."""

    print(f"[{stage}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # torchrun of this Python
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PATH": path, **(env or {})}, stdout=subprocess.PIPE, text=True
    )
    peak = TreePeak(proc.pid)
    lines = []
    signalled = False

    def reader():
        for line in proc.stdout:
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    while proc.poll() is None:
        if until is not None and not signalled and until():
            proc.send_signal(signal.SIGUSR1)  # launch/torchrun.sh passes it to every rank
            signalled = True
        time.sleep(0.2)
    t.join()
    rc = proc.returncode
    entry = report.setdefault(stage, {"seconds": 0.0, "peak_host_bytes": 0})
    entry["seconds"] += time.time() - t0
    entry["peak_host_bytes"] = max(entry["peak_host_bytes"], peak.close())
    if report.get("json"):  # what the stages so far measured, kept if a later one fails
        with open(report["json"], "w") as f:
            json.dump(report, f, indent=1)
    if rc != 0 and until is None:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"[{stage}] failed with exit code {rc}")
    return rc


def make_release(hf_dir: str, sizes: dict, pattern: str, corpus_docs) -> None:
    """A NemotronH checkpoint written by transformers (bf16) with a byte-level BPE tokenizer beside it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = transformers.NemotronHConfig(
        layers_block_type=[TYPES[s] for s in pattern],
        conv_kernel=4,
        chunk_size=128,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        **sizes,
    )
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.NemotronHForCausalLM(cfg)
    finally:
        torch.set_default_dtype(dtype)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(hf_dir)
    del model
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_docs, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(hf_dir)


def job_yaml(src: str, dest: str, edit) -> str:
    with open(src) as f:
        job = yaml.safe_load(f)
    edit(job)
    with open(dest, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    return dest


def cut_vocabulary(src: str, dest: str, vocab: int) -> None:
    """The sorted parent ``src`` (an importance output) with its embedding and output layer cut to ``vocab`` rows."""
    import shutil

    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.checkpoint import latest_checkpoint, save_checkpoint
    from megatron_elastic.store.open_run import config_from_checkpoint
    from megatron_elastic.store.reader import CheckpointTensorReader

    path = latest_checkpoint(os.path.join(src, "sorted"))
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    state["config"]["model"]["vocab_size"] = vocab
    job = config_from_checkpoint(path)
    job.model["vocab_size"] = vocab
    initialize_parallel(1, 1)
    model = build_hybrid_model(job.model_config())
    reader = CheckpointTensorReader(path)
    tensors = {n: reader.load(n) for n in reader.names() if not n.endswith("_extra_state")}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        tensors[name] = tensors[name][:vocab].clone()
    model.load_state_dict(tensors, strict=False)
    del tensors
    state.pop("iteration", None)
    save_checkpoint(os.path.join(dest, "sorted"), 0, model, trainer_state=state)
    for name in ("ranking.json", "scores.json"):
        shutil.copy(os.path.join(src, name), dest)


def process_baseline() -> int:
    """PSS of one rank before it holds a tensor: Python, torch, Megatron and our modules imported, gloo up."""
    code = (
        "import psutil, megatron_elastic.cli, megatron_elastic.elastic.run, megatron_elastic.importance.run\n"
        "from megatron_elastic.parallel import initialize_parallel\n"
        "initialize_parallel(1, 1)\n"
        "print(psutil.Process().memory_full_info().pss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def predictions(report: dict, w: str, args, sizes: dict) -> None:
    """What plan / elastic.memory say for the stages at this size (tensors per rank, plus each rank's process
    baseline), and for the 12B's 62 layers per GPU."""
    from megatron_elastic.elastic.config import load_elastic_config, parent_model_config
    from megatron_elastic.elastic.memory import importance_memory_per_gpu, memory_per_gpu, student_path
    from megatron_elastic.plan import Hardware, make_plan
    from megatron_elastic.store.checkpoint import latest_checkpoint
    from megatron_elastic.store.open_run import config_from_checkpoint

    cfg = load_elastic_config(os.path.join(w, "elastic.yaml"))
    config = parent_model_config(cfg.raw, w, cfg.parallel)
    stage = cfg.curriculum.stages[-1]
    per_rank = memory_per_gpu(
        config,
        8,
        1,
        1,
        stage.seq_length,
        cfg.train.micro_batch_size,
        stage.global_batch_size // cfg.train.micro_batch_size,
        True,
        cfg.train.recompute,
        student_path("reference", True),
    )
    base = process_baseline()
    report["process_baseline_bytes"] = base
    report["train"]["predicted_tensor_bytes_per_rank"] = sum(per_rank.values())
    report["train"]["predicted_bytes"] = 8 * (sum(per_rank.values()) + base)
    imp_config = config_from_checkpoint(latest_checkpoint(os.path.join(w, "importance", "sorted"))).model_config()
    imp = importance_memory_per_gpu(imp_config, 1, args.seq, 1, 256 * 2**20)
    report["importance"]["predicted_tensor_bytes_per_rank"] = sum(imp.values())
    report["importance"]["predicted_bytes"] = 2 * (sum(imp.values()) + base)
    if not args.reduced:
        plan = make_plan(os.path.join(EXAMPLES, "elastic.yaml"), Hardware(nodes=16))
        report["12b_62_layers_per_gpu"] = {
            "importance_bytes": sum(plan.importance.memory.values()),
            "train_stage_bytes": {s.name: s.total_memory for s in plan.stages},
        }


def generate_with_each_export(report: dict, out: str) -> None:
    import torch
    import transformers

    loaded = {}
    t0 = time.time()

    def generate(model, ids):
        """8 greedy tokens; transformers' hybrid cache needs an attention layer (a sub-model whose depth choice
        dropped them all generates without the cache)."""
        try:
            return model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :], True
        except ValueError as e:
            if "Attention layers" not in str(e):
                raise
            return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)[0, ids.shape[1] :], False

    dirs = sorted(os.path.join(out, d, "hf") for d in os.listdir(out) if os.path.isdir(os.path.join(out, d, "hf")))
    for hf in dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(hf)
        assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
        ids = tok("def main():", return_tensors="pt").input_ids
        new, cache = generate(model, ids)
        loaded[os.path.relpath(hf, out)] = {"hidden": model.config.hidden_size, "text": tok.decode(new), "cache": cache}
        del model
    elastic = os.path.join(out, "hf-elastic")
    with open(os.path.join(elastic, "config.json")) as f:
        budgets = [b for b in json.load(f)["elastic_budgets"] if not b.startswith("router:")]
    for b in budgets:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            elastic, dtype=torch.float32, trust_remote_code=True, elastic_budget=b
        )
        tok = transformers.AutoTokenizer.from_pretrained(elastic)
        ids = tok("def main():", return_tensors="pt").input_ids
        new, cache = generate(model, ids)
        loaded[f"hf-elastic@{b}"] = {"text": tok.decode(new), "cache": cache}
        del model
    report["transformers"] = {"seconds": time.time() - t0, "exports": loaded}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/rehearsal_12b")
    p.add_argument("--pattern", default="M*-", help="the depth: one layer per symbol (M Mamba, * attention, - MLP)")
    p.add_argument("--train-vocab", type=int, default=8192, help="vocabulary from the training stage on (see above)")
    p.add_argument("--seq", type=int, default=128, help="context of calibration and training")
    p.add_argument("--steps", type=int, default=4, help="elastic training steps")
    p.add_argument("--reduced", action="store_true", help="a reduced width (CI)")
    p.add_argument("--sync-save", action="store_true", help="checkpoint.async_save false (the recipe's is true)")
    p.add_argument(
        "--no-distributed-optimizer",
        action="store_true",
        help="train.distributed_optimizer false (the recipe's is true)",
    )
    p.add_argument("--json", help="write the report here (after every stage)")
    p.add_argument("--until", choices=["importance"], help="stop after this stage")
    args = p.parse_args(argv)
    sizes = REDUCED if args.reduced else TWELVE_B
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    report: dict = {"sizes": sizes, "pattern": args.pattern, "train_vocab": args.train_vocab, "seq": args.seq}
    report["options"] = {"sync_save": args.sync_save, "distributed_optimizer": not args.no_distributed_optimizer}
    with open(os.path.join(EXAMPLES, "elastic.yaml")) as f:
        report["options"]["optimizer_sharding"] = yaml.safe_load(f)["checkpoint"].get("optimizer_sharding")
    report["json"] = args.json
    cli = [sys.executable, "-m", "megatron_elastic"]
    launch = os.path.join(ROOT, "launch", "torchrun.sh")
    cpu = {"OMP_NUM_THREADS": "1"}

    from megatron_elastic.data.corpus import iter_stdlib_documents

    hf = os.path.join(w, "release")
    t0 = time.time()
    if not os.path.isfile(os.path.join(hf, "config.json")):
        make_release(hf, sizes, args.pattern, list(iter_stdlib_documents(max_bytes=2_000_000)))
    report["release (transformers)"] = {"seconds": time.time() - t0}

    run(
        "prepare-data",
        [*cli, "prepare-data", "--out", f"{w}/data", "--tokenizer", hf, "--max-bytes", "3000000", "--valid-every", "5"],
        report,
    )

    def parent_edit(job):
        job["model"]["hybrid_pattern"] = args.pattern
        if args.reduced:
            job["model"].update(
                hidden_size=sizes["hidden_size"],
                ffn_hidden_size=sizes["intermediate_size"],
                num_attention_heads=sizes["num_attention_heads"],
                num_query_groups=sizes["num_key_value_heads"],
                kv_channels=sizes["head_dim"],
                mamba_num_heads=sizes["mamba_num_heads"],
                mamba_head_dim=sizes["mamba_head_dim"],
                mamba_num_groups=sizes["n_groups"],
                mamba_state_dim=sizes["ssm_state_size"],
                vocab_size=sizes["vocab_size"],
            )
        job["data"] = {"path": f"{w}/data", "seq_length": args.seq}
        job["checkpoint"]["dir"] = f"{w}/parent"

    parent_yaml = job_yaml(os.path.join(EXAMPLES, "parent.yaml"), f"{w}/parent.yaml", parent_edit)
    run("import-hf", [*cli, "import-hf", "--hf-dir", hf, "--out", f"{w}/parent", "--config", parent_yaml], report)

    imp = [launch, "importance", "--checkpoint", f"{w}/parent", "--out", f"{w}/importance", "--no-progress"]
    imp += ["--calib-tokens", str(4 * args.seq), "--tensor-parallel", "1"]
    run("importance", imp, report, env={**cpu, "NPROC_PER_NODE": "2"})
    if args.until == "importance":
        print(format_report(report))
        return report

    parent_for_training = f"{w}/importance"
    if args.train_vocab < sizes["vocab_size"]:
        t0 = time.time()
        cut = subprocess.run(
            [
                sys.executable,
                __file__,
                "--cut-vocabulary",
                f"{w}/importance",
                f"{w}/importance_v",
                str(args.train_vocab),
            ]
        )
        if cut.returncode:
            raise SystemExit("cutting the vocabulary failed")
        report["cut vocabulary"] = {"seconds": time.time() - t0}
        parent_for_training = f"{w}/importance_v"

    def elastic_edit(job):
        job["parent"] = parent_for_training
        job.pop("plan_parent_config", None)
        tokens = args.steps // 2 * 8 * args.seq
        job["curriculum"]["stages"][0].update(tokens=tokens, seq_length=args.seq, global_batch_size=8)
        job["curriculum"]["stages"][1].update(tokens=tokens, seq_length=2 * args.seq, global_batch_size=4)
        job["data"] = {"path": f"{w}/data", "eval_seq_length": args.seq}
        job["train"].update(lr_warmup_iters=1, log_interval=1, eval_interval=1000, eval_iters=1)
        job["router"]["warmup_iters"] = 1
        job["checkpoint"].update(dir=f"{w}/elastic", save_interval=1, async_save=not args.sync_save)
        if args.no_distributed_optimizer:
            job["train"]["distributed_optimizer"] = False

    elastic_yaml = job_yaml(os.path.join(EXAMPLES, "elastic.yaml"), f"{w}/elastic.yaml", elastic_edit)
    train = [launch, "train", "--config", elastic_yaml, "--no-progress"]
    first = lambda: os.path.isfile(f"{w}/elastic/latest")
    rc = run("train", train, report, env={**cpu, "NPROC_PER_NODE": "8"}, until=first)
    report["train"]["usr1_exit_code"] = rc
    with open(f"{w}/elastic/latest") as f:
        report["train"]["stopped_at"] = f.read().strip()
    run("train", train, report, env={**cpu, "NPROC_PER_NODE": "8"})

    run(
        "extract",
        [*cli, "extract", "--checkpoint", f"{w}/elastic", "--format", "both", "--out", f"{w}/extracted"],
        report,
    )
    ext = [*cli, "extract", "--checkpoint", f"{w}/elastic", "--format", "hf-elastic", "--out", f"{w}/extracted"]
    run("extract hf-elastic", ext, report)
    generate_with_each_export(report, f"{w}/extracted")
    predictions(report, w, args, sizes)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def format_report(report: dict) -> str:
    base = report.get("process_baseline_bytes", 0) / GIB
    lines = [
        f"{'stage':>22} {'seconds':>8} {'peak host GiB':>14} {'predicted GiB':>14}   (predicted: plan's tensors per "
        f"rank + {base:.2f} GiB per rank's process)"
    ]
    for stage, r in report.items():
        if not isinstance(r, dict) or "seconds" not in r:
            continue
        pred = r.get("predicted_bytes")
        peak = r.get("peak_host_bytes")
        lines.append(
            f"{stage:>22} {r['seconds']:8.0f} {peak / GIB if peak else float('nan'):14.2f} "
            f"{pred / GIB if pred else float('nan'):14.2f}"
        )
    big = report.get("12b_62_layers_per_gpu")
    if big:
        stages = ", ".join(f"{k} {v / GIB:.1f}" for k, v in big["train_stage_bytes"].items())
        lines.append(
            f"12B (62 layers) per GPU, plan: importance {big['importance_bytes'] / GIB:.1f} GiB; train {stages} GiB"
        )
    for name, e in report.get("transformers", {}).get("exports", {}).items():
        cache = "" if e.get("cache", True) else " (no attention layer left: without transformers' cache)"
        lines.append(f"  transformers loaded {name}: generated {e['text']!r}{cache}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--cut-vocabulary":
        cut_vocabulary(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
