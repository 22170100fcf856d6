"""The project's errors: one base class, one subclass per kind of bad input.

Every error the package raises for something a user can fix (a config value, a data file, a checkpoint, an
architecture file, a model that cannot be exported) derives from :class:`ElasticError`; the message names the
field or file and the fix. ``megatron-elastic`` prints any of them as one line and exits with code 2
(``--debug`` shows the traceback). They also derive from the built-in class a caller would expect
(``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class ElasticError(Exception):
    """Base of every megatron_elastic error caused by an input the user can fix."""


class ConfigError(ElasticError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class DataError(ElasticError, ValueError):
    """A dataset file is unreadable or inconsistent; the message names the file and the fix."""


class InputNotFoundError(ElasticError, FileNotFoundError):
    """A file or directory the user named (or a step before this one should have written) does not exist."""


class UnknownBudgetError(ConfigError, KeyError):
    """A budget that the run did not train (or an arch name it does not hold) was asked for."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


class CheckpointError(ElasticError, ValueError):
    """A checkpoint cannot be used: written for another model, or by another program."""


class CheckpointCorruptError(CheckpointError, RuntimeError):
    """A checkpoint file is missing, truncated or altered; the message names it and the previous checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than plain data (tensors, numbers, strings, containers)."""


class ElasticArchError(ConfigError):
    """An architecture choice is invalid for its parent; the message says which entry and why."""


class PlanError(ConfigError):
    """The job cannot run as configured on the stated hardware; the message says why and what to change."""


class HFExportError(ElasticError, ValueError):
    """The model cannot be written as (or read from) a NemotronH checkpoint; the message says why."""
