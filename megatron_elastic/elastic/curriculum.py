"""The two-stage curriculum (paper §Training): stages with their own token counts, sequence length, global batch
and budget-sampling weights; the router temperature and logit scale annealed over the whole run.

Defaults follow the paper's 12B recipe in proportion: stage 1 = 65/110 of the tokens at short context with
uniform budget sampling, stage 2 = 45/110 at long context sampling (full, middle, smallest) = (0.5, 0.3, 0.2);
temperature 1.0 -> 0.05 and router-logit scale 1 -> 10, linear. Everything is configurable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_elastic.errors import ConfigError


@dataclass
class Stage:
    name: str
    tokens: int
    seq_length: int
    global_batch_size: int
    budget_weights: List[float]  # aligned with Curriculum.budgets

    def validate(self, n_budgets: int) -> None:
        if self.tokens <= 0 or self.seq_length <= 0 or self.global_batch_size <= 0:
            raise ConfigError(f"stage {self.name!r}: tokens, seq_length and global_batch_size must be positive")
        if (
            len(self.budget_weights) != n_budgets
            or any(w < 0 for w in self.budget_weights)
            or sum(self.budget_weights) <= 0
        ):
            raise ConfigError(
                f"stage {self.name!r}: budget_weights needs {n_budgets} non-negative weights with a "
                f"positive sum (one per budget), got {self.budget_weights}"
            )


@dataclass
class Curriculum:
    budgets: List[float]  # parameter fractions, largest first, e.g. [1.0, 0.75, 0.5]
    stages: List[Stage]
    tau: Tuple[float, float] = (1.0, 0.05)
    logit_scale: Tuple[float, float] = (1.0, 10.0)
    seed: int = 1234
    # Share of the micro-batches that train an untrained budget between the trained ones (our addition: every
    # budget a user may extract later is then trained, not only interpolated); 0 trains the configured ones only.
    between_share: float = 0.0

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("a curriculum needs at least one stage")
        for s in self.stages:
            s.validate(len(self.budgets))

    @classmethod
    def paper_default(
        cls,
        budgets: Sequence[float],
        total_tokens: int,
        short_seq: int,
        long_seq: int,
        short_batch: int,
        long_batch: int,
    ) -> "Curriculum":
        n = len(budgets)
        skew = [0.5, 0.3, 0.2] if n == 3 else [1.0 / n] * n
        s1 = int(round(total_tokens * 65 / 110))
        return cls(
            list(budgets),
            [
                Stage("short-context", s1, short_seq, short_batch, [1.0 / n] * n),
                Stage("long-context", total_tokens - s1, long_seq, long_batch, skew),
            ],
        )

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def stage_at(self, tokens_consumed: int) -> Tuple[int, Stage]:
        """The stage a run is in after ``tokens_consumed`` tokens (the last stage once all are consumed)."""
        acc = 0
        for i, s in enumerate(self.stages):
            acc += s.tokens
            if tokens_consumed < acc:
                return i, s
        return len(self.stages) - 1, self.stages[-1]

    def _progress(self, tokens_consumed: int) -> float:
        return min(1.0, max(0.0, tokens_consumed / self.total_tokens))

    def tau_at(self, tokens_consumed: int) -> float:
        a, b = self.tau
        return a + (b - a) * self._progress(tokens_consumed)

    def logit_scale_at(self, tokens_consumed: int) -> float:
        a, b = self.logit_scale
        return a + (b - a) * self._progress(tokens_consumed)

    def sample_budgets(self, tokens_consumed: int, n: int, step: int) -> List[float]:
        """``n`` budgets drawn with the current stage's weights; deterministic in (seed, step) so a resumed
        run and every rank draw the same ones."""
        _, stage = self.stage_at(tokens_consumed)
        rng = random.Random(self.seed * 1_000_003 + step)
        drawn = rng.choices(self.budgets, weights=stage.budget_weights, k=n)
        between = self.between_budget(step)
        if between is not None:
            drawn = [between if rng.random() < self.between_share else b for b in drawn]
        return drawn

    def between_budget(self, step: int) -> Optional[float]:
        """The step's untrained budget, uniform strictly between the smallest and the largest trained budget
        (deterministic in (seed, step)); None when ``between_share`` is 0."""
        if not self.between_share:
            return None
        lo, hi = min(self.budgets), max(self.budgets)
        rng = random.Random(f"between:{self.seed}:{step}")
        b = lo + (hi - lo) * rng.random()
        while b in self.budgets:  # a trained budget (measure zero; floats do repeat)
            b = lo + (hi - lo) * rng.random()
        return b
