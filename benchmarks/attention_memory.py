"""Peak memory of core attention, forward + backward: ours (``SDPAttention``, PyTorch's fused scaled-dot-product
attention) vs Megatron-Core's ``DotProductAttention`` (explicit scores and probabilities), on the CPU.

    python benchmarks/attention_memory.py [--seqs 1024 2048 4096 8192] [--heads 8 --groups 2 --head-dim 64]
                                          [--json out.json]

Measures the peak of live tensor bytes (the profiler's record of every CPU allocation and free, above what was
alive before; ``torch.cuda.max_memory_allocated()`` on a GPU) of one forward and backward of the core attention
alone, with GQA, batch 1, fp32, and prints a table with the ratio to the previous sequence length: ~2x per
doubling is linear growth, ~4x is quadratic. Also reports the elastic case (half the query heads active).
"""

import argparse
import json
import time
import warnings


def _measure(core, seq: int, heads: int, groups: int, head_dim: int):
    import torch

    from megatron_elastic.testing import peak_live_tensor_bytes

    g = torch.Generator().manual_seed(seq)
    q = torch.randn(seq, 1, heads, head_dim, generator=g, requires_grad=True)
    k = torch.randn(seq, 1, groups, head_dim, generator=g, requires_grad=True)
    v = torch.randn(seq, 1, groups, head_dim, generator=g, requires_grad=True)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]  # Megatron's causal mask, made by the caller

    def step():
        core(q, k, v, mask).sum().backward()

    t0 = time.perf_counter()
    _, peak = peak_live_tensor_bytes(step)
    return peak, time.perf_counter() - t0


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--heads", type=int, default=8, help="query heads (default: %(default)s)")
    p.add_argument("--groups", type=int, default=2, help="KV heads / query groups (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default: %(default)s)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_elastic.model.sdpa_attention import SDPAttention
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.testing import tiny_config

    initialize_parallel(1, 1)
    cfg = tiny_config(num_attention_heads=args.heads, num_query_groups=args.groups, kv_channels=args.head_dim)
    cases = {
        "ours (SDPA)": (SDPAttention, args.heads),
        f"ours, {args.heads // 2} heads active": (SDPAttention, args.heads // 2),
        "Megatron DotProductAttention": (DotProductAttention, args.heads),
    }
    rows = []
    print(f"{'attention':<32} {'seq':>6} {'peak MiB':>10} {'x prev':>7} {'seconds':>8}", flush=True)
    for name, (cls, heads) in cases.items():
        prev = None
        for seq in args.seqs:
            core = cls(cfg, 1, AttnMaskType.causal, "self")
            peak, seconds = _measure(core, seq, heads, args.groups, args.head_dim)
            growth = f"{peak / prev:.2f}" if prev else "-"
            print(f"{name:<32} {seq:>6} {peak / 2**20:>10.1f} {growth:>7} {seconds:>8.2f}", flush=True)
            rows.append({"attention": name, "seq": seq, "peak_bytes": peak, "seconds": seconds})
            prev = peak
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
