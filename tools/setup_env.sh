#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv/ at the repository root.
# Order matters: torch is installed first (the CPU build on machines without a GPU), then the
# project and its dependencies with `pip -c constraints.txt` so nothing replaces that torch.
# Idempotent: a stamp records what was installed; a second run with the same inputs does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="$(sed -n 's/^torch==\(.*\)$/\1/p' "$ROOT/constraints.txt")"
EXTRAS="${MEGATRON_EXTRAS:-test,tracking,local-mpi,serve,eval}"
STAMP="$VENV/.megatron-setup"
want="$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" "$0" | sha256sum | cut -c1-16) extras=$EXTRAS"

say() { echo "[setup] $*"; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  say "reusing $VENV (already set up for this revision of setup.py/constraints.txt)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
installed_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ "${installed_torch%%+*}" == "$TORCH_VERSION" ]]; then
  say "torch $installed_torch already installed"
elif have_gpu; then
  say "installing torch==$TORCH_VERSION (CUDA build: a GPU is present)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
else
  # No GPU: the CPU build, never a multi-GB CUDA wheel. A local wheel (pip find-links) is used
  # when there is one; otherwise PyTorch's CPU index (override with TORCH_CPU_INDEX).
  say "installing torch==$TORCH_VERSION, CPU build (no GPU found)"
  if ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi

say "installing the project ([$EXTRAS]) with torch pinned by constraints.txt"
"${PIP[@]}" install -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"

if ! have_gpu; then
  "$VENV/bin/python" - <<'PY'
import torch, sys
if torch.version.cuda:
    sys.exit(f"[setup] a CUDA torch ({torch.__version__}) was installed on a machine without a GPU: "
             "remove .venv and rerun, or check that nothing overrode constraints.txt")
print(f"[setup] torch {torch.__version__} (CPU build)")
PY
fi
mkdir -p "$VENV/torch_extensions"
echo "$want" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate' (mpiexec: $(command -v "$VENV/bin/mpiexec" || command -v mpiexec || echo none))"
