#!/usr/bin/env bash
# The checks that need an NVIDIA GPU (CUDA), in one short script (a few minutes); the test suite never runs it.
#   source .venv/bin/activate && bash benchmarks/device_check.sh        (OUT_DIR=... keeps the logs there)
# Items, each PASS or FAIL with its step times:
#   1. --optimizer galoreadamw8bit: pretrain_gpt.py, one GPU, fp32, ZeRO-0, a few steps (bitsandbytes' 8-bit
#      GaLore runs on CUDA only, so nothing else exercises it);
#   2. --optimizer galoreadamw8bitperlayer: the same with the per-parameter step inside backward (one rank,
#      no accumulation, no clipping: the flags it requires);
#   3. galoreadamw8bit in bf16 at ZeRO-1 (fp32 masters by whole matrix, megatron/optimizer/mixed_precision.py), and
#      muon in fp16 at ZeRO-1 (the same path with dynamic loss scaling, which CPUs cannot run; its first steps
#      may be skipped while the scale comes down from --initial-loss-scale 65536, so skips are allowed there);
#   4. the bf16 rows of benchmarks/bench_optimizers.py (--bf16 --zero-stage 1 against AdamW bf16, dp 1, or
#      dp 1 and 2 where two GPUs are visible): one item per optimizer, plus the benchmark's table and targets.
# A training item passes when its run exits 0, logs every iteration, and its losses are finite with no skipped
# (but for the fp16 item) or NaN iteration; a bf16 row passes when it trained (not refused) to a finite loss.
# Exit status: 0 when every item passed, 1 when one failed, 2 when no CUDA GPU is visible (nothing is run). It
# installs nothing: run it in the project's environment (PYTHON=... names another interpreter; STEPS=8 the
# steps of each training item; OUT_DIR=... keeps the logs there).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
STEPS="${STEPS:-8}"

if ! gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>&1); then
  echo "device_check.sh: cannot import torch with $PY ($gpus); activate the project's environment first" >&2
  exit 2
fi
gpus="${gpus##*$'\n'}"
if [[ "$gpus" -lt 1 ]]; then
  echo "device_check.sh: no CUDA GPU is visible (torch.cuda.is_available() is False): these checks need an" \
    "NVIDIA GPU; nothing was run" >&2
  exit 2
fi
OUT_DIR="${OUT_DIR:-$(mktemp -d -t device_check.XXXXXX)}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
echo "device_check.sh: $gpus GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'); commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown); logs in $OUT_DIR"
failed=0

# train NAME [flags...]: a few steps through pretrain_gpt.py on one GPU; PASS/FAIL with the step times of its log
train() {
  local name="$1"; shift
  local log="$OUT_DIR/$name.log"
  local start=$SECONDS
  timeout 300 "$PY" pretrain_gpt.py --model-preset tiny --mock-data --vocab-size 512 --seq-length 256 \
    --micro-batch-size 4 --global-batch-size 4 --train-iters "$STEPS" --lr 1e-3 --lr-decay-style constant \
    --log-interval 1 --eval-iters 0 --seed 1234 "$@" >"$log" 2>&1
  local rc=$?
  local verdict
  verdict=$("$PY" - "$log" "$STEPS" "$rc" "${ALLOW_SKIPS:-0}" <<'EOF'
import math, re, sys
log, steps, rc = open(sys.argv[1], errors="replace").read(), int(sys.argv[2]), int(sys.argv[3])
losses = [float(x) for x in re.findall(r"lm loss=\s*([-+0-9.eEnaNinf]+)", log)]
times = [float(x) for x in re.findall(r"elapsed_time_per_iteration_ms=\s*([0-9.]+)", log)]
kinds = "nan" if sys.argv[4] == "1" else "(?:skipped|nan)"
bad = re.findall(r"number_of_" + kinds + r"_iterations=\s*([1-9][0-9]*)", log)
skipped = sum(int(x) for x in re.findall(r"number_of_skipped_iterations=\s*([0-9]+)", log))  # per log line
logged = len(re.findall(r" iteration=\s*[0-9]+/", log))  # a skipped iteration's line has no loss (upstream's)
why = []
if rc:
    why.append(f"exit code {rc}")
if logged != steps:
    why.append(f"{logged} of {steps} iterations logged")
if not losses or len(losses) + skipped < steps:
    why.append(f"{len(losses)} losses for {steps - skipped} applied iterations")
if any(not math.isfinite(x) for x in losses):
    why.append("a non-finite loss")
if bad:
    why.append("skipped or NaN iterations")
if skipped >= steps:
    why.append("every iteration skipped")
steady = times[1:] or times
timing = f"step {min(steady):.1f} ms fastest, {sorted(steady)[len(steady) // 2]:.1f} ms median" if steady else "no step times"
loss = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss"
print(("FAIL (" + "; ".join(why) + ")" if why else "PASS") + f"  {timing}; {loss}"
      + (f"; {skipped} skipped (loss scale)" if skipped and not why else ""))
EOF
)
  echo "$name: $verdict  [$((SECONDS - start)) s, $log]"
  if [[ "$verdict" != PASS* ]]; then
    failed=1
    tail -n 5 "$log" | sed 's/^/    /'
  fi
}

train galoreadamw8bit --optimizer galoreadamw8bit --zero-stage 0 --clip-grad 1.0
train galoreadamw8bitperlayer --optimizer galoreadamw8bitperlayer --zero-stage 0 --clip-grad 0
train galoreadamw8bit-bf16-zero1 --optimizer galoreadamw8bit --bf16 --zero-stage 1 --clip-grad 1.0
ALLOW_SKIPS=1 train muon-fp16-zero1 --optimizer muon --fp16 --initial-loss-scale 65536 --zero-stage 1 --clip-grad 1.0

dp=1
[[ "$gpus" -ge 2 ]] && dp=1,2
echo "bf16 rows of benchmarks/bench_optimizers.py (dp $dp):"
timeout 420 "$PY" benchmarks/bench_optimizers.py --device cuda --mock-data --optimizers none --bf16-dp "$dp" \
  --bf16-steps 20 --json "$OUT_DIR/bench_optimizers.json" >"$OUT_DIR/bench_optimizers.log" 2>&1
rc=$?
sed -n '/^bf16, ZeRO-1/,$p' "$OUT_DIR/bench_optimizers.log"
rows=$("$PY" - "$OUT_DIR/bench_optimizers.json" <<'EOF'
import json, math, sys
try:
    bf16 = json.load(open(sys.argv[1]))["bf16"]
except (OSError, KeyError, ValueError) as e:
    print(f"bf16 rows: FAIL (no results: {e})")
    sys.exit(0)
for dp, rows in bf16.items():
    for name, ranks in rows.items():
        r = ranks[0]
        if "refused" in r:
            reason = r["refused"].splitlines()[-1].strip()
            print(f"bf16 {name} dp {dp}: FAIL (refused: {reason[2:] if reason.startswith('- ') else reason})")
        elif not all(math.isfinite(x) for x in r["losses"]):
            print(f"bf16 {name} dp {dp}: FAIL (a non-finite loss)")
        else:
            print(f"bf16 {name} dp {dp}: PASS  step {r['step_min_s'] * 1e3:.1f} ms fastest, {r['step_s'] * 1e3:.1f} ms "
                  f"median; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
EOF
)
echo "$rows"
if [[ $rc -ne 0 ]]; then
  echo "bench_optimizers.py: FAIL (exit code $rc; $OUT_DIR/bench_optimizers.log)"
  tail -n 5 "$OUT_DIR/bench_optimizers.log" | sed 's/^/    /'
  failed=1
fi
grep -q FAIL <<<"$rows" && failed=1

if [[ $failed -ne 0 ]]; then
  echo "device_check.sh: FAILED (logs in $OUT_DIR)"
  exit 1
fi
echo "device_check.sh: all items passed"
