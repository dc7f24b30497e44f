#!/usr/bin/env bash
# The README's main job, on a laptop's or a CI machine's CPU, from a fresh clone:
#   set-up (.venv) → corpus from the Python standard library (3 corpora, 12 files) → SentencePiece
#   tokenizer → parallel preprocessing to .bin/.idx → a data file list blending the corpora →
#   a small Llama-style model (RMSNorm, SwiGLU, RoPE, GQA, untied) trained on 8 CPU ranks through
#   mpiexec with tensor 2 × pipeline 2 × data 2 and ZeRO-1 → checkpoint → Hugging Face
#   directory → text generated from it by our inference engine.
# Data and tokenizer are reused when present; the run directory (runs/demo) is made anew.
# Knobs: TRAIN_ITERS (300), NRANKS (8), TP (2), PP (2), DEMO_DIR (data/demo), RUN_DIR (runs/demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/7 environment (.venv)"
bash tools/setup_env.sh
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$ROOT/.venv/torch_extensions" WANDB_MODE=offline \
       HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo

DEMO_DIR="${DEMO_DIR:-$ROOT/data/demo}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/demo}"
CORPUS="$DEMO_DIR/corpus"
TOKENIZER="$DEMO_DIR/tokenizer/tokenizer.model"
TRAIN_ITERS="${TRAIN_ITERS:-300}" NRANKS="${NRANKS:-8}" TP="${TP:-2}" PP="${PP:-2}"

step "2/7 corpus from the Python standard library → $CORPUS"
if [[ -f "$CORPUS/data_file_list.txt" ]]; then
  echo "reusing $CORPUS"
else
  "$PY" tools/build_corpus.py --output-dir "$CORPUS" --shards 4 --max-mb 4
fi

step "3/7 SentencePiece tokenizer (vocab 4096) → $TOKENIZER"
if [[ -f "$TOKENIZER" ]]; then
  echo "reusing $TOKENIZER"
else
  "$PY" tools/train_tokenizer.py --input "$CORPUS/*/*.jsonl" --type sentencepiece --vocab-size 4096 \
    --output-dir "$(dirname "$TOKENIZER")"
fi

step "4/7 preprocessing every shard to .bin/.idx (2 workers)"
for jsonl in "$CORPUS"/*/*.jsonl; do
  corpus="$(basename "$(dirname "$jsonl")")"; name="$(basename "$jsonl" .jsonl)"
  prefix="$CORPUS/tokenized/$corpus/$name"
  if [[ -f "${prefix}_text_document.idx" ]]; then echo "reusing ${prefix}_text_document"; continue; fi
  "$PY" tools/preprocess_data.py --input "$jsonl" --output-prefix "$prefix" --json-keys text --append-eod \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER" --workers 2 --quiet
done
echo "blend:"; grep -v '^#' "$CORPUS/data_file_list.txt" | awk '{print "  " $0}'

step "5/7 training on $NRANKS CPU ranks: tp $TP × pp $PP × dp $((NRANKS / (TP * PP))), ZeRO-1, $TRAIN_ITERS iterations"
rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR"
MPIEXEC=(mpiexec -n "$NRANKS")
if mpiexec --version 2>/dev/null | grep -qi "open mpi"; then MPIEXEC+=(--allow-run-as-root --oversubscribe); fi
"${MPIEXEC[@]}" "$PY" pretrain_gpt.py \
  --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 8 --num-key-value-heads 4 \
  --seq-length 128 --max-position-embeddings 128 --normalization rmsnorm --swiglu \
  --use-rotary-position-embeddings --rope-theta 10000 --untie-embeddings-and-output-weights \
  --disable-bias-linear --attention-dropout 0 --hidden-dropout 0 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --zero-stage 1 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 --weight-decay 0.1 --clip-grad 1.0 \
  --optimizer adamw --adam-beta2 0.95 \
  --data-file-list "$CORPUS/data_file_list.txt" --split 980,20,0 \
  --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER" \
  --log-interval 25 --eval-interval 100 --eval-iters 4 \
  --save "$RUN_DIR/checkpoints" --save-interval "$TRAIN_ITERS" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --seed 1234

step "6/7 converting the tp $TP × pp $PP checkpoint to Hugging Face → $RUN_DIR/hf"
"$PY" tools/convert_checkpoint.py to-hf --load "$RUN_DIR/checkpoints" --out "$RUN_DIR/hf"

step "7/7 generating with transformers (LlamaForCausalLM from $RUN_DIR/hf)"
"$PY" tools/generate.py --hf "$RUN_DIR/hf" --max-new-tokens 48 --greedy \
  --prompt "def __init__(self" --prompt "import os" --prompt "The "

echo
echo "done: checkpoints in $RUN_DIR/checkpoints, Hugging Face model in $RUN_DIR/hf, TensorBoard logs in $RUN_DIR/tensorboard"
