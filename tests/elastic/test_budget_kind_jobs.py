"""A job states what its budgets bound (``budget_kind``): the router trains and is saved with that kind, and
absolute budgets (``6GiB@32768``) become fractions of the parent's cost of that kind, computed from the parent's
architecture independently here."""

import os

import pytest

from tests.elastic.test_elastic_training import _config


def _parent_model_config(parent):
    from megatron_elastic.store.checkpoint import latest_checkpoint
    from megatron_elastic.store.open_run import config_from_checkpoint

    return config_from_checkpoint(latest_checkpoint(os.path.join(parent, "sorted"))).model_config()


def test_absolute_memory_budgets_become_fractions_of_the_parent(parent, tmp_path):
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.cost import ServingMemory, dtype_bytes

    config = _parent_model_config(parent)
    full = ServingMemory(64, 2, dtype_bytes(config)).of(config, ElasticArch.full(config))
    stated = f"{0.6 * full / 2**10:.3f}KiB@64x2"
    cfg = _config(parent, str(tmp_path), overrides=[f"budgets=[1.0, '{stated}', 0.5]"])
    assert cfg.budget_kind == "memory@64x2"
    assert cfg.budgets[0] == 1.0 and cfg.budgets[2] == 0.5
    assert cfg.budgets[1] == pytest.approx(0.6, rel=1e-4)
    assert cfg.budget_labels[cfg.budgets[1]] == stated


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["budget_kind=memory"], "budget_kind: 'memory'"),
        (["budgets=[1.0, 1GiB@64, 2GFLOP@64]"], "one kind"),
        (["budget_kind=flops@64", "budgets=[1.0, 1GiB@64]"], "one kind"),
        (["budgets=[1.0, 1TiB@64]"], "at most the parent"),
        (["budgets=[1.0, fast]"], "budgets: budget 'fast'"),
    ],
)
def test_budget_kind_errors_name_the_fix(parent, tmp_path, overrides, message):
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        _config(parent, str(tmp_path), overrides=overrides)
    assert "\n" not in str(e.value)


def test_a_memory_budget_run_trains_and_saves_its_kind(single_process_parallel, parent, tmp_path):
    """The router of a ``memory@64x2`` run pulls the expected memory of each budget (not its parameters) towards
    the target and the checkpoint's router comes back with that kind, so extraction chooses in memory."""
    from megatron_elastic.elastic.arch import ElasticArch
    from megatron_elastic.elastic.choose import budget_archs, choose_all
    from megatron_elastic.elastic.cost import ServingMemory, dtype_bytes
    from megatron_elastic.elastic.run import train_elastic
    from megatron_elastic.elastic.source import load_source

    ckpt = str(tmp_path / "mem")
    summary = train_elastic(_config(parent, ckpt, overrides=["budget_kind=memory@64x2"]), progress=False)
    src = load_source(ckpt)
    config = src.config
    cost = ServingMemory(64, 2, dtype_bytes(config))
    assert src.router.cost.to_dict() == cost.to_dict()
    assert src.router.full_cost == cost.of(config, ElasticArch.full(config))
    chosen = choose_all(src.router)
    # a bare fraction asked of this run is a fraction of its memory, like its trained budgets
    assert budget_archs(src.router, ["0.75"])["0.75"].arch == chosen[0.75]
    between = budget_archs(src.router, ["0.6"])["0.6"].arch  # untrained: walked onto 0.6 of the memory
    assert cost.of(config, between) / src.router.full_cost == pytest.approx(0.6, rel=0.02)
    # the run's summary reports the chosen fractions in memory, computed here independently
    for b, arch in chosen.items():
        got = summary["budgets"][f"{b:g}"]
        assert got["cost_fraction"] == pytest.approx(cost.of(config, arch) / src.router.full_cost)
        assert got["costs"]["memory_bytes"] == pytest.approx(cost.of(config, arch))


def test_train_budget_flags_replace_the_budgets(parent, tmp_path):
    """`train --budget 1 --budget 0.6` is the override budgets=[1, 0.6]; a memory budget also sets the kind; a count
    that does not match the stages' budget_weights names them."""
    from megatron_elastic.cli import budget_overrides
    from megatron_elastic.model.config import ConfigError

    stages = "curriculum.stages=[{name: s, tokens: 512, seq_length: 32, global_batch_size: 8, budget_weights: [1, 1]}]"
    cfg = _config(parent, str(tmp_path), overrides=[stages, *budget_overrides(["0.6", "1"])])
    assert cfg.budgets == [1.0, 0.6] and cfg.budget_kind == "params"
    cfg = _config(parent, str(tmp_path), overrides=[stages, *budget_overrides(["1", "100KiB@64"])])
    assert cfg.budget_kind == "memory@64" and 0 < cfg.budgets[1] < 1
    with pytest.raises(ConfigError, match="budget_weights"):
        _config(parent, str(tmp_path), overrides=budget_overrides(["1", "0.6"]))
