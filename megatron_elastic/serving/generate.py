"""Many-in-one serving: one copy of the elastic parent's weights, any budget on demand (its slices are views
or gathers of the shared weights, never copies of the model), autoregressive decoding with the recurrent
Mamba state and the attention KV cache in Megatron's static inference context (no re-running the prompt).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from megatron_elastic.errors import UnknownBudgetError
from megatron_elastic.model.elastic_arch import ElasticArch
from megatron_elastic.model.elastic_model import use_arch


def _context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)


@torch.no_grad()
def decode(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
    return_logits: bool = False,
):
    """Continue ``prompt`` ``[batch, seq]`` by ``max_new_tokens`` tokens with ``model`` (a Megatron hybrid LM at
    TP=PP=1, plain or elastic at its current choice). Greedy when ``temperature == 0``, else sampled (optionally
    from the ``top_k`` most likely). Returns the new tokens ``[batch, max_new_tokens]`` (and the logits that
    chose each, ``[batch, max_new_tokens, vocab]``, with ``return_logits``)."""
    was_training = model.training
    model.eval()
    batch, seq = prompt.shape
    ctx = _context(batch, seq + max_new_tokens)
    pos = torch.arange(seq, device=prompt.device).unsqueeze(0).expand(batch, -1)
    logits = model(prompt, pos, None, inference_context=ctx, runtime_gather_output=True)[:, -1]
    ctx.sequence_len_offset += seq
    tokens, chosen_logits = [], []
    for t in range(max_new_tokens):
        chosen_logits.append(logits.float())
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            scores = logits.float() / temperature
            if top_k:
                kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            nxt = (
                torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
            )
        tokens.append(nxt)
        if t + 1 == max_new_tokens:
            break
        p = torch.full((batch, 1), seq + t, device=prompt.device, dtype=torch.long)
        logits = model(nxt[:, None], p, None, inference_context=ctx, runtime_gather_output=True)[:, -1]
        ctx.sequence_len_offset += 1
    model.train(was_training)
    out = torch.stack(tokens, 1)
    return (out, torch.stack(chosen_logits, 1)) if return_logits else out


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
        from megatron_elastic.extraction.extract import load_source

        src = load_source(checkpoint)
        archs = (
            {f"{b:g}": a for b, a in src.router.choose_all().items()}
            if src.router is not None
            else {"1": ElasticArch.full(src.model.config)}
        )
        return cls(src.model, archs, src.job, src.router)

    def arch(self, budget: Union[str, float, ElasticArch]) -> ElasticArch:
        """A trained budget's architecture, or an untrained one's (``Router.choose_budgets``, cached)."""
        if isinstance(budget, ElasticArch):
            return budget
        try:
            key = f"{float(budget):g}"
        except (TypeError, ValueError):
            raise UnknownBudgetError(f"budget {budget!r}: use a fraction such as 0.6") from None
        if key not in self.archs:
            if self.router is None:
                raise UnknownBudgetError(f"budget {budget} is not one of the trained budgets {sorted(self.archs)}")
            from megatron_elastic.extraction.extract import budget_archs

            self.archs[key] = budget_archs(self.router, [key])[key].arch
        return self.archs[key]

    def generate(
        self, prompt: torch.Tensor, budget: Union[str, float, ElasticArch] = 1.0, max_new_tokens: int = 32, **kwargs
    ):
        with use_arch(self.model, self.arch(budget)):
            return decode(self.model, prompt, max_new_tokens, **kwargs)

    def resident_bytes(self) -> int:
        """Bytes of the one weight copy that serves every budget."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if torch.is_tensor(t))
