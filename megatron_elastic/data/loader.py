"""Training/validation data through Megatron's ``GPTDataset`` and ``BlendedMegatronDatasetBuilder``."""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_elastic.data.source import DataSource
from megatron_elastic.data.tokenizer import BitsPerByte, bytes_per_token


def as_source(data: Union[DataSource, str]) -> DataSource:
    """A :class:`DataSource`, or a ``prepare-data`` directory as one."""
    return data if isinstance(data, DataSource) else DataSource.from_dir(data)


def build_gpt_datasets(
    data: Union[DataSource, str],
    seq_length: int,
    train_samples: int,
    valid_samples: int,
    seed: int = 1234,
    model_vocab_size: Optional[int] = None,
) -> Tuple[GPTDataset, GPTDataset]:
    """Train and validation ``GPTDataset``s of ``data`` (a :class:`DataSource` or a ``prepare-data`` directory):
    blends and splits as Megatron builds them.

    Checks the tokenizer fits the model's vocabulary and every prefix is sound. Rank 0 builds (and caches) the
    sample indices first; the other ranks then read the cache.
    """
    source = as_source(data)
    tokenizer = source.check(model_vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **source.megatron_blends(),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=source.index_cache_dir(),
        mmap_bin_files=True,
    )

    def build():
        return BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0 if source.split else None], lambda: True, config
        ).build()

    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            datasets = build()
        dist.barrier()
        if dist.get_rank() != 0:
            datasets = build()
    else:
        datasets = build()
    train, valid, _ = datasets
    return train, valid


def eval_bits_per_byte(dataset: GPTDataset, samples: int, max_tokens: int = 1 << 20) -> BitsPerByte:
    """The bits/byte unit of an evaluation that reads the first ``samples`` samples of ``dataset``: bytes per token
    measured on their text, at most ``max_tokens`` of it (exactly 1 for the byte tokenizer)."""
    n = min(samples, len(dataset), max(1, max_tokens // dataset.config.sequence_length))
    return bits_per_byte_of(dataset.config.tokenizer, [dataset[i]["tokens"] for i in range(n)])


def bits_per_byte_of(tokenizer, token_lists) -> BitsPerByte:
    """The bits/byte unit for text given as token ids (``token_lists``: sequences or tensors)."""
    name = "byte" if getattr(tokenizer, "library", None) == "byte-level" else str(getattr(tokenizer, "path", "?"))
    lists = [t.tolist() if hasattr(t, "tolist") else list(t) for t in token_lists]
    return BitsPerByte(bytes_per_token(tokenizer, lists), name)


class ResumableSampler(torch.utils.data.Sampler):
    """Sequential micro-batches of sample indices for one data-parallel rank, starting after
    ``consumed_samples`` (global), like Megatron's pretraining sampler: resuming continues the same stream."""

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self) -> Iterator[list]:
        global_batch = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - global_batch + 1, global_batch):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def make_loader(
    dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0
):
    sampler = ResumableSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


def calibration_batches(
    data: Union[DataSource, str],
    seq_length: int,
    num_tokens: int,
    micro_batch_size: int = 8,
    seed: int = 1234,
    split: str = "train",
    vocab_size: Optional[int] = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> List[dict]:
    """This data-parallel rank's share of ``num_tokens`` tokens of ``split`` as GPTDataset micro-batches: the
    same number on every rank (the total rounded up to whole micro-batches on each), rank r taking every
    ``dp_size``-th micro-batch from the r-th; together the ranks read what one process reads."""
    n = max(1, math.ceil(num_tokens / (seq_length * micro_batch_size * dp_size)))
    samples = n * micro_batch_size * dp_size
    train, valid = build_gpt_datasets(data, seq_length, samples, samples, seed=seed, model_vocab_size=vocab_size)
    ds = train if split == "train" else valid
    it = iter(make_loader(ds, 0, micro_batch_size, dp_rank, dp_size))
    return [next(it) for _ in range(min(n, len(ds) // (micro_batch_size * dp_size)))]
