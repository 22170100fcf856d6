"""The wall-time limit on a real single-node Slurm: a job whose run outlasts its 1-minute limit checkpoints,
requeues itself and finishes. Its own module (the Slurm of ``test_real_slurm``'s fixture, started again here) so
that pytest-xdist can place this test, which mostly waits on job segments, on its own: behind the rehearsal on the
first worker (tests/conftest.py), not beside the other Slurm tests."""

import pytest

from tests.launch import test_real_slurm
from tests.launch.test_real_slurm import _explain, _sbatch, _train_config, _train_steps, _wait

slurm = test_real_slurm.slurm  # the same module-scoped fixture: this module starts its own test Slurm


# Several job segments; on a crowded machine each spends most of its minute starting up and the run advances a few
# steps per segment until the load drops: a longer limit than the suite's 900 s.
LIMIT_SECONDS = 1800


@pytest.mark.timeout(LIMIT_SECONDS)
def test_a_job_near_its_time_limit_checkpoints_requeues_and_finishes(slurm, parent, tmp_path):
    """A 1-minute job whose run needs longer (1000 steps, about 100 s here): the ranks read the job's end from
    Slurm (the script exports it) and stop before it with a checkpoint; the job requeues itself (as often as
    needed) and the run finishes, every step once. The USR1 warning is switched to SIGURG here (ignored by the
    script) so only the wall-time check acts."""
    args, metrics = _train_config(parent, tmp_path, tokens=1000 * 256)
    job_id = _sbatch(slurm, args, tmp_path, opts=["--time=1", "--signal=B:URG@1"])
    job = _wait(slurm, job_id, timeout=LIMIT_SECONDS - 50)  # fails with the job's state, not pytest's
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    out = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, _explain(slurm, job, out_file)
    assert "wall-time limit" in out and "requeueing job" in out and "resumed from" in out, out
    assert _train_steps(metrics) == list(range(1, 1001))
