#!/usr/bin/env bash
# Create .venv with a CPU torch (or keep the CUDA one a GPU image already has) and install this package.
# Usage: bash scripts/setup_env.sh [extras], e.g. bash scripts/setup_env.sh test   (extras: test, hf, gpu, dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU build on CPU machines.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[${extras}]"
else
  .venv/bin/python -m pip install -q -e .
fi
