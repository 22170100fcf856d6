"""Language-model helpers shared by pretraining, elastic training, importance and evaluation: batches on the
device, the masked mean of a per-token loss, logits and loss of a ``GPTDataset`` batch."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch


def batch_to_device(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Move a GPTDataset batch to the current CUDA device (or leave it on the CPU)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-token loss over the tokens the mask counts (float32)."""
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def lm_forward_step(data_iterator: Iterator, model):
    """Megatron ``forward_step_func``: per-token LM loss averaged over the loss mask."""
    batch = batch_to_device(next(data_iterator))
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    output = model(tokens, batch["position_ids"], None, labels=labels)

    def loss_func(output_tensor):
        loss = masked_mean(output_tensor, loss_mask)
        # A copy: Megatron divides the returned loss by the number of micro-batches in place.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def lm_logits(model, batch):
    """Logits ``[b, s, vocab/tp]`` for a GPTDataset batch."""
    batch = batch_to_device(batch)
    tokens = batch["tokens"]
    return model(tokens, batch["position_ids"], None)


def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss (nats) of a GPTDataset batch."""
    batch = batch_to_device(batch)
    tokens = batch["tokens"]
    losses = model(tokens, batch["position_ids"], None, labels=batch["labels"])
    return masked_mean(losses, batch["loss_mask"])


def _language_model(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):  # DDP / Float16Module wrappers
        model = model.module
    return model


@contextmanager
def _without_output_layer(model):
    m = _language_model(model)
    post_process = m.post_process
    m.post_process = False  # Megatron's model returns the decoder's output (final norm applied) when unset
    try:
        yield m
    finally:
        m.post_process = post_process


def final_hidden(model, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """The final hidden states ``[s, b, h]`` (after the final norm): the forward pass without the output layer,
    for jobs that read the logits a chunk at a time (:func:`chunk_logits`). ``model`` holds the whole network."""
    with _without_output_layer(model) as m:
        return m(tokens, position_ids, attention_mask)


def lm_hidden(model, batch) -> torch.Tensor:
    """:func:`final_hidden` of a GPTDataset batch."""
    batch = batch_to_device(batch)
    return final_hidden(model, batch["tokens"], batch["position_ids"])


def chunk_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocab-sharded logits ``[s, b, vocab/tp]`` of final hidden states ``[s, b, h]`` (any slice of the sequence)."""
    m = _language_model(model)
    weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
    return m.output_layer(hidden, weight=weight)[0]
