"""Does our importance ranking pick better sub-models than a random or a weight-magnitude ranking?

For a trained parent (e.g. the demo's), sort the weights by each ranking and report the validation loss
(bits/byte) of the sub-models at ~75% and ~50% of the parameters (every width axis scaled; no retraining),
and of the parent with its 25% least important layers skipped (depth ranking: normalized MSE vs random).

    python benchmarks/importance_ranking.py --parent runs/demo/parent [--json benchmarks/importance_ranking.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import warnings

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parent", required=True, help="pretrain checkpoint dir (with 'latest')")
    ap.add_argument("--data", help="prepared data dir (default: the parent's)")
    ap.add_argument("--calib-tokens", type=int, default=131_072)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--seeds", type=int, default=3, help="random rankings to average")
    ap.add_argument("--json", default="benchmarks/importance_ranking.json")
    a = ap.parse_args()

    from megatron_elastic.data.loader import calibration_batches
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.cost import arch_parameters, scaled_arch
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.elastic.source import load_parent
    from megatron_elastic.importance.depth import depth_scores
    from megatron_elastic.importance.permute import permute_state_dict, random_permutation
    from megatron_elastic.importance.width import collect_width_scores, magnitude_scores
    from megatron_elastic.training.lm import lm_logits, lm_loss

    model, job, _ = load_parent(a.parent)
    cfg = model.config
    data = a.data or job.data.path
    seq, mbs = job.data.seq_length, job.train.micro_batch_size
    calib = calibration_batches(data, seq, a.calib_tokens, mbs, job.train.seed, "train", cfg.vocab_size)
    evalb = calibration_batches(data, seq, a.eval_tokens, mbs, job.train.seed, "valid", cfg.vocab_size)
    parent_sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    def width_arch(target):
        lo, hi = 0.05, 1.0
        full = arch_parameters(cfg, ElasticArch.full(cfg))
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if arch_parameters(cfg, scaled_arch(cfg, mid)) / full < target else (lo, mid)
        return scaled_arch(cfg, hi)

    @torch.no_grad()
    def val_bpb(arch):
        model.eval()
        with use_arch(model, arch):
            return float(torch.stack([lm_loss(model, b) for b in evalb]).mean()) / math.log(2)

    def random_perm(seed):
        return random_permutation(cfg, torch.Generator().manual_seed(seed))

    model.load_state_dict(parent_sd, strict=False)
    ours = collect_width_scores(model, calib, lm_logits).to_permutation(cfg)
    ours_out = collect_width_scores(model, calib, lm_logits, mamba_source="out_proj_input").to_permutation(cfg)
    magnitude = magnitude_scores(parent_sd, cfg).to_permutation(cfg)
    archs = {"75%": width_arch(0.75), "50%": width_arch(0.5)}
    # One axis at half width, the others full: where does the ranking matter?
    axis_archs = {}
    a_h = ElasticArch.full(cfg)
    a_h.hidden_size = cfg.hidden_size // 2
    axis_archs["hidden 1/2"] = a_h
    per_layer_axes = {
        "ffn 1/2": "ffn_hidden_size",
        "mamba heads 1/2": "mamba_num_heads",
        "mamba channels 1/2": "mamba_head_dim",
        "attention heads 1/2": "num_attention_heads",
    }
    for label, field in per_layer_axes.items():
        arch = ElasticArch.full(cfg)
        setattr(arch, field, {i: getattr(cfg, field) // 2 for i in getattr(arch, field)})
        axis_archs[label] = arch
    archs.update(axis_archs)
    full_params = arch_parameters(cfg, ElasticArch.full(cfg))
    results = {
        "parent_bpb": val_bpb(None),
        "params": {k: arch_parameters(cfg, v) / full_params for k, v in archs.items()},
        "width": {},
        "depth": {},
    }

    def evaluate(perm):
        model.load_state_dict(permute_state_dict(parent_sd, cfg, perm), strict=False)
        return {k: val_bpb(arch) for k, arch in archs.items()}

    results["width"]["ours (activation)"] = evaluate(ours)
    results["width"]["ours, Mamba at out_proj"] = evaluate(ours_out)
    results["width"]["magnitude"] = evaluate(magnitude)
    rnd = [evaluate(random_perm(s)) for s in range(a.seeds)]
    results["width"][f"random (mean of {a.seeds})"] = {k: sum(r[k] for r in rnd) / len(rnd) for k in archs}
    results["width_random_spread"] = {k: max(r[k] for r in rnd) - min(r[k] for r in rnd) for k in archs}

    model.load_state_dict(parent_sd, strict=False)
    _, ranking = depth_scores(model, calib[:4], lm_logits)
    drop = max(1, len(cfg.hybrid_pattern) // 4)

    def skipping(layers):
        arch = ElasticArch.full(cfg)
        arch.skipped_layers = tuple(layers)
        return val_bpb(arch)

    results["depth"]["ours (normalized MSE)"] = skipping(ranking[-drop:])
    rng = random.Random(0)
    results["depth"][f"random (mean of {a.seeds})"] = (
        sum(skipping(rng.sample(range(len(cfg.hybrid_pattern)), drop)) for _ in range(a.seeds)) / a.seeds
    )
    results["depth"]["last layers"] = skipping(range(len(cfg.hybrid_pattern) - drop, len(cfg.hybrid_pattern)))
    results["depth_dropped"] = drop

    print(f"parent: {results['parent_bpb']:.3f} bits/byte (validation, {a.eval_tokens} tokens)")
    print(
        f"\nwidth-pruned sub-models, no retraining (bits/byte; params {results['params']['75%']:.2f} / "
        f"{results['params']['50%']:.2f} of the parent)"
    )
    print(f"{'ranking':26} {'~75%':>8} {'~50%':>8}")
    for name, r in results["width"].items():
        print(f"{name:26} {r['75%']:8.3f} {r['50%']:8.3f}")
    names = list(axis_archs)
    print("\none axis at half width, the rest full (bits/byte)")
    print(f"{'ranking':26} " + " ".join(f"{n:>19}" for n in names))
    for name, r in results["width"].items():
        print(f"{name:26} " + " ".join(f"{r[n]:19.3f}" for n in names))
    print(f"\ndepth: {drop} of {len(cfg.hybrid_pattern)} layers skipped (bits/byte)")
    for name, v in results["depth"].items():
        print(f"{name:26} {v:8.3f}")
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
