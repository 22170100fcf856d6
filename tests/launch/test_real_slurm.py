"""`launch/slurm/megatron_elastic.sbatch` on a real single-node Slurm (Debian's slurm-wlm + munge): the daemons are
started by a fixture with a configuration written into a temporary directory, the script runs its CPU profile (the
same script; ``--gpus-per-node=0``, 2 tasks, gloo). Skipped with the reason where Slurm cannot be started here
(``.ci/run`` installs the packages). Multi-node host lists stay with the fake-command tests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from packaging.version import Version

from megatron_elastic.compat import MCORE_VERSION
from megatron_elastic.parallel import free_port
from tests.launch.test_launch_scripts import SBATCH

DAEMONS = ("munged", "slurmctld", "slurmd")


def _why_not() -> str:
    missing = [
        d for d in (*DAEMONS, "sbatch", "scontrol") if not shutil.which(d) and not os.path.exists(f"/usr/sbin/{d}")
    ]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return ""


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CONF = """ClusterName=elastictest
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool-%n
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=600
# A slurmd on a loaded 2-core CI machine can take longer than the default 10 s to answer: a launch whose RPC times
# out is requeued (seen: a two-node job requeued 3 times more than the test's own 2, "Socket timed out on send/recv")
MessageTimeout=60
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm(root, controller: str, nodes: str, names: str, slurmd_commands) -> dict:
    """Start munge, slurmctld and one slurmd per command of ``slurmd_commands`` (each given the config path) with
    ``CONF`` written into ``root``; returns the environment (``SLURM_CONF``) once every node is idle. Raises
    ``pytest.skip`` with the daemons' logs where they cannot start."""
    (root / "state").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(
        CONF.format(
            controller=controller, root=root, ctld_port=free_port(), d_port=free_port(), nodes=nodes, names=names
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = [_daemon("munged"), f"--socket={root}/munge.socket", f"--key-file={key}", f"--pid-file={root}/munged.pid"]
    try:
        subprocess.run([*munge, f"--log-file={root}/munged.log", "--force"], check=True, env=env, timeout=30)
        subprocess.run([_daemon("slurmctld"), "-f", str(conf)], check=True, env=env, timeout=30)
        for command in slurmd_commands:
            subprocess.run([*command, _daemon("slurmd"), "-f", str(conf)], check=True, env=env, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            if set(_node_state(env).split()) <= {"idle", "mixed", "allocated"} and _node_state(env):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the nodes never became idle ({_node_state(env)!r})")
    except (subprocess.SubprocessError, OSError, RuntimeError) as e:
        logs = " | ".join(p.read_text()[-300:] for p in sorted(root.glob("slurm*.log")))
        stop_slurm(root)
        pytest.skip(f"the test Slurm could not be started here ({e}); logs: {logs}")
    return env


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm; yields the environment (``SLURM_CONF``) that its commands need."""
    if MCORE_VERSION < Version("0.19"):  # ~6 minutes: the scripts and the job steps are the same on both legs
        pytest.skip("the real-Slurm runs use the Docker image's megatron-core (0.19, CI's 2nd leg)")
    why = _why_not()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    node = f"NodeName={host} CPUs={os.cpu_count() or 2} State=UNKNOWN"
    env = start_slurm(root, host, node, host, [[]])
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        stop_slurm(root)


def stop_slurm(root) -> None:
    for pid_file in [*sorted(root.glob("slurmd-*.pid")), root / "slurmctld.pid", root / "munged.pid"]:
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def _sbatch(env, args, cwd, **extra):
    """Submit the project's sbatch script with its CPU profile: 2 tasks on the one node, no GPUs."""
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", *extra.pop("opts", []), SBATCH, *args]
    e = {**env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", **extra}
    out = subprocess.run(cmd, env=e, cwd=cwd, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip().split(";")[0]


def _job(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(env, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600) -> dict:
    """Poll until the job reaches one of ``states``. Slurm holds a requeued job for two minutes (its BeginTime);
    once its old credential has expired (``cred_expire``: 10 s in the test Slurm, 120 s by default; a start before
    that fails the job with "Job credential revoked"), the test lets it start, which changes nothing but the wait."""
    deadline, held_since = time.time() + timeout, None
    while time.time() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in states:
            return job
        held = job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime" and job.get("Restarts") != "0"
        held_since = (held_since or time.time()) if held else None
        if held and time.time() - held_since > 20:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {states}: {_job(env, job_id)}")


def _node_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


def _explain(env, job, out_file) -> str:
    """An assertion message: the job's state fields, its output and the controller's log."""
    fields = {k: job.get(k) for k in ("JobState", "Reason", "Restarts", "ExitCode", "RunTime", "StartTime", "EndTime")}
    log = os.path.join(os.path.dirname(env["SLURM_CONF"]), "slurmctld.log")
    tail = open(log).read()[-3000:] if os.path.exists(log) else ""
    out = out_file.read_text()[-3000:] if out_file.exists() else "(no output)"
    return f"{fields}\n--- output ---\n{out}\n--- slurmctld.log ---\n{tail}"


def _logged_steps(metrics):
    """Iterations in a metrics.jsonl being written (a torn last line is skipped)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps.append(json.loads(line)["iteration"])
        except ValueError:
            pass
    return steps


def test_one_rank_per_task_nodes_times_tasks_per_node(slurm, tmp_path):
    """Every rank reports its Slurm rank and world size: 2 tasks per node on 1 node is 2 ranks (the old script
    asked for 1 task per node and started 1)."""
    report = tmp_path / "report.sh"
    report.write_text('#!/bin/bash\necho "rank ${SLURM_PROCID} of ${SLURM_NTASKS} local ${SLURM_LOCALID}"\n')
    report.chmod(0o755)
    job_id = _sbatch(slurm, ["prepare-data", "--help"], tmp_path, PYTHON=str(report))
    job = _wait(slurm, job_id)
    assert job["JobState"] == "COMPLETED", job
    out = (tmp_path / f"megatron-elastic-{job_id}.out").read_text()
    assert sorted(line for line in out.splitlines() if line.startswith("rank ")) == [
        "rank 0 of 2 local 0",
        "rank 1 of 2 local 1",
    ], out


def _train_config(parent, tmp_path, tokens=6144):
    """The tiny elastic job, one stage of ``tokens`` (256 a step), no periodic checkpoints or evaluations: every
    checkpoint the test sees is a stop checkpoint."""
    from tests.elastic.test_elastic_training import JOB

    ckpt = tmp_path / "ckpt"
    cfg = tmp_path / "elastic.yaml"
    cfg.write_text(JOB.format(parent=parent, ckpt=ckpt, mode="sample"))
    stage = f"{{name: s, tokens: {tokens}, seq_length: 32, global_batch_size: 8, budget_weights: [1, 1, 1]}}"
    stages = f"curriculum.stages=[{stage}]"
    args = ["train", "--config", str(cfg), "--no-progress", "--set", stages, "--set", "train.eval_interval=1000",
            "--set", "checkpoint.save_interval=1000"]  # fmt: skip
    return args, ckpt / "metrics.jsonl"


def _wait_for_step(env, job_id, metrics, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(_logged_steps(metrics), default=0) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"the job never reached step {step}: {_job(env, job_id)}")


def _train_steps(metrics):
    return [r["iteration"] for r in map(json.loads, metrics.read_text().splitlines()) if "lr" in r]


def test_stop_signal_checkpoints_requeues_and_the_requeued_job_finishes(slurm, parent, tmp_path):
    """SIGUSR1 to the batch script (what ``--signal=B:USR1@N`` sends before the time limit, and preemption):
    the ranks checkpoint at the current step, the job requeues itself (same id, restart count 1) and the requeued
    job resumes from that step and finishes the run. At most the current step is lost."""
    args, metrics = _train_config(parent, tmp_path)
    job_id = _sbatch(slurm, args, tmp_path, opts=["--time=20"])
    _wait_for_step(slurm, job_id, metrics, 3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm, check=True)
    job = _wait(slurm, job_id, timeout=900)
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    out = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", _explain(slurm, job, out_file)
    assert "requeueing job" in out and "resumed from" in out, out
    stopped_at = int(out.split("stopping at step ")[1].split()[0])
    assert stopped_at >= 3 and "preempted" in out
    # Before the stop: 1..stopped_at; after the requeue: stopped_at+1..the end, each step once.
    assert _train_steps(metrics) == list(range(1, 25))


def test_a_requeue_from_outside_loses_at_most_the_current_step(slurm, parent, tmp_path):
    """``scontrol requeue`` (what an operator or a preempting scheduler does): Slurm sends SIGTERM to the ranks and
    to srun, which then kills the step after KillWait; the ranks checkpoint at the current step first, and the job
    Slurm requeued resumes there and finishes, every step once."""
    args, metrics = _train_config(parent, tmp_path)
    job_id = _sbatch(slurm, args, tmp_path, opts=["--time=20"])
    _wait_for_step(slurm, job_id, metrics, 3)
    subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True)
    job = _wait(slurm, job_id, timeout=900)
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    out = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", _explain(slurm, job, out_file)
    stopped_at = int(out.split("stopping at step ")[1].split()[0])
    assert f"resumed from {metrics.parent / f'iter_{stopped_at:07d}'}" in out, out
    assert _train_steps(metrics) == list(range(1, 25))


def _submit_curriculum(env, config, cwd):
    e = {**env, "CONFIG": str(config), "NODES_STAGE1": "1", "TIME_STAGE1": "20", "TIME_STAGE2": "20",
         "SBATCH_ARGS": "--ntasks-per-node=2 --gpus-per-node=0", "PYTHON": sys.executable,
         "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = os.path.join(os.path.dirname(SBATCH), "submit_curriculum.sh")
    out = subprocess.run(["bash", script, "--no-progress"], env=e, cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.split("stage 1: job ")[1].split()[0], out.stdout.split("stage 2: job ")[1].split()[0]


def test_the_curriculum_runs_as_two_jobs_and_stage_2_starts_only_after_stage_1(slurm, parent, tmp_path):
    """``submit_curriculum.sh``: stage 1 (``--until-stage 1``) stops with a checkpoint at the stage boundary, the
    stage-2 job (``afterok``) starts after it ended, resumes there and finishes; when stage 1 fails, stage 2 never
    starts: Slurm cancels it (``--kill-on-invalid-dep``)."""
    from tests.elastic.test_elastic_training import JOB

    ckpt = tmp_path / "ckpt"
    config = tmp_path / "elastic.yaml"
    config.write_text(JOB.format(parent=parent, ckpt=ckpt, mode="sample"))
    first, second = _submit_curriculum(slurm, config, tmp_path)
    one, two = _wait(slurm, first), _wait(slurm, second)
    assert one["JobState"] == "COMPLETED", _explain(slurm, one, tmp_path / f"elastic-stage1-{first}.out")
    assert two["JobState"] == "COMPLETED", _explain(slurm, two, tmp_path / f"elastic-stage2-{second}.out")
    assert two["StartTime"] >= one["EndTime"], "stage 2 started before stage 1 ended"
    out = (tmp_path / f"elastic-stage2-{second}.out").read_text()
    assert f"resumed from {ckpt / 'iter_0000004'}" in out, out  # stage 1 = steps 1-4 of the tiny curriculum
    assert _train_steps(ckpt / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]

    broken = tmp_path / "broken"
    broken.mkdir()
    first, second = _submit_curriculum(slurm, broken / "missing.yaml", broken)
    assert _wait(slurm, first)["JobState"] == "FAILED"  # a bad input (exit 2): failed at once, not requeued
    assert _job(slurm, first).get("Restarts") == "0"
    gone = _wait(slurm, second, states=("CANCELLED", "COMPLETED", "FAILED"), timeout=120)
    assert gone["JobState"] == "CANCELLED", f"stage 2 after a failed stage 1 (--kill-on-invalid-dep): {gone}"
