#!/usr/bin/env bash
#PBS -l select=2
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:flare
#PBS -q debug
# Aurora (Intel Data Center GPU Max, 12 tiles a node): one rank per tile, launched by PALS' mpiexec.
# Torch's native XPU device and the xccl backend are used (oneCCL bindings only if installed).
#   qsub -A <project> ALCF/train_aurora.sh        or, inside an interactive job:
#   MODEL_PRESET=auroragpt-2b TP=2 DATA_FILE_LIST=/path/list.txt bash ALCF/train_aurora.sh
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
cd "$REPO_ROOT"

# The frameworks module provides torch with XPU; activate this project's environment on top of it
# (create it once with: python -m venv --system-site-packages .venv && .venv/bin/pip install -e .[tracking]).
if command -v module >/dev/null 2>&1 && [[ "${LOAD_MODULES:-1}" == 1 ]]; then module load frameworks; fi
[[ -f "$REPO_ROOT/.venv/bin/activate" ]] && source "$REPO_ROOT/.venv/bin/activate"

NHOSTS=$(alcf_num_hosts)
NGPU_PER_HOST=${NGPU_PER_HOST:-12}
NGPUS=$((NHOSTS * NGPU_PER_HOST))
export ZE_FLAT_DEVICE_HIERARCHY=${ZE_FLAT_DEVICE_HIERARCHY:-FLAT}   # each tile is one device
export CCL_KVS_MODE=${CCL_KVS_MODE:-mpi} CCL_PROCESS_LAUNCHER=${CCL_PROCESS_LAUNCHER:-pmix}
export FI_PROVIDER=${FI_PROVIDER:-cxi} TORCH_LLM_ALLREDUCE=${TORCH_LLM_ALLREDUCE:-1}
export MODEL_PRESET=${MODEL_PRESET:-auroragpt-7b} DTYPE=${DTYPE:-bf16} PEAK_TFLOPS=${PEAK_TFLOPS:-229}

megatron_flags
echo "[aurora] $NHOSTS hosts × $NGPU_PER_HOST tiles = $NGPUS ranks"
set -x
mpiexec -n "$NGPUS" --ppn "$NGPU_PER_HOST" --cpu-bind "${CPU_BIND:-depth}" -d "${DEPTH:-8}" \
  python pretrain_gpt.py --distributed-backend "${BACKEND:-xccl}" "${MEGATRON_FLAGS[@]}" "$@"
