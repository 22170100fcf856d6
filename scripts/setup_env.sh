#!/usr/bin/env bash
# Create a virtual environment for one Megatron-Core generation and install this package into it (editable).
#
# Usage: bash scripts/setup_env.sh [--mcore 0.16|0.19] [extras]      extras: eval (the default: the demo's
#                                                                    lm-eval table), test, hf, gpu, dev
#   --mcore 0.16 (default)  .venv              Python 3.11 (python3), CPU torch 2.13.0, megatron-core 0.16.1
#   --mcore 0.19            .venv-mcore0.19    Python 3.12 (python3.12 on PATH, or pyenv's 3.12.x),
#                                              torch 2.14.1 (a CUDA build; runs on the CPU), megatron-core 0.19.2,
#                                              the release the Docker image pins and clusters run
# Prints the venv directory on its last line. A venv that already has torch keeps it (e.g. a GPU image's).
set -euo pipefail
cd "$(dirname "$0")/.."
mcore=0.16
if [ "${1:-}" = "--mcore" ]; then
  mcore="${2:?--mcore needs 0.16 or 0.19}"
  shift 2
fi
extras="${1:-eval}"  # the demo's report scores every budget with lm-evaluation-harness

case "$mcore" in
  0.16)
    venv=.venv; torch_pin="torch==2.13.0"; mcore_pin="megatron-core==0.16.1"
    python=python3 ;;
  0.19)
    venv=.venv-mcore0.19; torch_pin="torch==2.14.1"; mcore_pin="megatron-core==0.19.2"
    # A python3.12 on PATH that runs (a pyenv shim may not), else pyenv's newest 3.12.x.
    python=""
    pyenv_versions="$(pyenv root 2>/dev/null || echo /nonexistent)/versions"
    for candidate in python3.12 $(find "$pyenv_versions" -maxdepth 3 -path "*/3.12*/bin/python" 2>/dev/null | sort -rV); do
      if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        python=$candidate
        break
      fi
    done
    if [ -z "$python" ]; then
      echo "setup_env.sh: megatron-core 0.19 needs Python 3.12, and none was found (no python3.12 on PATH, no" \
           "pyenv 3.12.x). Fix: 'pyenv install 3.12.1' or put a python3.12 on PATH." >&2
      exit 2
    fi ;;
  *)
    echo "setup_env.sh: --mcore must be 0.16 or 0.19, got '$mcore'" >&2
    exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU build on CPU machines.
  "$venv/bin/python" -m pip install -q "$torch_pin"
fi
"$venv/bin/python" -m pip install -q "$mcore_pin" -e ".${extras:+[$extras]}"
echo "$venv"
