"""Depth importance: normalized MSE of the logits when one layer is skipped (the paper's criterion),

    s_j = sum (logits_full - logits_without_j)^2 / sum logits_full^2,

over the calibration batches; a higher score means a more important layer. The iterative variant removes the
least important layer and re-scores the rest with it removed, until one layer remains.

Memory is bounded by design: a batch keeps the full model's final hidden states ``[s, b, h]``, never its logits;
each candidate's logits and the full model's are made a sequence chunk at a time from hidden states (at most
``chunk_bytes`` of float32 logits per chunk, vocab-sharded under TP), and only their float64 *sums* are kept.
The search is a list of rounds (one-shot: one round over every layer; iterative: a round per removed layer), each a
sum over batches; :class:`DepthSearch` is its whole state, so a job can save it after any batch and resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.layers.model import set_arch
from megatron_elastic.training.lm import chunk_logits, lm_hidden

CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk (per rank): 4096 tokens of a 16,384-id vocabulary shard


def _model_parallel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over TP (vocab shards) and DP (calibration shards); identity in one process."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        for group, size in (
            (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()),
            (parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()),
        ):
            if size > 1:
                dist.all_reduce(t, group=group)
    return t


@dataclass
class DepthSearch:
    """The state of a depth search: layers removed so far with their scores, and the current round's sums."""

    num_layers: int
    iterative: bool = False
    removed: List[int] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)  # score of removed[k] when it was removed
    num: Optional[torch.Tensor] = None  # this round's per-candidate sum of squared differences (this rank's part)
    den: float = 0.0  # this round's sum of squared full logits (this rank's part)
    batches_done: int = 0  # batches summed into this round

    @property
    def finished(self) -> bool:
        return (not self.iterative and bool(self.scores)) or len(self.removed) >= self.num_layers - 1

    def candidates(self) -> List[int]:
        return [j for j in range(self.num_layers) if j not in self.removed]

    def add_batch(self, model, batch, hidden: Callable = lm_hidden, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Sum one batch into the current round."""
        cands = self.candidates()
        if self.num is None:
            self.num = torch.zeros(len(cands), dtype=torch.float64)
        config = model.config
        set_arch(model, None)
        full = hidden(model, batch)
        chunk = _chunk_tokens(model, full, chunk_bytes)
        for start in range(0, full.shape[0], chunk):
            self.den += float(chunk_logits(model, full[start : start + chunk]).float().pow(2).sum(dtype=torch.float64))
        for k, j in enumerate(cands):
            arch = ElasticArch.full(config)
            arch.skipped_layers = tuple(sorted({*self.removed, j}))
            set_arch(model, arch)
            h = hidden(model, batch)
            for start in range(0, full.shape[0], chunk):
                a = chunk_logits(model, full[start : start + chunk]).float()
                a -= chunk_logits(model, h[start : start + chunk]).float()
                self.num[k] += float(a.pow_(2).sum(dtype=torch.float64))
            del h
        set_arch(model, None)
        self.batches_done += 1

    def end_round(self) -> None:
        """Reduce the round's sums over TP and DP (collective) and record its result."""
        cands = self.candidates()
        totals = _model_parallel_sum(torch.cat([self.num, torch.tensor([self.den], dtype=torch.float64)]))
        nmse = totals[:-1] / totals[-1]
        if self.iterative:
            k = int(torch.argmin(nmse))
            self.removed.append(cands[k])
            self.scores.append(float(nmse[k]))
        else:
            self.removed, self.scores = list(cands), [float(x) for x in nmse]
        self.num, self.den, self.batches_done = None, 0.0, 0

    def result(self) -> Tuple[torch.Tensor, List[int]]:
        """(per-layer NMSE, ranking most important first); the last layer left in an iterative search scores inf."""
        scores = torch.zeros(self.num_layers, dtype=torch.float64)
        for j, s in zip(self.removed, self.scores):
            scores[j] = s
        if not self.iterative:
            return scores, torch.sort(-scores, stable=True).indices.tolist()
        last = next(j for j in range(self.num_layers) if j not in self.removed)
        scores[last] = float("inf")
        return scores, [last] + self.removed[::-1]

    def state_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "iterative": self.iterative,
            "removed": list(self.removed),
            "scores": list(self.scores),
            "num": self.num,
            "den": self.den,
            "batches_done": self.batches_done,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "DepthSearch":
        return cls(**d)


def _chunk_tokens(model, hidden: torch.Tensor, chunk_bytes: int) -> int:
    vocab_shard = model.output_layer.weight.shape[0]
    return max(1, chunk_bytes // (4 * vocab_shard * hidden.shape[1]))


@torch.no_grad()
def run_depth_search(
    model,
    batches: Sequence,
    search: DepthSearch,
    hidden: Callable = lm_hidden,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    after_batch: Optional[Callable[[DepthSearch], None]] = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> DepthSearch:
    """Run ``search`` to its end over ``batches`` (this rank's calibration shard), from wherever it stands;
    ``after_batch(search)`` is called after every batch (where a job saves it)."""
    was_training = model.training
    model.eval()
    try:
        rounds = range(len(search.removed), search.num_layers - 1) if search.iterative else range(1)
        for _ in progress(rounds) if progress and not search.finished else rounds:
            if search.finished:
                break
            for batch in batches[search.batches_done :]:
                search.add_batch(model, batch, hidden, chunk_bytes)
                if after_batch is not None:
                    after_batch(search)
            search.end_round()
            if after_batch is not None:
                after_batch(search)
        return search
    finally:
        set_arch(model, None)
        model.train(was_training)


def depth_scores(
    model,
    batches: Iterable,
    hidden: Callable = lm_hidden,
    iterative: bool = False,
    progress: Optional[Callable] = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Tuple[torch.Tensor, List[int]]:
    """Return (per-layer NMSE scores, ranking most-important-first). ``model`` is an elastic hybrid model
    (whole network, any TP); ``hidden(model, batch)`` returns its final hidden states (:func:`lm_hidden` for
    GPTDataset batches). In the iterative variant a layer's score is the NMSE at the moment it was removed."""
    search = DepthSearch(len(model.config.hybrid_pattern), iterative)
    return run_depth_search(model, list(batches), search, hidden, progress, chunk_bytes=chunk_bytes).result()
