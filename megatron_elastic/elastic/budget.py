"""Budgets as a user states them: a fraction of the parent's parameters (``0.5``), deployment memory at a context
length and batch (``6GiB@32768``, ``6GiB@32768x4``: weights in the serving dtype + KV caches + Mamba states), or
forward FLOPs per token at a context length (``1.5GFLOP@4096``). One parser and one printer for every command
(``train``'s config, ``plan``, ``extract``, ``generate``); the costs themselves are ``elastic.cost``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple, Union

from megatron_elastic.elastic.arch import ElasticArch
from megatron_elastic.elastic.cost import PARAMETERS, Cost, FlopsPerToken, ServingMemory, dtype_bytes
from megatron_elastic.errors import ConfigError

BYTE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
FLOP_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
SYNTAX = (
    "a parameter fraction (0.5), memory at a context length [x batch] (6GiB@32768, 512MiB@4096x8) or FLOPs per "
    "token at a context length (1.5GFLOP@4096)"
)
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass(frozen=True)
class Budget:
    """``value`` in the unit of ``cost``: a fraction of the parent's parameters for ``params``, bytes for
    ``memory``, FLOPs per token for ``flops``."""

    value: float
    cost: Cost

    @property
    def kind(self) -> str:
        return self.cost.kind

    def fraction(self, config) -> float:
        """The budget as a fraction of the parent's cost of its kind (what the router takes)."""
        if self.kind == "params":
            return self.value
        return self.value / float(self.cost.of(config, ElasticArch.full(config)))

    def target(self, config) -> float:
        """The budget in its kind's unit (parameters, bytes, FLOPs per token)."""
        if self.kind == "params":
            return self.value * float(self.cost.of(config, ElasticArch.full(config)))
        return self.value

    def __str__(self) -> str:
        if self.kind == "params":
            return f"{self.value:g}"
        return format_cost(self.value, self.cost)


def parse_budget(text: Union[str, float, int], config=None) -> Budget:
    """``"0.5"`` / ``0.5`` / ``"6GiB@32768"`` / ``"6GiB@32768x4"`` / ``"1.5GFLOP@4096"``. Memory budgets count
    weights and caches in ``config``'s dtype (bf16/fp16: 2 bytes, else 4; 2 without a config)."""
    if isinstance(text, bool):
        raise ConfigError(f"budget {text!r}: write {SYNTAX}")
    if isinstance(text, (int, float)):
        return _fraction(float(text), repr(text))
    s = str(text).strip()
    try:
        number = float(s)
    except ValueError:
        number = None
    if number is not None:
        return _fraction(number, s)
    m = re.fullmatch(_NUMBER + r"\s*([KMGTP]?i?B)\s*@\s*([0-9]+)(?:\s*[xX]\s*([0-9]+))?", s)
    if m:
        number, unit, context, batch = m.groups()
        if unit not in BYTE_UNITS:
            raise ConfigError(f"budget {s!r}: unknown unit {unit!r}; use one of {', '.join(BYTE_UNITS)}")
        cost = ServingMemory(_positive(context, s, "context"), _positive(batch or "1", s, "batch"), _dtype(config))
        return Budget(_positive_value(float(number) * BYTE_UNITS[unit], s), cost)
    m = re.fullmatch(_NUMBER + r"\s*([KMGTP]?)FLOPs?\s*@\s*([0-9]+)", s)
    if m:
        number, unit, context = m.groups()
        return Budget(
            _positive_value(float(number) * FLOP_UNITS[unit], s), FlopsPerToken(_positive(context, s, "context"))
        )
    raise ConfigError(f"budget {s!r}: write {SYNTAX}")


KIND_SYNTAX = "params, memory@CONTEXT[xBATCH] (e.g. memory@32768x4) or flops@CONTEXT (e.g. flops@4096)"


def parse_kind(text: str, config=None) -> Cost:
    """A budget kind as a job config states it (``budget_kind``): ``params``, ``memory@32768x4`` or ``flops@4096``.
    Memory counts ``config``'s dtype (2 bytes without a config)."""
    s = str(text).strip()
    if s == "params":
        return PARAMETERS
    m = re.fullmatch(r"memory@([0-9]+)(?:[xX]([0-9]+))?", s)
    if m:
        return ServingMemory(
            _positive(m.group(1), s, "context"), _positive(m.group(2) or "1", s, "batch"), _dtype(config)
        )
    m = re.fullmatch(r"flops@([0-9]+)", s)
    if m:
        return FlopsPerToken(_positive(m.group(1), s, "context"))
    raise ConfigError(f"budget_kind: {text!r}; write {KIND_SYNTAX}")


def kind_text(cost: Cost) -> str:
    """The inverse of :func:`parse_kind`."""
    if cost.kind == "memory":
        return f"memory@{cost.context}" + (f"x{cost.batch}" if cost.batch != 1 else "")
    if cost.kind == "flops":
        return f"flops@{cost.context}"
    return "params"


def same_kind(a: Cost, b: Cost) -> bool:
    """Whether two costs measure the same thing (kind, context and batch; the dtype follows the model)."""
    return kind_text(a) == kind_text(b)


def _fraction(value: float, text: str) -> Budget:
    if not 0 < value <= 1:  # also refuses nan
        raise ConfigError(f"budget {text}: a parameter fraction must lie in (0, 1]; or write {SYNTAX}")
    return Budget(value, PARAMETERS)


def _positive(digits: str, text: str, what: str) -> int:
    if int(digits) <= 0:
        raise ConfigError(f"budget {text!r}: the {what} must be a positive whole number")
    return int(digits)


def _positive_value(value: float, text: str) -> float:
    if not value > 0:
        raise ConfigError(f"budget {text!r}: must be positive")
    return value


def _dtype(config) -> int:
    return dtype_bytes(config) if config is not None else 2


def format_cost(value: float, cost: Cost) -> str:
    """A cost in its kind's unit, the way budgets are written (``5,256,816 params``, ``6.00GiB@32768``,
    ``1.50GFLOP@4096``)."""
    if cost.kind == "params":
        return f"{int(round(value)):,} params"
    if cost.kind == "memory":
        unit = next(u for u in ("TiB", "GiB", "MiB", "KiB", "B") if value >= BYTE_UNITS[u] or u == "B")
        batch = f"x{cost.batch}" if cost.batch != 1 else ""
        return f"{value / BYTE_UNITS[unit]:.2f}{unit}@{cost.context}{batch}"
    unit = next(u for u in ("P", "T", "G", "M", "K", "") if value >= FLOP_UNITS[u] or u == "")
    return f"{value / FLOP_UNITS[unit]:.2f}{unit}FLOP@{cost.context}"


def every_cost(config, arch: ElasticArch, context: int, batch: int = 1) -> Dict[str, float]:
    """One sub-model in every kind, for reports: parameters, serving memory and FLOPs per token at ``context``."""
    return {
        "params": float(PARAMETERS.of(config, arch)),
        "memory_bytes": float(ServingMemory(context, batch, _dtype(config)).of(config, arch)),
        "flops_per_token": float(FlopsPerToken(context).of(config, arch)),
        "context": int(context),
        "batch": int(batch),
    }


def describe_costs(costs: Dict[str, Any]) -> str:
    """An ``every_cost`` record in one line: parameters, memory and FLOPs per token at its context."""
    return ", ".join([format_cost(costs["params"], PARAMETERS), *format_costs(costs)])


def report_shape(costs: Sequence[Cost], default_context: int) -> Tuple[int, int]:
    """(context, batch) at which a report states memory and FLOPs: the first of ``costs`` that has a context (a
    stated budget's, the router's kind), else ``default_context`` and batch 1."""
    for cost in costs:
        if getattr(cost, "context", 0):
            return cost.context, getattr(cost, "batch", 1)
    return int(default_context), 1


def format_costs(costs: Dict[str, Any]) -> Tuple[str, str]:
    """(memory, FLOPs per token) of an ``every_cost`` record with its context, for tables."""
    memory = ServingMemory(costs["context"], costs["batch"], 2)
    return format_cost(costs["memory_bytes"], memory), format_cost(
        costs["flops_per_token"], FlopsPerToken(costs["context"])
    )


def stated_costs(*texts: Any) -> list:
    """The cost kinds that budget texts state (``6GiB@32768`` -> its memory kind; fractions and other text state
    none), for :func:`report_shape`."""
    out = []
    for text in texts:
        try:
            cost = parse_budget(text).cost
        except ConfigError:
            continue
        if cost.kind != "params":
            out.append(cost)
    return out
