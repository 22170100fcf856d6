"""The ``importance`` job: score a trained parent on calibration data, sort it, write scores, ranking, a
sorted checkpoint, a summary table and a plot."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.data.loader import calibration_batches
from megatron_elastic.elastic.arch import AXIS_FIELD
from megatron_elastic.elastic.layers.model import build_elastic_model
from megatron_elastic.errors import ConfigError
from megatron_elastic.importance.depth import DepthSearch, run_depth_search
from megatron_elastic.importance.permute import permute_model
from megatron_elastic.importance.progress import ImportanceProgress
from megatron_elastic.importance.width import WidthScores, WidthStatistics, accumulate_width
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.store.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from megatron_elastic.store.open_run import config_from_checkpoint
from megatron_elastic.training.lm import lm_hidden


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
    micro_batch_size: Optional[int] = None,
    seq_length: Optional[int] = None,
    tensor_parallel: Optional[int] = None,
    save_every_minutes: float = 10.0,
    mamba_head_channels: int = 0,
) -> dict:
    """Score, sort and save; returns a summary dict (paths and the depth ranking). ``data``: a ``prepare-data``
    directory, or None for the data the parent was trained on (its ``data`` section: a directory or a blend).

    Runs in every process of a torchrun/srun launch (or alone): the parent at the job's TP size (``tensor_parallel``
    overrides it; logits stay vocab-sharded), PP=1 (scoring is forward-only), the calibration set split over the
    data-parallel ranks (``world / TP``) and every sum reduced over them, so any layout gives one process's ranking.
    ``micro_batch_size`` and ``seq_length`` override the job's; ``mamba_head_channels``: D_top of Eq. 4 (0: every
    channel of a head scores it). The running sums are saved every
    ``save_every_minutes`` under ``out/progress``; run the same command again to resume a killed job."""
    path = resolve_checkpoint(checkpoint)
    job = config_from_checkpoint(path)
    mbs = micro_batch_size or job.train.micro_batch_size
    seq = seq_length or job.data.seq_length
    tp = tensor_parallel or job.parallel.tensor_model_parallel_size
    for name, value in (("--micro-batch-size", mbs), ("--seq-length", seq), ("--tensor-parallel", tp)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be a positive integer")
    initialize_parallel(tp, 1, seed=job.train.seed, timeout_minutes=job.parallel.distributed_timeout_minutes)
    # Sequence parallelism off: the width statistics average each sample over all of its tokens.
    config = job.model_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False)
    model = build_elastic_model(config)
    load_checkpoint(path, model, optimizer=None, load_rng=False)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    data = data or job.data.source(out)  # default: the parent's own data (a blend caches its index under out)
    batches = calibration_batches(
        data, seq, calib_tokens, mbs, job.train.seed, vocab_size=config.vocab_size, dp_rank=dp_rank, dp_size=dp_size
    )
    fingerprint = {
        "checkpoint": os.path.abspath(path),
        "data": data if isinstance(data, str) else repr(data),
        "calib_tokens": calib_tokens,
        "micro_batch_size": mbs,
        "seq_length": seq,
        "tensor_parallel": tp,
        "data_parallel": dp_size,
        "ffn_source": ffn_source,
        "mamba_source": mamba_source,
        "iterative_depth": iterative_depth,
    }
    store = ImportanceProgress(out, fingerprint, save_every_minutes)
    stats, search = _restore(store, ffn_source, mamba_source, len(config.hybrid_pattern), iterative_depth)
    save = lambda *_: store.maybe_save({"width": stats.state_dict(), "depth": search.state_dict()})
    show = progress and torch.distributed.get_rank() == 0
    bar = lambda desc, unit: (lambda it: tqdm(it, desc=desc, unit=unit)) if show else None
    accumulate_width(model, batches, lm_hidden, stats, bar("width (calibration)", "batch"), after_batch=save)
    scores = stats.scores(config, mamba_head_channels)
    depth_bar = bar("depth (iterative)" if iterative_depth else "depth", "round")
    run_depth_search(model, batches, search, lm_hidden, depth_bar, after_batch=save)
    depth, ranking = search.result()
    perm = scores.to_permutation(config)
    permute_model(model, perm)
    sorted_dir = os.path.join(out, "sorted")
    save_checkpoint(
        sorted_dir, 0, model, trainer_state={"config": job.to_dict(), "sorted_from": path, "depth_ranking": ranking}
    )
    table = summary_table(config, scores, depth, ranking)
    plot = None
    if torch.distributed.get_rank() == 0:
        _write_results(out, config, scores, perm, depth, ranking, fingerprint, dp_size * len(batches) * mbs * seq)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(table + "\n")
        plot = plot_importance(os.path.join(out, "importance.png"), config, scores, depth)
    store.clear()
    return {"sorted_checkpoint": sorted_dir, "depth_ranking": ranking, "table": table, "plot": plot}


def _restore(store: ImportanceProgress, ffn_source: str, mamba_source: str, n_layers: int, iterative: bool):
    """(width statistics, depth search): as last saved under ``store``, or fresh."""
    saved = store.load()
    if saved:
        return WidthStatistics.from_state_dict(saved["width"]), DepthSearch.from_state_dict(saved["depth"])
    return WidthStatistics(ffn_source, mamba_source), DepthSearch(n_layers, iterative)


def _write_results(out, config, scores, perm, depth, ranking, fingerprint: dict, tokens: int) -> None:
    """``scores.json`` (width and depth scores, how they were made) and ``ranking.json`` (the orders)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(
            {
                "width": scores.to_dict(),
                "depth_nmse": [float(x) for x in depth],
                "ffn_source": fingerprint["ffn_source"],
                "mamba_source": fingerprint["mamba_source"],
                "mamba_head_channels": scores.mamba_head_channels,
                "calibration_tokens": tokens,
                "layout": {k: fingerprint[k] for k in ("tensor_parallel", "data_parallel", "micro_batch_size")},
            },
            f,
        )
    ranking_doc = {
        "depth_ranking": ranking,
        "iterative_depth": fingerprint["iterative_depth"],
        "width_order": {
            "hidden": perm.hidden.tolist(),
            **{a: {i: p.tolist() for i, p in getattr(perm, a).items()} for a in AXIS_FIELD},
        },
    }
    with open(os.path.join(out, "ranking.json"), "w") as f:
        json.dump(ranking_doc, f)
