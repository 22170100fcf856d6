"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then the special tokens. No files, no downloads."""

from __future__ import annotations

from typing import Iterable, List

import numpy as np

from megatron_elastic.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes + ``<eod>`` (256) + ``<pad>`` (257). ``vocab_size`` = 258.

    Has the attributes Megatron's ``GPTDataset`` reads (``eod``, ``pad``, ``vocab_size``, ``tokenize``).
    """

    name = "byte"
    EOD, PAD = 256, 257

    def __init__(self):
        # Megatron's datasets hash this into their index-cache names.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size}

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def pad(self) -> int:
        return self.PAD

    @property
    def vocab(self):
        return {**{bytes([i]).decode("latin-1"): i for i in range(256)}, "<eod>": self.EOD, "<pad>": self.PAD}

    @property
    def inv_vocab(self):
        return {v: k for k, v in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def bits_per_byte(self, nats_per_token: float) -> float:
        """Each token is one byte, so bits/byte = nats/token / ln 2."""
        return nats_per_token / float(np.log(2))


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str = "byte"):
    if name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {name!r}; available: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()
