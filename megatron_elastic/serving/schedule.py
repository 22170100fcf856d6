"""Budget schedules: one generation that switches budgets as it goes, e.g. a small budget for the reasoning
trace and the full one for the answer (``"0.5 until </think>, then 1.0"``) or by token count
(``"0.5 for 256, then 1.0"``), served from the one weight copy of an elastic checkpoint.

Switching is a re-prefill: the next budget's Mamba states and KV cache are built by running its sub-model over the
prompt and every token generated so far, then decoding goes on from there. A smaller budget's caches cannot be
widened into a larger one's (its Mamba states and keys come from different hidden states in every layer after the
first), so this is the handover that gives exactly what the larger budget would have computed on that context:
a switched generation equals, token for token, the smaller budget on the prefix followed by the larger budget on
prefix + generated tokens. Its cost is one prefill of the context at the new budget (``benchmarks/budget_switching.py``
measures it).
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.layers.model import use_arch
from megatron_elastic.errors import ConfigError
from megatron_elastic.serving.decode import stream

SYNTAX = "'BUDGET [until TEXT | for N], then BUDGET ...', e.g. '0.5 until </think>, then 1.0' or '0.5 for 128, then 1'"


@dataclass(frozen=True)
class Phase:
    """One budget of a schedule and when it hands over: after ``tokens`` tokens of its own, or once the generation
    ends with ``until`` (a text; ``until_ids`` its token ids, see :meth:`BudgetSchedule.with_token_ids`). The last
    phase runs to the end."""

    budget: str
    tokens: Optional[int] = None
    until: Optional[str] = None
    until_ids: Tuple[int, ...] = ()

    def ends_after(self, generated: Sequence[int], own: int) -> bool:
        """Whether this phase hands over after ``generated`` (all new tokens so far; ``own`` of them its own)."""
        if self.tokens is not None:
            return own >= self.tokens
        n = len(self.until_ids)
        return bool(n) and own >= 1 and tuple(generated[-n:]) == self.until_ids

    def __str__(self) -> str:
        if self.tokens is not None:
            return f"{self.budget} for {self.tokens}"
        return f"{self.budget} until {self.until}" if self.until is not None else self.budget


@dataclass(frozen=True)
class BudgetSchedule:
    phases: Tuple[Phase, ...]

    @classmethod
    def parse(cls, text: str) -> "BudgetSchedule":
        """``"0.5 until </think>, then 1.0"``: phases separated by ``, then``; each a budget, optionally followed by
        ``until TEXT`` or ``for N`` (N tokens of that phase). Every phase but the last needs a condition."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"budget schedule: empty; write {SYNTAX}")
        phases = []
        parts = re.split(r",\s*then\s+", text.strip())
        for i, part in enumerate(parts):
            m = re.fullmatch(r"\s*(\S+?)(?:\s+(until|for)\s+(.+?))?\s*", part)
            if m is None:
                raise ConfigError(f"budget schedule: cannot read phase {part!r}; write {SYNTAX}")
            budget, kind, arg = m.groups()
            try:
                value = float(budget)
            except ValueError:
                raise ConfigError(f"budget schedule: {budget!r} is not a budget fraction; write {SYNTAX}") from None
            if not 0 < value <= 1:
                raise ConfigError(f"budget schedule: budget {budget} must be a fraction in (0, 1]")
            last = i == len(parts) - 1
            if kind is None and not last:
                raise ConfigError(
                    f"budget schedule: phase {part.strip()!r} needs 'until TEXT' or 'for N' (only the last phase "
                    f"runs to the end); write {SYNTAX}"
                )
            if kind is not None and last:
                raise ConfigError(
                    f"budget schedule: the last phase runs to the end; drop its '{kind} {arg}' or add ', then BUDGET'"
                )
            if kind == "for":
                if not re.fullmatch(r"[1-9][0-9]*", arg):
                    raise ConfigError(f"budget schedule: 'for {arg}': a positive whole number of tokens")
                phases.append(Phase(f"{value:g}", tokens=int(arg)))
            else:
                phases.append(Phase(f"{value:g}", until=_unquote(arg) if arg is not None else None))
        return cls(tuple(phases))

    def with_token_ids(self, tokenize: Callable[[str], List[int]]) -> "BudgetSchedule":
        """The schedule with every ``until`` text that has no ids yet turned into the token ids ``tokenize`` writes
        for it alone (a special token such as ``</think>`` is one id; a plain text matches where the model writes the
        same ids)."""
        out = []
        for p in self.phases:
            if p.until is not None and not p.until_ids:
                ids = tuple(int(t) for t in tokenize(p.until))
                if not ids:
                    raise ConfigError(f"budget schedule: 'until {p.until}' is no token at all for this tokenizer")
                p = replace(p, until_ids=ids)
            out.append(p)
        return BudgetSchedule(tuple(out))

    @property
    def needs_token_ids(self) -> bool:
        """Whether an ``until`` text still needs its token ids (:meth:`with_token_ids`)."""
        return any(p.until is not None and not p.until_ids for p in self.phases)

    def __str__(self) -> str:
        return ", then ".join(str(p) for p in self.phases)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@dataclass
class ScheduledGeneration:
    """The new tokens ``[1, n]`` and where each phase began: ``(position in the new tokens, budget)``."""

    tokens: torch.Tensor
    switches: List[Tuple[int, str]]


def generate_scheduled(
    model,
    arch_of: Callable[[str], ElasticArch],
    prompt: torch.Tensor,
    schedule: BudgetSchedule,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
) -> ScheduledGeneration:
    """Continue ``prompt`` ``[1, seq]`` by up to ``max_new_tokens`` tokens following ``schedule`` (its ``until``
    texts already turned into ids) on the elastic ``model``; ``arch_of(budget)`` gives each phase's sub-model.
    Each phase re-prefills the prompt and the tokens so far at its budget (see the module's docstring)."""
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ConfigError(
            f"a budget schedule decodes one sequence at a time (each switches where its own text appears); got a "
            f"prompt of shape {tuple(prompt.shape)}, pass one row"
        )
    if schedule.needs_token_ids:
        raise ConfigError("budget schedule: turn its 'until' texts into token ids first (with_token_ids)")
    generated: List[int] = []
    switches: List[Tuple[int, str]] = []
    for phase in schedule.phases:
        if len(generated) >= max_new_tokens:
            break
        switches.append((len(generated), phase.budget))
        context = torch.cat([prompt, torch.tensor([generated], dtype=prompt.dtype, device=prompt.device)], 1)
        own = 0
        with use_arch(model, arch_of(phase.budget)):
            steps = stream(model, context, max_new_tokens - len(generated), temperature, top_k, generator)
            with closing(steps):
                for token, _ in steps:
                    generated.append(int(token[0]))
                    own += 1
                    if phase.ends_after(generated, own):
                        break
    return ScheduledGeneration(torch.tensor([generated], dtype=prompt.dtype), switches)
