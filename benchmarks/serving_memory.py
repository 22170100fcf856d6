"""Many-in-one serving memory: one copy of the elastic parent's weights serving every budget vs the sum of the
separately extracted models (the paper: 24 GB vs 42 GB for 12B + 9B + 6B in bf16).

    python benchmarks/serving_memory.py --checkpoint runs/demo/elastic [--json out.json]

Prints the weight bytes each way (exact, from the tensors), and the resident memory (RSS) measured after
loading the server and after loading each extracted model separately, in this process.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings

import psutil
import torch


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an elastic training run (megatron-elastic train)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.serving.generate import ElasticServer
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    base = rss()
    server = ElasticServer.from_checkpoint(args.checkpoint)
    served = server.resident_bytes()
    server_rss = rss() - base
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        extracted = extract(args.checkpoint, tmp, budgets=["all"], fmt="megatron")
        del server
        gc.collect()
        for r in extracted:
            before = rss()
            job = config_from_checkpoint(os.path.join(r["megatron"], "iter_0000000"))
            model = build_hybrid_model(job.model_config())
            load_model_weights(r["megatron"], model)
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
            rows.append(
                {
                    "budget": r["name"],
                    "parameters": r["parameters"],
                    "weight_bytes": nbytes,
                    "rss_increase_bytes": rss() - before,
                }
            )
            del model
            gc.collect()
    total = sum(r["weight_bytes"] for r in rows)
    mb = lambda b: f"{b / 2**20:8.2f} MiB"
    print(f"{'budget':>8} {'parameters':>12} {'weights':>12}")
    for r in rows:
        print(f"{r['budget']:>8} {r['parameters']:>12,} {mb(r['weight_bytes'])}")
    print(f"separate models, all budgets: {mb(total)}")
    print(
        f"one elastic copy serving all: {mb(served)}  ({served / total:.2f} of the separate total; "
        f"RSS after loading the server: {mb(server_rss)})"
    )
    out = {
        "budgets": rows,
        "separate_total_bytes": total,
        "elastic_served_bytes": served,
        "ratio": served / total,
        "server_rss_increase_bytes": server_rss,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
