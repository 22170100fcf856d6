"""Elastic hybrid stack: active hidden width and depth (skipped layers are identity).

Pipeline parallelism: stages exchange the *full* hidden size, with the inactive channels zero (a stage
slices its input to the active width and pads its output back). Megatron's schedules then keep one fixed
p2p shape whatever the choice, at the cost of sending ``hidden_size - active`` zero channels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.utils import WrappedTensor

from megatron_elastic.model.stack import HybridStack


class ElasticHybridStack(HybridStack):
    _active_hidden: Optional[int] = None
    hidden_gate: Optional[torch.Tensor] = None

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
        return out
