"""Text sources for ``prepare-data``: the built-in corpus (this machine's Python standard library sources)
and a user's JSONL or plain-text files."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, List, Sequence

from megatron_elastic.errors import DataError, InputNotFoundError

DEFAULT_MAX_BYTES = 16_000_000  # the built-in corpus's cap (the demo's recipe)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path = None) -> List[Path]:
    """The standard library's ``.py`` files in a deterministic order (sorted relative paths),
    excluding ``site-packages`` (which differs between machines)."""
    root = Path(root) if root is not None else stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_stdlib_documents(max_bytes: int = None, root: Path = None) -> Iterator[str]:
    """One document per stdlib source file, up to ``max_bytes`` of UTF-8 in total."""
    total = 0
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        n = len(text.encode("utf-8"))
        if max_bytes is not None and total + n > max_bytes:
            if total == 0:
                yield text
            return
        total += n
        yield text


def iter_user_documents(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Documents from ``.jsonl``/``.json`` (one JSON object per line, text under ``json_key``) or any other
    file (the whole file is one document). Raises with the file and line on malformed input."""
    for p in paths:
        if not os.path.isfile(p):
            raise InputNotFoundError(f"--input {p}: no such file")
        if p.endswith((".jsonl", ".json")):
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from e
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise DataError(f"{p}:{lineno}: no {json_key!r} field; pass --json-key with the right name")
                    if obj[json_key]:
                        yield str(obj[json_key])
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                yield text
