"""HF NemotronH -> ours -> HF is lossless, and the imported model computes what transformers computes."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _tiny_hf(tmp_path, seed=0):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(
        vocab_size=96,
        hidden_size=32,
        layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=40,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        conv_kernel=4,
        chunk_size=16,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere (the default init leaves some at 1/0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "hf_src")
    model.save_pretrained(path)
    return model, path


def test_import_round_trip_is_bit_exact_and_logits_match(single_process_parallel, tmp_path):
    from megatron_elastic.extraction.hf import read_hf_checkpoint, save_hf_checkpoint
    from megatron_elastic.extraction.import_hf import import_hf
    from megatron_elastic.model.builder import build_hybrid_model, causal_attention_mask, position_ids_for
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    hf_model, src = _tiny_hf(tmp_path)
    res = import_hf(src, str(tmp_path / "ours"))
    assert res["hybrid_pattern"] == "M-*-M-"
    assert res["parameters"] == sum(p.numel() for p in hf_model.parameters())
    job = config_from_checkpoint(res["checkpoint"])
    ours = build_hybrid_model(job.model_config())
    load_model_weights(str(tmp_path / "ours"), ours)
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(input_ids=ids, use_cache=False).logits
        got = ours(ids, position_ids_for(ids), causal_attention_mask(37))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    back = save_hf_checkpoint(str(tmp_path / "hf_back"), ours.config, ours.state_dict())
    _, a = read_hf_checkpoint(src)
    _, b = read_hf_checkpoint(back)
    norm = lambda d: {k.replace("model.", "backbone.", 1) if k.startswith("model.") else k: v for k, v in d.items()}
    a, b = norm(a), norm(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_import_rejects_moe_with_a_clear_error(tmp_path):
    import json

    from megatron_elastic.extraction.hf import HFExportError, model_dict_from_hf

    with pytest.raises(HFExportError, match="MoE|moe"):
        model_dict_from_hf({"layers_block_type": ["moe"], "vocab_size": 8, "hidden_size": 8})
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"vocab_size": 8}))
    from megatron_elastic.extraction.hf import read_hf_checkpoint

    with pytest.raises(FileNotFoundError, match="safetensors"):
        read_hf_checkpoint(str(tmp_path / "x"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_reads_only_json_and_safetensors(single_process_parallel, tmp_path):
    """A pickled `.bin` and a `modeling_*.py` (named by `auto_map`) that would create a marker file sit beside the
    safetensors: the import neither unpickles nor runs them. Without safetensors, the directory is refused."""
    import json

    from megatron_elastic.errors import InputNotFoundError
    from megatron_elastic.extraction.import_hf import import_hf

    _, src = _tiny_hf(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"weights": _Payload(str(marker))}, os.path.join(src, "pytorch_model.bin"))
    with open(os.path.join(src, "modeling_evil.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w')\n")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    res = import_hf(src, str(tmp_path / "ours"))
    assert res["hybrid_pattern"] == "M-*-M-" and not marker.exists()
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(InputNotFoundError, match="safetensors"):
        import_hf(src, str(tmp_path / "ours2"))
    assert not marker.exists()


def test_import_takes_a_blend_and_the_releases_own_tokenizer(single_process_parallel, tmp_path):
    """``import-hf --config``: the imported parent's job gets the config's blend; without ``data.tokenizer`` the
    tokenizer inside the HF directory (a tokenizer.json saved beside the weights) is used; none there: refused."""
    from megatron_elastic.errors import DataError
    from megatron_elastic.extraction.import_hf import import_hf
    from megatron_elastic.store.open_run import config_from_checkpoint

    _, src = _tiny_hf(tmp_path)
    blend = {"blend": [0.3, "/data/a_text_document", 0.7, "/data/b_text_document"], "split": "98,2,0"}
    with pytest.raises(DataError, match="no tokenizer.json"):
        import_hf(src, str(tmp_path / "no_tokenizer"), data=blend)
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(src)
    res = import_hf(src, str(tmp_path / "ours"), data=blend)
    job = config_from_checkpoint(res["checkpoint"])
    assert job.data.blend == blend["blend"] and job.data.split == "98,2,0"
    assert job.data.tokenizer == os.path.abspath(src) and job.data.path == ""
    assert res["data"]["tokenizer"] == os.path.abspath(src)

    # A job config (the run book's parent.yaml) also gives how the parent's jobs run, and our model choices.
    from megatron_elastic.errors import HFExportError

    stated = {
        "train": {"micro_batch_size": 1, "global_batch_size": 4},
        "parallel": {"tensor_model_parallel_size": 2},
        "model": {"elastic_ffn_groups": 2, "hidden_size": 32, "params_dtype": "bfloat16"},
    }
    res = import_hf(src, str(tmp_path / "carried"), data=blend, job_config=stated)
    job = config_from_checkpoint(res["checkpoint"])
    assert (job.train.micro_batch_size, job.train.global_batch_size) == (1, 4)
    assert job.parallel.tensor_model_parallel_size == 2 and job.model["elastic_ffn_groups"] == 2
    assert (job.model["params_dtype"], job.model["bf16"]) == ("float32", False)  # the release's dtype: float32
    with pytest.raises(HFExportError, match="hidden_size: config 64 vs config.json 32"):
        import_hf(src, str(tmp_path / "clash"), data=blend, job_config={"model": {"hidden_size": 64}})


def test_exports_of_a_parent_whose_tokenizer_is_a_full_model_directory_load_with_their_own_config(
    single_process_parallel, tmp_path
):
    """The release layout: tokenizer files beside config.json, generation_config.json and the weights. import-hf
    with that directory as data.tokenizer, then extract a narrower sub-model to HF: its config.json is the
    sub-model's (not the parent's, copied over it with the tokenizer), transformers loads it and it computes what
    the Megatron export computes, and eos/bos/pad come from the tokenizer."""
    from tokenizers import Tokenizer, models

    from megatron_elastic.data.tokenizer import is_tokenizer_file
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.extraction.import_hf import import_hf
    from megatron_elastic.model.builder import build_hybrid_model, causal_attention_mask, position_ids_for
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    _, src = _tiny_hf(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": 4 + i for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(src)
    assert {"config.json", "generation_config.json"} <= set(os.listdir(src))
    data = {"blend": [1.0, "/data/a_text_document"], "split": "99,1,0", "tokenizer": src}
    res = import_hf(src, str(tmp_path / "ours"), data=data)
    parent_cfg = config_from_checkpoint(res["checkpoint"]).model_config()
    arch = ElasticArch.full(parent_cfg)
    arch.hidden_size = 16
    arch.ffn_hidden_size = {i: 20 for i in arch.ffn_hidden_size}
    arch_file = tmp_path / "sub.json"
    arch_file.write_text(arch.to_json())
    (row,) = extract(res["checkpoint"], str(tmp_path / "out"), arch_file=str(arch_file), fmt="both")

    files = set(os.listdir(row["hf"]))
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert all(is_tokenizer_file(f) for f in files - {"config.json", "generation_config.json", "model.safetensors"})
    cfg = json.load(open(os.path.join(row["hf"], "config.json")))
    assert cfg["hidden_size"] == 16 and cfg["model_type"] == "nemotron_h"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    gen = json.load(open(os.path.join(row["hf"], "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)

    hf = transformers.AutoModelForCausalLM.from_pretrained(row["hf"], dtype=torch.float32)
    plain = build_hybrid_model(config_from_checkpoint(os.path.join(row["megatron"], "iter_0000000")).model_config())
    load_model_weights(row["megatron"], plain)
    ids = torch.randint(4, 44, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(ids, position_ids_for(ids), causal_attention_mask(19))
        torch.testing.assert_close(hf(input_ids=ids, use_cache=False).logits, want, rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(row["hf"])
    assert tokenizer.eos_token_id == hf.generation_config.eos_token_id == 2
    out = hf.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= 7


def test_a_bf16_release_is_imported_for_megatron_mixed_precision(single_process_parallel, tmp_path):
    """A bf16 release (as NVIDIA ships them) becomes a bf16 parent with Megatron's mixed precision on (``bf16``:
    fp32 main weights in the optimizer), with its weights bit for bit."""
    from megatron_elastic.extraction.hf import read_hf_checkpoint
    from megatron_elastic.extraction.import_hf import import_hf
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    hf_model, _ = _tiny_hf(tmp_path)
    src = str(tmp_path / "bf16")
    hf_model.to(torch.bfloat16).save_pretrained(src)
    res = import_hf(src, str(tmp_path / "ours"))
    job = config_from_checkpoint(res["checkpoint"])
    assert (job.model["params_dtype"], job.model["bf16"], job.model["fp16"]) == ("bfloat16", True, False)
    ours = build_hybrid_model(job.model_config())
    load_model_weights(str(tmp_path / "ours"), ours)
    _, tensors = read_hf_checkpoint(src)
    assert torch.equal(ours.state_dict()["embedding.word_embeddings.weight"], tensors["backbone.embeddings.weight"])
