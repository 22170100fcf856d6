"""HF NemotronH -> ours -> HF is lossless, and the imported model computes what transformers computes."""

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
    from megatron_elastic.training.checkpoint import load_model_weights
    from megatron_elastic.training.runs import config_from_checkpoint

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
    from megatron_elastic.training.runs import config_from_checkpoint

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
