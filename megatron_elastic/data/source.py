"""Where a job's tokens come from, in Megatron's terms: a tokenizer and blends of indexed-dataset prefixes.

Two ways to name data in a config's ``data`` section:

* ``path``: a directory written by ``megatron-elastic prepare-data`` (its ``train``/``valid`` prefixes, and the
  tokenizer copy and ``metadata.json`` inside it).
* ``blend`` (Megatron's syntax: ``[0.3, /data/a_text_document, 0.7, /data/b_text_document]``, or prefixes alone)
  with ``split`` (``"99,1,0"``: train, valid, test) or a separate ``valid_blend``, and ``tokenizer`` (a spec of
  :mod:`megatron_elastic.data.tokenizer`). Any ``.bin``/``.idx`` pair Megatron-Core's ``IndexedDatasetBuilder``
  wrote works, e.g. Megatron-LM's ``tools/preprocess_data.py`` output.

:class:`DataSource` is the one resolved form; the loader, the checks and the unigram baseline read it.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from megatron_elastic.data.indexed import check_indexed_dataset, data_tokenizer_spec, read_metadata, split_prefix
from megatron_elastic.data.tokenizer import BYTE, check_vocabulary, load_tokenizer, tokenizer_library
from megatron_elastic.errors import ConfigError, InputNotFoundError

Blend = Tuple[List[str], Optional[List[float]]]  # Megatron's (prefixes, weights or None)


@dataclass(frozen=True)
class DataSource:
    tokenizer: str  # a tokenizer spec
    train: Blend
    valid: Optional[Blend] = None  # a separate validation blend; None: `split` carves it out of `train`
    split: Optional[str] = None
    cache_dir: Optional[str] = None  # Megatron's sample-index cache
    name: str = field(default="", compare=False)  # for messages

    @classmethod
    def from_dir(cls, data_dir: str) -> "DataSource":
        """A ``prepare-data`` directory (checked: metadata, both splits, token ids)."""
        meta = read_metadata(data_dir)
        return cls(
            tokenizer=data_tokenizer_spec(data_dir, meta),
            train=([split_prefix(data_dir, "train")], None),
            valid=([split_prefix(data_dir, "valid")], None),
            cache_dir=os.path.join(data_dir, "index_cache"),
            name=data_dir,
        )

    @classmethod
    def from_config(cls, data, default_cache_dir: Optional[str] = None) -> "DataSource":
        """The ``data`` section of a job (fields ``path``, ``blend``, ``split``, ``valid_blend``, ``tokenizer``)."""
        blend, valid_blend = getattr(data, "blend", None), getattr(data, "valid_blend", None)
        if data.path and (blend or valid_blend):
            raise ConfigError("data: give either data.path (a prepare-data directory) or data.blend, not both")
        if data.path:
            return cls.from_dir(data.path)
        if not blend:
            raise ConfigError(
                "data: no data: set data.path to a `megatron-elastic prepare-data` directory, or data.blend "
                "(e.g. [0.3, /data/a_text_document, 0.7, /data/b_text_document]) with data.tokenizer"
            )
        if not getattr(data, "tokenizer", None):
            raise ConfigError("data.tokenizer: a blend needs its tokenizer ('byte' or a tokenizer directory)")
        train = parse_blend(blend, "data.blend")
        valid = parse_blend(valid_blend, "data.valid_blend") if valid_blend else None
        split = None if valid else parse_split(getattr(data, "split", None) or "99,1,0")
        return cls(data.tokenizer, train, valid, split, default_cache_dir, name=", ".join(train[0]))

    def prefixes(self) -> List[str]:
        return list(self.train[0]) + (list(self.valid[0]) if self.valid else [])

    def index_cache_dir(self) -> Optional[str]:
        """Megatron's sample-index cache for exactly these files: ``cache_dir/<fingerprint>``. Megatron keys its
        cache by the dataset config alone, so data rewritten in place (``prepare-data`` run again into the same
        directory) would be read through the old files' document and sample indices: samples that cut across
        documents or span the whole token stream. The fingerprint (size and modification time of every
        ``.bin``/``.idx``) changes with any rewrite and costs one ``stat`` per file."""
        if not self.cache_dir:
            return None
        h = hashlib.sha1()
        for prefix in self.prefixes():
            for ext in (".bin", ".idx"):
                st = os.stat(prefix + ext)
                h.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns};".encode())
        return os.path.join(self.cache_dir, h.hexdigest()[:16])

    def check(self, model_vocab_size: Optional[int] = None):
        """Load the tokenizer, check the model embeds its ids and every prefix is sound (its ``.idx`` parses, its
        ``.bin`` is complete, its token ids fit the tokenizer); errors name the prefix. Returns the tokenizer."""
        tokenizer = load_tokenizer(self.tokenizer)
        check_vocabulary(tokenizer, model_vocab_size, f"data {self.name}")
        for prefix in self.prefixes():
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise InputNotFoundError(
                        f"data: dataset prefix {prefix}: {prefix + ext} not found (a prefix is the path without "
                        f".bin/.idx, e.g. /data/corpus_text_document)"
                    )
            check_indexed_dataset(prefix, vocab_size=tokenizer.vocab_size)
        return tokenizer

    def train_tokens(self) -> int:
        """Tokens the training split holds (its share of the ``split`` when there is no validation blend)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        total = 0
        for prefix in self.train[0]:
            dataset = IndexedDataset(prefix, mmap=True)  # held while its lengths (a view of its mmap) are read
            total += int(dataset.sequence_lengths.sum())
            del dataset
        if self.split is None:
            return total
        weights = [float(x) for x in self.split.split(",")]
        return int(total * weights[0] / sum(weights))

    def megatron_blends(self) -> dict:
        """The ``blend``/``split`` or ``blend_per_split`` arguments of Megatron's ``GPTDatasetConfig``."""
        if self.valid is not None:
            return {"blend_per_split": [self.train, self.valid, None]}
        return {"blend": self.train, "split": self.split}


def job_tokenizer_spec(data: dict) -> Optional[str]:
    """The tokenizer a job's ``data`` section (a mapping) was tokenised with: its ``tokenizer``, or that of its
    ``prepare-data`` directory; None when it names neither."""
    if data.get("tokenizer"):
        return data["tokenizer"]
    if data.get("path"):
        return DataSource.from_dir(data["path"]).tokenizer
    return None


def exported_tokenizer(data: dict) -> Tuple[Optional[str], str]:
    """The tokenizer a job's ``data`` section was trained with, as it travels with a Hugging Face export
    (``transformers`` then loads model and tokenizer from one directory): its spec (None: nothing to write) and what
    a summary says of it. Never raises: an export's weights are fine without it."""
    try:
        spec = job_tokenizer_spec(data)
    except (OSError, ValueError) as e:  # the parent's data directory is gone: say so
        return None, f"not copied: the parent's data ({data.get('path')}) cannot be read: {e}"
    if spec is None:
        return None, "not copied: the parent's job names no data"
    if spec == BYTE:
        return BYTE, "byte (written as a byte-level tokenizer.json: ids 0-255 are UTF-8 bytes, <eod> 256, <pad> 257)"
    library, _ = tokenizer_library(spec)
    if library != "huggingface":
        return None, f"not copied: {library} tokenizers are not loadable by transformers ({spec})"
    return spec, spec


def parse_blend(blend: Sequence, field_name: str) -> Blend:
    """Megatron's blend list -> (prefixes, weights or None), with errors that name ``field_name``."""
    if isinstance(blend, str):
        blend = blend.split()
    if not isinstance(blend, (list, tuple)) or not blend:
        raise ConfigError(f"{field_name}: expected a list like [0.3, /data/a_text_document, 0.7, /data/b]")
    if not any(_is_number(x) for x in blend):  # prefixes only (Megatron weights them by their sizes)
        return [str(x) for x in blend], None
    if len(blend) % 2:
        raise ConfigError(f"{field_name}: odd-length list ({len(blend)} items): give weight, prefix pairs")
    weights, prefixes = list(blend[0::2]), list(blend[1::2])
    for w, p in zip(weights, prefixes):
        if not _is_number(w) or not isinstance(p, str) or _is_number(p):
            raise ConfigError(f"{field_name}: expected weight, prefix pairs; got {w!r}, {p!r}")
        if float(w) < 0:
            raise ConfigError(f"{field_name}: weight {w} of {p} is negative; weights are >= 0")
    if sum(float(w) for w in weights) <= 0:
        raise ConfigError(f"{field_name}: the weights sum to 0; give at least one positive weight")
    return prefixes, [float(w) for w in weights]


def parse_split(split: str) -> str:
    """``"train,valid,test"`` weights (Megatron's split string); the train and valid parts must be positive."""
    parts = str(split).replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split: {split!r} is not numbers; e.g. '99,1,0' (train, valid, test)") from None
    if len(values) != 3 or min(values) < 0 or values[0] <= 0 or values[1] <= 0:
        raise ConfigError(f"data.split: {split!r}: give three weights >= 0 with train and valid > 0, e.g. '99,1,0'")
    return ",".join(parts)


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, numbers.Number):
        return True
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False
