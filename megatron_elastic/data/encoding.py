"""Tokenising documents into ``(token ids + EOD, UTF-8 bytes)``: in this process, or in a pool of processes that
start clean (:func:`megatron_elastic.parallel.clean_process_context`; a pool forked from the caller once waited forever
in CI, a worker stuck loading a Hugging Face tokenizer)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Tuple

from megatron_elastic.data.tokenizer import load_tokenizer
from megatron_elastic.parallel import clean_process_context

# What the pool's server process imports once, before it starts any worker (a fresh import of Megatron's tokenizers
# takes seconds); this module brings the worker's functions.
POOL_PRELOAD = ["megatron.core.tokenizers", __name__]

_worker_tokenizer = None


def _start_worker(spec: str) -> None:
    """A pool process: its own tokenizer, single-threaded (one process per worker is the parallelism)."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(spec)


def _encode(text: str, tokenizer=None) -> Tuple[List[int], int]:
    tok = tokenizer or _worker_tokenizer
    return tok.tokenize(text) + [tok.eod], len(text.encode("utf-8"))


def encode_documents(documents: Iterable[str], spec: str, workers: int = 1) -> Iterator[Tuple[List[int], int]]:
    """``(token ids + EOD, UTF-8 bytes)`` of every document, in order; ``workers`` > 1 tokenises in that many
    processes (each loads the tokenizer once)."""
    if workers <= 1:  # in this process, leaving its environment (TOKENIZERS_PARALLELISM) as it is
        tokenizer = load_tokenizer(spec)
        yield from (_encode(d, tokenizer) for d in documents)
        return
    with clean_process_context(POOL_PRELOAD).Pool(workers, initializer=_start_worker, initargs=(spec,)) as pool:
        yield from pool.imap(_encode, documents, chunksize=32)
