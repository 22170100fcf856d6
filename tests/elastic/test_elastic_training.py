"""Elastic distillation end to end on a toy sorted parent: the curriculum switches stage at its token count,
a resumed run reproduces the straight run step by step, TP=2 and PP=2 reproduce TP=1, and the router's
expected sizes are pulled toward the budgets."""

import json
import os
import shutil

import pytest

from megatron_elastic.testing import run_multiprocess

# Stage 1: 4 steps of 8 x 32 tokens, uniform; stage 2: 2 steps of 4 x 64, full budget only.
JOB = """
parent: {parent}
budgets: [1.0, 0.75, 0.5]
router: {{hidden: 32, warmup_iters: 2}}
curriculum:
  stages:
    - {{name: short, tokens: 1000, seq_length: 32, global_batch_size: 8, budget_weights: [1, 1, 1]}}
    - {{name: long, tokens: 512, seq_length: 64, global_batch_size: 4, budget_weights: [1, 0, 0]}}
distill: {{budgets_per_step: {mode}}}
train: {{micro_batch_size: 2, lr: 0.001, min_lr: 0.0001, lr_warmup_iters: 1, log_interval: 1, eval_interval: 3,
        eval_iters: 1}}
checkpoint: {{dir: {ckpt}, save_interval: 3, keep_last: 5}}
"""


def _config(parent, ckpt, mode="sample", overrides=()):
    from megatron_elastic.elastic.config import load_elastic_config

    return load_elastic_config(text=JOB.format(parent=parent, ckpt=ckpt, mode=mode), overrides=list(overrides))


def _records(ckpt):
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_records(ckpt):
    return {r["iteration"]: r for r in _records(ckpt) if "lr" in r}


def _train(parent, ckpt, resume=False, until_stage=None, **kw):
    from megatron_elastic.elastic.run import train_elastic

    return train_elastic(_config(parent, ckpt, **kw), resume=resume, progress=False, until_stage=until_stage)


def test_curriculum_switches_stage_and_resume_reproduces_the_run(single_process_parallel, parent, tmp_path):
    full = str(tmp_path / "full")
    summary = _train(parent, full)
    recs = _train_records(full)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    # 1000 tokens of stage 1 at 256 per step: steps 1-4 (the 4th step crosses 1000), then stage 2.
    assert [recs[i]["stage"] for i in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    assert [recs[i]["seq_length"] for i in range(1, 7)] == [32] * 4 + [64] * 2
    assert [recs[i]["tokens"] for i in range(1, 7)] == [256, 512, 768, 1024, 1280, 1536]
    stage1_budgets = {k for i in range(1, 5) for k in recs[i] if k.startswith("kd/")}
    assert stage1_budgets == {"kd/1", "kd/0.75", "kd/0.5"}, "uniform sampling over 16 micro-batches hits every budget"
    assert all({k for k in recs[i] if k.startswith("kd/")} == {"kd/1"} for i in (5, 6)), "stage 2 weights (1, 0, 0)"
    assert recs[1]["tau"] == pytest.approx(1.0) and recs[6]["tau"] < recs[5]["tau"] < recs[1]["tau"]
    assert summary["tokens"] == 1536 and set(summary["budgets"]) == {"1", "0.75", "0.5"}

    # A run that only has the step-3 checkpoint (as if killed after writing it) resumes to the same curve.
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(full, "iter_0000003"), os.path.join(part, "iter_0000003"))
    with open(os.path.join(part, "latest"), "w") as f:
        f.write("iter_0000003")
    _train(parent, part, resume=True)
    resumed = _train_records(part)
    assert sorted(resumed) == [4, 5, 6]
    _assert_same_steps(resumed, recs, (4, 5, 6))

    # One job per stage: stop after stage 1 with a checkpoint, then a second job finishes stage 2.
    staged = str(tmp_path / "staged")
    out = _train(parent, staged, until_stage=1)
    assert out["stopped"] == "stage" and out["steps"] == 4 and out["checkpoint"].endswith("iter_0000004")
    _train(parent, staged, resume=True)
    _assert_same_steps(_train_records(staged), recs, (1, 2, 3, 4, 5, 6))


def test_a_frozen_then_trainable_teacher_schedule_trains_the_full_budget_in_its_stage_and_resumes(
    single_process_parallel, parent, tmp_path
):
    """distill.teacher [frozen, trainable] (Eq. 16 then Eq. 15): stage 2 logs the full budget's own CE and changes
    the student's full-budget weights' update against the frozen-teacher run; a resume inside stage 2 reproduces it."""
    schedule = ["distill.teacher=[frozen, trainable]", "distill.teacher_ce_weight=0.5"]
    run = str(tmp_path / "trainable")
    _train(parent, run, overrides=schedule)
    recs = _train_records(run)
    assert all("teacher_ce" not in recs[i] for i in range(1, 5)) and all(recs[i]["teacher_ce"] > 0 for i in (5, 6))
    ref = str(tmp_path / "frozen")
    _train(parent, ref)
    frozen = _train_records(ref)
    _assert_same_steps({i: recs[i] for i in range(1, 5)}, frozen, range(1, 5))  # stage 1 is the same run
    # Stage 2 trains the full budget only (weights 1, 0, 0): against the frozen parent KD(full || parent), against
    # itself KD(full || full) = 0, and the step is alpha x CE's.
    assert all(frozen[i]["kd/1"] > 1e-4 and recs[i]["kd/1"] == pytest.approx(0.0, abs=1e-6) for i in (5, 6))
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(run, "iter_0000003"), os.path.join(part, "iter_0000003"))
    with open(os.path.join(part, "latest"), "w") as f:
        f.write("iter_0000003")
    _train(parent, part, resume=True, overrides=schedule)
    resumed = _train_records(part)
    _assert_same_steps(resumed, recs, (4, 5, 6))
    assert resumed[6]["teacher_ce"] == pytest.approx(recs[6]["teacher_ce"], rel=1e-6)


def _assert_same_steps(got, ref, steps):
    assert sorted(got) == sorted(steps)
    for i in steps:
        for key, value in ref[i].items():
            if key.startswith(("kd/", "expected_fraction/", "chosen_fraction/")) or key in ("lr", "router_lr", "tau"):
                assert got[i][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (i, key)


def test_sigterm_checkpoints_and_exits_for_requeue(parent, tmp_path):
    """Slurm preemption: SIGTERM mid-run -> checkpoint at the current step, exit code 99."""
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "job.yaml"
    ckpt = tmp_path / "ckpt"
    cfg.write_text(JOB.format(parent=parent, ckpt=ckpt, mode="sample"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_elastic",
            "train",
            "--config",
            str(cfg),
            "--no-progress",
            "--set",
            "checkpoint.save_interval=1000",
            "--set",
            "train.eval_interval=1000",
            "--set",
            "curriculum.stages=[{name: s, tokens: 51200, seq_length: 32, global_batch_size: 8, "
            "budget_weights: [1, 1, 1]}]",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = ckpt / "metrics.jsonl"
    # Signal once training is under way (however slow a loaded machine is to get there).
    deadline, started = time.time() + 600, False
    while not started and time.time() < deadline and proc.poll() is None:
        started = metrics.exists() and any('"lr"' in line for line in metrics.read_text().splitlines())
        time.sleep(0.2)
    assert started, f"the run never logged a training step: {proc.poll()=}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 99, err[-3000:]
    last = max(r["iteration"] for r in _records(str(ckpt)) if "lr" in r)
    with open(ckpt / "latest") as f:
        assert f.read().strip() == f"iter_{last:07d}"
    assert "preempted" in out and last < 200, "stopped early, not at the end of the run"


def test_all_budgets_per_step_trains_every_budget_on_every_micro_batch(single_process_parallel, parent, tmp_path):
    ckpt = str(tmp_path / "all")
    _train(
        parent,
        ckpt,
        mode="all",
        overrides=[
            "curriculum.stages=[{name: s, tokens: 512, seq_length: 32, "
            "global_batch_size: 4, budget_weights: [1, 0, 0]}]"
        ],
    )
    recs = _train_records(ckpt)
    assert sorted(recs) == [1, 2, 3, 4]
    assert all({k for k in r if k.startswith("kd/")} == {"kd/1", "kd/0.75", "kd/0.5"} for r in recs.values())


# Layouts run in two processes; each must log what TP=1 logged, step by step.
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": [],
    # sequence parallelism: norms, residuals and the router's gates act on each rank's part of the sequence
    "tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    # 1F1B runs micro-batch k+1 (another budget) before micro-batch k's backward, which re-runs k's layers
    "pp2-recompute": ["parallel.pipeline_model_parallel_size=2", "train.recompute=true"],
}


def _parallel_job(rank, world, parent, root, layouts):
    for layout in layouts:
        _train(parent, os.path.join(root, layout), overrides=LAYOUTS[layout])


def _assert_same_losses(got, ref, steps, layout):
    assert sorted(got) == sorted(steps)
    for i in steps:
        keys = [k for k in ref[i] if k.startswith(("kd/", "expected_fraction/", "chosen_fraction/"))]
        assert keys and keys == [k for k in got[i] if k.startswith(("kd/", "expected_fraction/", "chosen_fraction/"))]
        for k in keys:
            assert got[i][k] == pytest.approx(ref[i][k], rel=1e-4, abs=1e-6), (layout, i, k)


@pytest.mark.parametrize("layouts", [("tp2", "pp2", "dp2"), ("tp2-sp", "pp2-recompute")])
def test_parallel_layouts_give_the_same_losses_as_tp1(parent, tmp_path, layouts):
    from megatron_elastic.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, seed=1234)
    _train(parent, str(tmp_path / "tp1"))
    destroy_parallel()
    run_multiprocess(2, _parallel_job, parent, str(tmp_path), layouts)
    ref = _train_records(str(tmp_path / "tp1"))
    for layout in layouts:
        _assert_same_losses(_train_records(str(tmp_path / layout)), ref, sorted(ref), layout)


def test_recompute_trains_exactly_like_without(single_process_parallel, parent, tmp_path):
    """Full activation recompute with the router's gates on every layer (megatron-core 0.18+ re-runs layers in a
    nested backward that must not consume the router's graph, which every layer shares): the same run step by step."""
    _train(parent, str(tmp_path / "plain"))
    _train(parent, str(tmp_path / "recompute"), overrides=["train.recompute=true"])
    ref = _train_records(str(tmp_path / "plain"))
    _assert_same_losses(_train_records(str(tmp_path / "recompute")), ref, sorted(ref), "recompute")


def _resume_copy(src, dst, iteration):
    """``dst`` holds only ``src``'s checkpoint at ``iteration`` (as if the run was killed after writing it)."""
    name = f"iter_{iteration:07d}"
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "latest"), "w") as f:
        f.write(name)


DIST_OPT = ["train.distributed_optimizer=true"]
PORTABLE_OPT = DIST_OPT + ["checkpoint.optimizer_sharding=fully_reshardable"]


def _distributed_optimizer_job(rank, world, parent, root):
    import torch.distributed as dist

    from megatron_elastic.errors import CheckpointError

    # DP=2 with the optimizer state sharded over the two ranks: per rank (dp_reshardable, the default) and gathered
    # per parameter (fully_reshardable); each step-3 checkpoint resumed at TP=2.
    for run, overrides in (("dp2", PORTABLE_OPT), ("dp2-local", DIST_OPT)):
        _train(parent, os.path.join(root, run), overrides=overrides)
        if rank == 0:
            _resume_copy(os.path.join(root, run), os.path.join(root, f"tp2-from-{run}"), 3)
        dist.barrier()
    _train(parent, os.path.join(root, "tp2-from-dp2"), resume=True, overrides=DIST_OPT + LAYOUTS["tp2"])
    with pytest.raises(
        CheckpointError, match="tensor_model_parallel_size 1 \\(now 2\\).*optimizer_sharding: fully_resh"
    ):
        _train(parent, os.path.join(root, "tp2-from-dp2-local"), resume=True, overrides=DIST_OPT + LAYOUTS["tp2"])


def test_distributed_optimizer_matches_and_its_checkpoint_resumes_at_other_layouts(parent, tmp_path):
    """Megatron's DistributedOptimizer at DP=2 equals the plain optimizer at DP=1 step by step; its step-3
    checkpoint (optimizer state in two shards) resumes exactly at DP=1 in either sharding, and at TP=2 (Megatron's
    resharding) when gathered per parameter; the per-rank sharding refuses TP=2 naming the fix."""
    from megatron_elastic.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, seed=1234)
    _train(parent, str(tmp_path / "ref"))
    destroy_parallel()
    run_multiprocess(2, _distributed_optimizer_job, parent, str(tmp_path))
    ref = _train_records(str(tmp_path / "ref"))
    _assert_same_losses(_train_records(str(tmp_path / "dp2")), ref, sorted(ref), "dp2")
    _assert_same_losses(_train_records(str(tmp_path / "dp2-local")), ref, sorted(ref), "dp2 per-rank sharding")
    _assert_same_losses(_train_records(str(tmp_path / "tp2-from-dp2")), ref, [4, 5, 6], "tp2 resumed")
    for run in ("dp2", "dp2-local"):
        _resume_copy(str(tmp_path / run), str(tmp_path / f"dp1-from-{run}"), 3)
        initialize_parallel(1, 1, seed=1234)
        _train(parent, str(tmp_path / f"dp1-from-{run}"), resume=True, overrides=DIST_OPT)
        destroy_parallel()
        _assert_same_losses(_train_records(str(tmp_path / f"dp1-from-{run}")), ref, [4, 5, 6], f"dp1 from {run}")


def test_config_errors_name_the_fix(parent, tmp_path):
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="budget_weights"):
        _config(
            parent,
            str(tmp_path),
            overrides=[
                "curriculum.stages=[{name: s, tokens: 10, seq_length: 8, global_batch_size: 2, budget_weights: [1, 1]}]"
            ],
        )
    with pytest.raises(ConfigError, match="budgets_per_step"):
        _config(parent, str(tmp_path), mode="every")
    with pytest.raises(ConfigError, match="budgets"):
        _config(parent, str(tmp_path), overrides=["budgets=[1.0, 1.5]"])
    with pytest.raises(ConfigError, match="derived from the curriculum"):
        _config(parent, str(tmp_path), overrides=["train.train_iters=5"])
    with pytest.raises(ConfigError, match="unknown field"):
        _config(parent, str(tmp_path), overrides=["router.hiden=5"])
    with pytest.raises(ConfigError, match="Mode 2.*slice instead of masking"):
        _config(parent, str(tmp_path), overrides=["router.mask_mode=soft"])
    with pytest.raises(ConfigError, match="router.mask_mode: one of"):
        _config(parent, str(tmp_path), overrides=["router.mask_mode=hard"])
    with pytest.raises(ConfigError, match=r"one of them per curriculum stage \(2\)"):
        _config(parent, str(tmp_path), overrides=["distill.teacher=[trainable]"])


def _nan_kd(monkeypatch, bad_calls):
    import megatron_elastic.elastic.step as elastic_mod

    real, calls = elastic_mod.kd_loss, {"n": 0}

    def kd(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] in bad_calls else out

    monkeypatch.setattr(elastic_mod, "kd_loss", kd)


def test_a_nan_step_is_skipped_and_too_many_stop_with_a_checkpoint(
    single_process_parallel, parent, tmp_path, monkeypatch
):
    import torch

    from megatron_elastic.store.checkpoint import latest_checkpoint, load_model_weights

    # Step 2 = micro-batch calls 5-8 (4 micro-batches per step in stage 1): one poisoned micro-batch.
    _nan_kd(monkeypatch, {6})
    ckpt = str(tmp_path / "one")
    _train(parent, ckpt)
    recs = _records(ckpt)
    assert [r["iteration"] for r in recs if r.get("skipped")] == [2]
    assert sorted(_train_records(ckpt)) == [1, 2, 3, 4, 5, 6]

    monkeypatch.undo()
    _nan_kd(monkeypatch, set(range(9, 100)))  # every micro-batch from step 3 on
    ckpt = str(tmp_path / "many")
    with pytest.raises(FloatingPointError, match="3 consecutive steps.*--resume"):
        _train(parent, ckpt, overrides=["checkpoint.save_interval=100"])
    path = latest_checkpoint(ckpt)
    assert path.endswith("iter_0000005")
    from megatron_elastic.elastic.layers.model import build_elastic_model
    from megatron_elastic.store.open_run import config_from_checkpoint

    model = build_elastic_model(config_from_checkpoint(os.path.join(parent, "sorted", "iter_0000000")).model_config())
    load_model_weights(path, model)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the checkpoint holds the last good weights"


def test_unreachable_budget_is_refused_before_training(single_process_parallel, parent, tmp_path):
    from megatron_elastic.model.config import ConfigError

    with pytest.raises(ConfigError, match="below the smallest sub-model the space allows"):
        _train(parent, str(tmp_path / "x"), overrides=["budgets=[1.0, 0.75, 0.05]"])
