"""``train.exit_duration_minutes`` and the job end time from Slurm: the run stops with a checkpoint when the next
step and the stop checkpoint might not fit before the deadline, the margin coming from measured times."""

import json
import os

import pytest

from megatron_elastic.training.preemption import JOB_END_ENV, WallTimeLimit


def test_the_deadline_is_the_earlier_of_the_configured_duration_and_the_job_end(monkeypatch):
    monkeypatch.delenv(JOB_END_ENV, raising=False)
    assert WallTimeLimit(None, started=1000.0).deadline is None
    assert not WallTimeLimit(None, started=1000.0).near(now=1e12), "no limit, never near it"
    assert WallTimeLimit(10, started=1000.0).deadline == 1600.0
    monkeypatch.setenv(JOB_END_ENV, "1300")
    assert WallTimeLimit(10, started=1000.0).deadline == 1300.0
    assert WallTimeLimit(None, started=1000.0).deadline == 1300.0
    monkeypatch.setenv(JOB_END_ENV, "2000")
    assert WallTimeLimit(10, started=1000.0).deadline == 1600.0
    monkeypatch.setenv(JOB_END_ENV, "tomorrow")
    with pytest.raises(ValueError, match=JOB_END_ENV):
        WallTimeLimit(None, started=0.0)


def test_the_margin_is_the_slowest_step_plus_the_best_measured_checkpoint_time(monkeypatch):
    monkeypatch.delenv(JOB_END_ENV, raising=False)
    limit = WallTimeLimit(10, started=0.0)  # deadline at 600 s
    limit.startup = 40.0
    limit.step_done(2.0)
    limit.step_done(5.0)
    limit.step_done(3.0)
    # No checkpoint written or read yet: the start-up stands in for it.
    assert limit.margin() == pytest.approx(1.5 * (5.0 + 40.0))
    limit.load = 20.0  # a resumed run read a checkpoint
    assert limit.margin() == pytest.approx(1.5 * (5.0 + 20.0))
    limit.save_done(12.0)
    limit.save_done(8.0)  # the slowest save counts
    assert limit.margin() == pytest.approx(1.5 * (5.0 + 12.0))
    margin = limit.margin()
    assert not limit.near(now=600.0 - margin - 0.01)
    assert limit.near(now=600.0 - margin)
    assert "min to the limit" in limit.describe(now=500.0)


def test_before_the_last_step_the_runs_end_must_fit_too(monkeypatch):
    """The last step is followed by the final validation and the summary's scoring: ``FINISH_EVALS`` validation
    passes (the slowest measured) must fit besides the margin, or the run stops one step early."""
    monkeypatch.delenv(JOB_END_ENV, raising=False)
    limit = WallTimeLimit(10, started=0.0)  # deadline at 600 s
    limit.startup = 10.0
    limit.step_done(2.0)
    limit.eval_done(4.0)
    limit.eval_done(3.0)  # the slowest pass counts
    margin, finish = limit.margin(), 1.5 * WallTimeLimit.FINISH_EVALS * 4.0
    now = 600.0 - margin - finish / 2  # room for a step and a checkpoint, not for the run's end
    assert not limit.near(now=now) and limit.near(now=now, next_is_last=True)
    assert not limit.near(now=600.0 - margin - finish - 0.01, next_is_last=True)


@pytest.mark.parametrize("bad", [0, -5, "soon", True])
def test_a_bad_exit_duration_names_the_field(parent, tmp_path, bad):
    from megatron_elastic.model.config import ConfigError
    from tests.elastic.test_elastic_training import _config

    with pytest.raises(ConfigError, match="train.exit_duration_minutes"):
        _config(parent, str(tmp_path), overrides=[f"train.exit_duration_minutes={bad}"])


def test_a_run_past_its_wall_time_checkpoints_and_a_resumed_run_finishes(single_process_parallel, parent, tmp_path):
    """A deadline already inside the margin: the run stops after its first step with a checkpoint there; the next
    job (no limit) resumes at step 2 and runs to the end, every step once."""
    from tests.elastic.test_elastic_training import _train, _train_records

    ckpt = str(tmp_path / "ckpt")
    out = _train(parent, ckpt, overrides=["train.exit_duration_minutes=0.0001"])
    assert out["stopped"] == "time_limit" and out["steps"] == 1, out
    assert out["checkpoint"].endswith("iter_0000001")
    assert sorted(_train_records(ckpt)) == [1]
    # the stop checkpoint carries how long a validation pass took (the next job's estimate of the run's end)
    state = json.load(open(os.path.join(out["checkpoint"], "trainer_state.json")))
    assert state["eval_seconds"] > 0
    summary = _train(parent, ckpt, resume=True)
    assert "stopped" not in summary and summary["steps"] == 6
    assert sorted(_train_records(ckpt)) == [1, 2, 3, 4, 5, 6]
