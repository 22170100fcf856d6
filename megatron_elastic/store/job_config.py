"""The pretraining job config: a YAML file with sections ``model``, ``parallel``, ``data``, ``train``,
``checkpoint``. Every field is checked before any work starts; errors name the field and the fix."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from megatron_elastic.data.source import DataSource
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import HybridConfig, tiny_defaults
from megatron_elastic.store.checkpoint import OPTIMIZER_SHARDINGS


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # split activations between the TP linears along the sequence (needs TP >= 2)
    # How long a rank waits in a collective before failing (NCCL's default is 10): longer than the slowest
    # checkpoint write, whose barrier the fastest ranks wait in.
    distributed_timeout_minutes: int = 30

    def check(self) -> None:
        t = self.distributed_timeout_minutes
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ConfigError(f"parallel.distributed_timeout_minutes: must be a positive integer, got {t!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError(
                "parallel.sequence_parallel: needs parallel.tensor_model_parallel_size >= 2 (it splits the "
                "sequence over the TP ranks); set it to false or raise the TP size"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size of this layout on ``world_size`` processes (which it must divide)."""
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"parallel: world size {world_size} is not a multiple of TP*PP={mp}; "
                f"launch a multiple of {mp} processes"
            )
        return world_size // mp


@dataclass
class DataSourceConfig:
    """Where the tokens come from (resolved by ``megatron_elastic.data.source.DataSource``): ``path``, a
    ``prepare-data`` directory, or ``blend`` in Megatron's syntax with ``split`` or ``valid_blend`` and the
    ``tokenizer`` the prefixes were written with."""

    path: str = ""
    blend: Optional[List[Any]] = None  # [0.3, /data/a_text_document, 0.7, /data/b_text_document]
    split: str = "99,1,0"  # train, valid, test weights, when there is no valid_blend
    valid_blend: Optional[List[Any]] = None
    tokenizer: str = ""  # with a blend: 'byte' or a tokenizer directory/file
    cache_dir: str = ""  # Megatron's sample-index cache for a blend (default: <checkpoint.dir>/index_cache)
    num_workers: int = 0

    SOURCE_FIELDS = ("path", "blend", "split", "valid_blend", "tokenizer")

    def names_data(self) -> bool:
        return bool(self.path or self.blend)

    def take_source(self, other: "DataSourceConfig") -> None:
        """Use ``other``'s data (e.g. the data the parent was trained on)."""
        for name in self.SOURCE_FIELDS:
            setattr(self, name, getattr(other, name))

    def source(self, checkpoint_dir: str):

        return DataSource.from_config(self, self.cache_dir or os.path.join(checkpoint_dir, "index_cache"))


@dataclass
class DataConfig(DataSourceConfig):
    seq_length: int = 256


@dataclass
class OptimizationConfig:
    """What pretraining and elastic training share: Adam, the LR schedule, clipping, the seed and the log and
    evaluation cadence (``training.setup.build_training`` reads these)."""

    micro_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 50
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 200
    eval_iters: int = 20

    def check_schedule(self) -> None:
        """The learning-rate fields make a schedule Megatron can run."""
        if not 0 < self.lr:
            raise ConfigError("train.lr: must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr: must be in [0, train.lr={self.lr}]")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError("train.lr_decay_style: must be 'cosine', 'linear' or 'constant'")


@dataclass
class TrainConfig(OptimizationConfig):
    global_batch_size: int = 8
    train_iters: int = 1000


@dataclass
class CheckpointConfig:
    dir: str = "runs/parent"
    save_interval: int = 500
    keep_last: int = 2
    async_save: bool = False  # write tensors in a background process (Megatron's async dist_checkpointing)
    # the distributed optimizer's state: per rank, resumes at the same TP/PP ("dp_reshardable", Megatron-LM's
    # default), or gathered per parameter, resumes at any layout ("fully_reshardable"); see store/checkpoint.py
    optimizer_sharding: str = "dp_reshardable"

    def __post_init__(self):

        if self.optimizer_sharding not in OPTIMIZER_SHARDINGS:
            raise ConfigError(
                f"checkpoint.optimizer_sharding: {self.optimizer_sharding!r} is not one of "
                f"{', '.join(OPTIMIZER_SHARDINGS)}"
            )


@dataclass
class PretrainConfig:
    model: Dict[str, Any] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def model_config(self, **overrides: Any) -> HybridConfig:
        """The validated ``HybridConfig`` at this job's parallel layout."""
        kw = {**tiny_defaults(), **self.model, **overrides}
        kw.setdefault("tensor_model_parallel_size", self.parallel.tensor_model_parallel_size)
        kw.setdefault("pipeline_model_parallel_size", self.parallel.pipeline_model_parallel_size)
        kw.setdefault("sequence_parallel", self.parallel.sequence_parallel)
        try:
            return HybridConfig.from_dict(kw)
        except ConfigError as e:
            raise ConfigError(f"model.{e}") from None

    def validate(self, world_size: int = 1) -> None:
        _positive(
            self,
            "parallel.tensor_model_parallel_size",
            "parallel.pipeline_model_parallel_size",
            "data.seq_length",
            "train.micro_batch_size",
            "train.global_batch_size",
            "train.train_iters",
            "train.log_interval",
            "train.eval_interval",
            "train.eval_iters",
            "checkpoint.save_interval",
            "checkpoint.keep_last",
        )
        t = self.train
        t.check_schedule()
        if not 0 <= t.lr_warmup_iters < t.train_iters:
            raise ConfigError(f"train.lr_warmup_iters: must be in [0, train.train_iters={t.train_iters})")
        self.parallel.check()
        dp = self.parallel.data_parallel_size(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"micro_batch_size*data_parallel_size ({t.micro_batch_size}*{dp})"
            )
        cfg = self.model_config()
        if "M" in cfg.hybrid_pattern and self.data.seq_length < cfg.mamba_conv_kernel:
            raise ConfigError(f"data.seq_length ({self.data.seq_length}) must be >= model.mamba_conv_kernel")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(cfg, *paths: str) -> None:
    for path in paths:
        section, name = path.split(".")
        v = getattr(getattr(cfg, section), name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{path}: must be a positive integer, got {v!r}")


def _yaml_float(text: str, field_name: str) -> float:
    """A float field written as ``5e-4``: YAML 1.1 (PyYAML) reads exponents without a dot as strings; accept any
    string Python reads as a finite float, refuse the rest with the field's name."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{field_name}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{field_name}: expected a finite number, got {text!r}")
    return value


def _build_section(cls, section: str, values: Any):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}; known: {sorted(fields)}")
    out = {}
    for k, v in values.items():
        default = getattr(cls(), k)
        if v is None and isinstance(default, str):  # `field:` / `--set section.field=` left empty: unset
            v = ""
        if isinstance(default, float) and isinstance(v, str):
            v = _yaml_float(v, f"{section}.{k}")
        if (
            (isinstance(default, bool) != isinstance(v, bool) and not _may_be_list(fields[k], v))
            or (isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(v, (int, float)))
            or (isinstance(default, str) and not isinstance(v, str) and not _may_be_list(fields[k], v))
        ):
            raise ConfigError(f"{section}.{k}: expected {type(default).__name__}, got {v!r}")
        if isinstance(default, float) and isinstance(v, int):
            v = float(v)
        out[k] = v
    return cls(**out)


def _may_be_list(f: dataclasses.Field, v: Any) -> bool:
    """A list given for a field typed ``Union[str | bool, List[...]]`` (one value, or one per item of something;
    the section's ``validate`` checks the items)."""
    return isinstance(v, list) and "List[" in str(f.type)


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``section.field=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: use section.field=value, e.g. train.train_iters=100")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][name] = yaml.safe_load(value)
    return raw


def read_config_mapping(path: Optional[str] = None, text: Optional[str] = None) -> Dict[str, Any]:
    """The top-level YAML mapping of a job config file ``path`` (or ``text``), with clear errors."""
    if text is None:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    return raw


def load_pretrain_config(
    path: Optional[str] = None, overrides: Optional[List[str]] = None, text: Optional[str] = None
) -> PretrainConfig:
    """Load a YAML job config from ``path`` (or ``text``), apply ``overrides``, validate the sections."""
    raw = apply_overrides(read_config_mapping(path, text), overrides)
    known = {"model", "parallel", "data", "train", "checkpoint"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; known: {sorted(known)}")
    if not isinstance(raw.get("model"), dict) or not raw["model"]:
        raise ConfigError("model: section missing; give at least hybrid_pattern, vocab_size, hidden_size, ...")
    cfg = PretrainConfig(
        model=dict(raw["model"]),
        parallel=_build_section(ParallelConfig, "parallel", raw.get("parallel")),
        data=_build_section(DataConfig, "data", raw.get("data")),
        train=_build_section(TrainConfig, "train", raw.get("train")),
        checkpoint=_build_section(CheckpointConfig, "checkpoint", raw.get("checkpoint")),
    )
    return cfg
