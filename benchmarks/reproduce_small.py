"""The paper's central comparison at tiny scale: one elastic run vs separate compression vs training from scratch.

    python benchmarks/reproduce_small.py [--run runs/demo] [--out runs/reproduce_small] [--seeds 1 2]

Same corpus, same sorted parent (the demo's: `megatron-elastic demo` first, or this script runs it), T = the tiny
elastic recipe's token count (327,680: 196,608 at seq 128 + 131,072 at seq 512), every model scored on the same
held-out tokens (`megatron_elastic.evaluation.fixed_eval_set`):

(a) Nemotron Elastic: one elastic run (recipes/tiny_elastic.yaml) trains budgets 1.0/0.75/0.5 together with T
    tokens in total; each budget is extracted zero-shot.
(b) Minitron-style: for each smaller budget separately, the same trainer with that single budget and exactly (a)'s
    extracted architecture (``fixed_arch``): the sorted parent (same importance ranking) is pruned to it and only
    that sub-network is distilled from the frozen parent with all T tokens (so 2T for two budgets). Every comparison
    is parameter for parameter; every token trains this one budget.
(c) From scratch: (a)'s architecture for each smaller budget, random init, T tokens of LM loss with the parent's
    own pretraining recipe (LR 3e-3 -> 3e-4, seq 256, batch 8).
(b/2), (c/2) with ``--equal-total``: the same with T/2 tokens per budget, so two budgets cost T in total, like (a).
Ablation: (a) with uniform budget sampling in stage 2 instead of the skewed [0.5, 0.3, 0.2].

Writes OUT/results.json (every run: method, budget, seed, parameters, loss, bits/byte, training tokens, wall time),
OUT/summary.json (mean and spread over seeds), OUT/report.md and OUT/pareto.png. Runs that finished are reused.

Status (2026-11-26, nested sampling, seeds 1234 1 2, --no-ablation --no-scratch, 2 CPU cores, ~45 min;
docs/results/reproduce_small/): (a) / (b) with (a)'s exact architectures: 1.014 at 75%, 1.023 at 50% (means over
seeds); the full model 2.046 vs the parent's 2.027. Before nested sampling (2026-11-24, router-chosen (b)
architectures): (a) 2.134 / 2.192 at 75% / 50%; (c) 0.27-0.33 worse than (a) even at 2T; uniform vs skewed stage 2
within +-0.003 (not rerun since). `--quick` runs the whole comparison in ~4 minutes as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SCRATCH_TRAIN = {
    "micro_batch_size": 8,
    "global_batch_size": 8,
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "weight_decay": 0.1,
    "clip_grad": 1.0,
    "log_interval": 20,
    "eval_interval": 100000,
    "eval_iters": 2,
}
SCRATCH_SEQ = 256


def _elastic_run(base_overrides, ckpt_dir, extra, progress):
    """Train (or reuse) an elastic run; extract its budgets; returns (summary, {budget: megatron path}, wall s)."""
    from megatron_elastic.demo import TINY_ELASTIC, recipe_path
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.elastic.run import train_elastic
    from megatron_elastic.extraction.extract import extract

    cfg = load_elastic_config(recipe_path(TINY_ELASTIC), base_overrides + [f"checkpoint.dir={ckpt_dir}"] + extra)
    summary_path = os.path.join(ckpt_dir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    else:
        summary = train_elastic(cfg, progress=progress)
    out = os.path.join(ckpt_dir, "extracted")
    paths = {f"{x:g}": os.path.join(out, f"budget_{x:g}", "megatron") for x in cfg.budgets}
    if not all(os.path.isfile(os.path.join(p, "latest")) for p in paths.values()):  # extracted by an earlier call
        paths = {r["name"]: r["megatron"] for r in extract(ckpt_dir, out, budgets=["all"], fmt="megatron")}
    return summary, paths, summary["wall_time_s"]


def _stages_with(cfg, weights_per_stage, scale=1.0):
    return [
        {
            "name": s.name,
            "tokens": int(s.tokens * scale)
            // (s.seq_length * s.global_batch_size)
            * s.seq_length
            * s.global_batch_size,
            "seq_length": s.seq_length,
            "global_batch_size": s.global_batch_size,
            "budget_weights": w,
        }
        for s, w in zip(cfg.curriculum.stages, weights_per_stage)
    ]


def _flow(obj) -> str:
    return yaml.safe_dump(obj, default_flow_style=True, width=10**6).strip()


def _scratch_run(arch_ckpt, data, ckpt_dir, tokens, seed, progress):
    """Pretrain (or reuse) the architecture of ``arch_ckpt`` (an extracted checkpoint) from random init."""
    from megatron_elastic.store.checkpoint import latest_checkpoint
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    summary_path = os.path.join(ckpt_dir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    with open(os.path.join(latest_checkpoint(arch_ckpt), "trainer_state.json")) as f:
        job = json.load(f)["config"]
    iters = tokens // (SCRATCH_SEQ * SCRATCH_TRAIN["global_batch_size"])
    job["data"] = {"path": data, "seq_length": SCRATCH_SEQ}
    job["train"] = {**SCRATCH_TRAIN, "train_iters": iters, "lr_warmup_iters": max(1, iters // 10), "seed": seed}
    job["checkpoint"] = {"dir": ckpt_dir, "save_interval": iters}
    return pretrain(load_pretrain_config(text=yaml.safe_dump(job)), progress=progress)


def main(argv=None):
    warnings.filterwarnings("ignore")
    from megatron_elastic.demo import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a finished demo run folder (data, sorted parent, run (a))")
    p.add_argument("--out", default="runs/reproduce_small", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help="training seeds (1234 = the demo's run)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per evaluation")
    p.add_argument("--equal-total", action="store_true", help="also (b) and (c) with T/2 tokens per budget")
    p.add_argument("--no-ablation", action="store_true", help="skip uniform vs skewed stage-2 sampling")
    p.add_argument("--no-scratch", action="store_true", help="skip (c), training from scratch")
    p.add_argument(
        "--elastic-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a field of the elastic recipe for every run (a) and (b) (e.g. train.lr=5e-4); "
        "use a new --out for each setting",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the demo's --precision when no finished demo is in --run; every run here takes the precision of the "
        "demo's parent",
    )
    p.add_argument(
        "--quick", action="store_true", help="the demo's --quick curriculum (a smoke test; numbers mean little)"
    )
    args = p.parse_args(argv)
    progress = not args.no_progress

    from megatron_elastic.demo import QUICK_ELASTIC, TINY_ELASTIC, recipe_path
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.evaluation import eval_set_bits_per_byte, evaluate_checkpoint, fixed_eval_set, pareto_plot

    run, out = os.path.abspath(args.run), os.path.abspath(args.out)
    data, imp = os.path.join(run, "data"), os.path.join(run, "importance")
    if not os.path.isfile(os.path.join(run, "elastic", "summary.json")):
        from megatron_elastic.data.corpus import DEFAULT_MAX_BYTES
        from megatron_elastic.demo import run_demo

        print(f"no finished demo in {run}: running `megatron-elastic demo --out {run}` first")
        run_demo(
            argparse.Namespace(
                out=run,
                quick=False,
                config=None,
                set=None,
                elastic_set=None,
                max_bytes=DEFAULT_MAX_BYTES,
                seed=None,
                precision=args.precision,
                no_progress=args.no_progress,
            )
        )
    os.makedirs(out, exist_ok=True)
    base = [f"parent={imp}", f"data.path={data}"] + (QUICK_ELASTIC if args.quick else []) + args.elastic_set
    cfg = load_elastic_config(recipe_path(TINY_ELASTIC), base)
    T = cfg.curriculum.total_tokens
    small = [b for b in cfg.budgets if b < 1.0]
    batches = fixed_eval_set(data, 256, args.eval_tokens)
    bits = eval_set_bits_per_byte(data, batches)
    results_path = os.path.join(out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else []
    done = {(r["method"], r["budget"], r["seed"]) for r in results}

    def record(method, budget, seed, path, tokens, wall, total_tokens):
        if (method, budget, seed) in done:
            return
        row = {
            "method": method,
            "budget": budget,
            "seed": seed,
            **evaluate_checkpoint(path, batches, bits),
            "train_tokens": tokens,
            "total_tokens_for_all_budgets": total_tokens,
            "wall_s": wall,
            "checkpoint": path,
        }
        results.append(row)
        done.add((method, budget, seed))
        print(
            f"  {method:<34} budget {budget:<5} seed {seed}: {row['parameters']:>9,} params, "
            f"{row['bpb']:.4f} bits/byte, {tokens:,} tokens, {wall:.0f} s",
            flush=True,
        )
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)

    t_start = time.time()
    elastic_runs = {}  # seed -> (a)'s training summary
    for seed in args.seeds:
        seed_extra = [] if seed == cfg.train.seed else [f"train.seed={seed}"]
        own = seed_extra or args.elastic_set  # the demo's run is (a) only for its own seed and recipe
        a_dir = os.path.join(run, "elastic") if not own else os.path.join(out, f"a_elastic_seed{seed}")
        print(f"\n(a) Nemotron Elastic, seed {seed}: {a_dir}", flush=True)
        summary, paths, wall = _elastic_run(base, a_dir, seed_extra, progress)
        elastic_runs[seed] = summary
        for b, path in paths.items():
            record("(a) elastic", b, seed, path, summary["tokens"], wall, summary["tokens"])
        variants = [("", 1.0)] + ([("/2", 0.5)] if args.equal_total else [])
        for suffix, scale in variants:
            for b in small:
                name = f"{b:g}"
                b_dir = os.path.join(out, f"b{suffix.replace('/', 'half')}_minitron_{name}_seed{seed}")
                print(f"\n(b{suffix}) Minitron-style, budget {name}, seed {seed}: {b_dir}", flush=True)
                stages = _stages_with(cfg, [[1.0]] * len(cfg.curriculum.stages), scale)
                fixed = os.path.join(os.path.dirname(paths[name]), "arch.json")  # (a)'s extracted architecture
                s, bpaths, bwall = _elastic_run(
                    base,
                    b_dir,
                    seed_extra + [f"budgets=[{b}]", f"curriculum.stages={_flow(stages)}", f"fixed_arch={fixed}"],
                    progress,
                )
                record(
                    f"(b{suffix}) prune + distil",
                    name,
                    seed,
                    bpaths[name],
                    s["tokens"],
                    bwall,
                    s["tokens"] * len(small),
                )
                if args.no_scratch:
                    continue
                c_dir = os.path.join(out, f"c{suffix.replace('/', 'half')}_scratch_{name}_seed{seed}")
                print(f"\n(c{suffix}) from scratch, budget {name}, seed {seed}: {c_dir}", flush=True)
                tokens = int(T * scale)
                cs = _scratch_run(paths[name], data, c_dir, tokens, seed, progress)
                record(
                    f"(c{suffix}) from scratch",
                    name,
                    seed,
                    c_dir,
                    cs["tokens"],
                    cs["wall_time_s"],
                    cs["tokens"] * len(small),
                )
        if not args.no_ablation:
            u_dir = os.path.join(out, f"ablation_uniform_stage2_seed{seed}")
            print(f"\nablation: (a) with uniform stage-2 sampling, seed {seed}: {u_dir}", flush=True)
            n = len(cfg.budgets)
            stages = _stages_with(cfg, [s.budget_weights for s in cfg.curriculum.stages[:-1]] + [[1.0] * n])
            s, upaths, uwall = _elastic_run(base, u_dir, seed_extra + [f"curriculum.stages={_flow(stages)}"], progress)
            for b, path in upaths.items():
                record("(a) elastic, uniform stage 2", b, seed, path, s["tokens"], uwall, s["tokens"])

    summary = summarize(results)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rows = [
        {"name": f"{r['budget']}", "method": r["method"], "parameters": r["parameters"], "bpb": r["bpb_mean"]}
        for r in summary
    ]
    pareto_plot(os.path.join(out, "pareto.png"), rows, "tiny reproduction: bits/byte vs parameters (mean over seeds)")
    report = write_report(out, summary, T, args, time.time() - t_start, elastic_runs)
    print(f"\n{report_table(summary)}\nreport: {report}")
    return summary


def summarize(results):
    """Mean and spread (min..max, sample std) of bits/byte per (method, budget) over seeds."""
    groups = {}
    for r in results:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        bpb = [r["bpb"] for r in rs]
        out.append(
            {
                "method": method,
                "budget": budget,
                "parameters": rs[0]["parameters"],
                "seeds": [r["seed"] for r in rs],
                "bpb_mean": statistics.mean(bpb),
                "bpb_std": statistics.stdev(bpb) if len(bpb) > 1 else None,
                "bpb_min": min(bpb),
                "bpb_max": max(bpb),
                "train_tokens": rs[0]["train_tokens"],
                "total_tokens_for_all_budgets": rs[0]["total_tokens_for_all_budgets"],
                "wall_s_min": min(r["wall_s"] for r in rs),
            }
        )
    order = {"1": 0, "0.75": 1, "0.5": 2}
    return sorted(out, key=lambda r: (order.get(r["budget"], 9), r["method"]))


def report_table(summary):
    lines = [
        "| budget | method | parameters | bits/byte (mean) | spread (min..max, n) | tokens for this budget | "
        "tokens for all budgets | train wall s (fastest seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        spread = f"{r['bpb_min']:.3f}..{r['bpb_max']:.3f}, n={len(r['seeds'])}"
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['parameters']:,} | {r['bpb_mean']:.3f} | {spread} | "
            f"{r['train_tokens']:,} | {r['total_tokens_for_all_budgets']:,} | {r['wall_s_min']:.0f} |"
        )
    return "\n".join(lines)


def comparisons(summary):
    """Per smaller budget: (a) minus each other method, and each method's total-token cost relative to (a)."""
    by = {(r["method"], r["budget"]): r for r in summary}
    lines = [
        "| budget | compared with | difference (a) - other | (a) / other | other's tokens for all budgets / (a)'s |",
        "|---|---|---|---|---|",
    ]
    for (method, budget), r in by.items():
        a = by.get(("(a) elastic", budget))
        if a is None or method == "(a) elastic":
            continue
        lines.append(
            f"| {budget} | {method} | {a['bpb_mean'] - r['bpb_mean']:+.3f} | {a['bpb_mean'] / r['bpb_mean']:.3f} | "
            f"{r['total_tokens_for_all_budgets'] / a['total_tokens_for_all_budgets']:.1f}x |"
        )
    return "\n".join(lines)


def nesting_table(elastic_runs):
    """Per seed of (a): each budget's extracted size, whether the router's unmasked choices were nested, and the
    share of final-temperature draws that are exactly the extracted architectures."""
    lines = [
        "| seed | fractions of the parent (per budget) | unmasked choices nested | extracted = sampled |",
        "|---|---|---|---|",
    ]
    for seed, s in elastic_runs.items():
        fractions = ", ".join(f"{b}: {r['fraction']:.3f}" for b, r in s["budgets"].items())
        sampled = s.get("extracted_sampled")
        lines.append(
            f"| {seed} | {fractions} | {s['nested_without_clipping']} | "
            f"{'-' if sampled is None else f'{sampled:.2f}'} |"
        )
    return "\n".join(lines)


def write_report(out, summary, T, args, seconds, elastic_runs=None):
    text = "\n".join(
        [
            "# Tiny reproduction: one elastic run vs separate compression vs from scratch",
            "",
            f"`python benchmarks/reproduce_small.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
            "",
            f"T = {T:,} tokens. Seeds: {args.seeds}. "
            f"Every model scored on the same {args.eval_tokens:,} held-out tokens. "
            f"This invocation ran {seconds:.0f} s (finished runs are reused). For (a), *tokens for this budget* is the "
            "whole run's T: the budgets share it (each micro-batch trains one sampled budget).",
            "",
            report_table(summary),
            "",
            "![bits/byte vs parameters](pareto.png)",
            "",
            "## (a) against the others (bits/byte difference, mean over seeds; negative: (a) is better)",
            "",
            comparisons(summary),
            "",
            "## (a)'s architectures per seed",
            "",
            "Training draws every budget nested inside the next larger one's draw, so the extracted architectures "
            "(the noise-free limit of those draws) are what training sampled; *unmasked choices nested* says whether "
            "the router's choices would have been nested without that mask.",
            "",
            nesting_table(elastic_runs or {}),
            "",
        ]
    )
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    main()
