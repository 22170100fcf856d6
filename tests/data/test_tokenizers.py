"""Tokenizers through Megatron-Core's tokenizer system: the byte tokenizer keeps its layout; a Hugging Face BPE
tokenizer trained here (no downloads) prepares data with 1 or 2 workers (the ids are what ``tokenizers`` itself
gives), the data carries the tokenizer, training reports bits/byte from the measured bytes per token, and bad
tokenizers fail with errors that name the fix."""

import json
import os

import numpy as np
import pytest

from megatron_elastic.data.corpus import iter_stdlib_documents
from megatron_elastic.data.indexed import data_tokenizer_spec, iter_documents, read_metadata, split_prefix
from megatron_elastic.data.prepare import prepare_data
from megatron_elastic.data.tokenizer import BitsPerByte, load_tokenizer
from megatron_elastic.errors import ConfigError, DataError, InputNotFoundError

tokenizers = pytest.importorskip("tokenizers", reason="the Hugging Face tokenizers (pip install '.[hf]')")
transformers = pytest.importorskip("transformers", reason="pip install '.[hf]'")

DOCS = list(iter_stdlib_documents(max_bytes=300_000))


def train_bpe(out_dir, vocab_size=600):
    """A byte-level BPE tokenizer trained on the built-in corpus, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS[:40], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out_dir)
    return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    reference = train_bpe(str(root / "tokenizer"))
    return {"dir": str(root / "tokenizer"), "reference": reference, "root": root}


def test_the_byte_tokenizer_is_megatrons_with_the_projects_layout():
    tok = load_tokenizer("byte")
    text = "héllo ✓\n"
    assert tok.tokenize(text) == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    assert tok.detokenize(list(text.encode("utf-8")) + [256]) == text.rstrip()  # Megatron's byte-level rstrips


def test_prepare_data_with_a_hf_tokenizer_gives_the_tokenizers_own_ids_with_any_number_of_workers(bpe, monkeypatch):
    reference = bpe["reference"]
    eod = reference.token_to_id("<|endoftext|>")
    outs = {}
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    for workers in (1, 2):
        out = str(bpe["root"] / f"data{workers}")
        stats = prepare_data(
            out, tokenizer=bpe["dir"], max_bytes=300_000, valid_every=5, progress=False, workers=workers
        )
        outs[workers] = out
        assert "TOKENIZERS_PARALLELISM" not in os.environ, "only pool workers turn the tokenizer's threads off"
        meta = read_metadata(out)
        assert meta["tokenizer"] == "tokenizer" and os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
        assert meta["vocab_size"] == reference.get_vocab_size() and meta["eod"] == eod
        assert stats["train"].bytes == sum(len(d.encode()) for i, d in enumerate(DOCS) if i % 5 != 4)
    for split in ("train", "valid"):
        a = [d.tolist() for d in iter_documents(split_prefix(outs[1], split))]
        b = [d.tolist() for d in iter_documents(split_prefix(outs[2], split))]
        assert a == b, "2 workers write exactly what 1 worker writes"
    valid = [d for i, d in enumerate(DOCS) if i % 5 == 4]
    stored = [d.tolist() for d in iter_documents(split_prefix(outs[1], "valid"))]
    assert stored == [reference.encode(d).ids + [eod] for d in valid]
    # The copy inside the data directory loads and round-trips the text.
    tok = load_tokenizer(data_tokenizer_spec(outs[1], read_metadata(outs[1])))
    assert tok.detokenize(stored[0][:-1]) == valid[0]


def test_tokenising_workers_start_clean_not_as_copies_of_the_calling_process(bpe, monkeypatch):
    """A worker forked from the caller copies its memory, with any lock one of its threads holds at that moment
    (a worker once waited forever in CI that way). The workers must not see what the caller changed in memory:
    here its encoding function, replaced in the caller only."""
    from megatron_elastic.data import encoding

    def replaced(text, tokenizer=None):
        return [-1], 0

    replaced.__module__, replaced.__qualname__ = encoding.__name__, "_encode"  # pickled by that name
    monkeypatch.setattr(encoding, "_encode", replaced)
    docs = DOCS[:40]
    monkeypatch.chdir(bpe["root"])  # a tokenizer named relative to the caller's directory
    got = list(encoding.encode_documents(docs, "tokenizer", workers=2))
    eod = bpe["reference"].token_to_id("<|endoftext|>")
    assert got == [(bpe["reference"].encode(d).ids + [eod], len(d.encode())) for d in docs]


def test_pretraining_on_bpe_data_reports_bits_per_byte_from_measured_bytes_per_token(bpe, tmp_path):
    from megatron_elastic.parallel import destroy_parallel
    from megatron_elastic.store.job_config import load_pretrain_config
    from megatron_elastic.training.pretrain import pretrain

    data = str(bpe["root"] / "data1")
    if not os.path.isdir(data):
        prepare_data(data, tokenizer=bpe["dir"], max_bytes=300_000, valid_every=5, progress=False)
    job = f"""
model: {{hybrid_pattern: "M*-", hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4, num_query_groups: 2,
        mamba_num_heads: 4, mamba_head_dim: 8, mamba_num_groups: 2, mamba_state_dim: 8, vocab_size: 640}}
data: {{path: {data}, seq_length: 64}}
train: {{micro_batch_size: 4, global_batch_size: 4, train_iters: 3, lr: 0.003, min_lr: 0.0003, lr_warmup_iters: 1,
        log_interval: 1, eval_interval: 3, eval_iters: 2}}
checkpoint: {{dir: {tmp_path / "ckpt"}, save_interval: 1000}}
"""
    try:
        summary = pretrain(load_pretrain_config(text=job), progress=False)
    finally:
        destroy_parallel()
    assert summary["tokenizer"].endswith("tokenizer")
    # Independent: bytes per token of the same evaluation windows, decoded with the `tokenizers` library itself.
    from megatron_elastic.data.loader import build_gpt_datasets

    _, valid = build_gpt_datasets(data, 64, 1, 16, seed=1234)
    windows = [valid[i]["tokens"].tolist() for i in range(8)]
    eod = bpe["reference"].token_to_id("<|endoftext|>")
    text_bytes = sum(len(bpe["reference"].decode([t for t in w if t != eod]).encode()) for w in windows)
    assert summary["bytes_per_token"] == pytest.approx(text_bytes / sum(map(len, windows)), rel=1e-9)
    assert 1.5 < summary["bytes_per_token"] < 6, "a BPE token is several bytes of Python source"
    records = [json.loads(line) for line in open(tmp_path / "ckpt" / "metrics.jsonl")]
    first = next(r for r in records if "valid_bpb" in r)
    assert first["bytes_per_token"] == summary["bytes_per_token"] and first["tokenizer"] == summary["tokenizer"]
    assert first["valid_bpb"] == pytest.approx(BitsPerByte(summary["bytes_per_token"])(first["valid_loss"]))
    assert first["valid_bpb"] == pytest.approx(first["valid_loss"] / np.log(2) / summary["bytes_per_token"])


def test_bad_tokenizers_and_vocabularies_name_the_fix(bpe, tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file.*'byte'"):
        load_tokenizer(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        load_tokenizer(str(broken))
    # Data tokenised with the 600-id BPE, a model with the byte vocabulary: refused, naming model.vocab_size.
    from megatron_elastic.data.loader import build_gpt_datasets

    data = str(bpe["root"] / "data1")
    if not os.path.isdir(data):
        prepare_data(data, tokenizer=bpe["dir"], max_bytes=300_000, valid_every=5, progress=False)
    with pytest.raises(ConfigError, match=r"model.vocab_size is 258; set model.vocab_size >= \d+"):
        build_gpt_datasets(data, 64, 1, 1, model_vocab_size=258)


def test_the_whole_pipeline_on_bpe_data_ends_in_a_hf_export_transformers_loads_with_its_tokenizer(bpe, tmp_path):
    """prepare-data -> pretrain -> importance -> train (a few steps) -> extract on BPE-tokenised data; the Hugging
    Face export holds the tokenizer files, and ``transformers`` loads model and tokenizer from it and generates."""
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.elastic.run import train_elastic
    from megatron_elastic.extraction.extract import extract
    from megatron_elastic.parallel import destroy_parallel
    from tests.elastic.test_elastic_training import JOB
    from tests.tiny_pipeline import make_tiny_sorted_parent

    try:
        paths = make_tiny_sorted_parent(str(tmp_path), iters=4, tokenizer=bpe["dir"], vocab_size=640)
        ckpt = str(tmp_path / "elastic")
        job = JOB.format(parent=paths["importance"], ckpt=ckpt, mode="sample")
        stage = "{name: s, tokens: 512, seq_length: 32, global_batch_size: 8, budget_weights: [1, 1, 1]}"
        stages = f"curriculum.stages=[{stage}]"
        summary = train_elastic(load_elastic_config(text=job, overrides=[stages]), progress=False)
        assert summary["tokenizer"].endswith("tokenizer") and summary["bytes_per_token"] > 1.5
        rows = extract(ckpt, str(tmp_path / "extracted"), ["0.5"], fmt="hf")
        # `generate` without --tokenizer reads the checkpoint's own: the prompt goes in as BPE ids.
        from megatron_elastic.cli import main
        from megatron_elastic.data.source import job_tokenizer_spec
        from megatron_elastic.serving.generate import ElasticServer

        spec = job_tokenizer_spec(ElasticServer.from_checkpoint(ckpt).job["data"])
        assert spec == os.path.join(paths["data"], "tokenizer")
        assert main(["generate", "--checkpoint", ckpt, "--prompt", "def main", "--max-new-tokens", "2"]) == 0
    finally:
        destroy_parallel()
    hf_dir = rows[0]["hf"]
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json")), rows[0]["tokenizer"]
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = tok("def main():\n    return", return_tensors="pt").input_ids
    assert ids[0].tolist() == bpe["reference"].encode("def main():\n    return").ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(out[0]), str) and tok.decode(out[0]).startswith("def main():")
