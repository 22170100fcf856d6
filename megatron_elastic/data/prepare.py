"""The ``prepare-data`` job: tokenize text (the user's JSONL/text files, or the built-in corpus) into Megatron
indexed datasets with train and valid splits; called by the CLI and by the demo."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from megatron_elastic.data.corpus import DEFAULT_MAX_BYTES, iter_stdlib_documents, iter_user_documents, stdlib_root
from megatron_elastic.data.indexed import SplitStats, write_split_datasets
from megatron_elastic.data.tokenizer import BYTE, describe, load_tokenizer


def prepare_data(
    out: str,
    inputs: Optional[List[str]] = None,
    json_key: str = "text",
    tokenizer: str = BYTE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    valid_every: int = 20,
    progress: bool = True,
    workers: int = 1,
) -> Dict[str, SplitStats]:
    """Write ``out/{train,valid}_text_document.{bin,idx}`` from ``inputs`` (or this machine's Python standard
    library, up to ``max_bytes``) with the tokenizer spec ``tokenizer`` (``data.tokenizer``), tokenising in
    ``workers`` processes; prints what it reads, the split sizes and the rate. Returns the stats per split."""
    tok = load_tokenizer(tokenizer)
    if inputs:
        docs = iter_user_documents(inputs, json_key)
        source = f"{len(inputs)} file(s)"
    else:
        docs = iter_stdlib_documents(max_bytes)
        source = f"Python standard library at {stdlib_root()}"
    print(f"prepare-data: {source} -> {out} (tokenizer: {describe(tokenizer)}, vocab {tok.vocab_size}, EOD {tok.eod})")
    t0 = time.perf_counter()
    stats = write_split_datasets(out, docs, tokenizer, valid_every=valid_every, progress=progress, workers=workers)
    seconds = time.perf_counter() - t0
    for split, s in stats.items():
        print(f"  {split:5s}: {s.documents:6d} documents, {s.tokens:11,d} tokens, {s.bytes / s.tokens:.2f} bytes/token")
    tokens = sum(s.tokens for s in stats.values())
    print(f"  {tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s, {workers} worker(s))")
    return stats
