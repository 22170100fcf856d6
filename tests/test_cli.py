"""Every command has --help; bad arguments give a clear error and exit code 2."""

import subprocess
import sys

import pytest

COMMANDS = ["prepare-data", "pretrain", "demo"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "megatron_elastic", *args], capture_output=True, text=True, timeout=300)


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

    r = run("pretrain", "--config", recipe_path("tiny_parent.yaml"), "--set", f"data.path={tmp_path}/nodata",
            "--set", f"checkpoint.dir={tmp_path}/ckpt", "--no-progress")
    assert r.returncode == 2
    assert "prepare-data" in r.stderr
