#!/usr/bin/env bash
# Shared start of the ALCF recipes: the machine's software environment, then ALCF/recipe.py, which reads
# upstream's knobs (argonne-lcf/Megatron-DeepSpeed ALCF/helpers.sh names and defaults: MODEL_ARCH, TP, PP, SP,
# ZERO_STAGE, MICRO_BATCH, GRAD_ACC_STEPS, GLOBAL_BATCH, TRAIN_TOKENS/TRAIN_ITERS, LR, LR_DECAY_STYLE,
# LR_WARMUP_FRAC, LR_DECAY_ITERS, OPT, ADAM_BETA1/2, ADAM_EPS, WEIGHT_DECAY, CLIP_GRAD, DTYPE, ROPE_THETA,
# USE_ACTIVATION_CHECKPOINTING, ACT_CKPT_NUM_LAYERS, TIMING_LOG_LEVEL, DATA_FILE_LIST, TOKENIZER_TYPE,
# TOKENIZER_MODEL, CKPT_DIR, LOAD, SAVE, ... see ALCF/recipe.py), refuses unknown or conflicting ones before
# launching, and runs mpiexec with its output teed to logs/<run>/<date>_<ws>_<host>/output.log (as upstream).
# OPT is any --optimizer name (the whole-matrix muon, muonclip, dshampooadamw, galoreadamw, adam8bit with the
# default bf16 too); what the engine would refuse on the machine's accelerator stops the recipe before launch.
# DRY_RUN=1 prints the resolved run (and its upstream-named run directory) instead. Flags after the script name are
# appended (they win).

ALCF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$ALCF_DIR/.." && pwd)"

alcf_activate() {  # the project's virtual environment on top of the machine's module, unless one is active
  if [[ -z "${VIRTUAL_ENV:-}" && -f "$REPO_ROOT/.venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$REPO_ROOT/.venv/bin/activate"
  fi
}

alcf_launch() {  # alcf_launch MACHINE [flags...]
  local machine="$1"; shift
  cd "$REPO_ROOT"
  exec python3 "$ALCF_DIR/recipe.py" "$machine" "$@"
}
