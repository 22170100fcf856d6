"""A sliced sub-model, built as a plain (non-elastic, per-layer-sized) Megatron model, computes what the elastic
parent computes at that choice; its dist checkpoint round-trips and loads at TP=2."""

import dataclasses
import random

import pytest
import torch

from megatron_elastic.elastic.arch import ElasticArch
from tests.elastic.test_elastic_model import _args, random_heterogeneous_arch
from tests.importance.test_permute import _cfg


def _model_dict(cfg):
    """The parent's ``model:`` section: its architecture (``HybridConfig.architecture_dict``) and dtype."""
    return {**cfg.architecture_dict(), "params_dtype": cfg.params_dtype}


def _sub_config(cfg, arch):
    from megatron_elastic.elastic.slicing import sub_model_dict
    from megatron_elastic.model.config import HybridConfig, tiny_defaults

    return HybridConfig.from_dict({**tiny_defaults(), **sub_model_dict(_model_dict(cfg), cfg, arch)})


@pytest.mark.parametrize("seed", range(4))
def test_extracted_plain_model_matches_the_elastic_choice(single_process_parallel, seed):
    from megatron_elastic.elastic.cost import arch_parameters
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.elastic.slicing import slice_state_dict
    from megatron_elastic.model.builder import build_hybrid_model, parameter_count

    cfg = _cfg()
    arch = random_heterogeneous_arch(cfg, random.Random(7 + seed)).validate(cfg)
    if seed == 0:  # also the full parent and a homogeneous one
        arch = ElasticArch.full(cfg)
    torch.manual_seed(seed)
    parent = build_elastic_model(cfg)
    ids, pos, mask = _args(seq=17, seed=seed)
    with use_arch(parent, arch), torch.no_grad():
        want = parent(ids, pos, mask)
    sub_cfg = _sub_config(cfg, arch)
    kept = [i for i in range(6) if i not in arch.skipped_layers]
    sizes = [
        (
            arch.ffn_hidden_size.get(i),
            arch.mamba_num_heads.get(i),
            arch.mamba_head_dim.get(i),
            arch.num_attention_heads.get(i),
        )
        for i in kept
    ]
    varied = any(len({s[j] for s, i in zip(sizes, kept) if s[j] is not None}) > 1 for j in range(4))
    assert bool(sub_cfg.layer_overrides) == varied, "per-layer sizes exactly where the kept layers differ"
    plain = build_hybrid_model(sub_cfg)
    sd = slice_state_dict(parent.state_dict(), cfg, arch)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    assert parameter_count(plain) == arch_parameters(cfg, arch)
    with torch.no_grad():
        got = plain(ids, pos, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_overrides_are_validated():
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="layer_overrides.1"):
        _cfg(layer_overrides={1: {"mamba_num_heads": 4}})  # layer 1 is an MLP
    with pytest.raises(ConfigError, match="outside"):
        _cfg(layer_overrides={9: {"ffn_hidden_size": 4}})
    cfg = _cfg(layer_overrides={"1": {"ffn_hidden_size": 12}})
    assert cfg.for_layer(1).ffn_hidden_size == 12 and cfg.for_layer(4).ffn_hidden_size == 48
    assert dataclasses.replace(cfg).layer_overrides == {1: {"ffn_hidden_size": 12}}


def _hf_logits(path, ids, trust_remote_code=False):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=torch.float32
    )
    hf.eval()
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("seed", range(3))
def test_hf_checkpoint_loaded_by_transformers_gives_the_same_logits(single_process_parallel, tmp_path, seed):
    """transformers' own NemotronH (torch path) is the referee: the extracted HF checkpoint must reproduce
    the elastic parent's logits at the chosen sub-model (homogeneous: stock config; heterogeneous: per-layer
    sizes through the shipped module that only builds transformers' blocks)."""
    from megatron_elastic.elastic.layers.model import build_elastic_model, use_arch
    from megatron_elastic.elastic.slicing import slice_state_dict
    from megatron_elastic.extraction.hf import save_hf_checkpoint
    from tests.elastic.test_elastic_model import random_homogeneous_arch

    cfg = _cfg()
    rng = random.Random(50 + seed)
    arch = (
        ElasticArch.full(cfg)
        if seed == 0
        else random_homogeneous_arch(cfg, rng)
        if seed == 1
        else random_heterogeneous_arch(cfg, rng)
    ).validate(cfg)
    torch.manual_seed(seed)
    parent = build_elastic_model(cfg)
    ids, pos, mask = _args(seq=23, seed=seed)
    with use_arch(parent, arch), torch.no_grad():
        want = parent(ids, pos, mask)
    sub_cfg = _sub_config(cfg, arch)
    assert bool(sub_cfg.layer_overrides) == (seed == 2)
    out = save_hf_checkpoint(str(tmp_path / "hf"), sub_cfg, slice_state_dict(parent.state_dict(), cfg, arch))
    # No remote code: megatron_elastic (imported here) registers its class with transformers' Auto classes.
    got = _hf_logits(out, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if sub_cfg.layer_overrides:  # without megatron_elastic: the module shipped in the checkpoint
        torch.testing.assert_close(_hf_logits_without_megatron_elastic(out, ids, tmp_path), want, rtol=1e-4, atol=1e-4)


def _hf_logits_without_megatron_elastic(path, ids, tmp_path):
    """Logits from transformers in a fresh process that never imports megatron_elastic (trust_remote_code)."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True, "
        "dtype=torch.float32).eval()\n"
        "assert 'megatron_elastic' not in sys.modules\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def test_import_megatron_elastic_registers_the_class_when_transformers_is_imported(tmp_path):
    """`import megatron_elastic` does not import transformers (every command would pay for it); importing
    transformers afterwards, or before, registers `elastic_nemotron_h` with its Auto classes."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    check = (
        "cfg = transformers.AutoConfig.for_model('elastic_nemotron_h')\n"
        "cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]\n"
        "print(type(cfg).__name__, cls.__name__)\n"
    )
    ours_first = (
        "import sys\nimport megatron_elastic\n"
        "assert 'transformers' not in sys.modules, 'import megatron_elastic pulled in transformers'\n"
        "import transformers\n"
    )
    transformers_first = "import transformers\nimport megatron_elastic\n"
    for code in (ours_first + check, transformers_first + check):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split()[-2:] == ["ElasticNemotronHConfig", "ElasticNemotronHForCausalLM"]
