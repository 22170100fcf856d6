#!/usr/bin/env bash
# Submit the two curriculum stages as two dependent Slurm jobs (stage 2 starts when stage 1 succeeded, and is
# cancelled when stage 1 failed for good), each with its own node count and time limit. Both resume from the same
# checkpoint.dir. Run it once: it submits the whole curriculum.
#
#   CONFIG=examples/nemotron_nano_v2_12b/elastic.yaml NODES_STAGE1=16 NODES_STAGE2=16 \
#     launch/slurm/submit_curriculum.sh [extra `train` arguments, e.g. --set train.eval_interval=1000]
#
# AFTER: a job id stage 1 waits for (afterok; cancelled if it fails), e.g. the importance job's, so the whole
# pipeline is submitted at once.
# SBATCH_ARGS: more sbatch options for both jobs, e.g. "--account=abc --partition=batch" (Slurm's own SBATCH_*
# variables, e.g. SBATCH_ACCOUNT, work too).
# The last line printed is stage 2's job id alone (for a later job's --dependency).
set -euo pipefail

CONFIG="${CONFIG:?set CONFIG to the elastic YAML}"
NODES_STAGE1="${NODES_STAGE1:-16}"
NODES_STAGE2="${NODES_STAGE2:-${NODES_STAGE1}}"
TIME_STAGE1="${TIME_STAGE1:-04:00:00}"
TIME_STAGE2="${TIME_STAGE2:-04:00:00}"
here="$(cd "$(dirname "$0")" && pwd)"
read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
after=()
if [ -n "${AFTER:-}" ]; then
  if ! [[ "${AFTER}" =~ ^[0-9]+$ ]]; then
    echo "AFTER must be one Slurm job id (digits), got '${AFTER}'" >&2
    exit 2
  fi
  after=(--dependency "afterok:${AFTER}" --kill-on-invalid-dep=yes)
fi

stage1=$(sbatch --parsable "${sbatch_args[@]}" --job-name elastic-stage1 --nodes "${NODES_STAGE1}" --time "${TIME_STAGE1}" --exclusive \
  "${after[@]}" "${here}/megatron_elastic.sbatch" train --config "${CONFIG}" --until-stage 1 "$@")
echo "stage 1: job ${stage1}${AFTER:+ (after ${AFTER})}"
stage2=$(sbatch --parsable "${sbatch_args[@]}" --job-name elastic-stage2 --nodes "${NODES_STAGE2}" --time "${TIME_STAGE2}" --exclusive \
  --dependency "afterok:${stage1}" --kill-on-invalid-dep=yes "${here}/megatron_elastic.sbatch" train --config "${CONFIG}" "$@")
echo "stage 2: job ${stage2} (after ${stage1})"
echo "${stage2}"
