"""The ``importance`` job under a parallel layout: at TP=2 and at DP=2 (two processes) it gives one process's
scores, ranking and sorted parent; a job killed mid-way resumes from its saved sums to the same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_elastic.testing import run_multiprocess


def _run(rank, world, parent, data, out, tp):
    from megatron_elastic.importance.run import run_importance

    run_importance(parent, data, out, calib_tokens=2048, progress=False, tensor_parallel=tp)


def _results(out):
    with open(os.path.join(out, "scores.json")) as f:
        scores = json.load(f)
    with open(os.path.join(out, "ranking.json")) as f:
        ranking = json.load(f)
    return scores, ranking


def _sorted_tensors(out):
    from megatron_elastic.store.reader import CheckpointTensorReader

    reader = CheckpointTensorReader(os.path.join(out, "sorted", "iter_0000000"))
    return {n: reader.load(n) for n in reader.names() if not n.endswith("_extra_state")}


def _assert_same_importance(a, b, exact=False):
    (sa, ra), (sb, rb) = _results(a), _results(b)
    assert ra == rb, "the same ranking on every axis and the same depth order"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(sa["depth_nmse"]), torch.tensor(sb["depth_nmse"]), **tol)
    torch.testing.assert_close(torch.tensor(sa["width"]["hidden"]), torch.tensor(sb["width"]["hidden"]), **tol)
    for axis in ("mamba_heads", "mamba_head_dim", "attention_heads", "ffn"):
        for i in sa["width"][axis]:
            torch.testing.assert_close(torch.tensor(sa["width"][axis][i]), torch.tensor(sb["width"][axis][i]), **tol)
    ta, tb = _sorted_tensors(a), _sorted_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_importance_job_at_tp2_or_dp2_gives_one_process_result(tiny_pipeline, tmp_path, tp, single_process_parallel):
    """Two processes: TP=2 (logits vocab-sharded, FFN neurons of one group moved between the ranks by the sort) or
    DP=2 (each rank half of the calibration set). The fixture's importance ran in one process at TP=1."""
    out = str(tmp_path / "importance")
    run_multiprocess(2, _run, tiny_pipeline["parent"], tiny_pipeline["data"], out, tp)
    _assert_same_importance(out, tiny_pipeline["importance"])
    assert json.load(open(os.path.join(out, "scores.json")))["layout"]["data_parallel"] == 2 // tp
    assert not os.path.exists(os.path.join(out, "progress")), "progress is removed once the outputs are written"


def _cli(args, **kw):
    cmd = [sys.executable, "-m", "megatron_elastic", "importance", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def test_a_killed_importance_job_resumes_to_the_same_result(tiny_pipeline, tmp_path, single_process_parallel):
    common = ["--checkpoint", tiny_pipeline["parent"], "--data", tiny_pipeline["data"], "--calib-tokens", "8192"]
    common += ["--iterative-depth", "--no-progress", "--save-every-minutes", "0"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert _cli([*common, "--out", whole]).wait(600) == 0

    proc = _cli([*common, "--out", killed])
    state = os.path.join(killed, "progress", "state.json")
    deadline = time.monotonic() + 300
    saves = 0
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            saves = json.load(open(state))["save"]
        except (OSError, ValueError):
            pass
        if saves >= 60:  # width: 32 batches; then inside the iterative depth search
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(60) == -signal.SIGKILL, f"the job was not killed mid-way (saves {saves}): {proc.stderr.read()}"
    assert not os.path.exists(os.path.join(killed, "ranking.json"))

    # Another layout would sum other batches: refused, naming the fix.
    other = _cli([*common, "--out", killed, "--micro-batch-size", "2"])
    assert other.wait(600) == 2 and "delete" in other.stderr.read()
    resumed = _cli([*common, "--out", killed])
    assert resumed.wait(600) == 0, resumed.stderr.read()
    _assert_same_importance(killed, whole, exact=True)
