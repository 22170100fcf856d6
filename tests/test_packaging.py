"""The package a non-editable install ships (what the Docker image and `pip install .` get) is whole: a wheel
built from this checkout, installed into a fresh directory and used from outside the checkout, imports every
module of the source tree and answers --help for every subcommand through the console script."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _source_modules():
    """Every module under megatron_elastic/ in the checkout, as a dotted name."""
    mods = []
    for d, _, files in os.walk(os.path.join(ROOT, "megatron_elastic")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                mods.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(mods)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target directory, environment) of a non-editable install of a wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: a build/ directory left in the checkout would fill the gaps.
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.egg-info", "runs", "__pycache__", "docs", "tests", "benchmarks"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheels = list((tmp / "dist").glob("megatron_elastic-*.whl"))
    assert len(wheels) == 1, wheels
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheels[0])],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The install comes first on the path; the checkout (and its editable install) must not be needed.
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONSAFEPATH="1")
    return wheels[0], target, env


def test_wheel_holds_every_module_and_recipe(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [
        m
        for m in _source_modules()
        if m.replace(".", "/") + ".py" not in names and m.replace(".", "/") + "/__init__.py" not in names
    ]
    assert not missing, f"modules left out of the wheel (a directory without __init__.py?): {missing}"
    recipes = [
        f for f in os.listdir(os.path.join(ROOT, "megatron_elastic", "recipes")) if f.endswith((".yaml", ".json"))
    ]
    assert recipes and all(f"megatron_elastic/recipes/{f}" in names for f in recipes)


def test_installed_package_imports_every_module_outside_the_checkout(installed, tmp_path):
    _, target, env = installed
    modules = [m for m in _source_modules() if not m.endswith(".__main__")]  # __main__ runs the CLI
    code = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (m, mod.__file__)\n"
        "print(len(mods))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == len(modules)


def test_console_script_and_every_subcommand_help(installed, tmp_path):
    _, target, env = installed
    script = target / "bin" / "megatron-elastic"
    r = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "usage: megatron-elastic" in r.stdout, r.stderr[-3000:]
    code = (
        "import contextlib, io\n"
        "from megatron_elastic.cli import build_parser, main\n"
        "commands = list(build_parser()._subparsers._group_actions[0].choices)\n"
        "for c in commands:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            main([c, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (c, e.code)\n"
        "    assert out.getvalue().startswith('usage: megatron-elastic ' + c), c\n"
        "print(' '.join(commands))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"prepare-data", "pretrain", "importance", "train", "extract", "demo"} <= set(r.stdout.split())


def test_installed_package_builds_its_cpu_kernels_from_the_shipped_source(installed, tmp_path):
    """The wheel carries the C source of the compiled CPU kernels; installed (outside the checkout), it builds them
    into a fresh cache on first use (``MEGATRON_ELASTIC_CPU_KERNELS=native``: an error if it cannot)."""
    wheel, target, env = installed
    assert "megatron_elastic/ops/csrc/cpu_kernels.c" in set(zipfile.ZipFile(wheel).namelist())
    from megatron_elastic.ops import native

    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    env = {**env, "MEGATRON_ELASTIC_CPU_KERNELS": "native", "MEGATRON_ELASTIC_CACHE": str(tmp_path / "cache")}
    code = (
        "from megatron_elastic.ops import native\n"
        f"assert native.SOURCE.is_relative_to({str(target)!r}), native.SOURCE\n"
        "print(native.library()._name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith(str(tmp_path / "cache")), r.stdout
