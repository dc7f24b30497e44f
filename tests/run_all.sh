#!/usr/bin/env bash
# The whole test suite, set-up included: creates/reuses .venv, then runs every test on CPU
# (multi-rank cases use gloo). Extra arguments go to pytest, e.g. `bash tests/run_all.sh -k blend`, or
# `bash tests/run_all.sh -m "not slow"` for the unit layer (no test that starts processes; tests/conftest.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
export TORCH_EXTENSIONS_DIR="$ROOT/.venv/torch_extensions" WANDB_MODE=offline HF_HUB_OFFLINE=1 \
       GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PATH="$ROOT/.venv/bin:$PATH"
cd "$ROOT"
echo "[tests] running the suite with $(.venv/bin/python --version)"
exec .venv/bin/python -m pytest tests -q -rs --durations=15 -p no:cacheprovider --timeout=900 "$@"
