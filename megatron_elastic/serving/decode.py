"""Autoregressive decoding of a Megatron hybrid LM (plain or elastic at its current choice) with the recurrent
Mamba state and the attention KV cache in Megatron's static inference context: the prompt is prefilled once, then
each new token runs alone.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_elastic.compat import cpu_backend_suspended


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one batch ``[batch, longest]``, each right-aligned after ``pad_id`` padding, and
    their lengths ``[batch]`` (what :func:`stream` takes)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], device=device)


def _check_padding_supported(model) -> None:
    """Left padding needs attention that takes one mask per row and no rotary positions (a row's positions would
    shift by its padding)."""
    from megatron_elastic.model.sdpa_attention import SDPAttention

    if getattr(model.config, "position_embedding_type", "none") == "rope":
        raise NotImplementedError("batched prompts of different lengths with rotary positions: decode one at a time")
    for name, module in model.named_modules():
        if name.endswith("core_attention") and not isinstance(module, SDPAttention):
            raise NotImplementedError(
                f"batched prompts of different lengths need the local attention (SDPAttention); {name} is "
                f"{type(module).__name__}: decode one prompt at a time or build the model with the local specs"
            )


@torch.inference_mode()
def stream(
    model,
    context: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
    prompt_lengths: Optional[torch.Tensor] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Prefill ``context`` ``[batch, seq]`` once with ``model`` (a Megatron hybrid LM at TP=PP=1, plain or elastic
    at its current choice), then yield ``(next tokens [batch], the logits that chose them [batch, vocab])`` up to
    ``max_new_tokens`` times, feeding each token back through the Mamba state and the KV cache. Closing the
    iterator early frees the caches.

    Prompts of different lengths are left-padded (:func:`left_pad`) with ``prompt_lengths`` their real lengths:
    padding is masked out of attention (prefill and every step) and zeroed in the Mamba mixers' conv and scan
    inputs, so each row decodes as it would alone."""
    was_training = model.training
    model.eval()
    batch, seq = context.shape
    ctx = _context(batch, seq + max_new_tokens)
    pad = None  # [batch, seq] True on padding
    if prompt_lengths is not None and int(prompt_lengths.min()) < seq:
        _check_padding_supported(model)
        pad = torch.arange(seq, device=context.device)[None, :] < (seq - prompt_lengths.to(context.device))[:, None]
        ctx.prompt_keep = ~pad
    try:
        pos = torch.arange(seq, device=context.device).unsqueeze(0).expand(batch, -1)
        mask = None
        if pad is not None:  # causal, padding keys hidden; a padding query sees itself (no empty softmax row)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=context.device).triu(1)
            eye = torch.eye(seq, dtype=torch.bool, device=context.device)
            mask = ((causal[None] | pad[:, None, :]) & ~eye[None])[:, None]
        with cpu_backend_suspended():
            logits = model(context, pos, mask, inference_context=ctx, runtime_gather_output=True)[:, -1]
        ctx.prompt_keep = None
        ctx.sequence_len_offset += seq
        for t in range(max_new_tokens):
            nxt = _pick(logits, temperature, top_k, generator)
            yield nxt, logits.float()
            if t + 1 == max_new_tokens:
                break
            p = torch.full((batch, 1), seq + t, device=context.device, dtype=torch.long)
            step_mask = None
            if pad is not None:  # [batch, 1, 1, keys so far + this one]
                step_mask = torch.nn.functional.pad(pad, (0, t + 1), value=False)[:, None, None, :]
            with cpu_backend_suspended():
                logits = model(nxt[:, None], p, step_mask, inference_context=ctx, runtime_gather_output=True)[:, -1]
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


def decode_rows(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    done: Optional[Callable[[int, List[int]], bool]] = None,
    **sampling,
) -> List[List[int]]:
    """Continue prompts of any lengths together in one batch (left-padded, :func:`stream`); row ``i`` stops once
    ``done(i, its new tokens)`` is true (e.g. it emitted the end of document or a stop string), decoding ends when
    every row has. Returns each row's new tokens, the one that ended it included."""
    ids, lengths = left_pad(prompts, pad_id, device=next(model.parameters()).device)
    out: List[List[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    steps = stream(model, ids, max_new_tokens, prompt_lengths=lengths, **sampling)
    try:
        for tokens, _ in steps:
            for i, token in enumerate(tokens.tolist()):
                if not finished[i]:
                    out[i].append(token)
                    finished[i] = done is not None and done(i, out[i])
            if all(finished):
                break
    finally:
        steps.close()
    return out
