#!/usr/bin/env bash
#PBS -l select=2:system=polaris
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:eagle
#PBS -q debug
# Polaris (4 × NVIDIA A100 a node): one rank per GPU, launched by PALS' mpiexec (--envall, --ppn 4, --hostfile
# $PBS_NODEFILE, --cpu-bind depth), NCCL backend, upstream's Polaris defaults (DTYPE=fp16, GRAD_ACC_STEPS=8).
#   qsub -A <project> ALCF/train_polaris.sh      or, inside a job:
#   MODEL_ARCH=AuroraGPT-2B DATA_FILE_LIST=/path/list.txt bash ALCF/train_polaris.sh [--flag value ...]
#   DRY_RUN=1 MOCK_DATA=1 bash ALCF/train_polaris.sh
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
if [[ "${DRY_RUN:-0}" != 1 ]] && command -v module >/dev/null 2>&1 && [[ "${LOAD_MODULES:-1}" == 1 ]]; then
  module use /soft/modulefiles && module load conda && conda activate base
fi
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB} NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-1}
alcf_activate
alcf_launch polaris "$@"
