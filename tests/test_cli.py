"""Every command has --help; bad arguments give a clear error and exit code 2."""

import os
import subprocess
import sys

import pytest

COMMANDS = ["prepare-data", "pretrain", "importance", "train", "extract", "import-hf", "generate", "plan", "demo"]


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "megatron_elastic", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help(cmd):
    r = run(*([cmd] if cmd else []), "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: megatron-elastic" in r.stdout
    if cmd is None:
        for c in COMMANDS:
            assert c in r.stdout


def test_pretrain_with_bad_config_names_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {hybrid_pattern: 'M?', vocab_size: 10, hidden_size: 8, num_attention_heads: 1}\n")
    r = run("pretrain", "--config", str(cfg))
    assert r.returncode == 2
    assert "model.hybrid_pattern" in r.stderr and "unknown symbol" in r.stderr


def test_pretrain_with_missing_data_names_the_fix(tmp_path):
    from megatron_elastic.cli import recipe_path

    r = run(
        "pretrain",
        "--config",
        recipe_path("tiny_parent.yaml"),
        "--set",
        f"data.path={tmp_path}/nodata",
        "--set",
        f"checkpoint.dir={tmp_path}/ckpt",
        "--no-progress",
    )
    assert r.returncode == 2
    assert "prepare-data" in r.stderr


def test_train_without_importance_output_names_the_fix(tmp_path):
    from megatron_elastic.cli import recipe_path

    r = run(
        "train",
        "--config",
        recipe_path("tiny_elastic.yaml"),
        "--set",
        f"parent={tmp_path}/nothing",
        "--set",
        f"checkpoint.dir={tmp_path}/ckpt",
        "--no-progress",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "megatron-elastic importance --out" in r.stderr


def test_train_with_bad_stage_names_the_field(tmp_path):
    from megatron_elastic.cli import recipe_path

    r = run(
        "train",
        "--config",
        recipe_path("tiny_elastic.yaml"),
        "--set",
        "curriculum.stages=[{name: s, tokens: 100, seq_length: 64, global_batch_size: 4}]",
    )
    assert r.returncode == 2
    assert "curriculum.stages[0]" in r.stderr and "budget_weights" in r.stderr


def test_importance_end_to_end(tmp_path):
    """pretrain a few steps, then `importance` writes scores, ranking, a sorted checkpoint with the same
    function, a table and a plot."""
    import json
    import os

    from megatron_elastic.data.corpus import iter_stdlib_documents
    from megatron_elastic.data.indexed import write_split_datasets
    from tests.store.test_checkpoint_resume import TINY_JOB

    data = tmp_path / "data"
    write_split_datasets(str(data), iter_stdlib_documents(max_bytes=200_000), "byte", valid_every=5, progress=False)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(TINY_JOB.format(data=data, ckpt=tmp_path / "parent"))
    r = run(
        "pretrain",
        "--config",
        str(cfg),
        "--set",
        "train.train_iters=3",
        "--set",
        "train.lr_warmup_iters=1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "imp"
    r = run(
        "importance",
        "--checkpoint",
        str(tmp_path / "parent"),
        "--out",
        str(out),
        "--calib-tokens",
        "2000",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "depth ranking" in r.stdout
    for name in ("scores.json", "ranking.json", "summary.txt", "sorted/latest"):
        assert os.path.exists(out / name), name
    ranking = json.loads((out / "ranking.json").read_text())["depth_ranking"]
    assert sorted(ranking) == [0, 1, 2, 3]


def _bad_inputs(tmp, pipeline):
    """(subcommand, arguments) with one bad input each, for every subcommand."""
    from megatron_elastic.cli import recipe_path

    bad_arch = tmp / "arch.json"
    bad_arch.write_text('{"hidden_size": 100000}')
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model: {hybrid_pattern: 'M-', vocab_size: 300, hidden_size: 32, add_bias_linear: true}\n")
    sorted_parent = f"{pipeline['importance']}/sorted"
    return [
        ("prepare-data", ["--out", str(tmp / "d"), "--tokenizer", "no-such-tokenizer"]),
        ("prepare-data", ["--out", str(tmp / "d2"), "--input", str(tmp / "missing.jsonl")]),
        ("pretrain", ["--config", str(bad_yaml)]),
        ("pretrain", ["--config", str(tmp / "missing.yaml")]),
        ("importance", ["--checkpoint", str(tmp / "nothing"), "--out", str(tmp / "imp")]),
        ("train", ["--config", recipe_path("tiny_elastic.yaml"), "--set", "budgets=[1.0, 2.0]"]),
        ("extract", ["--checkpoint", sorted_parent, "--arch", str(bad_arch), "--out", str(tmp / "x")]),
        ("extract", ["--checkpoint", str(tmp / "nothing"), "--out", str(tmp / "x2")]),
        ("import-hf", ["--hf-dir", str(tmp / "nothing"), "--out", str(tmp / "h")]),
        ("generate", ["--checkpoint", sorted_parent, "--budget", "0.3", "--prompt", "def "]),
        (
            "plan",
            [
                "--config",
                recipe_path("tiny_elastic.yaml"),
                "--gpus-per-node",
                "3",
                "--set",
                "parallel.tensor_model_parallel_size=2",
            ],
        ),
        (
            "demo",
            [
                "--out",
                str(tmp / "demo"),
                "--quick",
                "--set",
                "model.position_embedding_type=learned_absolute",
                "--no-progress",
            ],
        ),
        (  # a fresh run into a directory that holds one: refused, nothing overwritten
            "train",
            [
                "--config",
                recipe_path("tiny_elastic.yaml"),
                "--set",
                f"parent={pipeline['importance']}",
                "--set",
                f"checkpoint.dir={sorted_parent}",
                "--no-progress",
            ],
        ),
    ]


def test_every_subcommand_reports_a_bad_input_in_one_line(tiny_pipeline, tmp_path):
    """Exit code 2, one line `megatron-elastic <cmd>: error: ...` on stderr, no traceback; --debug shows it."""
    from concurrent.futures import ThreadPoolExecutor

    seen = set()
    bad = _bad_inputs(tmp_path, tiny_pipeline)
    with ThreadPoolExecutor(2) as pool:  # one process per core: each is mostly its imports
        results = list(pool.map(lambda cmd_args: run(cmd_args[0], *cmd_args[1]), bad))
    for (cmd, args), r in zip(bad, results):
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, (cmd, args, r.stderr[-3000:])
        assert "Traceback" not in r.stderr, (cmd, r.stderr[-3000:])
        errors = [line for line in lines if line.startswith(f"megatron-elastic {cmd}: error: ")]
        assert len(errors) == 1 and len(errors[0]) > len(f"megatron-elastic {cmd}: error: ") + 10, (cmd, lines)
        seen.add(cmd)
    assert seen == set(COMMANDS)
    assert "already holds a run" in results[-1].stderr and "--resume" in results[-1].stderr
    cmd, args = _bad_inputs(tmp_path, tiny_pipeline)[6]
    marker = tmp_path / "bad-input"  # what a launcher (launch/slurm) reads to know not to run the job again
    r = run("--debug", cmd, *args, env={"MEGATRON_ELASTIC_BAD_INPUT_MARKER": str(marker)})
    assert r.returncode != 0 and "Traceback" in r.stderr and "ElasticArchError" in r.stderr
    assert " ".join(marker.read_text().split()[:6]) in " ".join(r.stderr.split()), (marker.read_text(), r.stderr)
    marker.unlink()
    r = run("train", "--no-such-option", env={"MEGATRON_ELASTIC_BAD_INPUT_MARKER": str(marker)})
    assert r.returncode == 2 and marker.exists(), "a bad command line is a bad input too"
    ok = run("plan", "--help", env={"MEGATRON_ELASTIC_BAD_INPUT_MARKER": str(tmp_path / "none")})
    assert ok.returncode == 0 and not (tmp_path / "none").exists()


def test_a_command_tears_its_process_groups_down_before_it_returns(tmp_path):
    """A gloo group left alive at interpreter exit aborts the process now and then (exit -6 after the job's own exit
    code, seen in CI): ``main`` destroys the groups a command set up, after a failure too."""
    from megatron_elastic.cli import recipe_path

    script = (
        "import sys, torch.distributed as dist\n"
        "from megatron_elastic import cli\n"
        "code = cli.main(sys.argv[1:])\n"
        "print('exit', code, 'initialized', dist.is_initialized())\n"
    )
    args = ["pretrain", "--config", recipe_path("tiny_parent.yaml"), "--set", f"data.path={tmp_path}/nodata"]
    r = subprocess.run(
        [sys.executable, "-c", script, *args, "--set", f"checkpoint.dir={tmp_path}/ckpt", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "exit 2 initialized False" in r.stdout, r.stderr[-2000:]
