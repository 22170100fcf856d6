"""Megatron linear layers and a norm that compute with a *slice* of their weights.

* ``ElasticColumnParallelLinear``: input features = the leading ``x.shape[-1]`` columns of the weight (the
  active hidden size), output = the local rows in ``active_rows`` (an index tensor, or a slice for a
  contiguous range, taken as a view) or all rows.
* ``ElasticRowParallelLinear``: input = the local columns in ``active_cols`` or all; output = the first
  ``active_output_size`` rows (the active hidden size) or all, times ``output_gate`` when one is set (the
  router's gate of the block this projection closes).
* ``ElasticRMSNorm``: RMSNorm over the first ``x.shape[-1]`` channels with the matching weight prefix.

With nothing set they are exactly their Megatron parents. Index tensors are local to the TP rank; the TP
communication is Megatron's own (the same mapping functions and ``_forward_impl`` as the parents).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_elastic.compat import foldable
from megatron_elastic.model.norms import RMSNorm

Index = Union[torch.Tensor, slice]


def take(t: torch.Tensor, index: Index, dim: int = 0) -> torch.Tensor:
    """``t`` restricted to ``index`` along ``dim``: a view for a slice, a gathered copy for an index tensor."""
    if isinstance(index, slice):
        return t[(slice(None),) * dim + (index,)]
    return t.index_select(dim, index)


def as_index(idx: torch.Tensor) -> Index:
    """A contiguous ascending index tensor becomes a slice (so weights are taken as views, not copies)."""
    if idx.numel() > 0 and int(idx[-1]) - int(idx[0]) + 1 == idx.numel() and bool((idx.diff() == 1).all()):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _linear_impl(layer, input_parallel, weight, bias, allreduce_dgrad, tp_group, sequence_parallel=False):
    """Megatron's linear autograd function (the parents' ``_forward_impl``) on a sliced weight. Sliced weights
    are temporaries without ``.main_grad``, so the fused wgrad-accumulation path is only used unsliced. With
    ``sequence_parallel`` it all-gathers the sequence-split input first (and reduce-scatters its gradient)."""
    fusion = layer.gradient_accumulation_fusion and weight is layer.weight
    return layer._forward_impl(
        input=input_parallel,
        weight=weight,
        bias=bias,
        gradient_accumulation_fusion=fusion,
        allreduce_dgrad=allreduce_dgrad,
        sequence_parallel=sequence_parallel,
        tp_group=tp_group,
    )


class ElasticColumnParallelLinear(ColumnParallelLinear):
    active_rows: Optional[Index] = None

    def forward(self, input_, weight=None, runtime_gather_output=None):
        input_ = foldable(input_)  # one matrix product on CPU for a weight without gradient (compat.foldable)
        weight = self.weight if weight is None else weight
        in_features = input_.shape[-1]
        if self.active_rows is None and in_features == weight.shape[1]:
            return super().forward(
                input_, weight=None if weight is self.weight else weight, runtime_gather_output=runtime_gather_output
            )
        if self.explicit_expert_comm:
            raise NotImplementedError("expert linears are not elastic")
        w = weight[:, :in_features] if in_features != weight.shape[1] else weight
        bias = self.bias if not self.skip_bias_add else None
        if self.active_rows is not None:
            w = take(w, self.active_rows)
            bias = take(bias, self.active_rows) if bias is not None else None
        # As the parent: the input is used as it is when the backward all-reduces its gradient or when it is a
        # sequence-parallel part (gathered inside the linear).
        sp = self.sequence_parallel
        input_parallel = (
            input_ if self.allreduce_dgrad or sp else copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        )
        out = _linear_impl(self, input_parallel, w, bias, self.allreduce_dgrad, self.tp_group, sp)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            if self.active_rows is not None:
                raise NotImplementedError("gathering a row-sliced column-parallel output is not supported")
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        out_bias = self.bias if self.skip_bias_add else None
        if out_bias is not None and self.active_rows is not None:
            out_bias = take(out_bias, self.active_rows)
        return out, out_bias


class ElasticRowParallelLinear(RowParallelLinear):
    active_cols: Optional[Index] = None
    active_output_size: Optional[int] = None
    output_gate: Optional[torch.Tensor] = None  # the router's scalar gate for the block this layer closes

    def forward(self, input_):
        out, bias = self._sliced_forward(foldable(input_))
        if self.output_gate is not None:
            out = out * self.output_gate
        return out, bias

    def _sliced_forward(self, input_):
        if self.active_cols is None and self.active_output_size is None:
            return super().forward(input_)
        if self.explicit_expert_comm or not self.input_is_parallel:
            raise NotImplementedError("elastic slicing needs input_is_parallel (and no expert linears)")
        w = self.weight
        if self.active_output_size is not None:
            w = w[: self.active_output_size]
        if self.active_cols is not None:
            w = take(w, self.active_cols, dim=1)
        out = _linear_impl(self, input_, w, None, False, None)
        if self.sequence_parallel:  # each rank keeps the sum over ranks of its part of the sequence
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        bias = self.bias
        if bias is not None and self.active_output_size is not None:
            bias = bias[: self.active_output_size]
        if not self.skip_bias_add:
            return (out + bias if bias is not None else out), None
        return out, bias


class ElasticRMSNorm(RMSNorm):
    """RMSNorm over the active (leading) channels of its input; exactly ``torch.nn.RMSNorm`` at full width.
    Built like Megatron's norms: ``ElasticRMSNorm(config, hidden_size, eps)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        if h == self.weight.shape[0]:
            return super().forward(x)
        return F.rms_norm(x, (h,), self.weight[:h], self.eps)
