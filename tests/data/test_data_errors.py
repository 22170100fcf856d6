"""Broken data gives an error that names the file and the fix, before any training step."""

import json
import os
import shutil

import pytest

from megatron_elastic.data.corpus import iter_stdlib_documents
from megatron_elastic.data.indexed import DataError, read_metadata, split_prefix, write_split_datasets


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    write_split_datasets(str(out), iter_stdlib_documents(max_bytes=100_000), "byte", valid_every=5, progress=False)
    return str(out)


@pytest.fixture
def data(good, tmp_path):
    d = str(tmp_path / "data")
    shutil.copytree(good, d)
    return d


def test_good_data_passes(good):
    assert read_metadata(good)["vocab_size"] == 258


@pytest.mark.parametrize(
    "damage,error,message",
    [
        ("truncate_bin", DataError, "truncated"),
        ("garbage_idx", DataError, "corrupted"),
        ("remove_idx", FileNotFoundError, "missing or empty"),
        ("empty_bin", FileNotFoundError, "missing or empty"),
        ("small_vocab", DataError, "token id"),
        ("no_metadata", FileNotFoundError, "prepare-data"),
    ],
)
def test_damaged_data_is_named(data, damage, error, message):
    prefix = split_prefix(data, "train")
    if damage == "truncate_bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".bin") - 7)
    elif damage == "garbage_idx":
        with open(prefix + ".idx", "wb") as f:
            f.write(b"not an index" * 10)
    elif damage == "remove_idx":
        os.remove(prefix + ".idx")
    elif damage == "empty_bin":
        open(prefix + ".bin", "wb").close()
    elif damage == "small_vocab":
        meta = json.load(open(os.path.join(data, "metadata.json")))
        meta["vocab_size"] = 64
        json.dump(meta, open(os.path.join(data, "metadata.json"), "w"))
    else:
        os.remove(os.path.join(data, "metadata.json"))
    with pytest.raises(error, match=message) as e:
        read_metadata(data)
    if damage != "no_metadata":
        assert "train_text_document" in str(e.value) and "prepare-data" in str(e.value)
