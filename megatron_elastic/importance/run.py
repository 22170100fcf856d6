"""The ``importance`` job: score a trained parent on calibration data, sort it, write scores, ranking, a
sorted checkpoint, a summary table and a plot."""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import torch
from tqdm import tqdm

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.data.loader import build_gpt_datasets, make_loader
from megatron_elastic.errors import CheckpointError, InputNotFoundError
from megatron_elastic.importance.depth import depth_scores
from megatron_elastic.importance.permute import permute_state_dict
from megatron_elastic.importance.width import WidthScores, collect_width_scores
from megatron_elastic.model.builder import causal_attention_mask
from megatron_elastic.model.elastic_model import build_elastic_model
from megatron_elastic.parallel import initialize_parallel
from megatron_elastic.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_elastic.training.config import PretrainConfig, load_pretrain_config
from megatron_elastic.training.pretrain import batch_to_device, masked_mean


def config_from_checkpoint(path: str) -> PretrainConfig:
    """The job config stored in a checkpoint's ``trainer_state.json``."""
    import yaml

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if "config" not in state:
        raise CheckpointError(
            f"{path}/trainer_state.json has no 'config'; was it written by megatron-elastic pretrain?"
        )
    return load_pretrain_config(text=yaml.safe_dump(state["config"]))


def lm_logits(model, batch):
    """Logits ``[b, s, vocab/tp]`` for a GPTDataset batch."""
    batch = batch_to_device(batch)
    tokens = batch["tokens"]
    return model(tokens, batch["position_ids"], causal_attention_mask(tokens.shape[1], tokens.device))


def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss (nats) of a GPTDataset batch."""
    batch = batch_to_device(batch)
    tokens = batch["tokens"]
    losses = model(
        tokens, batch["position_ids"], causal_attention_mask(tokens.shape[1], tokens.device), labels=batch["labels"]
    )
    return masked_mean(losses, batch["loss_mask"])


def calibration_batches(
    data_dir: str,
    seq_length: int,
    num_tokens: int,
    micro_batch_size: int = 8,
    seed: int = 1234,
    split: str = "train",
    vocab_size: Optional[int] = None,
) -> List[dict]:
    """``num_tokens`` tokens of ``split`` as GPTDataset batches."""
    n = max(1, math.ceil(num_tokens / (seq_length * micro_batch_size)))
    train, valid = build_gpt_datasets(
        data_dir, seq_length, n * micro_batch_size, n * micro_batch_size, seed=seed, model_vocab_size=vocab_size
    )
    ds = train if split == "train" else valid
    it = iter(make_loader(ds, 0, micro_batch_size))
    return [next(it) for _ in range(min(n, len(ds) // micro_batch_size))]


def single_process_job(checkpoint: str):
    """(resolved checkpoint path, its PretrainConfig at TP=1, PP=1) with Megatron's parallel state initialised
    for one process; ``checkpoint`` is a checkpoint directory or a run directory with a ``latest`` file."""
    path = latest_checkpoint(checkpoint) if os.path.isfile(os.path.join(checkpoint, "latest")) else checkpoint
    if path is None or not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise InputNotFoundError(f"{checkpoint}: no checkpoint (expected a 'latest' file or trainer_state.json)")
    job = config_from_checkpoint(path)
    job.parallel.tensor_model_parallel_size = job.parallel.pipeline_model_parallel_size = 1
    initialize_parallel(1, 1, seed=job.train.seed)
    return path, job


def load_parent(checkpoint: str):
    """(elastic model at TP=1, PP=1 with the checkpoint's weights, its PretrainConfig, checkpoint path)."""
    path, job = single_process_job(checkpoint)
    model = build_elastic_model(job.model_config())
    load_checkpoint(path, model, optimizer=None, load_rng=False)
    return model, job, path


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
    """Score, sort and save; returns a summary dict (paths and the depth ranking)."""
    model, job, src = load_parent(checkpoint)
    config = model.config
    data = data or job.data.path
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
            "mamba_heads": {i: p.tolist() for i, p in perm.mamba_heads.items()},
            "mamba_head_dim": {i: p.tolist() for i, p in perm.mamba_head_dim.items()},
            "attention_heads": {i: p.tolist() for i, p in perm.attention_heads.items()},
            "ffn": {i: p.tolist() for i, p in perm.ffn.items()},
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
