"""Hugging Face ``NemotronH`` checkpoints from our Megatron weights (and back).

Names (``transformers``' NemotronH, saved with the released checkpoints' ``backbone.`` prefix, which
``transformers`` maps onto ``model.``)::

    embedding.word_embeddings.weight            backbone.embeddings.weight
    decoder.layers.i.{norm,input_layernorm,pre_mlp_layernorm}.weight
                                                backbone.layers.i.norm.weight
    decoder.layers.i.mixer.*  (Mamba-2)         backbone.layers.i.mixer.*  (same names and layouts)
    decoder.layers.i.self_attention.linear_qkv  backbone.layers.i.mixer.{q,k,v}_proj  (de-interleaved per KV group)
    decoder.layers.i.self_attention.linear_proj backbone.layers.i.mixer.o_proj
    decoder.layers.i.mlp.linear_fc1 / fc2       backbone.layers.i.mixer.up_proj / down_proj
    decoder.final_norm.weight                   backbone.norm_f.weight
    output_layer.weight                         lm_head.weight

The stock ``NemotronHConfig`` has one size per layer type. A heterogeneous sub-model (per-layer sizes,
``HybridConfig.layer_overrides``) is written as ``model_type: elastic_nemotron_h`` with ``layer_overrides`` in
``config.json``; :mod:`megatron_elastic.extraction.hf_model` builds each overridden layer from ``transformers``'
own ``NemotronHBlock`` with that layer's sizes (every computation stays ``transformers``' NemotronH code). It is
registered with transformers' Auto classes on ``import megatron_elastic``, and shipped in the checkpoint as
``modeling_elastic_nemotron_h.py`` for ``trust_remote_code=True`` loading without the package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional

import torch

from megatron_elastic.compat import ATTENTION, MAMBA, MLP
from megatron_elastic.data.tokenizer import special_token_ids, write_hf_tokenizer
from megatron_elastic.errors import HFExportError, InputNotFoundError
from megatron_elastic.model.layouts import LOCAL_PRE_NORM_WEIGHT, QKVLayout

_HF_LAYER_TYPE = {MAMBA: "linear_attention", ATTENTION: "full_attention", "-": "mlp"}
_OVERRIDE_NAMES = {
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "mamba_num_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
}
REMOTE_MODULE = "modeling_elastic_nemotron_h"


RUNTIMES = ("transformers", "vllm")  # whose NemotronH conventions a config.json follows


def hf_config(config, runtime: str = "transformers") -> dict:
    """``config.json`` for a ``HybridConfig`` (raises :class:`HFExportError` for what NemotronH cannot express).

    A sub-model with per-layer sizes is, for ``transformers``, our ``elastic_nemotron_h`` (every size per layer,
    loaded through the shipped remote code); for ``vllm``, plain ``nemotron_h`` with ``intermediate_size`` a list
    with one entry per MLP layer in pattern order (vLLM's NemotronH reads entry ``pattern[:i + 1].count("-") - 1``
    for layer i), which is all vLLM varies per layer: other per-layer sizes are refused."""
    if runtime not in RUNTIMES:
        raise HFExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if config.activation not in ("relu2", "squared_relu") or config.gated_linear_unit:
        raise HFExportError(
            "NemotronH MLPs are squared-ReLU, not gated; this model uses "
            f"activation={config.activation!r}, gated_linear_unit={config.gated_linear_unit}"
        )
    if config.position_embedding_type != "none":
        raise HFExportError(
            f"NemotronH attention has no position embedding; this model uses {config.position_embedding_type!r}"
        )
    if config.add_bias_linear:
        raise HFExportError("NemotronH linears have no biases; this model has add_bias_linear=True")
    cfg = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "layers_block_type": [_HF_LAYER_TYPE[s] for s in config.hybrid_pattern],
        "hybrid_override_pattern": config.hybrid_pattern,  # the released checkpoints' field (vLLM, older readers)
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups or config.num_attention_heads,
        "head_dim": config.kv_channels,
        "intermediate_size": config.ffn_hidden_size or 1,
        "mlp_hidden_act": "relu2",
        "mamba_num_heads": config.mamba_num_heads or 1,
        "mamba_head_dim": config.mamba_head_dim or 1,
        "n_groups": config.mamba_num_groups,
        "ssm_state_size": config.mamba_state_dim,
        "conv_kernel": config.mamba_conv_kernel,
        "chunk_size": config.mamba_chunk_size,
        "use_conv_bias": True,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "layer_norm_epsilon": config.layernorm_epsilon,
        "tie_word_embeddings": config.share_embeddings_and_output_weights,
        "max_position_embeddings": config.max_sequence_length,
        "residual_in_fp32": False,
        # Megatron's SSD kernels do not clamp dt from below; NemotronH clamps at time_step_min.
        "time_step_min": 1e-30,
        "time_step_limit": [0.0, float("inf")],
        "torch_dtype": str(config.params_dtype).replace("torch.", ""),
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if config.layer_overrides and runtime == "vllm":
        varied = sorted({k for ov in config.layer_overrides.values() for k in ov} - {"ffn_hidden_size"})
        if varied:
            raise HFExportError(
                f"vLLM's NemotronH takes per-layer MLP sizes only; this sub-model also varies {varied} per layer: "
                "train with space.heterogeneous: [ffn] (Mamba and attention sizes shared), or export --format hf "
                "(transformers, with the remote code)"
            )
        cfg["intermediate_size"] = [
            config.layer_overrides.get(i, {}).get("ffn_hidden_size", config.ffn_hidden_size)
            for i, s in enumerate(config.hybrid_pattern)
            if s == MLP
        ]
    elif config.layer_overrides:
        cfg["layer_overrides"] = {
            str(i): {_OVERRIDE_NAMES[k]: v for k, v in ov.items()} for i, ov in sorted(config.layer_overrides.items())
        }
        cfg["architectures"] = ["ElasticNemotronHForCausalLM"]
        cfg["model_type"] = "elastic_nemotron_h"  # hf_model.ElasticNemotronHConfig.model_type
        cfg["auto_map"] = {
            "AutoConfig": f"{REMOTE_MODULE}.ElasticNemotronHConfig",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.ElasticNemotronHForCausalLM",
        }
    return cfg


# Our (TP=1, local-spec) names -> NemotronH names, for the tensors outside the layers.
_MODEL_NAMES = {
    "embedding.word_embeddings.weight": "backbone.embeddings.weight",
    "decoder.final_norm.weight": "backbone.norm_f.weight",
    "output_layer.weight": "lm_head.weight",
}
# (layer symbol, our name inside the layer) -> the NemotronH name inside the layer, for the one-to-one tensors. The
# pre-norm is "norm.weight" for every layer type (ours: LOCAL_PRE_NORM_WEIGHT), Mamba's "mixer.*" names are the
# same on both sides, and attention's fused QKV is split into q/k/v_proj by QKVLayout.
_LAYER_NAMES = {
    (ATTENTION, "self_attention.linear_proj.weight"): "mixer.o_proj.weight",
    (MLP, "mlp.linear_fc1.weight"): "mixer.up_proj.weight",
    (MLP, "mlp.linear_fc2.weight"): "mixer.down_proj.weight",
}
_HF_LAYER_NAMES = {(sym, hf): ours for (sym, ours), hf in _LAYER_NAMES.items()}
_HF_QKV = {f"mixer.{part}_proj.weight": part for part in "qkv"}


def _layer_part(name: str, root: str, config, problem: str):
    """(layer index, the name inside the layer, the layer's symbol) of ``<root>.layers.<i>.<rest>``."""
    m = re.match(rf"^{root}\.layers\.(\d+)\.(.+)$", name)
    if not m:
        raise HFExportError(f"{problem} {name!r}")
    return int(m.group(1)), m.group(2), config.hybrid_pattern[int(m.group(1))]


def to_hf_state_dict(state_dict: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Our (TP=1, local-spec names) state dict -> NemotronH tensors."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("_extra_state"):
            continue
        if name in _MODEL_NAMES:
            if name != "output_layer.weight" or not config.share_embeddings_and_output_weights:
                out[_MODEL_NAMES[name]] = t
            continue
        i, rest, sym = _layer_part(name, "decoder", config, "no NemotronH name for")
        p = f"backbone.layers.{i}."
        if rest == LOCAL_PRE_NORM_WEIGHT[sym]:
            out[p + "norm.weight"] = t
        elif sym == MAMBA and rest.startswith("mixer."):
            out[p + rest] = t
        elif sym == ATTENTION and rest == "self_attention.linear_qkv.weight":
            for part, rows in zip("qkv", QKVLayout.of_config(config.for_layer(i)).q_k_v_rows()):
                out[p + f"mixer.{part}_proj.weight"] = t[rows]
        elif (sym, rest) in _LAYER_NAMES:
            out[p + _LAYER_NAMES[sym, rest]] = t
        else:
            raise HFExportError(f"no NemotronH name for {name!r}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_hf_checkpoint(
    out_dir: str,
    config,
    state_dict: Dict[str, torch.Tensor],
    tokenizer: Optional[str] = None,
    max_shard_bytes: int = 5 * 2**30,
    runtime: str = "transformers",
) -> str:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index above ``max_shard_bytes``), plus
    the remote-code module for a heterogeneous model. With ``tokenizer`` (a spec) it is written so transformers loads
    it from the same directory (``data.tokenizer.write_hf_tokenizer``) and its bos/eos/pad ids go into
    ``config.json`` and ``generation_config.json`` (what ``generate`` stops and pads on), as ``transformers`` would
    save them. Returns ``out_dir``."""
    cfg = hf_config(config, runtime)  # refuses before anything is written
    os.makedirs(out_dir, exist_ok=True)
    _save_safetensors(out_dir, to_hf_state_dict(state_dict, config), max_shard_bytes)
    if "auto_map" in cfg:  # the model class's own source, for users without megatron_elastic
        shutil.copyfile(
            os.path.join(os.path.dirname(__file__), "hf_model.py"), os.path.join(out_dir, f"{REMOTE_MODULE}.py")
        )
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out_dir)
        ids = special_token_ids(tokenizer)
        cfg.update(ids)
        generation = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def _save_safetensors(out_dir: str, tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- import: NemotronH -> our layout --------------------------------------------------------------------
_FROM_HF_TYPE = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": "-",
}
_FROM_HF_OVERRIDE = {v: k for k, v in _OVERRIDE_NAMES.items()}


def model_dict_from_hf(cfg: dict) -> dict:
    """Our ``model:`` section for a NemotronH ``config.json`` (raises :class:`HFExportError` for what our
    hybrid model cannot hold: MoE layers, biases, another MLP activation)."""
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types is None and "hybrid_override_pattern" in cfg:
        pattern = cfg["hybrid_override_pattern"]
    else:
        unknown = sorted({t for t in types or [] if t not in _FROM_HF_TYPE})
        if types is None or unknown:
            raise HFExportError(
                f"config.json: layer types {unknown or 'missing'} are not supported (Mamba-2, "
                f"attention and MLP layers only; MoE is not)"
            )
        pattern = "".join(_FROM_HF_TYPE[t] for t in types)
    if "E" in pattern:
        raise HFExportError("config.json: MoE layers ('E') are not supported")
    for flag in ("use_bias", "mlp_bias", "attention_bias"):
        if cfg.get(flag):
            raise HFExportError(f"config.json: {flag}=true is not supported (Nemotron-H has no linear biases)")
    if cfg.get("mlp_hidden_act", "relu2") != "relu2":
        raise HFExportError(f"config.json: mlp_hidden_act={cfg['mlp_hidden_act']!r}; only relu2 is supported")
    heads = cfg.get("num_attention_heads", 1)
    out = {
        "hybrid_pattern": pattern,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg.get("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "kv_channels": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "mamba_num_heads": cfg.get("mamba_num_heads"),
        "mamba_head_dim": cfg.get("mamba_head_dim"),
        "mamba_num_groups": cfg.get("n_groups", cfg.get("mamba_n_groups", 1)),
        "mamba_state_dim": cfg.get("ssm_state_size"),
        "mamba_conv_kernel": cfg.get("conv_kernel", 4),
        "mamba_chunk_size": cfg.get("chunk_size", 128),
        "layernorm_epsilon": cfg.get("layer_norm_epsilon", 1e-5),
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        "max_sequence_length": cfg.get("max_position_embeddings", 4096),
        "position_embedding_type": "none",
        "activation": "relu2",
    }
    if cfg.get("layer_overrides"):
        out["layer_overrides"] = {
            int(i): {_FROM_HF_OVERRIDE[k]: v for k, v in ov.items()} for i, ov in cfg["layer_overrides"].items()
        }
    return out


def from_hf_state_dict(tensors: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """NemotronH tensors (``backbone.`` or ``model.`` prefix) -> our (TP=1, local-spec names) state dict."""
    ours_of = {hf: ours for ours, hf in _MODEL_NAMES.items()}
    out = {}
    qkv: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        n = re.sub(r"^(backbone|model)\.", "backbone.", name)
        if n in ours_of:
            out[ours_of[n]] = t
            continue
        i, rest, sym = _layer_part(n, "backbone", config, "unexpected NemotronH tensor")
        p = f"decoder.layers.{i}."
        if rest == "norm.weight":
            out[p + LOCAL_PRE_NORM_WEIGHT[sym]] = t
        elif sym == MAMBA and rest.startswith("mixer."):
            out[p + rest] = t
        elif sym == ATTENTION and rest in _HF_QKV:
            qkv.setdefault(i, {})[_HF_QKV[rest]] = t
        elif (sym, rest) in _HF_LAYER_NAMES:
            out[p + _HF_LAYER_NAMES[sym, rest]] = t
        else:
            raise HFExportError(f"unexpected NemotronH tensor {name!r} on a {sym!r} layer")
    for i, parts in qkv.items():
        rows = QKVLayout.of_config(config.for_layer(i)).q_k_v_rows()
        w = parts["q"].new_empty(sum(len(r) for r in rows), parts["q"].shape[1])
        for part, r in zip("qkv", rows):
            w[r] = parts[part]
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = w
    if config.share_embeddings_and_output_weights:
        out.pop("output_layer.weight", None)
    return out


def read_hf_checkpoint(hf_dir: str):
    """(config.json dict, all tensors) of a local Hugging Face checkpoint (single or sharded safetensors).

    Reads ``config.json`` (JSON) and safetensors files only: pickled weights (``*.bin``, ``*.pt``) and code in
    the directory (``modeling_*.py``, ``auto_map``) are never loaded or run."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputNotFoundError(f"{hf_dir}: no config.json (a Hugging Face checkpoint directory is needed)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise InputNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for fname in files:
        if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
            raise HFExportError(f"{index}: shard {fname!r} is not a .safetensors file in {hf_dir}")
        try:
            tensors.update(load_file(os.path.join(hf_dir, fname)))
        except Exception as e:  # noqa: BLE001 - safetensors' parse errors have no common base class
            raise HFExportError(f"{os.path.join(hf_dir, fname)} is not a readable safetensors file ({e})") from None
    return cfg, tensors
