"""Loading a checkpoint never runs code. Every pickled file a run holds gets an object whose unpickling would
create a marker file (the manifest updated to match, as an author could); every command that reads runs refuses
it in one line naming the file, before any model state is used, and the marker never appears."""

import glob
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from tests.elastic.test_elastic_training import _config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
# "dist/*.distcp": a byte item (pickled object, e.g. a layer's _extra_state) inside the tensor files.
PICKLED_FILES = ["extra.pt", "rng_rank0.pt", "dist/common.pt", "dist/.metadata", "dist/*.distcp"]


class Payload:
    """Unpickling this opens (creates) the marker file: stands for any code a file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poison(ckpt: str, name: str, marker: str) -> None:
    """Add a Payload to ``ckpt/name`` keeping the rest of its content, then re-write the manifest."""
    from megatron_elastic.store.checkpoint import write_manifest

    path = os.path.join(ckpt, name)
    if name.endswith(".distcp"):
        _poison_byte_item(os.path.join(ckpt, "dist"), Payload(marker))
    elif name.endswith(".metadata"):
        with open(path, "rb") as f:
            index = pickle.load(f)  # our own, trusted, test file
        index.__dict__["payload"] = Payload(marker)
        with open(path, "wb") as f:
            pickle.dump(index, f)
    else:
        content = torch.load(path, weights_only=True)
        with open(path, "wb") as f:
            torch.save({"content": content, "payload": Payload(marker)}, f)
    iteration = int(os.path.basename(os.path.normpath(ckpt)).split("_")[1])
    os.remove(os.path.join(ckpt, "manifest.json"))
    write_manifest(ckpt, iteration)


def _poison_byte_item(dist_dir: str, payload) -> None:
    """Replace the first byte item of a torch.distributed.checkpoint directory with a pickle of ``payload``
    (the file rewritten, the index's offsets and lengths moved to match)."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index_path = os.path.join(dist_dir, ".metadata")
    with open(index_path, "rb") as f:
        index = pickle.load(f)  # our own, trusted, test file
    key, info = next(
        (k, v)
        for k, v in index.storage_data.items()
        if isinstance(index.state_dict_metadata[k.fqn], BytesStorageMetadata)
    )
    blob = io.BytesIO()
    torch.save({"extra_state": payload}, blob)
    new = blob.getvalue()
    path = os.path.join(dist_dir, info.relative_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: info.offset] + new + data[info.offset + info.length :])
    shift = len(new) - info.length
    for k, v in index.storage_data.items():
        if v.relative_path == info.relative_path and v.offset > info.offset:
            index.storage_data[k] = type(v)(v.relative_path, v.offset + shift, v.length, v.transform_descriptors)
    index.storage_data[key] = type(info)(info.relative_path, info.offset, len(new), info.transform_descriptors)
    with open(index_path, "wb") as f:
        pickle.dump(index, f)


@pytest.fixture(scope="module")
def elastic_run(tiny_pipeline, tmp_path_factory):
    """A short elastic run (its latest checkpoint holds every file kind) made in a fresh process."""
    from megatron_elastic.elastic.config import load_elastic_config  # noqa: F401

    run = tmp_path_factory.mktemp("safety") / "run"
    cfg = _config(
        tiny_pipeline["importance"],
        str(run),
        overrides=[
            "curriculum.stages=[{name: s, tokens: 512, seq_length: 32, global_batch_size: 8, "
            "budget_weights: [1, 1, 1]}]"
        ],
    )
    job = run.parent / "job.yaml"
    import yaml

    job.write_text(yaml.safe_dump(cfg.raw))
    r = subprocess.run(
        [sys.executable, "-m", "megatron_elastic", "train", "--config", str(job), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {"job": str(job), "run": str(run), "pipeline": tiny_pipeline}


def _commands(run_dir, job, pipeline, parent_copy, out):
    return {
        "train": ["train", "--config", job, "--resume", "--no-progress", "--set", f"checkpoint.dir={run_dir}"],
        "extract": ["extract", "--checkpoint", run_dir, "--out", out],
        "generate": ["generate", "--checkpoint", run_dir, "--prompt", "def ", "--max-new-tokens", "2"],
        "importance": [
            "importance",
            "--checkpoint",
            parent_copy,
            "--data",
            pipeline["data"],
            "--out",
            out,
            "--calib-tokens",
            "256",
            "--no-progress",
        ],
    }


@pytest.mark.parametrize("name", PICKLED_FILES)
def test_every_command_refuses_a_file_that_would_run_code(elastic_run, tmp_path, name):
    run_dir = str(tmp_path / "run")
    shutil.copytree(elastic_run["run"], run_dir)
    latest = os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip())
    parent_copy = str(tmp_path / "parent")
    shutil.copytree(os.path.join(elastic_run["pipeline"]["parent"]), parent_copy)
    parent_latest = os.path.join(parent_copy, open(os.path.join(parent_copy, "latest")).read().strip())
    marker = str(tmp_path / "MARKER")
    if not glob.glob(os.path.join(latest, name)):
        from megatron_elastic.compat import MCORE_VERSION

        pytest.skip(f"megatron-core {MCORE_VERSION} does not write {name} (its common state lives in the index)")
    _poison(latest, name, marker)
    if glob.glob(os.path.join(parent_latest, name)):  # a pretrain checkpoint has no extra.pt
        _poison(parent_latest, name, marker)
    commands = _commands(run_dir, elastic_run["job"], elastic_run["pipeline"], parent_copy, str(tmp_path / "out"))
    if name == "extra.pt":
        commands.pop("importance")  # the parent has none; importance never reads an elastic run
    # One process runs every command through the CLI's entry point (one interpreter start, not four).
    driver = (
        "import contextlib, io, json, sys\n"
        "from megatron_elastic.cli import main\n"
        "results = {}\n"
        "for cmd, args in json.loads(sys.argv[1]).items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            rc = main(args)\n"
        "        except BaseException as e:  # a traceback here fails the test below\n"
        "            rc, err = repr(e), io.StringIO('Traceback ' + repr(e))\n"
        "    results[cmd] = [rc, err.getvalue()]\n"
        "print(json.dumps(results))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert not os.path.exists(marker), f"a command unpickled {name}"
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(results) == set(commands)
    for cmd, (rc, stderr) in results.items():
        assert rc == 2 and "Traceback" not in stderr, (cmd, rc, stderr[-3000:])
        errors = [line for line in stderr.splitlines() if line.startswith(f"megatron-elastic {cmd}: error: ")]
        assert len(errors) == 1, (cmd, stderr[-3000:])
        assert name.split("/")[-1].replace("*", "") in errors[0] and "not plain data" in errors[0], errors[0]


def test_the_cli_exits_2_on_a_refused_file(elastic_run, tmp_path):
    """The same refusal through the installed command's process: exit code 2, one line, no marker."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(elastic_run["run"], run_dir)
    latest = os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip())
    marker = str(tmp_path / "MARKER")
    _poison(latest, "extra.pt", marker)
    r = subprocess.run(
        [sys.executable, "-m", "megatron_elastic", "extract", "--checkpoint", run_dir, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and not os.path.exists(marker), r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        line for line in r.stderr.splitlines() if line.startswith("megatron-elastic extract: error: ")
    ]


def test_no_unsafe_load_in_the_package():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "megatron_elastic", "**", "*.py"), recursive=True):
        text = open(path).read()
        for needle in ("weights_only=False", "pickle.load(", "pickle.loads("):
            if needle in text:
                offenders.append((os.path.relpath(path, ROOT), needle))
    assert not offenders, offenders


def test_rng_files_of_older_runs_still_load(single_process_parallel, tmp_path):
    """Before checkpoints were plain data, numpy's generator state was stored as an ndarray; exactly those numpy
    types are admitted for RNG files, and the state restored is the one saved."""
    import numpy as np

    from megatron_elastic.store.checkpoint import rng_state, set_rng_state
    from megatron_elastic.store.safe_files import legacy_rng_globals, load_plain

    state = rng_state()
    state["numpy"] = np.random.get_state()  # the old format
    torch.save(state, tmp_path / "rng_rank0.pt")
    want = np.random.rand(3)
    np.random.rand(5)
    set_rng_state(load_plain(str(tmp_path / "rng_rank0.pt"), tuple(legacy_rng_globals())))
    np.testing.assert_array_equal(np.random.rand(3), want)
