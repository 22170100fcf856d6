"""SIGKILL a CPU elastic run at random moments (checkpoints are written every step, so some kills land inside a
write), resume each time with --auto-resume, and check the finished curve equals an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.elastic.test_elastic_training import JOB

STEPS = 28
KILLS = 4
STAGES = (
    "curriculum.stages=[{name: s, tokens: 4096, seq_length: 32, global_batch_size: 8, budget_weights: [1, 1, 1]}, "
    "{name: l, tokens: 3072, seq_length: 64, global_batch_size: 4, budget_weights: [0.5, 0.3, 0.2]}]"
)


def _cmd(cfg, async_save=False):
    return [
        sys.executable,
        "-m",
        "megatron_elastic",
        "train",
        "--config",
        str(cfg),
        "--no-progress",
        "--auto-resume",
        "--set",
        "checkpoint.save_interval=1",
        "--set",
        "checkpoint.keep_last=2",
        "--set",
        "train.eval_interval=1000",
        "--set",
        STAGES,
        "--set",
        f"checkpoint.async_save={str(async_save).lower()}",
    ]


def _processes_of(marker):
    """Live processes (not zombies) whose environment carries ``marker``: a run and whatever it started."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("KILL_RESUME_TEST_RUN") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _newest_step(latest):
    """The step of the checkpoint ``latest`` names (0 before the first)."""
    try:
        return int(latest.read_text().strip().removeprefix("iter_"))
    except (FileNotFoundError, ValueError):  # not written yet, or read while being replaced
        return 0


def _curve(ckpt):
    """The last logged record of every step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            if "lr" in r:
                out[r["iteration"]] = r
    return out


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tmp_path_factory):
    """The uninterrupted run's curve (one run for both save modes: how checkpoints are written does not change
    the training)."""
    ref_dir = tmp_path_factory.mktemp("kill_resume") / "ref"
    cfg = ref_dir.parent / "ref.yaml"
    cfg.write_text(JOB.format(parent=tiny_pipeline["importance"], ckpt=ref_dir, mode="sample"))
    r = subprocess.run(_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    curve = _curve(str(ref_dir))
    assert sorted(curve) == list(range(1, STEPS + 1))
    return curve


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_curve(parent, tmp_path, reference, async_save):
    """With ``async_save`` the kills also land while a forked writer writes: the run resumes from the last
    complete checkpoint and no writer outlives the trainer."""
    run_dir = tmp_path / "killed"
    (tmp_path / "killed.yaml").write_text(JOB.format(parent=parent, ckpt=run_dir, mode="sample"))

    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    # Kill k lands just after the run's newest checkpoint reaches step targets[k] (plus up to a quarter second, so
    # some kills land inside the next write): targets by step, not by clock, so a fast machine cannot finish the run
    # before the last kill, and the last target leaves several steps to run after it.
    targets = sorted(rng.sample(range(2, STEPS - 5), KILLS))
    kills = 0
    marker = uuid.uuid4().hex  # inherited by everything a killed run starts
    latest = run_dir / "latest"
    for attempt in range(KILLS + 1):
        proc = subprocess.Popen(
            _cmd(tmp_path / "killed.yaml", async_save),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, KILL_RESUME_TEST_RUN=marker),
        )
        start = time.time()
        while attempt < KILLS and proc.poll() is None and time.time() - start < 300:
            if _newest_step(latest) >= targets[attempt]:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None and attempt < KILLS:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            # Nothing of the killed run may outlive it (a checkpoint writer may finish the file it is on).
            deadline = time.time() + 30
            while _processes_of(marker) and time.time() < deadline:
                time.sleep(0.2)
            left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _processes_of(marker)]
            assert not left, f"processes outlived the killed trainer: {left}"
            continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        break
    else:
        pytest.fail("the run never finished")
    assert kills == KILLS, "the test must actually interrupt the run"
    got = _curve(str(run_dir))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in reference.items():
        for key, value in want.items():
            if key.startswith(("kd/", "expected_fraction/", "chosen_fraction/")) or key in ("lr", "router_lr", "tau"):
                assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key, kills)
