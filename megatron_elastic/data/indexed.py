"""Write and check Megatron indexed datasets (``.bin``/``.idx`` via ``megatron.core.datasets``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_elastic.data.encoding import encode_documents
from megatron_elastic.data.tokenizer import BYTE, copy_tokenizer, describe, load_tokenizer
from megatron_elastic.errors import DataError, InputNotFoundError

SPLITS = ("train", "valid")


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_split_datasets(
    out_dir: str,
    documents: Iterable[str],
    tokenizer: str = BYTE,
    valid_every: int = 20,
    progress: bool = True,
    workers: int = 1,
) -> Dict[str, SplitStats]:
    """Tokenise ``documents`` (EOD appended to each) with the tokenizer spec ``tokenizer`` into
    ``<out_dir>/{train,valid}_text_document.{bin,idx}``.

    Every ``valid_every``-th document goes to ``valid`` (deterministic, whatever ``workers``). A tokenizer on disk is
    copied to ``<out_dir>/tokenizer``, so the data carries it. Writes ``metadata.json`` (tokenizer, vocabulary,
    counts of documents, tokens and text bytes), which training checks against the model.
    """
    if valid_every < 2:
        raise DataError("valid_every must be >= 2 (every N-th document goes to the validation split)")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    stored = copy_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer"))
    dtype = token_dtype(tok.vocab_size)
    builders = {s: IndexedDatasetBuilder(os.path.join(out_dir, f"{s}_text_document.bin"), dtype=dtype) for s in SPLITS}
    stats = {s: SplitStats() for s in SPLITS}
    with tqdm(desc="tokenising", unit="tok", unit_scale=True, disable=not progress) as bar:
        for i, (ids, n_bytes) in enumerate(encode_documents(documents, stored, workers)):
            split = "valid" if i % valid_every == valid_every - 1 else "train"
            builders[split].add_item(torch.tensor(ids, dtype=torch.int64))
            builders[split].end_document()
            stats[split].documents += 1
            stats[split].tokens += len(ids)
            stats[split].bytes += n_bytes
            bar.update(len(ids))
    for s in SPLITS:
        if stats[s].documents == 0:
            raise DataError(
                f"the {s} split is empty ({sum(x.documents for x in stats.values())} documents in all): give "
                f"more input text "
                f"(a larger --max-bytes for the built-in corpus) or a smaller --valid-every"
            )
        builders[s].finalize(os.path.join(out_dir, f"{s}_text_document.idx"))
    meta = {
        "tokenizer": BYTE if stored == BYTE else os.path.relpath(stored, out_dir),
        "tokenizer_name": describe(tokenizer),
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "splits": {s: asdict(stats[s]) for s in SPLITS},
    }
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return stats


def data_tokenizer_spec(data_dir: str, meta: dict) -> str:
    """The spec of the tokenizer a ``prepare-data`` directory was written with (its copy inside the directory)."""
    spec = meta.get("tokenizer", BYTE)
    return spec if spec == BYTE else os.path.join(data_dir, spec)


def split_prefix(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}_text_document")


def read_metadata(data_dir: str) -> dict:
    """Read ``metadata.json`` and check both splits exist, with errors that name the fix."""
    path = os.path.join(data_dir, "metadata.json")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path} not found: run `megatron-elastic prepare-data --out {data_dir}` first")
    with open(path) as f:
        meta = json.load(f)
    for s in SPLITS:
        for ext in (".bin", ".idx"):
            p = split_prefix(data_dir, s) + ext
            if not os.path.isfile(p) or os.path.getsize(p) == 0:
                raise InputNotFoundError(
                    f"{p} is missing or empty: re-run `megatron-elastic prepare-data --out {data_dir}`"
                )
        check_indexed_dataset(split_prefix(data_dir, s), vocab_size=meta.get("vocab_size"))
    return meta


def check_indexed_dataset(prefix: str, vocab_size: Optional[int] = None, sample_tokens: int = 1 << 20) -> None:
    """The ``.idx`` parses, the ``.bin`` holds exactly the tokens it indexes, and (when ``vocab_size`` is
    known) the first and last ``sample_tokens`` token ids are in range. Raises :class:`DataError`."""
    fix = "re-create it with `megatron-elastic prepare-data`"
    try:
        ds = IndexedDataset(prefix, mmap=True)
        lengths = ds.sequence_lengths
        dtype = np.dtype(ds.index.dtype)
    except Exception as e:  # noqa: BLE001 - Megatron raises assertion/struct/value errors on a bad index
        raise DataError(f"{prefix}.idx is corrupted or not a Megatron index ({type(e).__name__}: {e}); {fix}") from None
    want = int(np.sum(lengths, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(prefix + ".bin")
    if have != want:
        raise DataError(
            f"{prefix}.bin has {have} bytes but its index describes {want} (truncated or from another index); {fix}"
        )
    if vocab_size and len(lengths):
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        n = min(sample_tokens, len(tokens))
        top = int(max(tokens[:n].max(), tokens[-n:].max()))
        if top >= vocab_size:
            raise DataError(
                f"{prefix}.bin holds token id {top} >= the tokenizer's vocabulary ({vocab_size}); the data "
                f"was written with another tokenizer; {fix}"
            )


def iter_documents(prefix: str) -> Iterator[np.ndarray]:
    """Token arrays of every document of an indexed dataset."""
    ds = IndexedDataset(prefix)
    for i in range(len(ds)):
        yield ds[i]
