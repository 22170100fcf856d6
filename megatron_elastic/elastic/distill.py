"""Knowledge-distillation losses on (vocab-parallel) logits.

``kd_loss`` is the forward KL(teacher || student) at temperature T, per token, times T^2, averaged over the
loss mask. Logits may be split over the vocabulary across tensor-parallel ranks (Megatron's
``parallel_output=True``): the softmax max and denominators and the KL sum are all-reduced over the TP group,
and the backward pass gives every rank the gradient of its own vocabulary shard.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_elastic.errors import ConfigError


def _tp_all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce in the forward pass, identity in the backward pass: for a sum of per-shard terms into a loss
    that every rank then differentiates (each rank's backward covers its own terms)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if op == dist.ReduceOp.SUM:
        return reduce_from_tensor_model_parallel_region(t, group=group)
    t = t.detach().clone()  # only used for the (non-differentiated) max
    dist.all_reduce(t, op=op, group=group)
    return t


def _log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    m = _tp_all_reduce(x.detach().amax(dim=-1, keepdim=True), dist.ReduceOp.MAX, group)
    z = torch.exp(x - m).sum(dim=-1, keepdim=True)
    if group is not None and dist.get_world_size(group) > 1:
        # Every rank's loss terms use the global denominator, so its gradient is summed back to all shards.
        from torch.distributed.nn.functional import all_reduce

        z = all_reduce(z, group=group)
    return x - m - torch.log(z)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    loss_mask: Optional[torch.Tensor] = None,
    tp_group=None,
) -> torch.Tensor:
    """Mean over (masked) tokens of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Shapes: logits ``[..., vocab_shard]``; ``loss_mask`` ``[...]`` (1 = counted). ``tp_group``: the group the
    vocabulary is split over (None = not split). The teacher gets no gradient.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    s = _log_softmax(student_logits.float() / temperature, tp_group)
    with torch.no_grad():
        t = _log_softmax(teacher_logits.detach().float() / temperature, tp_group)
    kl = _tp_all_reduce((t.exp() * (t - s)).sum(dim=-1), dist.ReduceOp.SUM, tp_group)
    if loss_mask is None:
        return kl.mean() * temperature**2
    mask = loss_mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2
