#!/usr/bin/env bash
# Set up and run the test suite against each Megatron-Core generation we support (what CI runs).
#
# Usage: bash scripts/run_tests.sh [all|0.16|0.19] [pytest arguments...]
#   0.16: Python 3.11, torch 2.13.0 (CPU), megatron-core 0.16.1  (.venv)
#   0.19: Python 3.12, torch 2.14.1, megatron-core 0.19.2        (.venv-mcore0.19; the Docker image's release)
#   all (default): both legs, one after the other; fails if either fails.
# Tests run in PYTEST_WORKERS processes (default: cores + 1, at most 8; pytest-xdist); -n 0 runs them in one.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
legs="${1:-all}"
[ $# -gt 0 ] && shift
[ "$legs" = all ] && legs="0.16 0.19"
status=0
summary=""
cores=$(nproc 2>/dev/null || echo 2)
workers="${PYTEST_WORKERS:-$((cores + 1))}"  # one more than the cores: the Slurm tests mostly wait
[ "$workers" -gt 8 ] && workers=8
for leg in $legs; do
  start=$SECONDS
  echo "=== megatron-core $leg: setting up ==="
  if ! venv=$(bash scripts/setup_env.sh --mcore "$leg" test | tail -n 1); then
    summary+="megatron-core $leg: set-up failed"$'\n'
    status=1
    continue
  fi
  echo "=== megatron-core $leg: $("$venv/bin/python" -c 'import sys, torch, megatron.core as m; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")' 2>/dev/null) ==="
  "$venv/bin/ruff" format --check . && "$venv/bin/ruff" check .  # style: pyproject.toml [tool.ruff]
  lint=$?
  # pytest-xdist workers, each test file on one worker (a module's fixtures, such as a test Slurm, start once;
  # the longest files first, in tests/conftest.py's order: --no-loadscope-reorder, else xdist deals the files with
  # the most tests first and a one-test file that takes minutes starts last), torch on one thread per worker:
  # multi-rank tests and the CLI's subprocesses do not oversubscribe the cores, and a test that waits on Slurm
  # leaves its core to the others.
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$venv/bin/python" -m pytest -q -n "$workers" --dist loadfile \
    --no-loadscope-reorder "$@"
  rc=$?
  if [ $lint -ne 0 ]; then
    summary+="megatron-core $leg: ruff format/lint failed (fix: ruff format . && ruff check --fix .)"$'\n'
    status=1
  fi
  [ $rc -ne 0 ] && status=1
  summary+="megatron-core $leg: pytest exit $rc in $((SECONDS - start)) s (set-up included)"$'\n'
done
printf '\n%s' "$summary"
exit $status
