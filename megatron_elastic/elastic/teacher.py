"""The teacher and the teacher/student pair that Megatron's schedules run as one model chunk.

The teacher is the frozen parent (paper Eq. 16) or, in a stage with a trainable teacher (Eq. 15,
``distill.teacher``), the student model itself at its full budget: the pair then runs the student twice per
micro-batch, at the full architecture (the teacher half, with gradients) and at the micro-batch's sub-model
(``forward(..., choice=(arch, gates))``).

Under pipeline parallelism the teacher is split over the same stages as the student, and the two travel
through the pipeline together: a stage's output is ``cat([student_hidden, teacher_hidden], dim=batch)`` (so
the schedule is called with twice the micro-batch size for its p2p shapes). The teacher half carries no
gradient. On the last stage the pair returns ``(student_logits, teacher_logits)`` for the KD loss.

The frozen teacher's output is cached per data micro-batch (``cache_key``), so when several budgets train on the
same micro-batch (``budgets_per_step: all``) it runs once. A trainable teacher runs in every micro-batch (its
graph is freed by that micro-batch's backward).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from megatron_elastic.elastic.layers.model import set_arch


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: no gradients, no optimizer state, eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _set_input(module: nn.Module, tensor: Optional[torch.Tensor]) -> None:
    from megatron.core.utils import get_attr_wrapped_model

    get_attr_wrapped_model(module, "set_input_tensor")([tensor])


class DistillationPair(nn.Module):
    """One pipeline stage of (student, frozen teacher). ``student`` may be DDP-wrapped."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config, pre_process: bool, post_process: bool):
        super().__init__()
        self.student, self.teacher = student, freeze(teacher)
        self.config, self.pre_process, self.post_process = config, pre_process, post_process
        self.model_type = teacher.model_type  # read by Megatron's schedules
        self._cache_key: Any = None
        self._cache: Optional[torch.Tensor] = None
        self.trainable_teacher = False  # set per step by the run (distill.teacher of the step's stage)
        self._halves: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        t = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if t is None:
            _set_input(self.student, None)
            _set_input(self.teacher, None)
            return
        b = t.shape[1] // 2  # [s, 2b, h]: student rows first
        if self.trainable_teacher:  # both halves are the student's, each at its own architecture (see forward)
            self._halves = (t[:, :b], t[:, b:])
            return
        _set_input(self.student, t[:, :b])
        _set_input(self.teacher, t[:, b:].detach())

    def forward(self, input_ids, position_ids, attention_mask, cache_key: Any = None, choice=None):
        if self.trainable_teacher:
            return self._forward_trainable_teacher(input_ids, position_ids, attention_mask, choice)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if cache_key is not None and cache_key == self._cache_key:
            teacher_out = self._cache
        else:
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)
            self._cache_key, self._cache = cache_key, teacher_out
        if self.post_process:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out], dim=1)

    def _forward_trainable_teacher(self, input_ids, position_ids, attention_mask, choice):
        """Eq. 15: the teacher half is the student at its full budget, the student half at ``choice`` (arch, gates),
        both with gradients (the KD loss detaches the teacher's logits; its own loss is the CE)."""
        if choice is None:
            raise ValueError("a trainable teacher needs the micro-batch's choice: forward(..., choice=(arch, gates))")
        arch, gates = choice
        student_in, teacher_in = self._halves
        if not self.pre_process:
            _set_input(self.student, teacher_in)
        set_arch(self.student, None)
        teacher_out = self.student(input_ids, position_ids, attention_mask)
        if not self.pre_process:
            _set_input(self.student, student_in)
        set_arch(self.student, arch, gates)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out], dim=1)

    def clear_cache(self) -> None:
        self._cache_key, self._cache = None, None
