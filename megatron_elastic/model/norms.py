"""The RMSNorm of the local specs: ``torch.nn.RMSNorm`` built like Megatron's norms
(``RMSNorm(config, hidden_size, eps)``), usable with sequence parallelism.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. With it, each TP rank normalises its own part of the
sequence with the full (replicated) weight, so the weight's gradient is a partial sum: the weight is marked
``sequence_parallel`` and Megatron's ``finalize_model_grads`` sums it over the TP group (as it does for TE's norms).
"""

from __future__ import annotations

import warnings

import torch

# In a bf16 model the norms keep their weights in float32 (as Megatron's mixed precision keeps norms): torch then
# normalises a bf16 input in float32 without its fused kernel and says so once per process. The numbers are the
# intended ones; the warning only alarms a demo's reader.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"{type(self).__name__} needs normalization='RMSNorm', got {config.normalization!r}")
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))
