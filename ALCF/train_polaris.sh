#!/usr/bin/env bash
#PBS -l select=2:system=polaris
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:eagle
#PBS -q debug
# Polaris (4 × NVIDIA A100 a node): one rank per GPU, launched by PALS' mpiexec, NCCL backend.
#   qsub -A <project> ALCF/train_polaris.sh      or, inside a job:
#   MODEL_PRESET=auroragpt-2b TP=2 DATA_FILE_LIST=/path/list.txt bash ALCF/train_polaris.sh
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
cd "$REPO_ROOT"

if command -v module >/dev/null 2>&1 && [[ "${LOAD_MODULES:-1}" == 1 ]]; then
  module use /soft/modulefiles && module load conda && conda activate base
fi
[[ -f "$REPO_ROOT/.venv/bin/activate" ]] && source "$REPO_ROOT/.venv/bin/activate"

NHOSTS=$(alcf_num_hosts)
NGPU_PER_HOST=${NGPU_PER_HOST:-4}
NGPUS=$((NHOSTS * NGPU_PER_HOST))
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB} NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-1}
export MODEL_PRESET=${MODEL_PRESET:-auroragpt-2b} DTYPE=${DTYPE:-bf16} PEAK_TFLOPS=${PEAK_TFLOPS:-312}

megatron_flags
echo "[polaris] $NHOSTS hosts × $NGPU_PER_HOST GPUs = $NGPUS ranks"
set -x
mpiexec -n "$NGPUS" --ppn "$NGPU_PER_HOST" --depth "${DEPTH:-16}" --cpu-bind "${CPU_BIND:-depth}" \
  python pretrain_gpt.py --distributed-backend nccl "${MEGATRON_FLAGS[@]}" "$@"
