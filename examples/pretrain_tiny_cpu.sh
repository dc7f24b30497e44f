#!/usr/bin/env bash
# Smallest end-to-end training: 4 CPU ranks under torchrun (tensor 2 × data 2, ZeRO-2) on mock data,
# checkpointing every 50 steps; rerun it and it resumes from the last checkpoint.
#   bash examples/pretrain_tiny_cpu.sh [extra pretrain_gpt.py flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
export TORCH_EXTENSIONS_DIR="$ROOT/.venv/torch_extensions" GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
SAVE="${SAVE:-$ROOT/runs/tiny-cpu}"
.venv/bin/torchrun --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29531}" \
  pretrain_gpt.py --model-preset tiny --mock-data --vocab-size 512 \
  --tensor-model-parallel-size 2 --zero-stage 2 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters 200 \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  --log-interval 10 --eval-interval 100 --eval-iters 2 \
  --save "$SAVE" --load "$SAVE" --save-interval 50 "$@"
