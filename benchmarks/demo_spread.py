"""How much the demo's numbers vary: the demo's recipe run with several seeds, one after the other, each in its
own folder; the spread of every model's held-out bits/byte (and parameter count) over the runs.

    python benchmarks/demo_spread.py --seeds 1234 1 2 [--precision float32] [--out runs/spread] [--install]

Writes ``<out>/spread.json`` and ``<out>/spread.md``; ``--install`` also copies ``spread.json`` to the package's
spread of that precision (``megatron_elastic/recipes/tiny_demo_spread.json`` for float32,
``tiny_demo_spread_bf16.json`` for bfloat16), which the demo's report compares every later run in it against.
A finished seed's folder is reused (the demo reuses its finished phases). About 10 minutes per seed on 2 cores.
Never gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

from megatron_elastic.demo import PRECISIONS, SPREADS, demo_precision, recipe_path


def run_seed(out: str, seed: int, precision: str) -> dict:
    folder = os.path.join(out, f"seed_{seed}")
    cmd = [sys.executable, "-m", "megatron_elastic", "demo", "--out", folder, "--seed", str(seed)]
    cmd += ["--precision", precision, "--no-progress"]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    with open(os.path.join(out, f"seed_{seed}.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(folder, "results.json")) as f:
        rows = json.load(f)
    return {"seed": seed, "rows": rows}


def spread_of(runs: list, precision: str) -> dict:
    names = [r["name"] for r in runs[0]["rows"]]
    table = {}
    for name in names:
        got = [next(r for r in run["rows"] if r["name"] == name) for run in runs]
        bpb, params = [g["bpb"] for g in got], [g["parameters"] for g in got]
        table[name] = {
            "bpb_mean": statistics.fmean(bpb),
            "bpb_min": min(bpb),
            "bpb_max": max(bpb),
            "bpb_by_seed": bpb,
            "parameters_min": min(params),
            "parameters_max": max(params),
        }
    return {
        "runs": len(runs),
        "seeds": [r["seed"] for r in runs],
        "precision": precision,
        "machine": f"{os.cpu_count()} CPU threads, {platform.machine()}, {platform.python_version()}",
        "rows": table,
    }


def markdown(spread: dict) -> str:
    seeds = spread["seeds"]
    lines = [
        f"| model | parameters (min - max) | bits/byte mean | min - max | {' | '.join(f'seed {s}' for s in seeds)} |",
        "|---|---|---|---|" + "---|" * len(seeds),
    ]
    for name, r in spread["rows"].items():
        params = (
            f"{r['parameters_min']:,}"
            if r["parameters_min"] == r["parameters_max"]
            else f"{r['parameters_min']:,} - {r['parameters_max']:,}"
        )
        lines.append(
            f"| {name} | {params} | {r['bpb_mean']:.3f} | {r['bpb_min']:.3f} - {r['bpb_max']:.3f} | "
            + " | ".join(f"{b:.3f}" for b in r["bpb_by_seed"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2], help="seeds (default: 1234 1 2)")
    ap.add_argument("--out", default="runs/spread", help="folder of the runs (default runs/spread)")
    ap.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="the demo's --precision (default auto: the demo's)"
    )
    ap.add_argument("--install", action="store_true", help="copy spread.json into the package's recipes")
    args = ap.parse_args()
    if len(args.seeds) < 2:
        ap.error("--seeds: give at least two seeds (a spread of one run is no spread)")
    precision, why = demo_precision(args.precision)
    print(f"precision: {precision} ({why})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    runs = [run_seed(args.out, s, precision) for s in args.seeds]
    spread = spread_of(runs, precision)
    with open(os.path.join(args.out, "spread.json"), "w") as f:
        json.dump(spread, f, indent=2)
    text = markdown(spread)
    with open(os.path.join(args.out, "spread.md"), "w") as f:
        f.write(text)
    print(text)
    if args.install:
        shutil.copyfile(os.path.join(args.out, "spread.json"), recipe_path(SPREADS[precision]))
        print(f"installed {recipe_path(SPREADS[precision])}")


if __name__ == "__main__":
    main()
