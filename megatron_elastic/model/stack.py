"""Megatron's hybrid stack with a final norm chosen by the spec.

Megatron's ``MambaStack``/``HybridStack`` hard-codes TransformerEngine's ``TENorm`` as the final norm; this
subclass takes the norm class as a spec parameter (``final_norm``) so the stack also builds without TE.
Everything else (layer allocation from the pattern, pipeline split, forward, sharded state dict) is
Megatron's own. With ``recompute_granularity="full"`` every layer's training forward is checkpointed: only its
input is kept and the layer re-runs in the backward pass. megatron-core >= 0.18's stack does that itself;
for 0.16/0.17, whose stack ignores the setting, ``compat.add_layer_recompute`` wraps each layer's forward.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import build_module

from megatron_elastic.compat import STACK_HAS_NATIVE_RECOMPUTE, add_layer_recompute
from megatron_elastic.compat import HybridStack as _MegatronHybridStack


class HybridStack(_MegatronHybridStack):
    def __init__(self, config, submodules, *args, final_norm=None, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            if final_norm is None:
                raise ValueError("HybridStack needs a final_norm spec parameter when post_layer_norm=True")
            self.final_norm = build_module(
                final_norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
        if getattr(config, "recompute_granularity", None) == "full" and not STACK_HAS_NATIVE_RECOMPUTE:
            add_layer_recompute(self.layers)
