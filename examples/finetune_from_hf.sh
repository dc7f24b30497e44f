#!/usr/bin/env bash
# Continue training a local Hugging Face Llama or GPT-2 directory at tensor 2 × pipeline 2 on 4 ranks:
# convert it to our checkpoint layout, then --load it with --finetune (weights only).
#   bash examples/finetune_from_hf.sh HF_DIR DATA_FILE_LIST [extra pretrain_gpt.py flags]
# The model flags must describe the same architecture as HF_DIR's config.json (the loader checks).
set -euo pipefail
HF_DIR="${1:?usage: finetune_from_hf.sh HF_DIR DATA_FILE_LIST [flags]}"
DATA_FILE_LIST="${2:?usage: finetune_from_hf.sh HF_DIR DATA_FILE_LIST [flags]}"
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
CKPT="${CKPT:-$ROOT/runs/from-hf}"
.venv/bin/python tools/convert_checkpoint.py from-hf --hf-dir "$HF_DIR" --save "$CKPT/initial" --tp 2 --pp 2
.venv/bin/mpiexec -n 4 .venv/bin/python pretrain_gpt.py --tensor-model-parallel-size 2 \
  --pipeline-model-parallel-size 2 --load "$CKPT/initial" --finetune --save "$CKPT/finetuned" \
  --data-file-list "$DATA_FILE_LIST" --tokenizer-type HFTokenizer --tokenizer-model "$HF_DIR" "$@"
