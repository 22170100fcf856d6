"""Where the demo's CPU time goes: one pretraining step, one elastic distillation step (frozen teacher + the
step's budgets) and one evaluation batch of the tiny recipe, profiled with ``torch.profiler``.

    python benchmarks/profile_demo.py --demo runs/demo [--out docs/results/profile] [--threads N]

``--demo`` is a finished demo directory (``megatron-elastic demo``; ``demo --quick --out DIR`` makes one with
the same model shapes in about two minutes). The real code paths run: ``pretrain`` and ``train_elastic`` with
their recipes (a few steps, into a scratch directory), the step after two warm-up steps profiled. Writes
``profile.md`` (and ``profile.json``) to ``--out``: per job the step's wall time, the forward split by module
(nested: the Mamba mixer's projections, conv, SSD scan and gated norm), backward and optimizer, and the
self-time split by kind of operation (matrix products, elementwise, layout copies, reductions, ...).
Never gates CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

PROFILED_STEP = 3  # steps 1-2 warm up (allocator, first-call paths)

# Operation kinds of the self-time table: the first prefix that matches an aten op name wins.
OP_KINDS = [
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                         "mkldnn::_linear_pointwise")),
    ("attention kernel", ("aten::_scaled_dot_product",)),
    ("convolution", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv")),
    ("layout copies", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::flip", "aten::pad")),
    ("reductions", ("aten::sum", "aten::mean", "aten::cumsum", "aten::max", "aten::amax", "aten::norm")),
    ("optimizer (foreach)", ("aten::_foreach", "aten::_fused_adam")),
    ("fills and masks", ("aten::fill_", "aten::zero_", "aten::masked_fill", "aten::tril", "aten::triu", "aten::where")),
    ("softmax / cross-entropy", ("aten::_softmax", "aten::_log_softmax", "aten::softmax", "aten::log_softmax",
                                 "aten::nll")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::exp", "aten::pow", "aten::rsqrt",
                     "aten::silu", "aten::sigmoid", "aten::relu", "aten::clamp", "aten::softplus", "aten::neg",
                     "aten::threshold", "aten::sqrt", "aten::log", "aten::lerp", "aten::addcmul", "aten::addcdiv",
                     "aten::gelu", "aten::square", "aten::abs", "aten::sign")),
]  # fmt: skip


def op_kind(name: str) -> str:
    for kind, prefixes in OP_KINDS:
        if name.startswith(prefixes):
            return kind
    return "other" if name.startswith(("aten::", "mkldnn::")) else ""


def _module_label(name: str, module) -> str:
    """The forward range a module gets in the profile ('' = none)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    from megatron_elastic.model.mamba_mixer import MambaMixer

    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, MambaMixer):
        return "Mamba mixer"
    if isinstance(module, SelfAttention):
        return "attention layer"
    if isinstance(module, MLP):
        return "MLP"
    if leaf == "embedding":
        return "embedding"
    if leaf == "output_layer":
        return "output layer (logits)"
    if leaf in ("in_proj", "out_proj") and ".mixer." in f".{name}.":
        return f"Mamba mixer/{leaf}"
    if leaf in ("linear_qkv", "linear_proj") and ".self_attention." in f".{name}.":
        return f"attention layer/{leaf}"
    if leaf == "core_attention":
        return "attention layer/core attention"
    if leaf in ("linear_fc1", "linear_fc2") and ".mlp." in f".{name}.":
        return f"MLP/{leaf}"
    return ""


@contextlib.contextmanager
def labelled_forwards():
    """Every module forward (of every model built inside) and the mixer's ops inside a ``fwd:`` record_function
    range, so the profile's totals split the forward pass by module."""
    from megatron_elastic.model import mamba_mixer

    ops = mamba_mixer.ops
    saved = {n: getattr(ops, n) for n in ("causal_conv1d", "ssd_chunk_scan", "gated_rmsnorm")}
    titles = {"causal_conv1d": "conv1d", "ssd_chunk_scan": "SSD scan", "gated_rmsnorm": "gated RMSNorm"}

    def wrap(fn_name):
        fn = saved[fn_name]

        def labelled(*a, **k):
            with record_function(f"fwd:Mamba mixer/{titles[fn_name]}"):
                return fn(*a, **k)

        return labelled

    open_ranges = {}

    def pre(module, args):
        label = getattr(module, "_profile_label", "")
        if label:
            r = record_function(f"fwd:{label}")
            r.__enter__()
            open_ranges.setdefault(id(module), []).append(r)

    def post(module, args, output):
        stack = open_ranges.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    def label_all(module):
        for name, m in module.named_modules():
            m._profile_label = _module_label(name, m)

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    for n in saved:
        setattr(ops, n, wrap(n))
    try:
        yield label_all
    finally:
        h1.remove()
        h2.remove()
        for n, fn in saved.items():
            setattr(ops, n, fn)


def summarize(prof, wall_s: float) -> dict:
    """Totals of the profiled step: forward ranges by module, backward, optimizer, and self time by op kind."""
    events = prof.key_averages()
    fwd = {e.key[4:]: e.cpu_time_total / 1e3 for e in events if e.key.startswith("fwd:")}
    backward = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function")) / 1e3
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")) / 1e3
    kinds = defaultdict(float)
    for e in events:
        kind = op_kind(e.key)
        if kind:
            kinds[kind] += e.self_cpu_time_total / 1e3
    return {
        "wall_ms": wall_s * 1e3,
        "forward_by_module_ms": dict(sorted(fwd.items())),
        "backward_ms": backward,
        "optimizer_ms": optimizer,
        "self_time_by_op_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
    }


class _Profiled(Exception):
    """Raised after the profiled step: the job stops there (its schedule is the recipe's own, untouched)."""


class StepProfiler:
    """Wraps a step function: the ``PROFILED_STEP``-th call runs under the profiler, its summary is kept, and the
    job stops (:class:`_Profiled`)."""

    def __init__(self, fn):
        self.fn, self.calls, self.result = fn, 0, None

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls != PROFILED_STEP:
            return self.fn(*a, **k)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            self.fn(*a, **k)
            wall = time.perf_counter() - t0
        self.result = summarize(prof, wall)
        raise _Profiled


def profile_pretrain(demo: str, scratch: str, label_all) -> dict:
    from megatron_elastic.demo import TINY_PARENT, recipe_path
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training import pretrain as pretrain_mod

    cfg = load_pretrain_config(
        recipe_path(TINY_PARENT),
        [
            f"data.path={demo}/data",
            f"checkpoint.dir={scratch}/parent",
            "train.eval_interval=1000",
            "train.eval_iters=1",
            "checkpoint.save_interval=1000",
        ],
    )
    step = StepProfiler(pretrain_mod._train_iteration)
    build = pretrain_mod.build_training_components

    def build_labelled(*a, **k):
        comps = build(*a, **k)
        label_all(comps.model)
        return comps

    saved = pretrain_mod._train_iteration, pretrain_mod.build_training_components
    pretrain_mod._train_iteration, pretrain_mod.build_training_components = step, build_labelled
    try:
        pretrain_mod.pretrain(cfg, progress=False)
    except _Profiled:
        pass
    finally:
        pretrain_mod._train_iteration, pretrain_mod.build_training_components = saved
    return {"what": f"pretrain: 1 step, {cfg.train.global_batch_size} x {cfg.data.seq_length} tokens", **step.result}


def profile_elastic(demo: str, scratch: str, label_all) -> dict:
    from megatron_elastic.demo import TINY_ELASTIC, recipe_path
    from megatron_elastic.elastic import run as run_mod
    from megatron_elastic.elastic.config import load_elastic_config

    cfg = load_elastic_config(
        recipe_path(TINY_ELASTIC),
        [
            f"parent={demo}/importance",
            f"data.path={demo}/data",
            f"checkpoint.dir={scratch}/elastic",
            "train.eval_interval=1000",
            "train.eval_iters=1",
            "checkpoint.save_interval=1000",
        ],
    )
    step = StepProfiler(run_mod.ElasticRun.train_step)
    build = run_mod.build_elastic_components

    def build_labelled(*a, **k):
        c = build(*a, **k)
        label_all(c.pair)
        return c

    saved = run_mod.ElasticRun.train_step, run_mod.build_elastic_components
    run_mod.ElasticRun.train_step = lambda self, s: step(self, s)
    run_mod.build_elastic_components = build_labelled
    try:
        run_mod.train_elastic(cfg, progress=False)
    except _Profiled:
        pass
    finally:
        run_mod.ElasticRun.train_step, run_mod.build_elastic_components = saved
    st = cfg.curriculum.stages[0]
    what = (
        f"elastic distillation: 1 step of stage 1, {st.global_batch_size} x {st.seq_length} tokens, "
        f"teacher + one sampled budget per micro-batch"
    )
    return {"what": what, **step.result}


def profile_evaluation(demo: str, label_all) -> dict:
    from megatron_elastic.evaluation import evaluate_lm, fixed_eval_set, load_standalone

    model = load_standalone(os.path.join(demo, "parent"))
    label_all(model)
    batches = fixed_eval_set(os.path.join(demo, "data"), 256, 8 * 256 * PROFILED_STEP)
    evaluate_lm(model, batches[: PROFILED_STEP - 1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        evaluate_lm(model, batches[PROFILED_STEP - 1 : PROFILED_STEP])
        wall = time.perf_counter() - t0
    return {"what": "evaluation: 1 batch of the report's held-out set, 8 x 256 tokens, forward only",
            **summarize(prof, wall)}  # fmt: skip


def matmul_gflops() -> float:
    """This machine's float32 matrix-product rate at the demo's MLP shape (2048 x 256 @ 256 x 1024, the linear
    layers' path): the times above scale with it from machine to machine (same CPU kind, 2-2.5x apart)."""
    a, w = torch.randn(2048, 256), torch.randn(1024, 256)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    start = time.perf_counter()
    for _ in range(20):
        torch.nn.functional.linear(a, w)
    return 2 * 2048 * 256 * 1024 * 20 / (time.perf_counter() - start) / 1e9


def markdown(results: list, threads: int, gflops: float) -> str:
    lines = [
        "# Where the demo's CPU time goes",
        "",
        f"`python benchmarks/profile_demo.py` ({threads} threads, torch {torch.__version__}; float32 matrix products "
        f"at the demo's MLP shape here: {gflops:.0f} GFLOP/s). Times are the profiler's CPU totals of one step after "
        "two warm-up steps; the profiler itself adds a little.",
    ]
    for r in results:
        wall = r["wall_ms"]
        lines += ["", f"## {r['what']}: {wall:,.0f} ms", "", "| part | ms | share of the step |", "|---|---|---|"]
        for name, ms in r["forward_by_module_ms"].items():
            depth = name.count("/")
            shown = ("&nbsp;&nbsp;&nbsp;&nbsp;" * depth) + name.rsplit("/", 1)[-1]
            lines.append(f"| forward: {shown} | {ms:,.0f} | {ms / wall:.1%} |")
        for name in ("backward", "optimizer"):
            ms = r[f"{name}_ms"]
            if ms:
                lines.append(f"| {name} (all modules) | {ms:,.0f} | {ms / wall:.1%} |")
        lines += ["", "| self time by kind of operation | ms | share |", "|---|---|---|"]
        total = sum(r["self_time_by_op_kind_ms"].values())
        for kind, ms in r["self_time_by_op_kind_ms"].items():
            lines.append(f"| {kind} | {ms:,.0f} | {ms / max(total, 1e-9):.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished demo directory (default: runs/demo)")
    ap.add_argument("--out", default="docs/results/profile", help="where profile.md and profile.json go")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--jobs", default="pretrain,elastic,evaluation", help="comma-separated subset")
    args = ap.parse_args()
    for part in ("data", "parent", os.path.join("importance", "sorted")):
        if not os.path.isdir(os.path.join(args.demo, part)):
            ap.error(
                f"{args.demo} has no {part}/: run `megatron-elastic demo --out {args.demo}` first "
                f"(or `demo --quick --out {args.demo}`: same model shapes, about two minutes)"
            )
    torch.set_num_threads(args.threads)
    from megatron_elastic.cli import _quiet_warnings

    _quiet_warnings()
    jobs = args.jobs.split(",")
    results = []
    with labelled_forwards() as label_all, tempfile.TemporaryDirectory() as scratch:
        if "pretrain" in jobs:
            results.append(profile_pretrain(args.demo, scratch, label_all))
            print(f"{results[-1]['what']}: {results[-1]['wall_ms']:,.0f} ms")
        if "elastic" in jobs:
            results.append(profile_elastic(args.demo, scratch, label_all))
            print(f"{results[-1]['what']}: {results[-1]['wall_ms']:,.0f} ms")
        if "evaluation" in jobs:
            results.append(profile_evaluation(args.demo, label_all))
            print(f"{results[-1]['what']}: {results[-1]['wall_ms']:,.0f} ms")
    os.makedirs(args.out, exist_ok=True)
    gflops = matmul_gflops()
    text = markdown(results, args.threads, gflops)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(
            {"threads": args.threads, "torch": torch.__version__, "matmul_gflops": gflops, "jobs": results}, f, indent=2
        )
    print(text)


if __name__ == "__main__":
    main()
