"""Tokenizers, through Megatron-Core's tokenizer system (``megatron.core.tokenizers.MegatronTokenizer``).

A tokenizer is named by a string, the *spec*:

* ``byte``: Megatron's byte-level tokenizer laid out as this project always had it: ids 0..255 are the UTF-8
  bytes, ``<eod>`` = 256, ``<pad>`` = 257, vocabulary 258. No files.
* a path, read offline (nothing is downloaded): a Hugging Face tokenizer directory (``tokenizer.json`` and/or
  ``tokenizer_config.json``; a ``tokenizer.json`` file names its directory), a SentencePiece ``*.model`` file, or a
  directory Megatron wrote (``tokenizer_metadata.json``, ``MegatronTokenizer.write_metadata``).

Every tokenizer returned has what Megatron's ``GPTDataset`` reads (``eod``, ``pad``, ``vocab_size``,
``unique_identifiers``, ``tokenize``) and ``detokenize``.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from megatron_elastic.errors import ConfigError, DataError, InputNotFoundError

LN2 = math.log(2.0)  # nats per bit: a loss in nats/token divided by LN2 is bits/token
BYTE = "byte"
BYTE_EOD, BYTE_PAD = 256, 257
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
MEGATRON_METADATA = "tokenizer_metadata.json"
FIX = "give 'byte' or a tokenizer on disk (a Hugging Face tokenizer directory, a SentencePiece .model file)"


def load_tokenizer(spec: str = BYTE):
    """The Megatron tokenizer ``spec`` names (see the module docstring); clear errors for what cannot load."""
    from megatron.core.tokenizers import MegatronTokenizer

    if spec == BYTE:
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "byte-level"},
            vocab_size=256,
            special_tokens=["<pad>", "<eod>"],  # byte-level numbers specials downwards from 257
            _eos_id=BYTE_EOD,
            _pad_id=BYTE_PAD,
        )
    library, path = tokenizer_library(spec)
    kwargs = {"use_fast": True} if library == "huggingface" else {}
    metadata = os.path.join(path, MEGATRON_METADATA) if library == "megatron-metadata" else {"library": library}
    try:
        tokenizer = MegatronTokenizer.from_pretrained(path, metadata_path=metadata, **kwargs)
    except ImportError as e:
        raise DataError(f"tokenizer {spec}: needs {e.name or 'a missing package'}: pip install 'megatron-elastic[hf]'")
    except Exception as e:  # noqa: BLE001 - transformers/sentencepiece raise many kinds for a bad file
        raise DataError(f"tokenizer {spec}: cannot be read ({type(e).__name__}: {e}); {FIX}") from None
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise DataError(
            f"tokenizer {spec}: has no end-of-document token (its eos_token); set `eos_token` in its "
            f"tokenizer_config.json (documents are separated by it)"
        )
    return tokenizer


def tokenizer_library(spec: str) -> Tuple[str, str]:
    """``(library, path)`` of a tokenizer on disk: ``huggingface``, ``sentencepiece`` or ``megatron-metadata``."""
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise InputNotFoundError(f"tokenizer {spec}: no such file or directory; {FIX}")
    if not os.access(path, os.R_OK):
        raise InputNotFoundError(f"tokenizer {spec}: not readable (permissions); make it readable or copy it")
    if os.path.isfile(path):
        if path.endswith(".model"):
            return "sentencepiece", path
        if os.path.basename(path) in HF_FILES:
            path = os.path.dirname(path)
        else:
            raise DataError(
                f"tokenizer {spec}: a file that is neither tokenizer.json nor a SentencePiece .model; {FIX}"
            )
    if os.path.isfile(os.path.join(path, MEGATRON_METADATA)):
        return "megatron-metadata", path
    if any(os.path.isfile(os.path.join(path, f)) for f in HF_FILES):
        return "huggingface", path
    models = glob.glob(os.path.join(path, "*.model"))
    if len(models) == 1:
        return "sentencepiece", models[0]
    raise DataError(f"tokenizer {spec}: the directory has no tokenizer.json, tokenizer_config.json or *.model; {FIX}")


def describe(spec: str) -> str:
    """A short name for reports and metrics: ``byte`` or ``<library>:<directory or file name>``."""
    if spec == BYTE:
        return BYTE
    library, path = tokenizer_library(spec)
    return f"{library}:{os.path.basename(path.rstrip(os.sep))}"


# What makes a tokenizer, and only that, travels with datasets and exports: a model directory's config.json,
# generation_config.json or weight index (every NVIDIA release ships them beside the tokenizer) never does.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
    }
)
TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".jinja")  # SentencePiece, tiktoken, chat templates


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a tokenizer (or model) directory belongs to the tokenizer."""
    return name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES)


def copy_tokenizer(spec: str, dest: str) -> str:
    """Copy the tokenizer's files (:func:`is_tokenizer_file`) into ``dest`` (a dataset or a checkpoint carries its
    tokenizer); returns the spec that loads the copy (``byte`` stays ``byte``)."""
    if spec == BYTE:
        return BYTE
    return _copy_tokenizer_files(spec, dest)


def write_hf_tokenizer(spec: str, dest: str) -> bool:
    """The tokenizer as ``transformers`` loads it from ``dest`` (``AutoTokenizer.from_pretrained(dest)``): a Hugging
    Face tokenizer's files copied; ``byte`` written as a byte-level BPE without merges that gives the same ids
    (byte b -> id b, ``<eod>`` 256, ``<pad>`` 257), so lm-eval's ``hf`` model and ``generate`` read an export of a
    byte-level model as they read any other. False when nothing could be written (``byte`` needs ``tokenizers``)."""
    if spec != BYTE:
        _copy_tokenizer_files(spec, dest)
        return True
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        return False
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"<eod>": BYTE_EOD, "<pad>": BYTE_PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eod>", pad_token="<pad>")
    fast.save_pretrained(dest)
    return True


def _copy_tokenizer_files(spec: str, dest: str) -> str:
    library, path = tokenizer_library(spec)
    os.makedirs(dest, exist_ok=True)
    if os.path.isfile(path):  # a SentencePiece model file
        shutil.copy2(path, dest)
        return os.path.join(dest, os.path.basename(path))
    for name in os.listdir(path):
        src = os.path.join(path, name)
        if os.path.isfile(src) and is_tokenizer_file(name):
            shutil.copy2(src, dest)
    return dest


def special_token_ids(spec: str) -> Dict[str, Optional[int]]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of a tokenizer (None where it has none): what a
    Hugging Face export's ``config.json`` and ``generation_config.json`` say. The end of a document is the eos."""
    if spec == BYTE:
        return {"bos_token_id": None, "eos_token_id": BYTE_EOD, "pad_token_id": BYTE_PAD}
    library, path = tokenizer_library(spec)
    if library == "huggingface":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ids = {k: getattr(hf, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
        tokenizer = load_tokenizer(spec)
        ids = {"bos_token_id": getattr(tokenizer, "bos", None), "eos_token_id": None, "pad_token_id": None}
    if ids["eos_token_id"] is None:
        ids["eos_token_id"] = load_tokenizer(spec).eod
    return {k: (int(v) if isinstance(v, int) and v >= 0 else None) for k, v in ids.items()}


def check_vocabulary(tokenizer, model_vocab_size: Optional[int], where: str) -> None:
    """The model can embed every id the tokenizer makes."""
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {model_vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size} (a multiple of 128 is usual) or use the model's tokenizer"
        )


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids``, exactly: Megatron's byte-level ``detokenize`` strips trailing whitespace (a generated
    newline or indent would vanish); its bytes are decoded here instead (specials dropped, bad UTF-8 replaced)."""
    if getattr(tokenizer, "library", None) == "byte-level":
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
    return tokenizer.detokenize([int(i) for i in ids])


def bytes_per_token(tokenizer, documents: Sequence[Sequence[int]]) -> float:
    """UTF-8 bytes of the text ``documents`` (token ids) decode to, per token: what turns a loss per token into
    bits per byte. Exactly 1 for the byte tokenizer (each token one byte; the end of document counts as one)."""
    if getattr(tokenizer, "library", None) == "byte-level":
        return 1.0
    tokens = sum(len(d) for d in documents)
    if tokens == 0:
        raise DataError("no tokens to measure bytes per token on (empty evaluation text)")
    text = (tokenizer.detokenize([int(i) for i in d if int(i) != tokenizer.eod]) for d in documents)
    return sum(len(t.encode("utf-8")) for t in text) / tokens


@dataclass(frozen=True)
class BitsPerByte:
    """Loss in nats/token -> bits per byte of text: divided by ``ln 2 x bytes_per_token`` of the evaluated text
    (measured: :func:`megatron_elastic.data.loader.eval_bits_per_byte`; exactly 1 for the byte tokenizer)."""

    bytes_per_token: float = 1.0
    tokenizer: str = BYTE

    def __call__(self, nats_per_token: float) -> float:
        return nats_per_token / (LN2 * self.bytes_per_token)

    def record(self) -> Dict[str, object]:
        """What metrics and summaries say about the unit."""
        return {"tokenizer": self.tokenizer, "bytes_per_token": self.bytes_per_token}
