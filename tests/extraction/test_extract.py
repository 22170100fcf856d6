"""`extract` on a real (toy) elastic run: every budget's Megatron checkpoint loads into a plain model and its
HF checkpoint into transformers, both reproducing the elastic model at the router's nested choice."""

import json
import os

import pytest
import torch

from tests.elastic.test_elastic_model import _args


def test_extract_all_budgets_megatron_and_hf(elastic_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_elastic.elastic.choose import choose_all
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.elastic.source import load_source
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    out = str(tmp_path / "extracted")
    rows = extract(elastic_run, out, budgets=["all"], fmt="both")
    assert [r["name"] for r in rows] == ["1", "0.75", "0.5"]
    src = load_source(elastic_run)
    archs = choose_all(src.router)
    ids, pos, mask = _args(seq=40, seed=3)
    for r, (b, arch) in zip(rows, archs.items()):
        assert r["fraction"] == pytest.approx(
            json.load(open(os.path.join(elastic_run, "summary.json")))["budgets"][f"{b:g}"]["fraction"]
        )
        with use_arch(src.model, arch), torch.no_grad():
            want = src.model(ids, pos, mask)
        job = config_from_checkpoint(os.path.join(r["megatron"], "iter_0000000"))
        plain = build_hybrid_model(job.model_config())
        load_model_weights(r["megatron"], plain)
        with torch.no_grad():
            got = plain(ids, pos, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(r["hf"], dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids, use_cache=False).logits, want, rtol=1e-4, atol=1e-4)
        # The byte tokenizer's end of document is the eos generation stops on, and <pad> its padding.
        assert (hf.config.eos_token_id, hf.config.pad_token_id) == (256, 257)
        assert hf.generation_config.eos_token_id == 256
        # ... and transformers loads the byte tokenizer from the same folder: the ids the model was trained on.
        from megatron_elastic.data.tokenizer import decode_text, load_tokenizer

        text = "def f(x):\n\treturn 'é' \n  "
        hf_tok, ours = transformers.AutoTokenizer.from_pretrained(r["hf"]), load_tokenizer("byte")
        assert hf_tok.encode(text) == list(ours.tokenize(text)) == list(text.encode("utf-8"))
        assert hf_tok.decode(hf_tok.encode(text)) == decode_text(ours, ours.tokenize(text)) == text
        assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (256, 257)
    assert json.load(open(os.path.join(out, "budget_1", "arch.json")))["skipped_layers"] == []


def test_extract_errors_name_the_fix(elastic_run, parent, tmp_path):
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="--arch"):
        extract(os.path.join(parent, "sorted"), str(tmp_path), budgets=["0.5"])
    with pytest.raises(ConfigError, match="fraction"):
        extract(elastic_run, str(tmp_path), budgets=["half"])


def test_extraction_streams_the_parent_and_never_reads_skipped_layers(parent, tmp_path, monkeypatch):
    """An explicit architecture from a sorted parent: tensors are read one at a time, skipped layers never."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.extraction import extract as extract_mod
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.open_run import config_from_checkpoint
    from megatron_elastic.store.reader import CheckpointTensorReader

    initialize_parallel(1, 1)
    sorted_ckpt = os.path.join(parent, "sorted")
    cfg = config_from_checkpoint(os.path.join(sorted_ckpt, "iter_0000000")).model_config()
    arch = ElasticArch.full(cfg)
    arch.skipped_layers = (1, 4)
    arch.hidden_size = 24
    arch_file = tmp_path / "small.json"
    arch_file.write_text(arch.to_json())
    loaded = []
    original = CheckpointTensorReader.load
    monkeypatch.setattr(CheckpointTensorReader, "load", lambda self, name: loaded.append(name) or original(self, name))
    rows = extract_mod.extract(sorted_ckpt, str(tmp_path / "out"), arch_file=str(arch_file), fmt="megatron")
    assert rows[0]["name"] == "small" and loaded
    assert not [n for n in loaded if n.startswith(("decoder.layers.1.", "decoder.layers.4."))]
    assert len(loaded) == len(set(loaded)), "each parent tensor is read once"


def test_extract_an_untrained_budget_zero_shot(elastic_run, tmp_path):
    """--budget 0.6 (between the trained 0.5 and 0.75): nested between them, on its parameter target, marked
    untrained, its standalone logits equal the elastic model's at that choice, and the server decodes it."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.choose import choose_all
    from megatron_elastic.elastic.cost import arch_parameters
    from megatron_elastic.elastic.layers.model import use_arch
    from megatron_elastic.elastic.source import load_source
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.serving.generate import ElasticServer
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    out = str(tmp_path / "x")
    (row,) = extract(elastic_run, out, budgets=["0.6"], fmt="megatron")
    src = load_source(elastic_run)
    full = arch_parameters(src.config, ElasticArch.full(src.config))
    assert row["name"] == "0.6" and row["trained"] is False
    assert row["parameters"] / full == pytest.approx(0.6, rel=0.02)
    meta = json.load(open(os.path.join(out, "budget_0.6", "arch.json")))
    assert meta["trained"] is False and meta["between"] == [0.5, 0.75] and meta["budget"] == "0.6"
    arch = ElasticArch.from_dict(meta)
    trained = choose_all(src.router)
    assert trained[0.5].is_within(arch) and arch.is_within(trained[0.75])
    ids, pos, mask = _args(seq=24, seed=5)
    with use_arch(src.model, arch), torch.no_grad():
        want = src.model(ids, pos, mask)
    plain = build_hybrid_model(config_from_checkpoint(os.path.join(row["megatron"], "iter_0000000")).model_config())
    load_model_weights(row["megatron"], plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, pos, mask), want, rtol=1e-5, atol=1e-5)
    server = ElasticServer(src.model, {f"{b:g}": a for b, a in trained.items()}, src.job, src.router)
    assert server.arch("0.6") == arch
    prompt = ids[:1, :8]
    with use_arch(src.model, arch):
        greedy = src.model(prompt, pos[:1, :8], mask).argmax(-1)[:, -1]
    assert int(server.generate(prompt, 0.6, max_new_tokens=1)[0, 0]) == int(greedy[0])


def test_bad_budgets_are_one_line_errors(elastic_run, tmp_path):
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.config import ConfigError

    for bad in ("1.2", "0.3", "abc", "nan"):
        with pytest.raises(ConfigError) as e:
            extract(elastic_run, str(tmp_path), budgets=[bad])
        assert "\n" not in str(e.value) and ("0.5" in str(e.value) or "fraction" in str(e.value)), bad


@pytest.mark.parametrize("kind", ["memory", "flops"])
def test_extract_a_budget_stated_in_memory_or_flops(elastic_run, tmp_path, monkeypatch, kind):
    """A parameter-trained run asked for a memory (or FLOPs) budget halfway between its 50% and 75% sub-models:
    the extracted model is the largest the router gives within it - its cost of that kind (computed here from the
    written architecture) is within the budget and no smaller than the best of a brute-force scan over budget
    fractions - and, for memory, a real generation with the extracted weights at that context holds no more bytes
    than the budget."""
    import megatron_elastic.serving.decode as decode_mod
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.choose import choose_all, choose_budgets
    from megatron_elastic.elastic.cost import FlopsPerToken, ServingMemory, dtype_bytes
    from megatron_elastic.elastic.source import load_source
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.builder import build_hybrid_model
    from megatron_elastic.store.checkpoint import load_model_weights
    from megatron_elastic.store.open_run import config_from_checkpoint

    src = load_source(elastic_run)
    cost = ServingMemory(48, 2, dtype_bytes(src.config)) if kind == "memory" else FlopsPerToken(48)
    trained = choose_all(src.router)
    target = (cost.of(src.config, trained[0.5]) + cost.of(src.config, trained[0.75])) / 2
    stated = f"{target / 2**10:.4f}KiB@48x2" if kind == "memory" else f"{target / 1e3:.4f}KFLOP@48"
    out = str(tmp_path / "x")
    (row,) = extract(elastic_run, out, budgets=[stated], fmt="megatron")
    assert row["name"] == stated and row["trained"] is False
    arch = ElasticArch.from_json(open(os.path.join(out, f"budget_{stated}", "arch.json")).read())
    got = cost.of(src.config, arch)
    assert got <= target * (1 + 1e-6), (got, target)
    grid = [0.5 + k / 100 for k in range(51)]
    scan = [cost.of(src.config, c.arch) for c in choose_budgets(src.router, grid).values()]
    assert got >= max(c for c in scan if c <= target), "the largest sub-model within the budget"
    key = "memory_bytes" if kind == "memory" else "flops_per_token"
    assert row["costs"][key] == pytest.approx(got) and row["costs"]["context"] == 48
    if kind == "memory":
        plain = build_hybrid_model(config_from_checkpoint(os.path.join(row["megatron"], "iter_0000000")).model_config())
        load_model_weights(row["megatron"], plain)
        weights = sum(t.numel() * t.element_size() for t in plain.state_dict().values() if torch.is_tensor(t))
        contexts = []
        original = decode_mod._context
        monkeypatch.setattr(decode_mod, "_context", lambda b, n: contexts.append(original(b, n)) or contexts[-1])
        decode_mod.decode(plain, torch.zeros(2, 40, dtype=torch.long), 8)  # 48 tokens, batch 2
        assert weights + decode_mod.inference_cache_bytes(contexts[0]) <= target * 1.001


def test_stated_budgets_errors(elastic_run, tmp_path):
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="smallest sub-model this router gives") as e:
        extract(elastic_run, str(tmp_path), budgets=["1KiB@48"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="memory at a context length"):
        extract(elastic_run, str(tmp_path), budgets=["1GiB"])


def test_vllm_export_lists_each_mlps_size_as_vllm_indexes_it(parent, tmp_path):
    """``--format vllm``: a sub-model whose FFN widths differ per layer (Mamba and attention shared) is plain
    ``nemotron_h`` with ``intermediate_size`` one entry per MLP layer; read the way vLLM's NemotronH reads it
    (layer i -> entry ``pattern[:i + 1].count("-") - 1``), every entry is the row count of that layer's up_proj in
    the written weights. A sub-model with per-layer Mamba heads is refused with the fix."""
    from safetensors.torch import load_file

    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.errors import HFExportError
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.parallel import initialize_parallel
    from megatron_elastic.store.open_run import config_from_checkpoint

    initialize_parallel(1, 1)
    sorted_ckpt = os.path.join(parent, "sorted")
    cfg = config_from_checkpoint(os.path.join(sorted_ckpt, "iter_0000000")).model_config()
    arch = ElasticArch.full(cfg)
    mlps = [i for i, s in enumerate(cfg.hybrid_pattern) if s == "-"]
    g = cfg.elastic_ffn_groups
    for n, i in enumerate(mlps):  # a different width per MLP layer
        arch.ffn_hidden_size[i] = max(g, cfg.ffn_hidden_size - g * (n + 1))
    (tmp_path / "ffn.json").write_text(arch.validate(cfg).to_json())
    (row,) = extract(sorted_ckpt, str(tmp_path / "out"), arch_file=str(tmp_path / "ffn.json"), fmt="vllm")
    hf_cfg = json.load(open(os.path.join(row["vllm"], "config.json")))
    assert hf_cfg["model_type"] == "nemotron_h" and "auto_map" not in hf_cfg
    weights = load_file(os.path.join(row["vllm"], "model.safetensors"))
    pattern = hf_cfg["hybrid_override_pattern"]
    sizes = hf_cfg["intermediate_size"]
    assert len(sizes) == pattern.count("-") and len(set(sizes)) > 1
    for i, s in enumerate(pattern):
        if s == "-":
            rows = weights[f"backbone.layers.{i}.mixer.up_proj.weight"].shape[0]
            assert sizes[pattern[: i + 1].count("-") - 1] == rows == arch.ffn_hidden_size[i]
    assert (hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (256, 257)

    mamba = [i for i, s in enumerate(cfg.hybrid_pattern) if s == "M"]
    arch.mamba_num_heads[mamba[0]] = cfg.mamba_num_groups  # fewer heads in one Mamba layer only
    (tmp_path / "mamba.json").write_text(arch.validate(cfg).to_json())
    with pytest.raises(HFExportError, match=r"heterogeneous: \[ffn\]"):
        extract(sorted_ckpt, str(tmp_path / "out2"), arch_file=str(tmp_path / "mamba.json"), fmt="vllm")
