"""Activation-based width importance (Minitron): forward hooks on calibration batches, no gradients.

Per channel the score is ``sqrt(sum over batches and samples of (mean over tokens of |activation|)^2)``
(the public Minitron aggregation: mean over the sequence, L2 over the batch, in float32):

* hidden channel: outputs of every layer's pre-norm, summed over layers;
* FFN neuron: input of ``linear_fc2`` (after the activation, as ModelOpt) or output of ``linear_fc1``
  (as the paper), ``ffn_source="fc2_input" | "fc1_output"``;
* attention query head: L2 over the head's channels of the input of ``linear_proj``; ranked within its KV group;
* Mamba: the x part of ``in_proj``'s output (``mamba_source="x"``, the paper's and ModelOpt's choice) or the
  input of ``out_proj`` (the gated-norm output, ``"out_proj_input"``); a head-channel's score is the L2 over
  heads (Eq. 3), a head's score the L2 over its channels, or with ``mamba_head_channels=K`` over the K top-ranked
  channels only (D_top, Eq. 4); heads ranked within their B/C group.

Accumulators are summed over data-parallel ranks and the TP-sharded ones gathered in rank order, so every
rank ends with the same global scores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.elastic.arch import AXIS_FIELD
from megatron_elastic.errors import ConfigError
from megatron_elastic.importance.permute import Permutation, order_within_groups
from megatron_elastic.model.layouts import MambaLayout, QKVLayout
from megatron_elastic.parallel import tensor_parallel

FFN_SOURCES = ("fc2_input", "fc1_output")
MAMBA_SOURCES = ("x", "out_proj_input")


@dataclass
class WidthScores:
    hidden: torch.Tensor
    mamba_heads: Dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_head_dim: Dict[int, torch.Tensor] = field(default_factory=dict)
    attention_heads: Dict[int, torch.Tensor] = field(default_factory=dict)
    ffn: Dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_head_channels: int = 0  # D_top (Eq. 4) the Mamba head scores were taken over; 0: every channel

    def to_permutation(self, config) -> Permutation:
        """Most important first on every axis, within groups where the axis has groups."""
        desc = _descending
        return Permutation(
            hidden=desc(self.hidden),
            mamba_heads={i: order_within_groups(s, config.mamba_num_groups) for i, s in self.mamba_heads.items()},
            mamba_head_dim={i: desc(s) for i, s in self.mamba_head_dim.items()},
            attention_heads={
                i: order_within_groups(s, config.num_query_groups) for i, s in self.attention_heads.items()
            },
            ffn={i: order_within_groups(s, config.elastic_ffn_groups) for i, s in self.ffn.items()},
        )

    def to_dict(self) -> dict:
        lists = lambda d: {str(k): v.tolist() for k, v in d.items()}
        return {"hidden": self.hidden.tolist(), **{a: lists(getattr(self, a)) for a in AXIS_FIELD}}

    @classmethod
    def from_dict(cls, d: dict) -> "WidthScores":
        tensors = lambda m: {int(k): torch.tensor(v) for k, v in m.items()}
        return cls(torch.tensor(d["hidden"]), **{a: tensors(d[a]) for a in AXIS_FIELD})


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the highest score down (ties keep their order)."""
    return torch.sort(-scores, stable=True).indices


def _add(totals: Dict[str, torch.Tensor], key: str, act: torch.Tensor) -> None:
    """Sum into ``totals[key]`` the per-channel squared mean over tokens of ``|act|`` ([seq, batch, channels])."""
    v = act.detach().float().abs().mean(dim=0).pow(2).sum(dim=0)
    totals[key] = v if key not in totals else totals[key] + v


def _reduce_dp(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if (
        dist.is_initialized()
        and parallel_state.model_parallel_is_initialized()
        and parallel_state.get_data_parallel_world_size() > 1
    ):
        t = t.clone()
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t


def _gather_tp(t: torch.Tensor) -> torch.Tensor:
    size, _, group = tensor_parallel()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


@dataclass
class WidthStatistics:
    """This rank's running sums for the width scores (``totals``: "hidden" and each layer's index as a string),
    over ``batches_done`` calibration batches; a job saves and resumes it (:meth:`state_dict`)."""

    ffn_source: str = "fc2_input"
    mamba_source: str = "x"
    totals: Dict[str, torch.Tensor] = field(default_factory=dict)
    batches_done: int = 0

    def __post_init__(self):
        if self.ffn_source not in FFN_SOURCES:
            raise ConfigError(f"ffn_source must be one of {FFN_SOURCES}, got {self.ffn_source!r}")
        if self.mamba_source not in MAMBA_SOURCES:
            raise ConfigError(f"mamba_source must be one of {MAMBA_SOURCES}, got {self.mamba_source!r}")

    @contextmanager
    def hooks(self, model):
        """Forward hooks that sum every forward pass of ``model`` (whole network, any TP) into the totals."""
        config, handles = model.config, []
        add = lambda key: lambda act: _add(self.totals, key, act)
        on_output = lambda f, pick=lambda o: o: lambda mod, inp, out: f(pick(out))
        on_input = lambda f: lambda mod, inp: f(inp[0])
        hidden = add("hidden")
        for layer in model.decoder.layers:
            i = layer.layer_number - 1
            sym, acc = config.hybrid_pattern[i], add(str(i))
            if sym == MAMBA:
                mixer = layer.mixer
                x = mixer.layout.in_proj_part("x")  # this rank's x rows of in_proj's output
                handles.append(layer.norm.register_forward_hook(on_output(hidden)))
                if self.mamba_source == "x":
                    handles.append(mixer.in_proj.register_forward_hook(on_output(acc, lambda o, x=x: o[0][..., x])))
                else:
                    handles.append(mixer.out_proj.register_forward_pre_hook(on_input(acc)))
            elif sym == ATTENTION:
                handles.append(layer.input_layernorm.register_forward_hook(on_output(hidden)))
                handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(on_input(acc)))
            else:
                handles.append(layer.pre_mlp_layernorm.register_forward_hook(on_output(hidden)))
                if self.ffn_source == "fc2_input":
                    handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(on_input(acc)))
                else:
                    handles.append(layer.mlp.linear_fc1.register_forward_hook(on_output(acc, lambda o: o[0])))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(self, config, mamba_head_channels: int = 0) -> WidthScores:
        """The global scores: sums reduced over DP, TP shards gathered in rank order (collective). A Mamba head is
        scored over its ``mamba_head_channels`` top-ranked channels (D_top of Eq. 4; 0: all of them)."""
        if "hidden" not in self.totals:
            raise ConfigError("no calibration batches were given")
        if not 0 <= mamba_head_channels <= config.mamba_head_dim:
            raise ConfigError(
                f"--mamba-head-channels {mamba_head_channels}: between 1 and the head dim ({config.mamba_head_dim}), "
                f"or 0 for all channels"
            )
        scores = WidthScores(hidden=_reduce_dp(self.totals["hidden"]).sqrt(), mamba_head_channels=mamba_head_channels)
        for i in sorted(int(k) for k in self.totals if k != "hidden"):  # the same order on every rank
            total = _gather_tp(_reduce_dp(self.totals[str(i)]))
            sym = config.hybrid_pattern[i]
            if sym == MAMBA:
                grid = total.sqrt().view(config.mamba_num_heads, config.mamba_head_dim)
                scores.mamba_head_dim[i] = grid.norm(dim=0)
                top = _descending(scores.mamba_head_dim[i])[: mamba_head_channels or config.mamba_head_dim]
                scores.mamba_heads[i] = grid[:, top].norm(dim=1)
            elif sym == ATTENTION:
                scores.attention_heads[i] = (
                    total.sqrt().view(config.num_attention_heads, config.kv_channels).norm(dim=1)
                )
            elif config.gated_linear_unit and self.ffn_source == "fc1_output":
                scores.ffn[i] = total.view(tensor_parallel()[0], 2, -1)[:, 0].flatten().sqrt()  # the gate half
            else:
                scores.ffn[i] = total.sqrt()
        return scores

    def state_dict(self) -> dict:
        return {
            "ffn_source": self.ffn_source,
            "mamba_source": self.mamba_source,
            "totals": dict(self.totals),
            "batches_done": self.batches_done,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "WidthStatistics":
        return cls(**d)


@torch.no_grad()
def accumulate_width(
    model,
    batches: Sequence,
    forward: Callable,
    stats: WidthStatistics,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    after_batch: Optional[Callable[[WidthStatistics], None]] = None,
) -> WidthStatistics:
    """Sum ``batches[stats.batches_done:]`` into ``stats`` (``forward(model, batch)``: any forward pass; the
    hooks see the activations); ``after_batch(stats)`` after each (where a job saves it)."""
    was_training = model.training
    model.eval()
    try:
        with stats.hooks(model):
            todo = batches[stats.batches_done :]
            for batch in progress(todo) if progress else todo:
                forward(model, batch)
                stats.batches_done += 1
                if after_batch is not None:
                    after_batch(stats)
    finally:
        model.train(was_training)
    return stats


def collect_width_scores(
    model,
    batches: Iterable,
    forward: Callable,
    ffn_source: str = "fc2_input",
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    mamba_source: str = "x",
    mamba_head_channels: int = 0,
) -> WidthScores:
    """Run ``forward(model, batch)`` on every calibration batch with hooks and return the global scores.
    ``model`` is a (plain or elastic) hybrid model holding the whole network (PP=1) at any TP size."""
    stats = WidthStatistics(ffn_source, mamba_source)
    return accumulate_width(model, list(batches), forward, stats, progress).scores(model.config, mamba_head_channels)


def magnitude_scores(state_dict: Dict[str, torch.Tensor], config) -> WidthScores:
    """A weight-magnitude baseline on a full (TP=1) state dict: L2 norms of the rows/columns an axis owns."""
    sd = {k: v.float() for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    hidden = sd["embedding.word_embeddings.weight"].norm(dim=0)
    out = WidthScores(hidden=hidden)
    hd, nh = config.mamba_head_dim, config.mamba_num_heads
    for i, sym in enumerate(config.hybrid_pattern):
        p = f"decoder.layers.{i}."
        if sym == MAMBA:
            x = MambaLayout.of_config(config).in_proj_part("x")
            x_rows = sd[p + "mixer.in_proj.weight"][x].norm(dim=1).view(nh, hd)
            out.mamba_heads[i] = x_rows.norm(dim=1)
            out.mamba_head_dim[i] = x_rows.norm(dim=0)
        elif sym == ATTENTION:
            q, hn = config.num_attention_heads, config.kv_channels
            q_rows = QKVLayout.of_config(config).q_k_v_rows()[0]
            w = sd[p + "self_attention.linear_qkv.weight"][q_rows]
            out.attention_heads[i] = w.reshape(q, hn, -1).flatten(1).norm(dim=1)
        else:
            out.ffn[i] = sd[p + "mlp.linear_fc1.weight"][: config.ffn_hidden_size].norm(dim=1)
    return out
