"""Many-in-one serving: one copy of the elastic parent's weights, any budget on demand (its slices are views
or gathers of the shared weights, never copies of the model), autoregressive decoding with the recurrent
Mamba state and the attention KV cache in Megatron's static inference context (no re-running the prompt).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from megatron_elastic.data.source import job_tokenizer_spec
from megatron_elastic.data.tokenizer import load_tokenizer
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.choose import budget_archs, choose_all
from megatron_elastic.elastic.layers.model import use_arch
from megatron_elastic.elastic.source import load_source
from megatron_elastic.errors import UnknownBudgetError
from megatron_elastic.serving.decode import decode, decode_rows
from megatron_elastic.serving.schedule import BudgetSchedule, ScheduledGeneration, generate_scheduled


def budget_key(budget: Union[str, float]) -> str:
    """The name a budget is served and reported under: a fraction as ``f"{b:g}"`` (``0.50`` -> ``0.5``), a budget in
    memory or FLOPs (``elastic.budget``) as written."""
    try:
        return f"{float(budget):g}"
    except (TypeError, ValueError):
        if not isinstance(budget, str):
            raise UnknownBudgetError(f"budget {budget!r}: use a fraction such as 0.6 or e.g. 6GiB@32768") from None
        return budget.strip()


class ElasticServer:
    """Serve every budget of an elastic checkpoint from one copy of its weights.

    ``ElasticServer.from_checkpoint(dir)`` loads the elastic model (TP=1) and the router's nested choices;
    ``server.generate(prompt_ids, budget=0.5, max_new_tokens=64)`` decodes with that budget's sub-model.
    """

    def __init__(self, model, archs: Dict[str, ElasticArch], job: Optional[dict] = None, router=None):
        self.model, self.archs = model, archs
        self.job = job or {}  # the parent's job: its data section names the tokenizer (job_tokenizer_spec)
        self.router = router  # picks untrained budgets between the trained ones (None: trained budgets only)

    @classmethod
    def from_checkpoint(cls, checkpoint: str) -> "ElasticServer":

        src = load_source(checkpoint)
        archs = (
            {f"{b:g}": a for b, a in choose_all(src.router).items()}
            if src.router is not None
            else {"1": ElasticArch.full(src.model.config)}
        )
        return cls(src.model, archs, src.job, src.router)

    def arch(self, budget: Union[str, float, ElasticArch]) -> ElasticArch:
        """A trained budget's architecture, or an untrained one's, in any kind (``extraction.extract.budget_archs``,
        cached)."""
        if isinstance(budget, ElasticArch):
            return budget
        key = budget_key(budget)
        if key not in self.archs:
            if self.router is None:
                raise UnknownBudgetError(f"budget {budget} is not one of the trained budgets {sorted(self.archs)}")

            self.archs[key] = budget_archs(self.router, [key])[key].arch
        return self.archs[key]

    def generate(
        self, prompt: torch.Tensor, budget: Union[str, float, ElasticArch] = 1.0, max_new_tokens: int = 32, **kwargs
    ):
        with use_arch(self.model, self.arch(budget)):
            return decode(self.model, prompt, max_new_tokens, **kwargs)

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        budget: Union[str, float, ElasticArch] = 1.0,
        max_new_tokens: int = 32,
        stop_ids: Sequence[int] = (),
        **kwargs,
    ) -> List[List[int]]:
        """Prompts (token ids) of any lengths decoded together at ``budget``, left-padded (``serving.decode``);
        each row ends at the first of ``stop_ids`` (kept) or after ``max_new_tokens``."""
        stops = set(int(i) for i in stop_ids)
        with use_arch(self.model, self.arch(budget)):  # padding is masked out: any id pads
            return decode_rows(self.model, prompts, max_new_tokens, 0, lambda i, new: new[-1] in stops, **kwargs)

    def generate_scheduled(
        self,
        prompt: torch.Tensor,
        schedule: Union[str, BudgetSchedule],
        max_new_tokens: int = 32,
        tokenize=None,
        **kwargs,
    ) -> ScheduledGeneration:
        """Decode one prompt ``[1, seq]`` switching budgets as ``schedule`` says (e.g. ``"0.5 until </think>, then
        1.0"``; ``serving.schedule``); ``until`` texts become token ids with ``tokenize`` (default: the
        checkpoint's tokenizer). Every budget is one this server serves (trained, or any between them)."""
        if isinstance(schedule, str):
            schedule = BudgetSchedule.parse(schedule)
        for phase in schedule.phases:
            self.arch(phase.budget)  # an unknown budget fails before any decoding
        if schedule.needs_token_ids:
            schedule = schedule.with_token_ids(tokenize or self.tokenizer().tokenize)
        return generate_scheduled(self.model, self.arch, prompt, schedule, max_new_tokens, **kwargs)

    def tokenizer(self):
        """The tokenizer the checkpoint's training data was written with (``byte`` when it names none)."""

        return load_tokenizer(job_tokenizer_spec(self.job.get("data") or {}) or "byte")

    def resident_bytes(self) -> int:
        """Bytes of the one weight copy that serves every budget."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if torch.is_tensor(t))
