#!/usr/bin/env bash
# Single node, any GPU count: run a megatron-elastic subcommand on every local GPU.
#
#   launch/torchrun.sh train --config examples/nemotron_nano_v2_12b/elastic.yaml
#   NPROC_PER_NODE=4 launch/torchrun.sh importance --checkpoint ... --out ...
#
# `train` gets --auto-resume (continue from checkpoint.dir when it has a checkpoint). Exit code 99 means the
# run checkpointed on SIGTERM/SIGUSR1 (sent to this script, which passes SIGUSR1 to every rank) and wants to be
# restarted (torchrun itself reports 1 when its workers exit 99: the ranks' requeue marker says it instead).
# Exit code 2 means a rank stopped on a bad input (its one-line error names the fix): running again cannot help.
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
for a in "${args[@]}"; do  # the subcommand: the first word that is not a global option (`--debug train ...`)
  if [ "${a#-}" = "${a}" ]; then
    [ "${a}" = "train" ] && args+=("--auto-resume")
    break
  fi
done

marker_dir="$(mktemp -d)"
trap 'rm -rf "${marker_dir}"' EXIT
export MEGATRON_ELASTIC_REQUEUE_MARKER="${marker_dir}/requeue"
export MEGATRON_ELASTIC_BAD_INPUT_MARKER="${marker_dir}/bad-input"  # a rank's exit 2 (torchrun reports 1)
torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC_PER_NODE}" -m megatron_elastic "${args[@]}" &
torchrun_pid=$!
# SIGUSR1/SIGTERM to this script: every rank finishes its step and checkpoints (torchrun would not pass SIGUSR1 on).
# shellcheck disable=SC2329  # invoked by the trap below
forward_signal() { pkill -USR1 -P "${torchrun_pid}" 2>/dev/null || true; }
trap forward_signal USR1 TERM
trap 'kill -TERM "${torchrun_pid}" 2>/dev/null || true' INT  # Ctrl-C (a background job ignores SIGINT itself)
status=0
while true; do
  wait "${torchrun_pid}" && status=0 || status=$?
  if [ "${status}" -gt 128 ] && kill -0 "${torchrun_pid}" 2>/dev/null; then continue; fi  # a trapped signal
  break
done
if [ -f "${MEGATRON_ELASTIC_BAD_INPUT_MARKER}" ]; then
  exit 2
fi
if [ -f "${MEGATRON_ELASTIC_REQUEUE_MARKER}" ]; then
  echo "megatron-elastic: checkpointed on a stop signal; run the same command again to resume" >&2
  exit 99
fi
exit "${status}"
