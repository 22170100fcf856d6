"""Autoregressive decoding of a Megatron hybrid LM (plain or elastic at its current choice) with the recurrent
Mamba state and the attention KV cache in Megatron's static inference context: the prompt is prefilled once, then
each new token runs alone.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch


def _context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)


def inference_cache_bytes(ctx) -> int:
    """Bytes of the attention KV cache and the Mamba conv and SSM states an inference context holds."""
    return sum(
        t.numel() * t.element_size()
        for entry in ctx.key_value_memory_dict.values()
        for t in (entry if isinstance(entry, (tuple, list)) else (entry,))
        if torch.is_tensor(t)
    )


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of every row from its logits ``[batch, vocab]``: greedy at ``temperature == 0``, else
    sampled (optionally from the ``top_k`` most likely)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def stream(
    model,
    context: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Prefill ``context`` ``[batch, seq]`` once with ``model`` (a Megatron hybrid LM at TP=PP=1, plain or elastic
    at its current choice), then yield ``(next tokens [batch], the logits that chose them [batch, vocab])`` up to
    ``max_new_tokens`` times, feeding each token back through the Mamba state and the KV cache. Closing the
    iterator early frees the caches."""
    was_training = model.training
    model.eval()
    batch, seq = context.shape
    ctx = _context(batch, seq + max_new_tokens)
    try:
        pos = torch.arange(seq, device=context.device).unsqueeze(0).expand(batch, -1)
        logits = model(context, pos, None, inference_context=ctx, runtime_gather_output=True)[:, -1]
        ctx.sequence_len_offset += seq
        for t in range(max_new_tokens):
            nxt = _pick(logits, temperature, top_k, generator)
            yield nxt, logits.float()
            if t + 1 == max_new_tokens:
                break
            p = torch.full((batch, 1), seq + t, device=context.device, dtype=torch.long)
            logits = model(nxt[:, None], p, None, inference_context=ctx, runtime_gather_output=True)[:, -1]
            ctx.sequence_len_offset += 1
    finally:
        model.train(was_training)


def decode(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
    return_logits: bool = False,
):
    """Continue ``prompt`` ``[batch, seq]`` by ``max_new_tokens`` tokens (:func:`stream`). Returns the new tokens
    ``[batch, max_new_tokens]`` (and the logits that chose each, ``[batch, max_new_tokens, vocab]``, with
    ``return_logits``)."""
    steps = list(stream(model, prompt, max_new_tokens, temperature, top_k, generator))
    out = torch.stack([t for t, _ in steps], 1)
    return (out, torch.stack([lg for _, lg in steps], 1)) if return_logits else out
