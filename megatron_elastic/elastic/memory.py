"""Per-GPU memory of elastic training: a cost formula written once, used by ``plan`` and by ``train``'s check
before its first step (``elastic.memory_check``).

Memory model (bytes per GPU, the largest pipeline stage):

* student weights (2 B/param in bf16, 4 in fp32), main grads (4, fp32), optimizer: fp32 master (bf16 only) +
  Adam moments (4 + 4), divided by the data-parallel size with the distributed optimizer;
* teacher weights (same dtype, no grads, no optimizer);
* activations kept for backward per micro-batch (per layer type, below), times the micro-batches in flight
  (1F1B: the pipeline depth on the first stage); with ``recompute`` only each layer's input is kept plus one
  layer's activations;
* logits of student and teacher at the last stage (bf16 output, fp32 softmax/KL buffers, fp32 grad);
* backward transients: the gradients of one layer's saved activations while that layer runs backward (the
  largest layer's activations);
* a fixed allowance (CUDA context, NCCL buffers, fragmentation), ``overhead_gib``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_elastic.compat import ATTENTION, MAMBA
from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.cost import arch_parameters, layer_parameters
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.kernels import MACHINES, KernelPath, student_kernels
from megatron_elastic.ops.ssd import decays_on_b_and_c

GIB = 2**30


def _bytes_per_param(config) -> int:
    return 2 if config.bf16 or config.fp16 else 4


def _optimizer_bytes_per_param(config) -> int:
    """Adam's two fp32 moments, plus the fp32 master copy of bf16/fp16 weights."""
    return (4 if _bytes_per_param(config) == 2 else 0) + 8


def checkpoint_bytes(config) -> float:
    """Bytes of a training checkpoint of the parent (weights, fp32 master copy and Adam moments; every tensor once,
    however the ranks share the writing)."""
    params = arch_parameters(config, ElasticArch.full(config))
    return params * (_bytes_per_param(config) + _optimizer_bytes_per_param(config))


KERNELS = tuple(MACHINES)


def student_path(kernels: str, sequence_parallel: bool = False) -> KernelPath:
    """The student's kernel path on the machine ``kernels`` names (see ``model.kernels.MACHINES``)."""
    if kernels not in MACHINES:
        raise ConfigError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return student_kernels(MACHINES[kernels], sequence_parallel)


def layer_activation_bytes(config, i: int, seq: int, mbs: int, tp: int, path: KernelPath) -> float:
    """Bytes one layer keeps for backward (one micro-batch, no recompute), for the kernels of ``path``.

    Counted tensor by tensor from what autograd saves. Hidden-size tensors (the layer input, the norm's
    output, and the unfused norm's normalised input) are split over TP with sequence parallelism (Megatron's
    sequence-parallel linears save their local input and gather it again in backward). Attention (SDPA or TE)
    keeps Q/K/V (views of the QKV output), its output and a float32 log-sum-exp per query and head, never the
    ``s x s`` probabilities. The ``mamba_ssm`` scan recomputes its chunk states in backward; the pure-PyTorch
    scan keeps its intra-chunk decay matrices, contiguous einsum operands and chunk states, in float32.
    """
    e = _bytes_per_param(config)
    sb, h = seq * mbs, config.hidden_size
    lc = config.for_layer(i)
    sym = config.hybrid_pattern[i]
    hidden = (2 if path.norm == "te" else 3) * h / (tp if path.sequence_parallel else 1)
    if sym == MAMBA:
        H, p = lc.mamba_num_heads / tp, lc.mamba_head_dim
        d, g, n, q = H * p, config.mamba_num_groups / tp, config.mamba_state_dim, config.mamba_chunk_size
        bc = g * n
        in_proj_out = 2 * d + 2 * bc + H
        if path.mamba_scan == "mamba_ssm":  # conv output, scan output, gated-norm output, fp32 dt/dA_cumsum
            return e * sb * (hidden + in_proj_out + (d + 2 * bc) + 3 * d) + 4 * sb * 2 * H
        # conv: pre- and post-activation (it reads its input in place, in in_proj's output); gated norm: y, gated
        # y, normalised y, its output and out_proj's contiguous input
        model_dtype = hidden + in_proj_out + 2 * (d + 2 * bc) + 5 * d
        # the scan (float32): decay matrix and its product with C.B (2 H q), C.B (g q), contiguous B/C (2 g n)
        # and their per-head (decayed or plain) copies (2 H n), x dt (d) and, with the decays on x and y, its
        # decayed copy and the off-diagonal product (2 d), the chunk states and the states entering each chunk
        # (2 d n / q; the recurrence reads the former in place), dt terms
        xy = d if decays_on_b_and_c(p, n) else 3 * d
        scan = 2 * H * q + g * q + 2 * bc + 2 * H * n + xy + 2 * d * n / q + 4 * H
        if e != 4:
            scan += d + 2 * bc  # float32 copies of x, B, C
        return e * sb * model_dtype + 4 * sb * scan
    if sym == ATTENTION:
        qh, g, hn = (
            lc.num_attention_heads / tp,
            (config.num_query_groups or lc.num_attention_heads) / tp,
            config.kv_channels,
        )
        # the fused QKV output (Q/K/V are views of it), the kernel's output and its [s, b, heads*hn] copy
        # (linear_proj's input), the float32 log-sum-exp
        return e * sb * (hidden + (qh + 2 * g) * hn + 2 * qh * hn) + 4 * sb * qh
    return e * sb * (hidden + 2 * lc.ffn_hidden_size / tp)


def _stage_layers(config, pp: int) -> List[List[int]]:
    n = len(config.hybrid_pattern)
    per = n // pp
    return [list(range(k * per, (k + 1) * per)) for k in range(pp)]


def memory_per_gpu(
    config,
    tp: int,
    pp: int,
    dp: int,
    seq: int,
    mbs: int,
    num_micro: int,
    distributed_optimizer: bool = True,
    recompute: bool = False,
    path: Optional[KernelPath] = None,
    overhead_gib: float = 0.0,
    trainable_teacher: bool = False,
) -> Dict[str, float]:
    """Per-GPU bytes by component for the most loaded pipeline stage (see the module docstring), for the student
    kernels ``path`` (default: the ``fused`` machine, no sequence parallelism). With a ``trainable_teacher`` (Eq. 15)
    the student keeps the activations of two forward passes per micro-batch (its full budget and the sub-model:
    counted as two full ones)."""
    path = path or student_path("fused")
    full = ElasticArch.full(config)
    e = _bytes_per_param(config)
    emb = config.vocab_size * config.hidden_size
    worst: Dict[str, float] = {}
    for k, layers in enumerate(_stage_layers(config, pp)):
        params = sum(layer_parameters(config, full, i) for i in layers)
        if k == 0:
            params += emb
        if k == pp - 1:
            params += config.hidden_size + (0 if config.share_embeddings_and_output_weights else emb)
        params /= tp
        opt = _optimizer_bytes_per_param(config)
        acts = [layer_activation_bytes(config, i, seq, mbs, tp, path) for i in layers]
        if recompute:  # each layer's input (split over TP with sequence parallelism) + one layer's activations
            layer_input = e * seq * mbs * config.hidden_size / (tp if path.sequence_parallel else 1)
            act = layer_input * len(layers) + max(acts)
        else:
            act = sum(acts)
        in_flight = min(pp - k, num_micro) if pp > 1 else 1
        m = {
            "weights": e * params,
            "grads": 4 * params,
            "optimizer": opt * params / (dp if distributed_optimizer else 1),
            "teacher": e * params,
            "activations": act * in_flight * (2 if trainable_teacher else 1),
            "logits": (22 * seq * mbs * config.vocab_size / tp) if k == pp - 1 else 0.0,
            "backward": max(acts),
            "overhead": overhead_gib * GIB,
        }
        if sum(m.values()) > sum(worst.values()):
            worst = m
    return worst


def importance_memory_per_gpu(config, tp: int, seq: int, mbs: int, chunk_bytes: float) -> Dict[str, float]:
    """Per-GPU bytes of the ``importance`` job (forward passes only, no gradients): the weights, the full model's
    final hidden states a batch keeps and a candidate's, one layer's forward transients, and the float32 logit
    chunks of the depth score (the full model's and a candidate's, bf16 and float32 copies; ``importance.depth``)."""
    e = _bytes_per_param(config)
    full = ElasticArch.full(config)
    emb = config.vocab_size * config.hidden_size
    params = sum(layer_parameters(config, full, i) for i in range(len(config.hybrid_pattern)))
    params += emb + config.hidden_size + (0 if config.share_embeddings_and_output_weights else emb)
    path = student_path("fused")
    logits = 4.0 * seq * mbs * config.vocab_size / tp  # one batch's float32 logits, which are never made whole
    return {
        "weights": e * params / tp,
        "hidden states": 2 * e * seq * mbs * config.hidden_size,
        "layer forward": max(
            layer_activation_bytes(config, i, seq, mbs, tp, path) for i in range(len(config.hybrid_pattern))
        ),
        "logit chunks": 3 * min(chunk_bytes, logits),
    }
