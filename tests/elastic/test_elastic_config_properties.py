"""Property-based: any elastic job config either loads or is rejected with a ConfigError (never another
exception that would surface as a traceback)."""

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

scalars = st.one_of(
    st.integers(-3, 10**6), st.floats(-2, 2), st.just(float("nan")), st.text(max_size=4), st.booleans(), st.none()
)
stage = st.fixed_dictionaries(
    {
        "name": st.text(max_size=5),
        "tokens": st.one_of(st.integers(-5, 10**6), scalars),
        "seq_length": st.one_of(st.integers(-2, 512), scalars),
        "global_batch_size": st.one_of(st.integers(-2, 64), scalars),
        "budget_weights": st.one_of(
            st.just([1, 1]), st.just([1]), st.lists(st.one_of(st.floats(-1, 2), scalars), max_size=3), scalars
        ),
    }
)
config = st.fixed_dictionaries(
    {
        "parent": st.one_of(st.just("p"), scalars),
        # Mostly valid budgets, so the other sections get exercised too.
        "budgets": st.one_of(
            st.just([1.0, 0.5]), st.just([0.75]), st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=4), scalars
        ),
        "curriculum": st.one_of(
            st.fixed_dictionaries({"stages": st.one_of(st.lists(stage, max_size=3), scalars)}), scalars
        ),
        "train": st.one_of(
            st.dictionaries(
                st.sampled_from(["micro_batch_size", "lr", "min_lr", "lr_warmup_iters", "eval_iters", "seed"]),
                scalars,
                max_size=3,
            ),
            scalars,
        ),
        "router": st.one_of(
            st.dictionaries(st.sampled_from(["hidden", "lr", "tau_start", "tau_end"]), scalars, max_size=2), scalars
        ),
    }
)


@settings(max_examples=500, deadline=None)
@given(raw=config)
def test_any_elastic_config_loads_or_fails_with_a_config_error(raw):
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.model.config import ConfigError

    try:
        cfg = load_elastic_config(text=yaml.safe_dump(raw))
    except ConfigError:
        return
    assert cfg.budgets == sorted(cfg.budgets, reverse=True) and cfg.train.train_iters > 0


@pytest.mark.parametrize(
    "tokens,weights",
    [("abc", "[1, 1]"), ("100", "x"), ("100", "[a, 1]"), ("null", "[1, 1]"), ("1.5", "[1, 1]"), ("100", "[1, .nan]")],
)
def test_bad_stage_values_are_config_errors(tokens, weights):
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.model.config import ConfigError

    text = (
        (
            "parent: p\nbudgets: [1.0, 0.5]\ncurriculum: {stages: [{name: s, tokens: T, seq_length: 32, "
            "global_batch_size: 8, budget_weights: W}]}\n"
        )
        .replace("T", tokens)
        .replace("W", weights)
    )
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[0\]\.(tokens|budget_weights)"):
        load_elastic_config(text=text)


@pytest.mark.parametrize("value,ok", [("true", True), ("false", True), ("[ffn]", True), ("[ffn, mlp]", False),
                                      ("[]", True), ("maybe", False)])  # fmt: skip
def test_space_heterogeneous_is_a_bool_or_a_list_of_width_axes(value, ok):
    from megatron_elastic.elastic.config import load_elastic_config
    from megatron_elastic.errors import ConfigError

    text = (
        "parent: p\nbudgets: [1.0, 0.5]\nspace: {heterogeneous: V}\ncurriculum: {stages: [{name: s, tokens: 100000, "
        "seq_length: 32, global_batch_size: 8, budget_weights: [1, 1]}]}\n"
    ).replace("V", value)
    if ok:
        assert load_elastic_config(text=text).space.heterogeneous == yaml.safe_load(value)
    else:
        with pytest.raises(ConfigError, match="space.heterogeneous"):
            load_elastic_config(text=text)
