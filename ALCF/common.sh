#!/usr/bin/env bash
# Shared pieces of the ALCF recipes: read the run's shape from environment variables (with
# defaults), turn it into Megatron-DeepSpeed flags, and count hosts/ranks from PBS.
# Source it; then "${MEGATRON_FLAGS[@]}" holds the pretrain_gpt.py flags.
#
# Variables (all optional): MODEL_PRESET (auroragpt-7b), NLAYERS HIDDEN HEADS KV_HEADS FFN SEQ,
# TP PP SP (Ulysses) ZERO_STAGE MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS TRAIN_TOKENS LR MIN_LR
# LR_WARMUP_FRACTION LR_DECAY_STYLE OPT (adamw) DTYPE (bf16|fp16|fp32) CPU_OPTIMIZER=1 ACT_CKPT=1
# DATA_FILE_LIST DATA_PATH MOCK_DATA=1 VOCAB_SIZE TOKENIZER_TYPE TOKENIZER_MODEL VOCAB_FILE MERGE_FILE
# SAVE LOAD SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS TENSORBOARD_DIR WANDB_PROJECT
# PEAK_TFLOPS EXTRA_FLAGS (appended verbatim).

ALCF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$ALCF_DIR/.." && pwd)"

alcf_num_hosts() {
  if [[ -n "${PBS_NODEFILE:-}" && -f "$PBS_NODEFILE" ]]; then wc -l < "$PBS_NODEFILE"; else echo 1; fi
}

megatron_flags() {
  MEGATRON_FLAGS=()
  add() { MEGATRON_FLAGS+=("$@"); }
  [[ -n "${MODEL_PRESET:-}" ]] && add --model-preset "$MODEL_PRESET"
  [[ -n "${NLAYERS:-}" ]] && add --num-layers "$NLAYERS"
  [[ -n "${HIDDEN:-}" ]] && add --hidden-size "$HIDDEN"
  [[ -n "${HEADS:-}" ]] && add --num-attention-heads "$HEADS"
  [[ -n "${KV_HEADS:-}" ]] && add --num-key-value-heads "$KV_HEADS"
  [[ -n "${FFN:-}" ]] && add --ffn-hidden-size "$FFN"
  [[ -n "${SEQ:-}" ]] && add --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  add --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
  [[ "${PP:-1}" == 1 ]] && add --no-pipeline-parallel
  [[ "${SP:-1}" != 1 ]] && add --ds-sequence-parallel-size "$SP"
  [[ "${TP:-1}" != 1 && "${MEGATRON_SP:-0}" == 1 ]] && add --sequence-parallel
  add --deepspeed --zero-stage "${ZERO_STAGE:-1}"
  [[ "${CPU_OPTIMIZER:-0}" == 1 ]] && add --cpu-optimizer
  [[ "${ACT_CKPT:-0}" == 1 ]] && add --checkpoint-activations --checkpoint-num-layers "${ACT_CKPT_LAYERS:-1}"
  add --micro-batch-size "${MICRO_BATCH:-1}"
  [[ -n "${GLOBAL_BATCH:-}" ]] && add --global-batch-size "$GLOBAL_BATCH"
  if [[ -n "${TRAIN_TOKENS:-}" ]]; then add --train-tokens "$TRAIN_TOKENS"; else add --train-iters "${TRAIN_ITERS:-1000}"; fi
  add --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}" --lr-decay-style "${LR_DECAY_STYLE:-cosine}" \
      --lr-warmup-fraction "${LR_WARMUP_FRACTION:-0.01}" --weight-decay "${WEIGHT_DECAY:-0.1}" \
      --clip-grad "${CLIP_GRAD:-1.0}" --adam-beta1 0.9 --adam-beta2 "${ADAM_BETA2:-0.95}" --adam-eps 1e-8
  add --optimizer "${OPT:-${OPTIMIZER:-${OPTIM:-adamw}}}"  # upstream's helpers.sh: OPT, default adamw
  case "${DTYPE:-bf16}" in
    bf16) add --bf16 ;; fp16) add --fp16 ;; fp32) ;;
    *) echo "DTYPE=${DTYPE} is not one of bf16, fp16, fp32" >&2; return 1 ;;
  esac
  if [[ "${MOCK_DATA:-0}" == 1 ]]; then
    add --mock-data --vocab-size "${VOCAB_SIZE:-32000}" --tokenizer-type NullTokenizer
  else
    [[ -n "${DATA_FILE_LIST:-}" ]] && add --data-file-list "$DATA_FILE_LIST"
    [[ -n "${DATA_PATH:-}" ]] && add --data-path $DATA_PATH
    add --tokenizer-type "${TOKENIZER_TYPE:-Llama2Tokenizer}"
    [[ -n "${TOKENIZER_MODEL:-}" ]] && add --tokenizer-model "$TOKENIZER_MODEL"
    [[ -n "${VOCAB_FILE:-}" ]] && add --vocab-file "$VOCAB_FILE"
    [[ -n "${MERGE_FILE:-}" ]] && add --merge-file "$MERGE_FILE"
  fi
  [[ -n "${SAVE:-}" ]] && add --save "$SAVE" --save-interval "${SAVE_INTERVAL:-1000}"
  [[ -n "${LOAD:-}" ]] && add --load "$LOAD"
  add --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}"
  [[ -n "${TENSORBOARD_DIR:-}" ]] && add --tensorboard-dir "$TENSORBOARD_DIR"
  [[ -n "${WANDB_PROJECT:-}" ]] && add --wandb-project "$WANDB_PROJECT"
  [[ -n "${PEAK_TFLOPS:-}" ]] && add --peak-tflops "$PEAK_TFLOPS"
  [[ -n "${SEED:-}" ]] && add --seed "$SEED"
  if [[ -n "${EXTRA_FLAGS:-}" ]]; then
    # shellcheck disable=SC2206
    local extra=($EXTRA_FLAGS); add "${extra[@]}"
  fi
  return 0
}
