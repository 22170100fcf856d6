"""Elastic hybrid stack: active hidden width and depth (skipped layers are identity).

With activation recompute the choice travels with each forward pass: the stack's output carries a gradient hook
that restores the pass's choice before its layers re-run in the backward pass.

Pipeline parallelism: stages exchange the *full* hidden size, with the inactive channels zero (a stage
slices its input to the active width and pads its output back). Megatron's schedules then keep one fixed
p2p shape whatever the choice, at the cost of sending ``hidden_size - active`` zero channels.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.utils import WrappedTensor

from megatron_elastic.model.stack import HybridStack


def _restore_choice(choice: Callable[[], None], grad: torch.Tensor) -> torch.Tensor:
    # The backward pass runs without grad mode; the restored gates (products of the router's samples) must require
    # grad as they did in the forward pass, so the re-run layers save the same tensors and pass the gates' gradient.
    with torch.enable_grad():
        choice()
    return grad


class ElasticHybridStack(HybridStack):
    _active_hidden: Optional[int] = None
    hidden_gate: Optional[torch.Tensor] = None
    # Puts the stack and its layers back at the current choice (set by ``elastic_model.set_arch``).
    choice: Optional[Callable[[], None]] = None

    def set_elastic(self, hidden_size: int, skipped_layers, hidden_gate: Optional[torch.Tensor] = None) -> None:
        """Active hidden width, and the (global) indices of the layers that are the identity."""
        self._active_hidden = None if hidden_size == self.config.hidden_size else hidden_size
        skipped = frozenset(skipped_layers)
        for layer in self.layers:
            layer.skipped = layer.layer_number - 1 in skipped
        self.hidden_gate = hidden_gate

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        h = self._active_hidden
        if self.pre_process and (h is not None or self.hidden_gate is not None):
            if isinstance(hidden_states, WrappedTensor):  # Megatron's inference path wraps the embeddings
                hidden_states = hidden_states.unwrap()
            if h is not None:
                hidden_states = hidden_states[..., :h]
            if self.hidden_gate is not None:
                hidden_states = hidden_states * self.hidden_gate
        elif h is not None and self.input_tensor is not None:
            self.input_tensor = self.input_tensor[..., :h]
        out = super().forward(hidden_states, attention_mask, *args, **kwargs)
        if not self.post_process and h is not None:
            out = F.pad(out, (0, self.config.hidden_size - h))
        if self.choice is not None and self._recomputes() and out.requires_grad:
            # The gradient of this output arrives before any layer of this pass re-runs: restore this pass's
            # choice first (another micro-batch's forward may have changed it since).
            out.register_hook(functools.partial(_restore_choice, self.choice))
        return out

    def _recomputes(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.config.recompute_granularity is not None
