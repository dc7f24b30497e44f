#!/usr/bin/env bash
#PBS -l select=2
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:flare
#PBS -q debug
# Aurora (Intel Data Center GPU Max, 12 tiles a node): one rank per tile, launched by PALS' mpiexec with
# upstream's conventions (--envall, --ppn 12, --hostfile $PBS_NODEFILE, ezpz's CPU binding list, --line-buffer,
# upstream's CCL/FI environment). Torch's native XPU device; `--distributed-backend ccl` (upstream's CCL=ccl)
# runs as xccl when the oneCCL bindings are not installed.
#   qsub -A <project> ALCF/train_aurora.sh        or, inside an interactive job:
#   MODEL_ARCH=AuroraGPT-2B OPT=adamw DATA_FILE_LIST=/path/list.txt bash ALCF/train_aurora.sh [--flag value ...]
#   OPT=muon MOCK_DATA=1 DRY_RUN=1 bash ALCF/train_aurora.sh   # a whole-matrix optimizer, with the default bf16
#   DRY_RUN=1 MOCK_DATA=1 bash ALCF/train_aurora.sh     # print the mpiexec line, layout, DeepSpeed JSON, memory
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
if [[ "${DRY_RUN:-0}" != 1 ]] && command -v module >/dev/null 2>&1 && [[ "${LOAD_MODULES:-1}" == 1 ]]; then
  module load frameworks
fi
alcf_activate
alcf_launch aurora "$@"
