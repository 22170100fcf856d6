"""Cost of elasticity on CPU: training-step time (forward + backward) of the elastic model at the full choice
vs the plain model with the same weights (goal <= 1.03x), and at ~75% / ~50% choices vs full next to their
FLOP ratios (goal: time ratio <= 1.15 x FLOP ratio).

    python benchmarks/elastic_overhead.py [--configs tiny mid] [--steps 10] [--json benchmarks/elastic_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

CONFIGS = {
    # the tiny recipe's parent
    "tiny": dict(
        hybrid_pattern="M-M*-M-M*-M-",
        hidden_size=256,
        ffn_hidden_size=1024,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=32,
        mamba_num_heads=16,
        mamba_head_dim=32,
        mamba_num_groups=2,
        mamba_state_dim=32,
        mamba_chunk_size=64,
        seq=256,
        batch=8,
    ),
    # a mid-size CPU config (~50M parameters)
    "mid": dict(
        hybrid_pattern="M-M*-M-M*-M-",
        hidden_size=640,
        ffn_hidden_size=2560,
        num_attention_heads=10,
        num_query_groups=2,
        kv_channels=64,
        mamba_num_heads=20,
        mamba_head_dim=64,
        mamba_num_groups=2,
        mamba_state_dim=64,
        mamba_chunk_size=128,
        seq=512,
        batch=4,
    ),
}


def interleaved_step_times(variants, args, steps: int):
    """Median step time of each ``(model, setup)`` variant, measured round-robin (one step of each in
    turn) so that machine noise affects all variants alike."""

    def step(model):
        model.zero_grad(set_to_none=True)
        model(*args).float().square().mean().backward()

    times = [[] for _ in variants]
    for rep in range(steps + 1):
        for k, (model, setup) in enumerate(variants):
            setup()
            t = time.perf_counter()
            step(model)
            if rep:  # the first round warms up
                times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="benchmarks/elastic_overhead.json")
    a = ap.parse_args()

    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.cost import arch_flops_per_token, arch_parameters, scaled_arch
    from megatron_elastic.elastic.layers.model import build_elastic_model, set_arch
    from megatron_elastic.model.builder import build_hybrid_model, causal_attention_mask, position_ids_for
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    initialize_parallel(1, 1)
    results = {}
    for name in a.configs:
        spec = dict(CONFIGS[name])
        seq, batch = spec.pop("seq"), spec.pop("batch")
        cfg = tiny_config(vocab_size=264, **spec)
        torch.manual_seed(0)
        plain = build_hybrid_model(cfg)
        elastic = build_elastic_model(cfg)
        elastic.load_state_dict(plain.state_dict())
        ids = torch.randint(0, 258, (batch, seq))
        args = (ids, position_ids_for(ids), causal_attention_mask(seq))
        full = ElasticArch.full(cfg)
        full_flops = arch_flops_per_token(cfg, full, seq)
        archs = {frac: scaled_arch(cfg, frac**0.5) for frac in (0.75, 0.5)}  # width ~ sqrt(param fraction)
        variants = [(plain, lambda: None), (elastic, lambda: set_arch(elastic, full))]
        variants += [(elastic, lambda arch=arch: set_arch(elastic, arch)) for arch in archs.values()]
        t_plain, t_full, *t_sub = interleaved_step_times(variants, args, a.steps)
        rows = {
            "plain_s": t_plain,
            "elastic_full_s": t_full,
            "full_overhead": t_full / t_plain,
            "parameters": arch_parameters(cfg, full),
            "choices": {},
        }
        print(f"\n{name}: {rows['parameters'] / 1e6:.1f}M parameters, batch {batch} x seq {seq}")
        print(
            f"  plain step {t_plain * 1e3:8.1f} ms | elastic @ full {t_full * 1e3:8.1f} ms | "
            f"ratio {t_full / t_plain:.3f} (goal <= 1.03)"
        )
        print(f"  {'choice':>8} {'params':>8} {'FLOP ratio':>10} {'time ratio':>10} {'time/FLOP':>9}")
        for (frac, arch), t in zip(archs.items(), t_sub):
            flop_ratio = arch_flops_per_token(cfg, arch, seq) / full_flops
            param_ratio = arch_parameters(cfg, arch) / rows["parameters"]
            rows["choices"][f"{frac:.2f}"] = {
                "arch": arch.to_dict(),
                "param_ratio": param_ratio,
                "flop_ratio": flop_ratio,
                "time_ratio": t / t_full,
            }
            print(
                f"  {'~%d%%' % (frac * 100):>8} {param_ratio:8.2f} {flop_ratio:10.2f} {t / t_full:10.2f} "
                f"{(t / t_full) / flop_ratio:9.2f}  (goal <= 1.15)"
            )
        set_arch(elastic, None)
        results[name] = rows
    with open(a.json, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
