"""`launch/slurm/megatron_elastic.sbatch` on a real two-node Slurm built on this one machine.

Each node is a network namespace the fixture creates (``ip netns``), joined to the controller by a bridge: its
own address, its own hostname (a UTS namespace) and an ``/etc/hosts`` naming both nodes (a bind mount private to
its slurmd), and a ``slurmd`` inside it. One ``slurmctld`` and ``munged`` run outside; every rank on the second
node reaches the first only over that bridge, as on a cluster. Debian's slurm-wlm has no multiple-slurmd mode,
hence namespaces. Skipped with the reason where they or Slurm cannot be started (not root, no ``ip``/``nsenter``).

On the lighter 0.16 leg of CI only (the real single-node runs are on the 0.19 leg): what is tested is the launch
script, the same on both legs.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from packaging.version import Version

from megatron_elastic.compat import MCORE_VERSION
from megatron_elastic.parallel import free_port
from tests.launch.test_real_slurm import (
    _explain,
    _job,
    _sbatch,
    _train_config,
    _train_steps,
    _wait,
    _wait_for_step,
    _why_not,
    start_slurm,
    stop_slurm,
)

NODES = {"n1": "10.231.77.1", "n2": "10.231.77.2"}
CONTROLLER = "10.231.77.254"
BRIDGE = "mel-br0"
CPUS_PER_NODE = 4  # declared (SlurmdParameters=config_overrides): the 1-node comparison runs 4 ranks on one node


def _ip(*args) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _remove_network() -> None:
    for name in NODES:  # the veth pair first: a namespace may outlive `netns del` while the kernel frees it
        subprocess.run(["ip", "link", "del", f"mel-{name}-v"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"mel-{name}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _make_network(root) -> None:
    """A bridge holding the controller's address and, per node, a namespace with a veth into the bridge."""
    _remove_network()  # a previous run's, if it was killed
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{CONTROLLER}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in NODES.items())
    hosts += f"{CONTROLLER} {socket.gethostname()}\n"
    for name, addr in NODES.items():
        ns, veth = f"mel-{name}", f"mel-{name}-v"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", BRIDGE)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        (root / f"hosts-{name}").write_text(hosts)


def _in_node(root, name: str):
    """The command prefix that runs a daemon as node ``name``: its network namespace, its hostname, its hosts."""
    script = f'hostname {name} && mount --bind {root}/hosts-{name} /etc/hosts && exec "$@"'
    return ["nsenter", f"--net=/run/netns/mel-{name}", "unshare", "--mount", "--uts", "sh", "-c", script, "sh"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Slurm nodes (``n1``, ``n2``) of 4 CPUs; yields the environment its commands need."""
    if MCORE_VERSION >= Version("0.19"):
        pytest.skip("the two-node Slurm runs on CI's 0.16 leg (the single-node one on the 0.19 leg)")
    why = _why_not() or ", ".join(f"{t} is missing" for t in ("ip", "nsenter", "unshare") if not shutil.which(t))
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm2")
    try:
        _make_network(root)
    except subprocess.SubprocessError as e:
        _remove_network()
        pytest.skip(f"network namespaces cannot be made here: {getattr(e, 'stderr', e)}")
    nodes = "SlurmdParameters=config_overrides\n" + "\n".join(
        f"NodeName={n} NodeAddr={a} CPUs={CPUS_PER_NODE} State=UNKNOWN" for n, a in NODES.items()
    )
    try:
        commands = [_in_node(root, n) for n in NODES]
        env = start_slurm(root, f"{socket.gethostname()}({CONTROLLER})", nodes, ",".join(NODES), commands)
    except BaseException:
        _remove_network()
        raise
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        stop_slurm(root)
        time.sleep(1)
        _remove_network()


def _two_nodes(env, args, cwd, **extra):
    return _sbatch(env, args, cwd, opts=["--nodes=2", "--time=20", *extra.pop("opts", [])], **extra)


def test_four_ranks_on_two_nodes_know_their_rank_and_reach_the_master(cluster, tmp_path):
    """2 nodes x 2 tasks: ranks 0-1 on n1 and 2-3 on n2, each with world size 4, and the master address (the
    first node of the job) resolves from both nodes to n1's own address."""
    report = tmp_path / "report.sh"
    report.write_text(
        "#!/bin/bash\n"
        'echo "rank ${SLURM_PROCID} of ${SLURM_NTASKS} on $(hostname) master ${MASTER_ADDR}'
        ' at $(getent hosts "${MASTER_ADDR}" | cut -d" " -f1)"\n'
    )
    report.chmod(0o755)
    job_id = _two_nodes(cluster, ["prepare-data", "--help"], tmp_path, PYTHON=str(report))
    job = _wait(cluster, job_id, timeout=120)
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    assert job["JobState"] == "COMPLETED", _explain(cluster, job, out_file)
    ranks = sorted(line for line in out_file.read_text().splitlines() if line.startswith("rank "))
    assert ranks == [f"rank {r} of 4 on n{r // 2 + 1} master n1 at {NODES['n1']}" for r in range(4)], ranks


_REFERENCE = {}  # run once for the module (``parent`` is function-scoped)


@pytest.fixture
def reference_run(cluster, parent, tmp_path_factory):
    """The tiny elastic job uninterrupted on 2 nodes x 2 ranks (DP=4): its metrics file."""
    if "metrics" in _REFERENCE:
        return _REFERENCE["metrics"]
    tmp = tmp_path_factory.mktemp("reference")
    args, metrics = _train_config(parent, tmp, tokens=12 * 256)
    job_id = _two_nodes(cluster, args, tmp)
    job = _wait(cluster, job_id, timeout=600)
    assert job["JobState"] == "COMPLETED", _explain(cluster, job, tmp / f"megatron-elastic-{job_id}.out")
    _REFERENCE["metrics"] = metrics
    return metrics


def _losses(metrics):
    """iteration -> the KD losses logged for it (the last record of a step logged twice after a resume)."""
    out = {}
    for rec in map(json.loads, metrics.read_text().splitlines()):
        if "lr" in rec:
            out[rec["iteration"]] = {k: v for k, v in rec.items() if k.startswith("kd/") or k in ("lr", "grad_norm")}
    return out


def test_two_nodes_train_as_one_node_of_four_ranks(cluster, parent, reference_run, tmp_path):
    """The same job on 1 node x 4 ranks: every step's losses, learning rate and gradient norm equal the two-node
    run's (the same data-parallel reduction, wherever the ranks are)."""
    args, metrics = _train_config(parent, tmp_path, tokens=12 * 256)
    job_id = _sbatch(cluster, args, tmp_path, opts=["--nodes=1", "--ntasks-per-node=4", "--time=20"])
    job = _wait(cluster, job_id, timeout=600)
    assert job["JobState"] == "COMPLETED", _explain(cluster, job, tmp_path / f"megatron-elastic-{job_id}.out")
    one, two = _losses(metrics), _losses(reference_run)
    assert sorted(one) == sorted(two) == list(range(1, 13))
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-7), step


def _rank_pid(job_id: str, rank: int) -> int:
    """The pid of the Python process of global rank ``rank`` of job ``job_id`` (every namespace here shares the
    machine's process table)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (
            env.get(b"SLURM_JOB_ID") == job_id.encode()
            and env.get(b"SLURM_PROCID") == str(rank).encode()
            and b"megatron_elastic" in cmdline
        ):
            return int(pid)
    raise AssertionError(f"no process of rank {rank} of job {job_id}")


def test_a_rank_killed_on_the_second_node_and_a_stop_signal_both_resume_exactly(
    cluster, parent, reference_run, tmp_path
):
    """SIGKILL to rank 3 (on n2) after a periodic checkpoint: srun ends the job step at once (not after the
    collective timeout), the job requeues itself (a crash, restart 1) and resumes from the newest complete
    checkpoint on both nodes; then SIGUSR1 (preemption, the time-limit warning): every rank checkpoints at the
    current step, the job requeues (restart 2) and finishes. Each step's losses equal the uninterrupted run's."""
    args, metrics = _train_config(parent, tmp_path, tokens=12 * 256)
    args += ["--set", "checkpoint.save_interval=3"]
    job_id = _two_nodes(cluster, args, tmp_path, MASTER_PORT=str(free_port()))
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    _wait_for_step(cluster, job_id, metrics, 4)
    killed_at = time.time()
    os.kill(_rank_pid(job_id, 3), signal.SIGKILL)
    deadline = time.time() + 120
    while (_job(cluster, job_id).get("Restarts"), _job(cluster, job_id).get("JobState")) != ("1", "PENDING"):
        assert time.time() < deadline, _explain(cluster, _job(cluster, job_id), out_file)
        time.sleep(0.5)
    requeued_after = time.time() - killed_at
    _wait(cluster, job_id, states=("RUNNING",), timeout=300)  # (releases Slurm's two-minute hold of a requeue)
    _wait_for_step(cluster, job_id, metrics, max(_train_steps(metrics)) + 2, timeout=300)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=cluster, check=True)
    job = _wait(cluster, job_id, timeout=900)
    out = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", _explain(cluster, job, out_file)
    assert requeued_after < 60, f"the crash took {requeued_after:.0f} s to requeue (srun --kill-on-bad-exit)"
    assert "the job step failed" in out and "resumed from" in out and "stopping at step" in out, out
    ours, reference = _losses(metrics), _losses(reference_run)
    assert sorted(ours) == list(range(1, 13))
    for step in ours:
        assert ours[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step


def test_the_torchrun_launcher_spans_both_nodes(cluster, tmp_path):
    """LAUNCHER=torchrun: one torchrun per node, rendezvous at the first node; the four workers form one gloo group
    across the bridge (an all-reduce of their ranks gives 0+1+2+3 on every worker)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, socket, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.tensor([float(dist.get_rank())])\n"
        "dist.all_reduce(t)\n"
        "print(f'worker {dist.get_rank()} of {dist.get_world_size()} on {socket.gethostname()} sum {t.item():g}')\n"
        "dist.destroy_process_group()  # a gloo group alive at exit may abort the process\n"
    )
    # torchrun runs `-m megatron_elastic ARGS`; a PYTHON that is `python probe.py` would lose the torchrun
    # wrapper, so the probe stands in for the package through PYTHONPATH instead.
    pkg = tmp_path / "shim" / "megatron_elastic"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(probe.read_text())
    job_id = _two_nodes(cluster, ["prepare-data", "--help"], tmp_path, LAUNCHER="torchrun", PYTHONPATH=str(pkg.parent))
    job = _wait(cluster, job_id, timeout=180)
    out_file = tmp_path / f"megatron-elastic-{job_id}.out"
    assert job["JobState"] == "COMPLETED", _explain(cluster, job, out_file)
    # (four processes share the output: two lines may interleave, so the reports are found, not split by line)
    workers = sorted(re.findall(r"worker \d+ of \d+ on \S+ sum \d+", out_file.read_text()))
    assert workers == [f"worker {r} of 4 on n{r // 2 + 1} sum 6" for r in range(4)], workers
