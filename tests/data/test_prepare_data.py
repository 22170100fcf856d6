"""prepare-data writes Megatron indexed datasets whose documents read back as the exact input bytes."""

import json

import numpy as np
import pytest

from megatron_elastic.data.corpus import iter_stdlib_documents, iter_user_documents, stdlib_files
from megatron_elastic.data.indexed import iter_documents, read_metadata, split_prefix, write_split_datasets


def _read_back(out, split):
    docs = []
    for ids in iter_documents(split_prefix(str(out), split)):
        assert ids[-1] == 256, "the byte tokenizer's end of document"
        docs.append(bytes(ids[:-1].astype(np.uint8).tolist()).decode("utf-8"))
    return docs


def test_user_jsonl_and_text_round_trip(tmp_path):
    texts = [f"document {i}: héllo wörld ✓ " * (i + 1) for i in range(7)]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in texts[:5]) + "\n")
    tx = tmp_path / "b.txt"
    tx.write_text(texts[5])
    tx2 = tmp_path / "c.md"
    tx2.write_text(texts[6])
    out = tmp_path / "data"
    stats = write_split_datasets(
        str(out), iter_user_documents([str(jl), str(tx), str(tx2)]), "byte", valid_every=3, progress=False
    )
    train, valid = _read_back(out, "train"), _read_back(out, "valid")
    assert valid == [texts[2], texts[5]]
    assert train == [t for i, t in enumerate(texts) if i not in (2, 5)]
    meta = read_metadata(str(out))
    assert meta["vocab_size"] == 258
    assert meta["splits"]["train"]["tokens"] == sum(len(t.encode()) + 1 for t in train) == stats["train"].tokens


def test_builtin_corpus_is_stdlib_files_in_order(tmp_path):
    docs = list(iter_stdlib_documents(max_bytes=200_000))
    assert docs, "the standard library sources must be found"
    expected = []
    for p in stdlib_files():
        t = p.read_text(encoding="utf-8") if p.stat().st_size else ""
        if t.strip():
            expected.append(t)
        if len(expected) == len(docs):
            break
    assert docs == expected
    out = tmp_path / "d"
    write_split_datasets(str(out), docs, "byte", valid_every=4, progress=False)
    assert _read_back(out, "train") + _read_back(out, "valid") == [d for i, d in enumerate(docs) if i % 4 != 3] + [
        d for i, d in enumerate(docs) if i % 4 == 3
    ]


def test_bad_inputs_have_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_user_documents([str(bad)]))
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="--json-key"):
        list(iter_user_documents([str(nokey)]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_user_documents([str(tmp_path / "missing.txt")]))
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        read_metadata(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="split is empty"):
        write_split_datasets(str(tmp_path / "e"), ["only one document"], "byte", progress=False)


def test_data_rewritten_in_place_is_read_through_its_own_sample_index(tmp_path):
    """Megatron caches sample indices by dataset config; prepare-data run again into the same directory must not
    be read through the old files' indices (the 12B rehearsal fed one 548,013-token sample that way)."""
    import dataclasses

    from megatron_elastic.data.loader import build_gpt_datasets
    from megatron_elastic.data.prepare import prepare_data
    from megatron_elastic.data.source import DataSource

    out = str(tmp_path / "data")
    prepare_data(out, max_bytes=300_000, valid_every=5, progress=False)
    old, _ = build_gpt_datasets(out, seq_length=64, train_samples=32, valid_samples=4)
    assert len(old[0]["tokens"]) == 64  # indices built and cached
    prepare_data(out, max_bytes=120_000, valid_every=3, progress=False)  # other documents, same paths
    again, _ = build_gpt_datasets(out, seq_length=64, train_samples=32, valid_samples=4)
    fresh_source = dataclasses.replace(DataSource.from_dir(out), cache_dir=str(tmp_path / "fresh_cache"))
    fresh, _ = build_gpt_datasets(fresh_source, seq_length=64, train_samples=32, valid_samples=4)
    for i in range(32):
        assert len(again[i]["tokens"]) == 64
        assert np.array_equal(np.asarray(again[i]["tokens"]), np.asarray(fresh[i]["tokens"])), i
