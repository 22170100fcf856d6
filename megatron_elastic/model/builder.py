"""Build the hybrid language model (Megatron's ``MambaModel``/``HybridModel``) from a ``HybridConfig``."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_elastic import compat
from megatron_elastic.model.config import HybridConfig
from megatron_elastic.model.specs import default_backend, hybrid_stack_spec


def build_hybrid_model(
    config: HybridConfig,
    *,
    backend: Optional[str] = None,
    pre_process: bool = True,
    post_process: bool = True,
    parallel_output: bool = True,
    pg_collection: Optional[ProcessGroupCollection] = None,
    stack_spec=None,
):
    """Return a Megatron hybrid LM for ``config``. ``stack_spec`` overrides the spec chosen by ``backend``.
    Megatron's parallel state must exist (``megatron_elastic.parallel.initialize_parallel``, which also enables
    the CPU back-end once per process when there is no CUDA).

    The model's forward is Megatron's: ``model(input_ids [b, s], position_ids [b, s], attention_mask)``
    returns logits ``[b, s, vocab/tp]`` (``parallel_output=True``) or the per-token loss when ``labels``
    is given. Its attention layers are causal by type, so ``attention_mask=None`` is what the project passes:
    no ``s x s`` mask is ever made (:func:`causal_attention_mask` gives the explicit one, for comparisons).
    """
    # A copy: the caller's spec is left as it was given.
    spec = copy.deepcopy(stack_spec) if stack_spec is not None else hybrid_stack_spec(backend or default_backend())
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    # Mixer options that Megatron passes through spec params, not the config.
    mixer_spec = spec.submodules.mamba_layer.submodules.mixer
    mixer_spec.params = {**mixer_spec.params, "d_conv": config.mamba_conv_kernel, "chunk_size": config.mamba_chunk_size}
    return compat.build_hybrid_model(
        stack_spec=spec,
        pattern=config.hybrid_pattern,
        config=config,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        pg_collection=pg_collection,
    )


def causal_attention_mask(seq_len: int, device=None):
    """Megatron's boolean attention mask ``[1, 1, s, s]`` (True = masked out) for causal attention."""
    import torch

    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def position_ids_for(input_ids):
    """``[b, s]`` position ids 0..s-1 for ``input_ids [b, s]``."""
    import torch

    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def parameter_count(model) -> int:
    """Parameters of the whole model across its tensor- and pipeline-parallel ranks, each counted once
    (TP-replicated tensors such as norms only on TP rank 0). Collective over the model-parallel group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    n = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    total = torch.tensor([n], dtype=torch.int64)
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total)
