"""Build an elastic hybrid model and select the active sub-model (:func:`set_arch` / :func:`use_arch`)."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Dict, Optional

import torch

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.elastic.arch import AXIS_FIELD, ElasticArch
from megatron_elastic.elastic.layers.linear import ElasticColumnParallelLinear
from megatron_elastic.elastic.layers.mlp import set_mlp_elastic
from megatron_elastic.elastic.layers.spec import elastic_hybrid_stack_spec
from megatron_elastic.model.builder import build_hybrid_model
from megatron_elastic.model.config import HybridConfig

# Gate keys: "hidden", and "<axis>.<layer>" for axis in AXES (layer = global 0-based index).
AXES = (*AXIS_FIELD, "depth")


def build_elastic_model(config: HybridConfig, **kwargs):
    """A Megatron hybrid LM built from :func:`elastic_hybrid_stack_spec`; at the full choice (the default)
    it computes exactly what the plain model with the same weights computes."""
    model = build_hybrid_model(config, stack_spec=elastic_hybrid_stack_spec(), **kwargs)
    if getattr(model, "output_layer", None) is not None:
        # Same parameters, a forward that takes the active hidden width from its input (ModelOpt-style
        # conversion of a built module; MambaModel/HybridModel construct the output layer directly).
        model.output_layer.__class__ = ElasticColumnParallelLinear
    return model


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _gate(gates: Optional[Dict[str, torch.Tensor]], *keys: str) -> Optional[torch.Tensor]:
    if not gates:
        return None
    found = [gates[k] for k in keys if k in gates]
    if not found:
        return None
    g = found[0]
    for other in found[1:]:
        g = g * other
    return g


def set_arch(model, arch: Optional[ElasticArch] = None, gates: Optional[Dict[str, torch.Tensor]] = None) -> ElasticArch:
    """Make ``model`` (elastic, possibly DDP-wrapped, one PP stage) compute the sub-model ``arch`` (None = the
    full parent) until the next call. ``gates`` maps ``"hidden"`` and ``"<axis>.<layer>"`` to scalar tensors
    that multiply the corresponding active slice (the router's straight-through samples).

    The choice also travels with each forward pass: with activation recompute, the stack puts itself back at
    the choice of the forward pass whose gradient is flowing before its layers re-run (Megatron's 1F1B
    schedule runs micro-batch k+1's forward, at another choice, before micro-batch k's backward). With
    recompute the modules also multiply by leaf stand-ins of the gates that pass each gradient they receive on
    to the gate's own graph (:func:`_linked_to`), so that a re-run layer's backward (Megatron's reentrant
    recompute) never runs through the router's graph itself, which several layers share; the gates' gradients
    then arrive through ``backward()`` (what Megatron's schedules call), not ``torch.autograd.grad``."""
    m = _unwrap(model)
    config = m.config
    arch = (arch or ElasticArch.full(config)).validate(config)
    unknown = [k for k in (gates or {}) if k != "hidden" and k.split(".")[0] not in AXES]
    if unknown:
        raise KeyError(f"unknown gate key(s) {unknown}; use 'hidden' or '<axis>.<layer>' with axis in {AXES}")
    if gates and config.recompute_granularity is not None:
        gates = {k: _linked_to(g) for k, g in gates.items()}
    _set_stack_arch(m.decoder, config, arch, gates)
    m.decoder.choice = functools.partial(_set_stack_arch, m.decoder, config, arch, gates)
    return arch


def _linked_to(gate: torch.Tensor) -> torch.Tensor:
    """A leaf with ``gate``'s value whose every gradient is passed on into ``gate``'s graph (kept for further
    passes): each backward that reaches the stand-in (one per micro-batch, or one per re-run layer under
    reentrant recompute) adds its part to the router's gradients, and the router's graph is never freed while a
    layer still needs it."""
    if not gate.requires_grad:
        return gate
    leaf = gate.detach().requires_grad_(True)
    leaf.register_hook(functools.partial(_pass_on, gate))
    return leaf


def _pass_on(gate: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    torch.autograd.backward(gate, grad, retain_graph=True)
    return grad


def _set_stack_arch(stack, config, arch: ElasticArch, gates) -> None:
    stack.set_elastic(arch.hidden_size, arch.skipped_layers, _gate(gates, "hidden"))
    for layer in stack.layers:
        i = layer.layer_number - 1
        symbol = config.hybrid_pattern[i]
        if symbol == MAMBA:
            layer.mixer.set_elastic(
                arch.hidden_size,
                arch.mamba_num_heads[i],
                arch.mamba_head_dim[i],
                _gate(gates, f"mamba_heads.{i}", f"mamba_head_dim.{i}", f"depth.{i}"),
            )
        elif symbol == ATTENTION:
            layer.self_attention.set_elastic(
                arch.hidden_size, arch.num_attention_heads[i], _gate(gates, f"attention_heads.{i}", f"depth.{i}")
            )
        else:
            set_mlp_elastic(
                layer.mlp, arch.hidden_size, arch.ffn_hidden_size[i], _gate(gates, f"ffn.{i}", f"depth.{i}")
            )


@contextmanager
def use_arch(model, arch: Optional[ElasticArch] = None, gates: Optional[Dict[str, torch.Tensor]] = None):
    """``with use_arch(model, arch): ...`` runs the block at ``arch`` and restores the full parent after."""
    set_arch(model, arch, gates)
    try:
        yield
    finally:
        set_arch(model, None)
