"""The elastic-distillation job config (``megatron-elastic train``): a YAML file with sections

``parent``      the importance output directory (``sorted/`` checkpoint + ``ranking.json``)
``plan_parent_config``  optional: a parent YAML (relative to this file) that ``plan`` reads before the parent exists
``budgets``     fractions of the parent's cost, e.g. ``[1.0, 0.75, 0.5]``, or budgets in the job's kind stated
                absolutely (``[1.0, 6GiB@32768, 4GiB@32768]``: converted with the parent's architecture)
``budget_kind`` what a budget bounds (``elastic.budget``): ``params`` (default, the paper's), ``memory@CONTEXT[xBATCH]``
                (serving weights + KV caches + Mamba states) or ``flops@CONTEXT`` (forward FLOPs per token)
``fixed_arch``  optional: an ``ElasticArch`` JSON (e.g. an extracted budget's ``arch.json``); the run then trains
                only that sub-model (and 1.0 if listed) under the one smaller budget, no router search (the
                exact-architecture baseline)
``space``       the allowed sizes of every elastic axis (fractions of the parent) and heterogeneity
``router``      hidden size, LR, warm-up, resource-loss weight, temperature and logit-scale annealing
``distill``     KD temperature, LM-loss weight, budgets per step (``sample`` or ``all``), the teacher (frozen or
                trainable, or one per stage)
``curriculum``  the stages: tokens, sequence length, global batch, budget weights
``parallel``, ``data``, ``train``, ``checkpoint``  as in the pretraining config

Every field is checked before any work starts; errors name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

from megatron_elastic.elastic.arch import AXIS_FIELD, ElasticArch, ElasticArchError
from megatron_elastic.elastic.budget import format_cost, kind_text, parse_budget, parse_kind
from megatron_elastic.elastic.curriculum import Curriculum, Stage
from megatron_elastic.errors import ConfigError
from megatron_elastic.store.checkpoint import latest_checkpoint
from megatron_elastic.store.job_config import (
    CheckpointConfig,
    DataSourceConfig,
    OptimizationConfig,
    ParallelConfig,
    _build_section,
    apply_overrides,
    load_pretrain_config,
    read_config_mapping,
)
from megatron_elastic.store.open_run import config_from_checkpoint


@dataclass
class SpaceConfig:
    fractions: List[float] = field(default_factory=lambda: [0.5, 0.625, 0.75, 0.875, 1.0])
    # fractions of the layers the router may keep, or "all": every depth from 1 layer to N (the paper's Eq. 9)
    depth_fractions: Union[List[float], str] = field(default_factory=lambda: [0.75, 0.875, 1.0])
    # true: every width axis chosen per layer (the paper's heterogeneous sub-models); false: one choice per axis for
    # all layers of its type (homogeneous); or the axes chosen per layer, the others shared, e.g. [ffn]: Mamba and
    # attention sizes the same in every layer, which vLLM's NemotronH can serve (a per-MLP intermediate_size list)
    heterogeneous: Union[bool, List[str]] = True


@dataclass
class RouterConfig:
    hidden: int = 256
    lr: float = 1e-2  # paper §Router
    warmup_iters: int = 60  # paper: 60-step linear warm-up for model and router
    loss_weight: float = 1.0  # lambda in L = L_KD + lambda * L_router (paper)
    tau_start: float = 1.0  # Gumbel-Softmax temperature, annealed linearly over the run (paper)
    tau_end: float = 0.05
    logit_scale_start: float = 1.0  # router-logit scale, increased linearly (paper)
    logit_scale_end: float = 10.0
    # How the chosen sub-model's mask enters the forward pass (paper Sec. Mask Generation, which does not say which
    # its runs used): "straight_through" (ours: gate 1 forward, the chosen probability's gradient back) or "scaled"
    # (Mode 1, Eq. 50: the mask times the chosen Gumbel-Softmax probability, forward and back). Mode 2's soft mix of
    # every nested mask is refused: see MASK_MODES.
    mask_mode: str = "straight_through"


# router.mask_mode -> Router.draw's ``hard``: whether the gate is the straight-through one-hot (1.0 forward).
MASK_MODES = {"straight_through": True, "scaled": False}
SOFT_MASK_REFUSAL = (
    "router.mask_mode: soft (the paper's Mode 2, Eq. 51: every unit weighted by the probability mass of the choices "
    "that keep it) runs every budget at full width, and this project's elastic layers slice instead of masking; "
    "use straight_through or scaled (Mode 1, Eq. 50)"
)


@dataclass
class DistillConfig:
    temperature: float = 1.0  # KD temperature: not given by the paper (our choice)
    lm_loss_weight: float = 0.0  # frozen-teacher mode: KD only (paper); > 0 adds next-token CE
    budgets_per_step: str = "sample"  # "sample": each micro-batch gets one budget; "all": every budget sees it
    # The teacher (paper Sec. Loss Formulation): "frozen" (Eq. 16: the parent before elastification, L = L_KD) or
    # "trainable" (Eq. 15: the elastic model's own full budget, trained with teacher_ce_weight x CE while the
    # sub-models distil from it, L = L_KD + alpha L_CE); or one of them per curriculum stage (a schedule).
    teacher: Union[str, List[str]] = "frozen"
    teacher_ce_weight: float = 1.0  # alpha of Eq. 15 (not stated by the paper: ours)


TEACHER_MODES = ("frozen", "trainable")


@dataclass
class ElasticDataConfig(DataSourceConfig):
    """Default (no path, no blend): the data the parent was trained on."""

    eval_seq_length: int = 0  # default: the first stage's sequence length


@dataclass
class ElasticTrainConfig(OptimizationConfig):
    micro_batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 60  # paper: 60 steps
    weight_decay: float = 0.01
    eval_interval: int = 100
    eval_iters: int = 4
    recompute: bool = False  # full activation recomputation of every layer (long contexts)
    distributed_optimizer: bool = False  # shard optimizer state over data parallel (Megatron's DistributedOptimizer)
    max_bad_steps: int = 3  # consecutive non-finite steps (skipped) before the run checkpoints and stops
    exit_duration_minutes: Optional[float] = None  # checkpoint and exit for requeue before this much wall time
    memory_check: bool = True  # on CUDA, refuse before the first step when `plan`'s memory model says no fit
    train_iters: int = 0  # derived from the curriculum (steps of all stages); not set by the user


@dataclass
class ElasticJobConfig:
    parent: str
    budgets: List[float]
    curriculum: Curriculum
    space: SpaceConfig = field(default_factory=SpaceConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: ElasticDataConfig = field(default_factory=ElasticDataConfig)
    train: ElasticTrainConfig = field(default_factory=ElasticTrainConfig)
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(dir="runs/elastic", save_interval=100)
    )
    fixed_arch: str = ""  # an ElasticArch JSON: train only this sub-model as the one budget below 1.0
    budget_kind: str = "params"  # elastic.budget.parse_kind: params, memory@CONTEXT[xBATCH] or flops@CONTEXT
    budget_labels: Dict[float, str] = field(default_factory=dict)  # fraction -> the budget as the config stated it
    raw: Dict[str, Any] = field(default_factory=dict)  # the resolved YAML mapping (stored in checkpoints)

    def cost(self, model_config):
        """What the budgets bound (``elastic.cost.Cost``), in ``model_config``'s dtype."""

        return parse_kind(self.budget_kind, model_config)

    @property
    def sorted_checkpoint(self) -> str:
        return os.path.join(self.parent, "sorted")

    @property
    def ranking_file(self) -> str:
        return os.path.join(self.parent, "ranking.json")

    def stage_steps(self) -> List[int]:
        """Optimizer steps of every stage: its tokens over (global batch * sequence length), rounded up."""
        return [max(1, math.ceil(s.tokens / (s.global_batch_size * s.seq_length))) for s in self.curriculum.stages]

    def trainable_teacher(self, stage_index: int) -> bool:
        """Whether curriculum stage ``stage_index`` distils from the trainable full budget (Eq. 15), not the frozen
        parent (Eq. 16)."""
        d = self.distill.teacher
        return (d[stage_index] if isinstance(d, list) else d) == "trainable"

    @property
    def eval_seq_length(self) -> int:
        return self.data.eval_seq_length or self.curriculum.stages[0].seq_length

    def validate(self, world_size: int = 1) -> None:
        for name in ("micro_batch_size", "log_interval", "eval_interval", "eval_iters", "max_bad_steps"):
            v = getattr(self.train, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"train.{name}: must be a positive integer, got {v!r}")
        t = self.train
        t.check_schedule()
        if t.exit_duration_minutes is not None and (
            isinstance(t.exit_duration_minutes, bool)
            or not isinstance(t.exit_duration_minutes, (int, float))
            or not t.exit_duration_minutes > 0
        ):
            raise ConfigError(
                f"train.exit_duration_minutes: must be a positive number of minutes (or null for no limit), "
                f"got {t.exit_duration_minutes!r}"
            )
        r = self.router
        if r.hidden <= 0 or r.lr <= 0 or r.warmup_iters < 0 or r.loss_weight < 0:
            raise ConfigError("router: hidden and lr must be > 0, warmup_iters and loss_weight >= 0")
        if not (r.tau_start > 0 and r.tau_end > 0 and r.logit_scale_start > 0 and r.logit_scale_end > 0):
            raise ConfigError("router: tau_* and logit_scale_* must be > 0")
        if r.mask_mode == "soft":
            raise ConfigError(SOFT_MASK_REFUSAL)
        if r.mask_mode not in MASK_MODES:
            raise ConfigError(f"router.mask_mode: one of {sorted(MASK_MODES)}, got {r.mask_mode!r}")
        d = self.distill
        if d.temperature <= 0 or d.lm_loss_weight < 0:
            raise ConfigError("distill: temperature must be > 0 and lm_loss_weight >= 0")
        if d.budgets_per_step not in ("sample", "all"):
            raise ConfigError(f"distill.budgets_per_step: 'sample' or 'all', got {d.budgets_per_step!r}")
        n_stages = len(self.curriculum.stages)
        modes = d.teacher if isinstance(d.teacher, list) else [d.teacher] * n_stages
        if len(modes) != n_stages or any(m not in TEACHER_MODES for m in modes):
            raise ConfigError(
                f"distill.teacher: frozen or trainable, or one of them per curriculum stage ({n_stages}), e.g. "
                f"[frozen, trainable]; got {d.teacher!r}"
            )
        if not (_is_finite_number(d.teacher_ce_weight) and d.teacher_ce_weight >= 0):
            raise ConfigError(
                f"distill.teacher_ce_weight: a number >= 0 (alpha of Eq. 15), got {d.teacher_ce_weight!r}"
            )
        if self.curriculum.between_share and (d.budgets_per_step == "all" or self.fixed_arch):
            raise ConfigError(
                "curriculum.between_share: budgets between the trained ones are drawn per micro-batch; it needs "
                "distill.budgets_per_step: sample and no fixed_arch (set between_share: 0 otherwise)"
            )
        het = self.space.heterogeneous
        if isinstance(het, list) and not set(het) <= set(AXIS_FIELD):
            raise ConfigError(
                f"space.heterogeneous: true, false or a list of the axes chosen per layer out of "
                f"{sorted(AXIS_FIELD)}, got {het!r}"
            )
        depth = self.space.depth_fractions
        numbers = isinstance(depth, list) and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in depth
        )
        if depth != "all" and not numbers:
            raise ConfigError(
                f"space.depth_fractions: fractions in (0, 1], or 'all' (every depth from 1 layer), got {depth!r}"
            )
        if not all(0 < f <= 1 for f in self.space.fractions + ([] if depth == "all" else list(depth))):
            raise ConfigError("space: fractions and depth_fractions must lie in (0, 1]")
        self.parallel.check()
        dp = self.parallel.data_parallel_size(world_size)
        for s in self.curriculum.stages:
            if s.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"curriculum stage {s.name!r}: global_batch_size ({s.global_batch_size}) must be a "
                    f"multiple of train.micro_batch_size*data_parallel_size ({t.micro_batch_size}*{dp})"
                )


# Each trained budget and the untrained one between them has its own Gumbel-noise slot per step
# (``elastic.step.noise_generator``: 16 slots).
MAX_BUDGETS = 15


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole_number(v: Any, field: str) -> int:
    if not _is_finite_number(v) or float(v) != int(v):
        raise ConfigError(f"{field}: a whole number, got {v!r}")
    return int(v)


def _budgets(raw: Any, kind: Any, parent_model_config: Callable[[], Any]) -> Tuple[List[float], str, Dict[float, str]]:
    """(fractions of the parent's cost, largest first; the budget kind; fraction -> the budget as stated). Absolute
    budgets (``6GiB@32768``) must all be of one kind, the job's ``budget_kind`` (or set it), and are converted with
    the parent's architecture (``parent_model_config()``)."""

    example = "e.g. [1.0, 0.75, 0.5] or, with budget_kind memory@32768, [1.0, 6GiB@32768, 4GiB@32768]"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"budgets: a list of budgets, {example}; got {raw!r}")
    if len(raw) > MAX_BUDGETS:
        raise ConfigError(f"budgets: at most {MAX_BUDGETS} trained budgets, got {len(raw)}")
    if not isinstance(kind, str):
        raise ConfigError(f"budget_kind: a string such as params or memory@32768, got {kind!r}")
    kind = kind_text(parse_kind(kind))  # checks it
    try:
        parsed = [parse_budget(b) for b in raw]
    except ConfigError as e:
        raise ConfigError(f"budgets: {e}") from None
    stated = sorted({kind_text(b.cost) for b in parsed if b.kind != "params"})
    if stated and (len(stated) > 1 or kind not in ("params", stated[0])):
        raise ConfigError(
            f"budgets: every absolute budget states the job's one kind (budget_kind: {kind}); got {stated}"
        )
    kind = stated[0] if stated else kind
    fractions = [b.value for b in parsed]
    if stated:
        config = parent_model_config()
        fractions = [
            parse_budget(r, config).fraction(config) if b.kind != "params" else b.value for r, b in zip(raw, parsed)
        ]
        for r, f in zip(raw, fractions):
            if not 0 < f <= 1:
                full = parse_kind(kind, config).of(config, ElasticArch.full(config))
                raise ConfigError(
                    f"budgets: {r} is {f:.3f} of the parent ({format_cost(full, parse_kind(kind, config))}); a budget "
                    f"is at most the parent (1.0)"
                )
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"budgets: must be distinct, got {raw}")
    labels = {f: str(r) for f, r in zip(fractions, raw) if isinstance(r, str)}
    return sorted(fractions, reverse=True), kind, labels


def _check_fixed_arch(path: Any, budgets: List[float]) -> None:
    """``fixed_arch`` names a readable ElasticArch JSON and the budgets have exactly one entry below 1.0 (its name)."""

    if not isinstance(path, str):
        raise ConfigError(f"fixed_arch: a path to an ElasticArch JSON (e.g. an extracted arch.json), got {path!r}")
    try:
        with open(path) as f:
            ElasticArch.from_json(f.read())
    except OSError as e:
        raise ConfigError(f"fixed_arch: cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError, ElasticArchError) as e:
        raise ConfigError(f"fixed_arch: {path} is not an ElasticArch JSON: {e}") from None
    if len([b for b in budgets if b < 1.0]) != 1:
        raise ConfigError(
            f"fixed_arch: the budgets must have exactly one entry below 1.0 (the fixed sub-model's name), got "
            f"{budgets}; e.g. --set budgets=[0.75]"
        )


def _curriculum(raw: Any, budgets: List[float], router: RouterConfig, seed: int) -> Curriculum:
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(
            "curriculum: needs 'stages', a list of {name, tokens, seq_length, global_batch_size, budget_weights}"
        )
    unknown = sorted(set(raw) - {"stages", "between_share"})
    if unknown:
        raise ConfigError(f"curriculum: unknown field(s) {unknown}; known: ['between_share', 'stages']")
    share = raw.get("between_share", 0.0)
    if not _is_finite_number(share) or not 0 <= share < 1:
        raise ConfigError(f"curriculum.between_share: a fraction in [0, 1), got {share!r}")
    if share and len(budgets) < 2:
        raise ConfigError("curriculum.between_share: needs at least two budgets to train budgets between them")
    stages = []
    keys = {f.name for f in dataclasses.fields(Stage)}
    for i, s in enumerate(raw["stages"]):
        if not isinstance(s, dict) or set(s) != keys:
            raise ConfigError(
                f"curriculum.stages[{i}]: needs exactly the fields {sorted(keys)}, got "
                f"{sorted(s) if isinstance(s, dict) else s!r}"
            )
        ints = {
            k: _whole_number(s[k], f"curriculum.stages[{i}].{k}") for k in ("tokens", "seq_length", "global_batch_size")
        }
        weights = s["budget_weights"]
        if not isinstance(weights, list) or not all(_is_finite_number(w) for w in weights):
            raise ConfigError(
                f"curriculum.stages[{i}].budget_weights: a list of finite numbers, one per budget; got {weights!r}"
            )
        stages.append(Stage(name=str(s["name"]), budget_weights=[float(w) for w in weights], **ints))
    try:
        return Curriculum(
            budgets,
            stages,
            tau=(router.tau_start, router.tau_end),
            logit_scale=(router.logit_scale_start, router.logit_scale_end),
            seed=seed,
            between_share=float(share),
        )
    except ValueError as e:
        raise ConfigError(f"curriculum: {e} (budget_weights follow 'budgets', largest first)") from None


SECTIONS = {
    "parent",
    "fixed_arch",
    "plan_parent_config",
    "budgets",
    "budget_kind",
    "space",
    "router",
    "distill",
    "curriculum",
    "parallel",
    "data",
    "train",
    "checkpoint",
}


def load_elastic_config(
    path: Optional[str] = None, overrides: Optional[List[str]] = None, text: Optional[str] = None
) -> ElasticJobConfig:
    """Load an elastic job config from ``path`` (or ``text``) with ``section.field=value`` overrides."""
    raw = read_config_mapping(path, text)
    scalars = ("parent", "budgets", "budget_kind", "fixed_arch", "plan_parent_config")
    scalar_overrides = [o for o in overrides or [] if o.split("=", 1)[0] in scalars]
    for o in scalar_overrides:
        k, v = o.split("=", 1)
        raw[k] = yaml.safe_load(v)
    raw = apply_overrides(raw, [o for o in overrides or [] if o not in scalar_overrides])
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    if not isinstance(raw.get("parent"), str):
        raise ConfigError("parent: the importance output directory (written by `megatron-elastic importance --out`)")
    config_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    budgets, budget_kind, labels = _budgets(
        raw.get("budgets"),
        raw.get("budget_kind", "params"),
        lambda: parent_model_config(raw, config_dir, _build_section(ParallelConfig, "parallel", raw.get("parallel"))),
    )
    fixed_arch = raw.get("fixed_arch") or ""
    if fixed_arch:
        _check_fixed_arch(fixed_arch, budgets)
    router = _build_section(RouterConfig, "router", raw.get("router"))
    train = _build_section(ElasticTrainConfig, "train", raw.get("train"))
    if train.train_iters:
        raise ConfigError(
            "train.train_iters: derived from the curriculum's token counts; set the stages' tokens instead"
        )
    cfg = ElasticJobConfig(
        parent=raw["parent"],
        budgets=budgets,
        budget_kind=budget_kind,
        budget_labels=labels,
        fixed_arch=fixed_arch,
        curriculum=_curriculum(raw.get("curriculum"), budgets, router, train.seed),
        space=_build_section(SpaceConfig, "space", raw.get("space")),
        router=router,
        distill=_build_section(DistillConfig, "distill", raw.get("distill")),
        parallel=_build_section(ParallelConfig, "parallel", raw.get("parallel")),
        data=_build_section(ElasticDataConfig, "data", raw.get("data")),
        train=train,
        checkpoint=_build_section(
            CheckpointConfig,
            "checkpoint",
            {"dir": "runs/elastic", "save_interval": 100, **(raw.get("checkpoint") or {})},
        ),
        raw=raw,
    )
    cfg.train.train_iters = sum(cfg.stage_steps())
    cfg.validate(cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    if not 0 <= cfg.train.lr_warmup_iters < cfg.train.train_iters:
        raise ConfigError(f"train.lr_warmup_iters: must be in [0, {cfg.train.train_iters}) (the run's steps)")
    return cfg


def parent_model_config(raw: Dict[str, Any], config_dir: str, parallel: ParallelConfig):
    """The parent's model config: ``plan_parent_config`` (a parent YAML, relative to the job config's directory) or
    the sorted checkpoint in ``parent`` (``importance --out``), at the job's parallel layout."""

    ref = raw.get("plan_parent_config")
    sorted_dir = os.path.join(str(raw.get("parent", "")), "sorted")
    if ref:
        job = load_pretrain_config(ref if os.path.isabs(ref) else os.path.join(config_dir, ref))
    else:
        src = latest_checkpoint(sorted_dir) if os.path.isdir(sorted_dir) else None
        if src is None:
            raise ConfigError(
                f"no parent architecture: set plan_parent_config (a parent YAML) or run importance into "
                f"{raw.get('parent')} first"
            )
        job = config_from_checkpoint(src)
    job.parallel = dataclasses.replace(parallel)
    return job.model_config()
