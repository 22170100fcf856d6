"""One fixed held-out evaluation for every model a run produces, and the run report.

Every model (the parent, an extracted budget, a baseline) is scored on the *same* tokens: ``num_tokens`` of the
validation split in a fixed order (``EVAL_SEED``), as next-token loss in nats/token and bits/byte (bytes per token
measured on those tokens' text: :func:`eval_set_bits_per_byte`; exactly 1 for the byte tokenizer), plus forward
throughput. :func:`write_report` renders the results as a
Markdown table and a Pareto plot (parameters vs validation bits/byte).
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_elastic.compat import cpu_backend_suspended
from megatron_elastic.data.loader import as_source, bits_per_byte_of, calibration_batches
from megatron_elastic.data.tokenizer import BitsPerByte, load_tokenizer
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.choose import budget_archs
from megatron_elastic.elastic.cost import arch_parameters
from megatron_elastic.elastic.layers.model import set_arch, use_arch
from megatron_elastic.elastic.source import load_parent, load_source
from megatron_elastic.model.builder import build_hybrid_model, parameter_count
from megatron_elastic.store.checkpoint import load_model_weights
from megatron_elastic.store.open_run import single_process_job
from megatron_elastic.training.lm import batch_to_device

EVAL_SEED = 4242


def fixed_eval_set(
    data_dir: str,
    seq_length: int = 256,
    num_tokens: int = 65536,
    vocab_size: Optional[int] = None,
    micro_batch_size: int = 8,
) -> List[dict]:
    """``num_tokens`` tokens of the validation split as batches, the same ones on every call."""
    return calibration_batches(
        data_dir, seq_length, num_tokens, micro_batch_size, seed=EVAL_SEED, split="valid", vocab_size=vocab_size
    )


def eval_set_bits_per_byte(data, batches: Sequence[dict]) -> BitsPerByte:
    """The bits/byte unit of ``batches`` (from :func:`fixed_eval_set` of ``data``, a ``DataSource`` or a
    ``prepare-data`` directory): bytes per token of their text, decoded with the data's tokenizer."""
    return bits_per_byte_of(load_tokenizer(as_source(data).tokenizer), [row for b in batches for row in b["tokens"]])


@torch.no_grad()
def evaluate_lm(model, batches: Sequence[dict], bits: BitsPerByte = BitsPerByte()) -> Dict[str, float]:
    """Token-weighted mean next-token loss over ``batches``: ``loss`` (nats/token), ``bpb`` (in the unit
    ``bits``), ``tokens_per_s`` (forward only, this process's threads)."""
    was_training = model.training
    model.eval()
    total, count, seconds = 0.0, 0, 0.0
    for batch in batches:
        b = batch_to_device(batch)
        tokens = b["tokens"]
        t0 = time.perf_counter()
        with cpu_backend_suspended():
            losses = model(tokens, b["position_ids"], None, labels=b["labels"])
        seconds += time.perf_counter() - t0
        mask = b["loss_mask"].float()
        total += float((losses.float() * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "bpb": bits(loss),
        "tokens": count,
        "tokens_per_s": sum(int(x["tokens"].numel()) for x in batches) / max(seconds, 1e-9),
    }


def load_standalone(path: str):
    """A plain (non-elastic) model from a ``pretrain`` or ``extract`` checkpoint, at TP=1, PP=1."""
    resolved, job = single_process_job(path)
    model = build_hybrid_model(job.model_config())
    load_model_weights(resolved, model)
    return model


def evaluate_checkpoint(path: str, batches: Sequence[dict], bits: BitsPerByte = BitsPerByte()) -> Dict[str, float]:
    """:func:`evaluate_lm` of a standalone checkpoint, with its parameter count."""
    model = load_standalone(path)
    return {"parameters": parameter_count(model), **evaluate_lm(model, batches, bits)}


def results_markdown(rows: List[dict]) -> str:
    """A Markdown table of ``rows`` (name, method, parameters, loss, bpb, tokens_per_s; optional tokens spent)."""
    spent = any("train_tokens" in r for r in rows)
    head = "| model | method | parameters | val loss (nats/token) | bits/byte | tokens/s |" + (
        " training tokens |" if spent else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['name']} | {r['method']} | {r['parameters']:,} | {r['loss']:.4f} | {r['bpb']:.3f} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
        if spent:
            line += f" {r['train_tokens']:,} |" if r.get("train_tokens") is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a base dependency
        return None
    return plt


def _save_bits_per_byte_plot(plt, fig, ax, path: str, title: str) -> str:
    """Axes labels (parameters vs held-out bits/byte), title, grid, legend; saves ``path`` and closes the figure."""
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("held-out bits/byte (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_plot(path: str, rows: List[dict], title: str = "validation bits/byte vs parameters") -> Optional[str]:
    """Parameters vs bits/byte, one series per method; returns the PNG path (None without matplotlib)."""
    plt = _pyplot()
    if plt is None:  # pragma: no cover - matplotlib is a base dependency
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = iter("os^Dvx*P")
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["parameters"], r["bpb"], r["name"]) for r in rows if r["method"] == method)
        xs, ys = [p[0] / 1e6 for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=next(markers, "o"), linestyle="-" if len(pts) > 1 else "none", label=method)
        for x, y, name in zip(xs, ys, (p[2] for p in pts)):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return _save_bits_per_byte_plot(plt, fig, ax, path, title)


def write_report(out_dir: str, title: str, rows: List[dict], sections: Sequence[str] = ()) -> str:
    """``report.md`` (and ``pareto.png``) in ``out_dir``; returns the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    plot = pareto_plot(os.path.join(out_dir, "pareto.png"), rows)
    parts = [f"# {title}", "", results_markdown(rows), ""]
    if plot:
        parts += ["![parameters vs validation bits/byte](pareto.png)", ""]
    parts += [s.rstrip() + "\n" for s in sections]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def evaluate_subnetworks(
    checkpoint: str, archs: Dict[str, "object"], batches: Sequence[dict], bits: BitsPerByte = BitsPerByte()
) -> Dict[str, dict]:
    """:func:`evaluate_lm` of sub-networks (name -> ElasticArch) of an elastic-capable checkpoint (e.g. the
    sorted parent: "pruned, not trained"), with their parameter counts. Nothing to score loads nothing."""
    if not archs:
        return {}
    model, job, _ = load_parent(checkpoint)
    config = job.model_config()
    out = {}
    for name, arch in archs.items():
        set_arch(model, arch)
        out[name] = {"parameters": arch_parameters(config, arch), **evaluate_lm(model, batches, bits)}
    set_arch(model, None)
    return out


def curve_budgets(trained: Sequence[float], points: int = 10) -> List[float]:
    """About ``points`` budgets evenly between the smallest trained budget and 1, plus every trained budget."""
    lo = min(trained)
    even = [round(lo + (1.0 - lo) * k / (points - 1), 4) for k in range(points)]
    return sorted(set(even) | {float(b) for b in trained} | {1.0}, reverse=True)


def budget_curve(
    elastic_checkpoint: str,
    sorted_checkpoint: str,
    budgets: Sequence[float],
    batches: Sequence[dict],
    bits: BitsPerByte = BitsPerByte(),
    progress: bool = True,
    scored: Optional[Dict[Tuple[str, str], dict]] = None,
) -> List[dict]:
    """The Pareto curve after training: every budget of ``budgets`` (trained or not, ``Router.choose_budgets``)
    scored zero-shot in the elastic model (what ``extract --budget`` writes, logit for logit) and, at the same
    architecture, in the sorted parent without training. One row per budget, largest first.

    ``scored`` holds scores already made on these ``batches`` (:func:`evaluate_lm`'s dicts), keyed
    ``("elastic", budget)`` (an extracted budget) and ``("pruned", budget)`` (that architecture of the sorted parent;
    at budget 1 the parent itself, which the sort leaves function-preserved): those are not scored again."""
    from tqdm import tqdm

    scored = dict(scored or {})
    src = load_source(elastic_checkpoint)
    choices = budget_archs(src.router, [f"{b:g}" for b in budgets], src.path)
    full = arch_parameters(src.config, ElasticArch.full(src.config))
    to_prune = {k: c.arch for k, c in choices.items() if ("pruned", k) not in scored}
    for name, res in evaluate_subnetworks(sorted_checkpoint, to_prune, batches, bits).items():
        scored["pruned", name] = res
    rows = []
    for name, choice in tqdm(choices.items(), desc="budget curve", disable=not progress):
        if ("elastic", name) not in scored:
            with use_arch(src.model, choice.arch):
                scored["elastic", name] = evaluate_lm(src.model, batches, bits)
        elastic, pruned = scored["elastic", name], scored["pruned", name]
        params = arch_parameters(src.config, choice.arch)
        rows.append(
            {
                "budget": name,
                "trained": choice.trained,
                "between": list(choice.between),
                "parameters": params,
                "fraction": params / full,
                "elastic_loss": elastic["loss"],
                "elastic_bpb": elastic["bpb"],
                "pruned_loss": pruned["loss"],
                "pruned_bpb": pruned["bpb"],
                "arch": choice.arch.to_dict(),
            }
        )
    return rows


def budget_curve_markdown(rows: List[dict]) -> str:
    lines = [
        "| budget | trained | parameters | fraction | elastic bits/byte | pruned, untrained bits/byte |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {'yes' if r['trained'] else 'no (zero-shot)'} | {r['parameters']:,} | "
            f"{r['fraction']:.3f} | {r['elastic_bpb']:.3f} | {r['pruned_bpb']:.3f} |"
        )
    return "\n".join(lines)


def budget_curve_plot(path: str, rows: List[dict], title: str = "every budget after one elastic run") -> Optional[str]:
    """Parameters vs bits/byte of the elastic budgets (trained: filled, untrained: hollow) and the pruned-untrained
    sub-models of the same sizes; returns the PNG path (None without matplotlib)."""
    plt = _pyplot()
    if plt is None:  # pragma: no cover - matplotlib is a base dependency
        return None
    rows = sorted(rows, key=lambda r: r["parameters"])
    x = [r["parameters"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(x, [r["elastic_bpb"] for r in rows], "-", color="C0", label="Nemotron Elastic (one run)")
    for trained, style in ((True, dict(marker="o")), (False, dict(marker="o", markerfacecolor="white"))):
        pts = [(xi, r["elastic_bpb"]) for xi, r in zip(x, rows) if r["trained"] == trained]
        if pts:
            ax.plot(
                *zip(*pts),
                linestyle="none",
                color="C0",
                label="trained budget" if trained else "untrained budget",
                **style,
            )
    ax.plot(x, [r["pruned_bpb"] for r in rows], "s--", color="C3", label="pruned from the sorted parent, no training")
    for xi, r in zip(x, rows):
        ax.annotate(r["budget"], (xi, r["elastic_bpb"]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    return _save_bits_per_byte_plot(plt, fig, ax, path, title)
