"""``megatron-elastic demo``: the tiny recipe end to end on this machine's CPU, with a report.

Phases (each reused when a previous run finished it): prepare the built-in corpus -> pretrain the tiny parent ->
importance and the function-preserving sort -> elastic distillation of budgets 100/75/50% at once (both
curriculum stages) -> zero-shot extraction of every budget (Megatron + Hugging Face) -> evaluation of every
extracted budget and of the baselines on one fixed held-out set -> the Pareto curve over ~10 budgets (trained and
untrained, each next to the pruned-untrained model of its size) -> ``report.md`` with the tables and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from importlib import resources
from typing import Dict, List, Optional, Tuple

from megatron_elastic.data.corpus import DEFAULT_MAX_BYTES

TINY_PARENT = "tiny_parent.yaml"
TINY_ELASTIC = "tiny_elastic.yaml"
# The recipe's numbers over several seeds (benchmarks/demo_spread.py), one file per precision.
SPREADS = {"float32": "tiny_demo_spread.json", "bfloat16": "tiny_demo_spread_bf16.json"}
PRECISIONS = ("auto", *SPREADS)
# --precision bfloat16: Megatron's mixed precision (bf16 weights and activations; fp32 main parameters, gradient
# reduction and Adam state; our norms, A_log, D and the SSD scan's arithmetic stay fp32).
BF16_OVERRIDES = ["model.bf16=true", "model.params_dtype=bfloat16"]
SPREAD_SLACK = 0.005  # bits/byte: "inside" tolerates this much beyond the seeds' range (third-decimal float noise)
PHASES = 8

# --quick: every phase, shortened to check a set-up in a few minutes (the numbers mean little).
QUICK_PARENT = [
    "train.train_iters=40",
    "train.eval_interval=20",
    "train.eval_iters=4",
    "train.lr_warmup_iters=8",
    "checkpoint.save_interval=40",
]
QUICK_ELASTIC = [
    "curriculum.stages=[{name: short-context, tokens: 16384, seq_length: 128, global_batch_size: 16, "
    "budget_weights: [1, 1, 1]}, {name: long-context, tokens: 16384, seq_length: 512, global_batch_size: 8, "
    "budget_weights: [0.5, 0.3, 0.2]}]",
    "router.warmup_iters=2",
    "train.lr_warmup_iters=2",
    "train.eval_interval=12",
    "train.eval_iters=2",
    "checkpoint.save_interval=12",
]


def recipe_path(name: str) -> str:
    return str(resources.files("megatron_elastic.recipes").joinpath(name))


def _seed_override(args) -> List[str]:
    seed = getattr(args, "seed", None)
    return [] if seed is None else [f"train.seed={seed}"]


def demo_precision(choice: str = "auto") -> Tuple[str, str]:
    """(precision, why) of the demo's run: ``choice`` unless it is ``auto``, which takes bfloat16 where the device
    the demo computes on multiplies it in hardware (a CUDA GPU with bf16, a CPU with ``cpu_gemm.NATIVE_BF16_FLAGS``:
    2-3.5x faster products, ~0.01 bits/byte on the demo's models) and float32 elsewhere (emulated bf16 gains
    nothing)."""
    if choice not in PRECISIONS:
        from megatron_elastic.errors import ConfigError

        raise ConfigError(f"--precision {choice}: use one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice, "--precision " + choice
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name()} computes in bfloat16"
        return "float32", f"{torch.cuda.get_device_name()} has no bfloat16 arithmetic"
    from megatron_elastic.ops.cpu_gemm import NATIVE_BF16_FLAGS, cpu_bf16_flags

    flags = cpu_bf16_flags()
    if flags:
        return "bfloat16", f"this CPU multiplies bfloat16 in hardware ({', '.join(flags)})"
    return "float32", f"this CPU has no bfloat16 products (no {' or '.join(NATIVE_BF16_FLAGS)})"


def precision_overrides(precision: str) -> List[str]:
    """The parent config's overrides for ``precision`` (the later phases take it from the parent's checkpoint)."""
    return BF16_OVERRIDES if precision == "bfloat16" else []


def recipe_spread(args, precision: str) -> Optional[dict]:
    """The spread of the demo's numbers over several seeds in ``precision`` (``recipes/tiny_demo_spread*.json``,
    written by ``benchmarks/demo_spread.py``), when this run is that recipe (no --quick, --config, --set,
    --elastic-set, default --max-bytes); else None: a changed recipe has no spread to compare with."""
    default_run = (
        not (args.quick or args.config or args.set or args.elastic_set) and args.max_bytes == DEFAULT_MAX_BYTES
    )
    if precision not in SPREADS:
        return None
    path = recipe_path(SPREADS[precision])
    if not default_run or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def spread_markdown(rows: List[dict], spread: dict) -> str:
    """This run's bits/byte of every model next to the recipe's range over seeds, and whether it falls inside."""
    lines = [
        f"| model | this run (bits/byte) | {spread['runs']} runs: mean | min - max | inside |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        s = spread["rows"].get(r["name"])
        if s is None:
            continue
        inside = s["bpb_min"] - SPREAD_SLACK <= r["bpb"] <= s["bpb_max"] + SPREAD_SLACK
        lines.append(
            f"| {r['name']} | {r['bpb']:.3f} | {s['bpb_mean']:.3f} | {s['bpb_min']:.3f} - {s['bpb_max']:.3f} | "
            f"{'yes' if inside else 'NO'} |"
        )
    return "\n".join(lines)


def _finished_summary(ckpt_dir: str, iters: int, what: str):
    """The summary of the run ``what`` in ``ckpt_dir`` if it reached ``iters`` iterations, else None."""
    from megatron_elastic.store.checkpoint import latest_checkpoint

    done, summary_path = latest_checkpoint(ckpt_dir), os.path.join(ckpt_dir, "summary.json")
    if not done or not os.path.isfile(summary_path):
        return None
    with open(os.path.join(done, "trainer_state.json")) as f:
        if json.load(f)["iteration"] < iters:
            return None
    print(f"  reusing {what} at {done}")
    with open(summary_path) as f:
        return json.load(f)


class _Phases:
    """Prints each phase's header and records how long it took."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.count = 0

    @contextlib.contextmanager
    def __call__(self, title: str, where: str = ""):
        self.count += 1
        print(f"\n[{self.count}/{PHASES}] {title}" + (f": {where}" if where else ""), flush=True)
        start = time.time()
        yield
        self.seconds[title] = time.time() - start


def _prepare_demo_data(data_dir: str, args, progress: bool) -> None:
    from megatron_elastic.data.indexed import read_metadata

    try:
        read_metadata(data_dir)
        print("  reusing prepared data")
    except FileNotFoundError:
        from megatron_elastic.data.prepare import prepare_data

        prepare_data(data_dir, max_bytes=args.max_bytes, progress=progress)


def _precision_of(job) -> str:
    """The precision a pretraining job config trains in."""
    model = job.model_config()
    return "bfloat16" if model.bf16 else "float16" if model.fp16 else "float32"


def parent_precision(parent_dir: str) -> str:
    """The precision the parent in ``parent_dir`` was trained in (its checkpoint's model config)."""
    from megatron_elastic.store.checkpoint import resolve_checkpoint
    from megatron_elastic.store.open_run import config_from_checkpoint

    return _precision_of(config_from_checkpoint(resolve_checkpoint(parent_dir)))


def _pretrain_parent(data_dir: str, parent_dir: str, args, precision: str, progress: bool) -> dict:
    from megatron_elastic.store.checkpoint import latest_checkpoint
    from megatron_elastic.store.job_config import load_pretrain_config

    overrides = [f"data.path={data_dir}", f"checkpoint.dir={parent_dir}"] + precision_overrides(precision)
    overrides += (QUICK_PARENT if args.quick else []) + _seed_override(args) + list(args.set or [])
    cfg = load_pretrain_config(args.config or recipe_path(TINY_PARENT), overrides)
    want = _precision_of(cfg)
    # any parent checkpoint there, finished (reused) or not (resumed), must be of this precision
    held = parent_precision(parent_dir) if latest_checkpoint(parent_dir) else want
    if held != want:
        from megatron_elastic.errors import ConfigError

        raise ConfigError(
            f"{parent_dir} holds a parent trained in {held}, this run asks for {want}: give another --out, or "
            f"--precision {held} to finish that run"
        )
    summary = _finished_summary(parent_dir, cfg.train.train_iters, "trained parent")
    if summary is None:
        from megatron_elastic.training.pretrain import pretrain

        summary = pretrain(cfg, resume=latest_checkpoint(parent_dir) is not None, progress=progress)
    print(
        f"parent: {summary['parameters']:,} parameters, {summary['tokens']:,} tokens; validation "
        f"{summary['initial_valid_bpb']:.3f} -> {summary['final_valid_bpb']:.3f} bits/byte "
        f"(unigram baseline {summary['unigram_bpb']:.3f})"
    )
    return summary


def tiny_d_top(parent_dir: str) -> int:
    """D_top of Eq. 4 for the tiny recipe: the smallest Mamba head dim its space allows (the channels every budget
    keeps); 0 for a parent without Mamba layers."""
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.elastic.space import ElasticSpace
    from megatron_elastic.store.checkpoint import resolve_checkpoint
    from megatron_elastic.store.open_run import config_from_checkpoint

    job = config_from_checkpoint(resolve_checkpoint(parent_dir))
    fractions = load_elastic_config(recipe_path(TINY_ELASTIC), [f"parent={parent_dir}"]).space.fractions
    head_dims = ElasticSpace.default(job.model_config(), fractions).mamba_head_dim
    return head_dims[0] if head_dims else 0


def tiny_importance_options(parent_dir: str) -> dict:
    """The tiny recipe's importance options: the paper's, but for the depth ranking. FFN neurons scored on fc1's
    output (Eq. 2); each Mamba head scored over its D_top top-ranked channels (Eq. 3-4). Depth: one normalized-MSE
    pass (the paper's iterative Eq. 5 scores 78 layer removals instead of 12 on the 12 layers, 11 of the demo's
    minutes on 2 cores, and moved only layers the budgets keep: docs/results/paper_ablation). The 12B recipe runs it
    iteratively."""
    return {"ffn_source": "fc1_output", "iterative_depth": False, "mamba_head_channels": tiny_d_top(parent_dir)}


def _sort_parent(parent_dir: str, data_dir: str, imp_dir: str, args, progress: bool) -> None:
    if os.path.isfile(os.path.join(imp_dir, "sorted", "latest")):
        print("  reusing the sorted parent")
        return
    from megatron_elastic.importance.run import run_importance

    options = tiny_importance_options(parent_dir)
    print(f"  importance options: {options}")
    res = run_importance(
        parent_dir, data_dir, imp_dir, calib_tokens=4096 if args.quick else 32768, progress=progress, **options
    )
    print(res["table"])
    print(f"depth ranking (most important first): {res['depth_ranking']}; plot: {res['plot']}")


def _train_elastic(imp_dir: str, elastic_dir: str, data_dir: str, args, progress: bool) -> dict:
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.elastic.report import results_table
    from megatron_elastic.elastic.run import train_elastic
    from megatron_elastic.store.checkpoint import latest_checkpoint

    overrides = [f"parent={imp_dir}", f"checkpoint.dir={elastic_dir}", f"data.path={data_dir}"]
    overrides += (QUICK_ELASTIC if args.quick else []) + _seed_override(args) + list(args.elastic_set or [])
    cfg = load_elastic_config(recipe_path(TINY_ELASTIC), overrides)
    summary = _finished_summary(elastic_dir, cfg.train.train_iters, "the elastic run")
    if summary is None:
        summary = train_elastic(cfg, resume=latest_checkpoint(elastic_dir) is not None, progress=progress)
    print(results_table(summary))
    return summary


def _extract_all(elastic_dir: str, extracted: str) -> List[dict]:
    from megatron_elastic.extraction.extract import extract

    rows = extract(elastic_dir, extracted, budgets=["all"], fmt="both")
    for r in rows:
        print(f"  budget {r['name']:>5}: {r['parameters']:>10,} parameters -> {r['megatron']}, {r['hf']}")
    return rows


def run_demo(args: argparse.Namespace) -> dict:
    """Run (or finish) the demo in ``args.out``; returns the evaluation rows and phase times."""
    t0 = time.time()
    out = os.path.abspath(args.out)
    data_dir, parent_dir, imp_dir, elastic_dir, extracted = (
        os.path.join(out, d) for d in ("data", "parent", "importance", "elastic", "extracted")
    )
    progress = not args.no_progress
    precision, why = demo_precision(getattr(args, "precision", "auto"))
    print(f"precision: {precision}: {why} (--precision chooses: {', '.join(PRECISIONS)})", flush=True)
    phase = _Phases()
    with phase("data", data_dir):
        _prepare_demo_data(data_dir, args, progress)
    with phase("pretrain the tiny parent", parent_dir):
        _pretrain_parent(data_dir, parent_dir, args, precision, progress)
    precision = parent_precision(parent_dir)  # what ran (a --set of model.bf16 wins over --precision)
    with phase("importance and the function-preserving sort", imp_dir):
        _sort_parent(parent_dir, data_dir, imp_dir, args, progress)
    with phase("elastic distillation of every budget at once", elastic_dir):
        esummary = _train_elastic(imp_dir, elastic_dir, data_dir, args, progress)
    with phase("zero-shot extraction of every budget (Megatron + Hugging Face)", extracted):
        rows_x = _extract_all(elastic_dir, extracted)
    with phase("evaluate every model on one held-out set and write the report"):
        held_out = _report_eval_set(data_dir, 8192 if args.quick else 65536)
        rows = evaluate_demo(out, parent_dir, imp_dir, rows_x, held_out, esummary, progress=progress)
    with phase("every budget after training: the Pareto curve (trained and untrained budgets)"):
        curve = evaluate_budget_curve(out, elastic_dir, imp_dir, held_out, esummary, progress, evaluated=rows)
    with phase("lm-evaluation-harness on a held-out task, every budget"):
        lm_eval_table = evaluate_lm_eval_task(out, data_dir, elastic_dir, args.quick)
    total = time.time() - t0
    report = _write_demo_report(out, rows, esummary, phase.seconds, total, args, curve, lm_eval_table, precision)
    print(f"\ndemo finished in {total:.0f} s; report: {report}; outputs in {out}")
    return {"rows": rows, "phase_seconds": phase.seconds, "total_seconds": total, "report": report}


def evaluate_lm_eval_task(out: str, data_dir: str, elastic_dir: str, quick: bool) -> Optional[str]:
    """lm-eval's multiple choice on the held-out next-line task (``harness.write_next_line_task``) for every
    trained budget; the table as Markdown, or why there is none (lm-eval not installed)."""
    from megatron_elastic.harness import NEXT_LINE_TASK, evaluate_budgets, results_table, write_next_line_task

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return None
    include = write_next_line_task(data_dir, os.path.join(out, "lm_eval_task"), 8 if quick else 16, context=192)
    table = evaluate_budgets(elastic_dir, [NEXT_LINE_TASK], ["all"], os.path.join(out, "lm_eval"), include)
    return results_table(table)


def _report_eval_set(data_dir: str, num_tokens: int):
    """The report's held-out batches (sequence 256, fixed order) and their bits/byte unit."""
    from megatron_elastic.evaluation import eval_set_bits_per_byte, fixed_eval_set

    batches = fixed_eval_set(data_dir, 256, num_tokens)
    return batches, eval_set_bits_per_byte(data_dir, batches)


def evaluate_demo(
    out: str,
    parent_dir: str,
    imp_dir: str,
    extracted_rows: List[dict],
    held_out: tuple,
    esummary: dict,
    progress: bool = True,
) -> List[dict]:
    """Rows for the report: the parent, every extracted budget, and each smaller budget's architecture sliced from
    the sorted parent without training (the zero-shot pruning baseline), on ``held_out`` (``_report_eval_set``)."""
    from tqdm import tqdm

    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.evaluation import evaluate_checkpoint, evaluate_subnetworks

    batches, bits = held_out
    print(f"  {sum(int(b['loss_mask'].sum()) for b in batches):,} held-out tokens (validation split, fixed order)")
    rows = []
    jobs = [("parent", "parent (pretrained)", parent_dir, None)]
    jobs += [
        (f"elastic {r['name']}", "Nemotron Elastic, extracted", r["megatron"], esummary["tokens"])
        for r in extracted_rows
    ]
    for name, method, path, spent in tqdm(jobs, desc="evaluate", disable=not progress):
        rows.append({"name": name, "method": method, **evaluate_checkpoint(path, batches, bits), "train_tokens": spent})
    archs = {
        r["name"]: ElasticArch.from_json(open(os.path.join(os.path.dirname(r["megatron"]), "arch.json")).read())
        for r in extracted_rows
        if float(r["name"]) < 1.0
    }
    for name, res in evaluate_subnetworks(os.path.join(imp_dir, "sorted"), archs, batches, bits).items():
        rows.append(
            {"name": f"pruned {name}", "method": "pruned from the sorted parent, no training", **res, "train_tokens": 0}
        )
    from megatron_elastic.evaluation import results_markdown

    print(results_markdown(rows))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def _scored_by_budget(rows: List[dict]) -> Dict[tuple, dict]:
    """The evaluation phase's rows as ``evaluation.budget_curve``'s ``scored``: each extracted budget (``elastic B``),
    each pruned one (``pruned B``), and the parent as the sorted parent's budget 1."""
    scored = {}
    for r in rows:
        kind, _, budget = r["name"].partition(" ")
        if kind in ("elastic", "pruned"):
            scored[kind, f"{float(budget):g}"] = r
        elif kind == "parent":
            scored["pruned", "1"] = r
    return scored


def evaluate_budget_curve(
    out: str,
    elastic_dir: str,
    imp_dir: str,
    held_out: tuple,
    esummary: dict,
    progress: bool = True,
    evaluated: List[dict] = (),
) -> List[dict]:
    """About 10 budgets from the smallest trained one to 1 (``evaluation.curve_budgets``), each zero-shot from the
    elastic run and pruned from the sorted parent, on the report's held-out set (``_report_eval_set``); what the
    evaluation phase scored (``evaluated``, its rows) is not scored again. Writes budget_curve.json."""
    from megatron_elastic.evaluation import budget_curve, budget_curve_markdown, curve_budgets

    batches, bits = held_out
    budgets = curve_budgets([float(b) for b in esummary["budgets"]])
    rows = budget_curve(
        elastic_dir,
        os.path.join(imp_dir, "sorted"),
        budgets,
        batches,
        bits,
        progress,
        scored=_scored_by_budget(list(evaluated)),
    )
    print(budget_curve_markdown(rows))
    with open(os.path.join(out, "budget_curve.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def _spread_section(rows: List[dict], args, precision: str) -> List[str]:
    spread = recipe_spread(args, precision)
    if spread is None:
        return []
    return [
        "## How much these numbers vary",
        "",
        f"The same recipe in {precision} run with seeds {', '.join(map(str, spread['seeds']))} ({spread['machine']}; "
        f"`python benchmarks/demo_spread.py`): another seed or another machine gives numbers inside this range "
        f"(floating-point sums differ between machines and can change a router choice).",
        "",
        spread_markdown(rows, spread),
        "",
    ]


def _write_demo_report(
    out: str,
    rows: List[dict],
    esummary: dict,
    times: Dict[str, float],
    total: float,
    args: argparse.Namespace,
    curve: List[dict],
    lm_eval_table: Optional[str] = None,
    precision: str = "float32",
) -> str:
    from megatron_elastic.evaluation import budget_curve_markdown, budget_curve_plot, write_report

    cmd = "megatron-elastic demo" + (" --quick" if args.quick else "")
    plot = budget_curve_plot(os.path.join(out, "budget_curve.png"), curve)
    budgets = esummary["budgets"]
    notes = [
        "## How these numbers were made",
        f"`{cmd}` on this machine ({os.cpu_count()} CPU threads) in {precision}, {total:.0f} s in all. Every model "
        "is scored on the same held-out tokens (validation split of the built-in corpus, fixed order; byte "
        "tokenizer, so bits/byte = loss / ln 2). *training tokens* counts the tokens of the one elastic run that "
        "produced all budgets together. tokens/s is forward-only throughput of the standalone model on this CPU.",
        "",
        f"The elastic run: {esummary['steps']} steps, {esummary['tokens']:,} tokens, "
        f"{esummary['wall_time_s']:.0f} s; training drew nested sub-models on every step; the router's unmasked "
        "choices were nested too: "
        f"{esummary['nested_without_clipping']}; share of final-temperature draws that are exactly the extracted "
        f"architectures: {esummary.get('extracted_sampled', float('nan')):.2f}. "
        "Chosen architectures: "
        + "; ".join(
            f"{b}: {r['parameters']:,} parameters ({r['fraction']:.3f} of the parent)" for b, r in budgets.items()
        )
        + ".",
        "",
        "## Every budget after training",
        "",
        "The router's choice for each budget from the smallest trained one to 1, scored on the same held-out tokens: "
        "trained budgets are the extracted ones; an untrained budget is chosen zero-shot from the router's "
        "interpolated budget input, nested between its trained neighbours and moved onto its parameter target "
        "(`megatron-elastic extract --budget 0.6` writes it). Next to each, the same architecture pruned from the "
        "sorted parent without training.",
        "",
        budget_curve_markdown(curve),
        "",
        "![every budget after training](budget_curve.png)" if plot else "",
        "",
        *_spread_section(rows, args, precision),
        "## lm-evaluation-harness on a held-out task",
        "",
        (
            "Each budget of the elastic checkpoint, through lm-eval (`megatron-elastic evaluate`): given a piece of a "
            "held-out file, pick its real next line among 4 (chance 0.25); task in `lm_eval_task/`, lm-eval's JSON "
            "in `lm_eval/`. Few questions: a check that the harness runs, not a benchmark.\n\n" + lm_eval_table
            if lm_eval_table
            else "Skipped: lm-eval is not installed (`pip install 'megatron-elastic[eval]'`)."
        ),
        "",
        "## Phase times (s)",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in times.items()],
    ]
    return write_report(out, "megatron-elastic demo: one elastic run, every budget extracted", rows, ["\n".join(notes)])
