"""The 12B run book's dress rehearsal (``benchmarks/rehearsal_12b.py``) at a reduced width, as CI can afford it: a
transformers-written NemotronH release with its tokenizer -> prepare-data -> import-hf --config parent.yaml ->
importance on 2 processes -> elastic train at TP=8 with sequence parallelism, the distributed optimizer and async
checkpoints, stopped by SIGUSR1 on every rank and resumed -> extract in every format -> transformers loads and
generates with each export. The full-width run is the benchmark itself (README, "dress rehearsal")."""

import json
import os
import subprocess
import sys

import pytest
from packaging.version import Version

from megatron_elastic.compat import MCORE_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ~5 minutes: run on the leg the Docker image pins; every stage it chains has its own tests on both legs.
@pytest.mark.skipif(
    MCORE_VERSION < Version("0.19"),
    reason="the rehearsal runs on the Docker image's megatron-core (0.19; CI's 2nd leg)",
)
def test_the_run_book_rehearsal_at_reduced_width(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "rehearsal_12b.py"), "--reduced", "--seq", "64"]
    cmd += ["--workdir", str(tmp_path / "w"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    train = report["train"]
    assert train["usr1_exit_code"] != 0, "SIGUSR1 stopped the ranks (exit 99 each; torchrun reports a failure)"
    final = (tmp_path / "w" / "elastic" / "latest").read_text().strip()
    assert train["stopped_at"] < final, "the stopped run checkpointed before the end; the resumed one finished"
    exports = report["transformers"]["exports"]
    budgets = ["1", "0.7311", "0.4874"]
    assert {f"budget_{b}/hf" for b in budgets} <= set(exports) and {f"hf-elastic@{b}" for b in budgets} <= set(exports)
    for b in budgets:  # the standalone export and the one-checkpoint-every-budget export are the same model
        assert exports[f"hf-elastic@{b}"]["text"] == exports[f"budget_{b}/hf"]["text"], b
    assert exports["budget_1/hf"]["hidden"] == report["sizes"]["hidden_size"]
    for stage in ("import-hf", "importance", "train", "extract"):
        assert report[stage]["seconds"] > 0 and report[stage]["peak_host_bytes"] > 0, stage
