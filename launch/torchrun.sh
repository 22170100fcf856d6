#!/usr/bin/env bash
# Single node, any GPU count: run a megatron-elastic subcommand on every local GPU.
#
#   launch/torchrun.sh train --config examples/nemotron_nano_v2_12b/elastic.yaml
#   NPROC_PER_NODE=4 launch/torchrun.sh importance --checkpoint ... --out ...
#
# `train` gets --auto-resume (continue from checkpoint.dir when it has a checkpoint). Exit code 99 means the
# run checkpointed on SIGTERM/SIGUSR1 and wants to be restarted.
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: $0 <megatron-elastic subcommand> [args...]" >&2
  exit 2
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
  else
    NPROC_PER_NODE=1
  fi
fi

# Megatron-Core: one CUDA stream per device for overlapping TP communication with compute.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

args=("$@")
if [ "${args[0]}" = "train" ]; then
  args+=("--auto-resume")
fi

exec torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC_PER_NODE}" -m megatron_elastic "${args[@]}"
