"""The ``importance`` job: score a trained parent on calibration data, sort it, write scores, ranking, a
sorted checkpoint, a summary table and a plot."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
from tqdm import tqdm

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.data.loader import calibration_batches
from megatron_elastic.importance.depth import depth_scores
from megatron_elastic.importance.permute import permute_state_dict
from megatron_elastic.importance.width import WidthScores, collect_width_scores
from megatron_elastic.model.elastic_arch import AXIS_FIELD
from megatron_elastic.training.checkpoint import save_checkpoint
from megatron_elastic.training.lm import lm_logits
from megatron_elastic.training.runs import load_parent


def summary_table(config, scores: WidthScores, depth: torch.Tensor, ranking: List[int]) -> str:
    """Per layer: type, depth score and rank, and how concentrated its width scores are (share of the
    total score held by the top half of the units)."""

    def top_half_share(s):
        s = torch.sort(s, descending=True).values
        return float(s[: max(1, len(s) // 2)].sum() / s.sum())

    rank_of = {layer: r for r, layer in enumerate(ranking)}
    lines = [
        f"{'layer':>5} {'type':9} {'depth NMSE':>11} {'rank':>4}  top-half share of width score",
        f"{'':>5} {'hidden':9} {'':>11} {'':>4}  {top_half_share(scores.hidden):.2f}",
    ]
    for i, sym in enumerate(config.hybrid_pattern):
        if sym == MAMBA:
            kind, width = (
                "mamba",
                f"heads {top_half_share(scores.mamba_heads[i]):.2f}, "
                f"channels {top_half_share(scores.mamba_head_dim[i]):.2f}",
            )
        elif sym == ATTENTION:
            kind, width = "attention", f"q-heads {top_half_share(scores.attention_heads[i]):.2f}"
        else:
            kind, width = "mlp", f"ffn {top_half_share(scores.ffn[i]):.2f}"
        lines.append(f"{i:5d} {kind:9} {float(depth[i]):11.4g} {rank_of[i]:4d}  {width}")
    return "\n".join(lines)


def plot_importance(path: str, config, scores: WidthScores, depth: torch.Tensor) -> Optional[str]:
    """Bar chart of per-layer depth importance and per-layer sorted width-score curves. Returns the path,
    or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {MAMBA: "tab:blue", ATTENTION: "tab:red", "-": "tab:green"}
    finite = torch.where(
        torch.isfinite(depth), depth, depth[torch.isfinite(depth)].max() if torch.isfinite(depth).any() else 1.0
    )
    ax1.bar(range(len(depth)), finite.tolist(), color=[colors[s] for s in config.hybrid_pattern])
    ax1.set_xlabel("layer (blue Mamba, red attention, green MLP)")
    ax1.set_ylabel("normalized MSE of logits when skipped")
    ax1.set_yscale("log")
    ax1.set_title("depth importance")
    curves = [("hidden", scores.hidden, "black")]
    curves += [(f"mamba {i}", s, "tab:blue") for i, s in scores.mamba_heads.items()]
    curves += [(f"attn {i}", s, "tab:red") for i, s in scores.attention_heads.items()]
    curves += [(f"ffn {i}", s, "tab:green") for i, s in scores.ffn.items()]
    for label, s, c in curves:
        v = torch.sort(s.float(), descending=True).values
        ax2.plot(torch.linspace(0, 1, len(v)).tolist(), (v / v[0]).tolist(), color=c, alpha=0.7, label=label)
    ax2.set_xlabel("unit rank (fraction of the axis)")
    ax2.set_ylabel("score / top score")
    ax2.set_title("width scores, sorted (per layer and axis)")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_importance(
    checkpoint: str,
    data: Optional[str],
    out: str,
    calib_tokens: int = 262_144,
    ffn_source: str = "fc2_input",
    iterative_depth: bool = False,
    progress: bool = True,
    mamba_source: str = "x",
) -> dict:
    """Score, sort and save; returns a summary dict (paths and the depth ranking). ``data``: a ``prepare-data``
    directory, or None for the data the parent was trained on (its ``data`` section: a directory or a blend)."""
    model, job, src = load_parent(checkpoint)
    config = model.config
    data = data or job.data.source(out)  # default: the parent's own data (a blend caches its index under out)
    batches = calibration_batches(
        data,
        job.data.seq_length,
        calib_tokens,
        job.train.micro_batch_size,
        job.train.seed,
        vocab_size=config.vocab_size,
    )
    bar = (lambda it: tqdm(it, desc="calibration", unit="batch")) if progress else None
    scores = collect_width_scores(
        model, batches, lm_logits, ffn_source=ffn_source, progress=bar, mamba_source=mamba_source
    )
    depth_bar = (lambda it: tqdm(it, desc="depth (iterative)", unit="layer")) if progress else None
    depth, ranking = depth_scores(model, batches, lm_logits, iterative=iterative_depth, progress=depth_bar)
    perm = scores.to_permutation(config)
    model.load_state_dict(permute_state_dict(model.state_dict(), config, perm))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(
            {
                "width": scores.to_dict(),
                "depth_nmse": [float(x) for x in depth],
                "ffn_source": ffn_source,
                "mamba_source": mamba_source,
                "calibration_tokens": sum(int(b["tokens"].numel()) for b in batches),
            },
            f,
        )
    ranking_doc = {
        "depth_ranking": ranking,
        "iterative_depth": iterative_depth,
        "width_order": {
            "hidden": perm.hidden.tolist(),
            **{a: {i: p.tolist() for i, p in getattr(perm, a).items()} for a in AXIS_FIELD},
        },
    }
    with open(os.path.join(out, "ranking.json"), "w") as f:
        json.dump(ranking_doc, f)
    sorted_dir = os.path.join(out, "sorted")
    save_checkpoint(
        sorted_dir, 0, model, trainer_state={"config": job.to_dict(), "sorted_from": src, "depth_ranking": ranking}
    )
    table = summary_table(config, scores, depth, ranking)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    plot = plot_importance(os.path.join(out, "importance.png"), config, scores, depth)
    return {"sorted_checkpoint": sorted_dir, "depth_ranking": ranking, "table": table, "plot": plot}
