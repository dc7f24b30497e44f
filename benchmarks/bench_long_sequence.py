"""The longest sequence one full training step can train under a fixed memory cap per rank: our layouts vs HF.

What one trial is: one optimizer step (forward, backward, AdamW step, with the first step's Adam state) of a
fixed small Llama (default: 2 layers, hidden 128, 16 heads / 8 KV heads (GQA, head size 8), SwiGLU 352, RoPE,
RMSNorm, untied embeddings, a real 32,000-token vocabulary so that the logits matter), micro-batch 1, fp32, on N ranks
started as fresh processes (RANK / WORLD_SIZE / MASTER_* as torchrun sets them; gloo). A trial "fits" when
every rank finishes the step under the cap. A failed allocation kills only its trial: each trial is its own set
of processes, one trial at a time.

The cap, per rank. No cgroup is ours to write here (the memory hierarchy belongs to the machine's own job
control), so each rank sets `RLIMIT_DATA` on itself before torch is imported. `RLIMIT_AS` is no use: importing
torch alone maps ~600 MB of address space (shared libraries, reservations) while touching ~220 MB, so an AS cap
measures mappings, not memory. `RLIMIT_DATA` (Linux >= 4.7) counts the private writable mappings, which is
where the heap, torch's tensors (glibc's mmap of large blocks) and thread stacks live; an allocation past it
fails with ENOMEM, which torch raises as "DefaultCPUAllocator: can't allocate memory". Each rank also reports
its peak resident set (`VmHWM` of /proc/self/status, what `getrusage().ru_maxrss` reports) twice: the peak of
building the model and engine, then (the high-water mark reset through /proc/self/clear_refs) the peak of the
step itself. Both are in the table: the cap is what decides "fits"; the step's peak RSS is what the plot and the
fit show (the build's peak does not depend on the sequence).

The scale. The model and the default cap (900 MiB per rank: the processes' own baseline, 350-580 MiB of
resident memory after the build, plus a few hundred MiB) are chosen so that the longest lengths are 1k-20k
tokens and the whole run (all rows at 1, 2, 4 and 8 ranks) takes minutes, not hours, on two cores: ~19 minutes
quiet by the estimate in RESULTS.md (a step's attention costs s² work; at 49k tokens one 8-rank step took 4.5
minutes here). The cap is one for all rows
and the peer; the peer gets the same model and optimizer.

The search, per (row, ranks): from a start length, double while the step fits (the last doubling probes the
bound itself) or halve while it does not, then bisect between the longest fit and the shortest failure until
the gap is at most --tolerance (default 0.25) of the longest fit: the true limit lies in [longest, first
failure). The start is a prediction (predict_start): the same row's longest on fewer ranks, grown per doubling
of ranks as the row grew before (1-2x); --start for a row's first rank count. It saves probes, never decides a
result. The HF peer runs first; our rows' searches stop at 16x its longest (--max-seq 0, the default), the
target, so a row that fits there shows ">= bound": the benchmark does not look further. Lengths are multiples
of 64 × ranks (the sequence is split over the ranks in the sequence-parallel rows). When the best row has fewer
than four fitted lengths, it is measured again at 1/2, 1/4, 1/8 ... of its longest ("fit" trials) so that its
memory fit has a verdict.

Time. Each trial's CPU time (user + system of its rank processes) is recorded; the end prints the wall time and
an estimate for a quiet machine, the sum of each trial's CPU time / min(cores, ranks), since this machine is
shared and the wall time depends on the load (memory does not).

A trial ends as: fits; oom (an allocation failed under the cap: the rank says so, or it died of SIGKILL /
abort with an allocator message); timeout (the step did not finish within --trial-timeout: counted as "does not
fit" and marked, since the bound is then time, not memory); refused (our CLI refused the layout, exit code 2);
error (anything else: the row's search stops and the table shows the message; never counted as memory).

The rows (flags are upstream's), each at 1, 2, 4 and 8 ranks where the layout applies:
  tp            --tensor-model-parallel-size N
  megatron-sp   the same + --sequence-parallel + --checkpoint-activations (full recomputation)
  ulysses-zero3 --ds-sequence-parallel-size N + --zero-stage 3 + --checkpoint-activations
  ulysses-zero3-offload-tiled  the same + --checkpoint-in-cpu + sequence tiling (TILING_FLAGS); reported as not
                available, with the CLI's refusal, while our CLI refuses those flags
  hf            LlamaForCausalLM (SDPA attention, gradient checkpointing, same shapes, untied, same AdamW
                groups and clipping), one process, the same cap

The fit: per row, peak RSS (max over ranks) against sequence length over the trials that fitted, least squares
of m(s) = a + b·s + c·s². The quadratic share is c·s² / (b·s + c·s²) at the longest fitted s: a row counts as
linear when that share is below 10 % (a concave fit, c <= 0, is linear too), and "flat" (linear too) when the
peaks spread less than 5 % of the smallest (the growth is within trial noise: no term of the curve is seen). The targets printed at the end:
the best row at the most ranks trains >= 16x the HF peer's sequence; our best row is linear.

    python benchmarks/bench_long_sequence.py                  # all rows at 1, 2, 4, 8 ranks (~19 min estimated
                                                              # on 2 quiet cores; RESULTS.md has the times)
    python benchmarks/bench_long_sequence.py --quick          # ranks 1 and 2, --tolerance 0.5
    python benchmarks/bench_long_sequence.py --rows ulysses-zero3-offload-tiled,hf --ranks 8   # the 16x target
    python benchmarks/bench_long_sequence.py --hidden 256 --ffn 704 --cap 1536MiB   # the earlier, larger
                                                              # scale (hours for all rows on 2 cores)
    python benchmarks/bench_long_sequence.py --plot-from benchmarks/long_sequence.json   # the PNG only
    python benchmarks/bench_long_sequence.py --table-from benchmarks/long_sequence.json  # the table again

The PNG needs matplotlib (the `bench` extra); without it the run still writes the table, the JSON and the CSV,
and says how to draw the PNG afterwards from the JSON with any Python that has matplotlib (this script's
--plot-from imports neither torch nor megatron).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

ROWS = ("tp", "megatron-sp", "ulysses-zero3", "ulysses-zero3-offload-tiled", "hf")
ROW_TITLES = {
    "tp": "tp only",
    "megatron-sp": "Megatron sp + recompute",
    "ulysses-zero3": "Ulysses + ZeRO-3 + recompute",
    "ulysses-zero3-offload-tiled": "Ulysses + ZeRO-3 + recompute + ckpt offload + tiling",
    "hf": "HF LlamaForCausalLM + grad ckpt (1 process)",
}
# The sequence-tiling flags of the offload row (the tiled MLP and the tiled logits + loss of issue 20).
# --sequence-tile-size stays at its default (the hidden size, in tokens).
TILING_FLAGS: list[str] = ["--checkpoint-in-cpu", "--tiled-mlp", "--tiled-logits-loss"]
QUADRATIC_SHARE_LIMIT = 0.10  # a fit whose s² term is under 10 % of the growth at the longest s counts as linear
# peaks that differ by less than 5 % of the smallest over the fitted lengths are "flat": the growth is within the
# spread of repeated trials (±40 MiB seen at one length), so the s² share of a fit to it says nothing; no term of
# the fitted curve reaches 5 % of the memory, a quadratic one included, and the row counts as linear
FLAT_LIMIT = 0.05
TARGET_RATIO = 16.0
# ZeRO's reduce bucket (elements): DeepSpeed's default of 5e8 is a 2 GB fp32 buffer, over any cap here; 5e6 (20 MB)
# is what a memory-bound run sets.
ZERO_BUCKET = 5_000_000
EXIT_OOM = 3  # a rank whose allocation failed under the cap
OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory", "memoryerror")


# ---------------------------------------------------------------------------------------------- the cap

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1.5GiB', '1536MiB', '1G', '800M', '1073741824' -> bytes (binary units: k = 1024)."""
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and m.group(3).lower() not in ("b", "ib")) or (m.group(3).lower() == "ib"
                                                                             and not m.group(2)):
        raise ValueError(f"memory size {text!r} not understood: give bytes or a number with K, M, G or T "
                         "(binary units), e.g. 1.5GiB or 1536M")
    value = float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    if value < 1:
        raise ValueError(f"memory size {text!r} is zero")
    return int(value)


def format_size(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def set_memory_cap(cap_bytes: int) -> int:
    """Cap this process's data segment (RLIMIT_DATA: heap, anonymous mappings, thread stacks) at cap_bytes,
    soft and hard. Call it before torch is imported. Returns the soft limit now in force."""
    import resource

    if cap_bytes <= 0:
        raise ValueError(f"memory cap must be positive, got {cap_bytes}")
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and cap_bytes > hard:
        raise ValueError(f"memory cap {cap_bytes} is above this process's hard RLIMIT_DATA {hard}")
    resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))
    return resource.getrlimit(resource.RLIMIT_DATA)[0]


def proc_status_bytes(*keys: str) -> dict:
    """{'VmHWM': bytes, ...} from /proc/self/status (kB there)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> int:
    """The peak RSS so far (bytes), then reset the kernel's high-water mark to the current RSS (`5` to
    /proc/self/clear_refs, Linux >= 4.0), so that the next VmHWM is the peak of what follows (the step)."""
    peak = proc_status_bytes("VmHWM")["VmHWM"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


# ---------------------------------------------------------------------------------------------- the search

class TrialError(RuntimeError):
    """A trial that failed for a reason other than memory: the search of its row stops."""


def round_down(n: float, granularity: int) -> int:
    return int(n // granularity) * granularity


def longest_fitting(fits: Callable[[int], bool], start: int, granularity: int, tolerance: float,
                    max_seq: int) -> tuple[Optional[int], Optional[int], list]:
    """(longest fitting length, shortest failing length, [(length, fitted), ...] in probe order).

    From `start` (rounded to the granularity) double while fits() holds, up to max_seq (the last step probes
    max_seq itself), or halve while it does
    not, down to one granularity; then bisect until the gap is at most max(granularity, tolerance × longest
    fit). `fits` may raise TrialError, which propagates (the row stops)."""
    if granularity < 1 or start < 1 or max_seq < granularity:
        raise ValueError(f"bad search bounds: start {start}, granularity {granularity}, max {max_seq}")
    probes: list = []

    def probe(n: int) -> bool:
        ok = bool(fits(n))
        probes.append((n, ok))
        return ok

    top = round_down(max_seq, granularity)
    n = min(max(granularity, round_down(start, granularity)), top)
    lo = hi = None
    if probe(n):
        lo = n
        while hi is None and lo < top:
            n = min(lo * 2, top)  # the last doubling stops at max_seq itself
            if probe(n):
                lo = n
            else:
                hi = n
        if hi is None:
            return lo, None, probes
    else:
        hi = n
        while lo is None and round_down(hi // 2, granularity) >= granularity:
            n = round_down(hi // 2, granularity)
            if probe(n):
                lo = n
            else:
                hi = n
        if lo is None:
            return None, hi, probes
    while hi - lo > max(granularity, tolerance * lo):
        mid = round_down((lo + hi) // 2, granularity)
        if mid <= lo or mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, probes


# ---------------------------------------------------------------------------------------------- the fit

@dataclass
class MemoryFit:
    points: int
    a: Optional[float] = None  # bytes
    b: Optional[float] = None  # bytes per token
    c: Optional[float] = None  # bytes per token²
    quadratic_share: Optional[float] = None  # c·s² / (b·s + c·s²) at the longest fitted s
    verdict: str = "too few points"  # "linear", "flat", "quadratic" or "too few points"
    spread: Optional[float] = None  # bytes: the largest fitted peak less the smallest


def fit_memory(seqs: list, peaks: list, limit: float = QUADRATIC_SHARE_LIMIT) -> MemoryFit:
    """Least squares of peak = a + b·s + c·s² over (s, peak); linear when the s² term's share of the growth at
    the longest s is under `limit` (or c <= 0); flat (and so linear) when the peaks spread less than FLAT_LIMIT
    of the smallest. Needs four distinct lengths."""
    import numpy as np

    pairs = sorted({(int(s), float(p)) for s, p in zip(seqs, peaks) if p is not None})
    if len({s for s, _ in pairs}) < 4:  # three points fit any quadratic exactly: no verdict from them
        return MemoryFit(points=len(pairs))
    s = np.array([p[0] for p in pairs], dtype=np.float64)
    m = np.array([p[1] for p in pairs], dtype=np.float64)
    scale = s.max()
    x = s / scale  # conditioned: s up to 10^6 squared would swamp the constant column
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x, x * x], axis=1), m, rcond=None)
    a, b, c = float(coef[0]), float(coef[1]) / scale, float(coef[2]) / scale ** 2
    smax = float(scale)
    growth = b * smax + c * smax * smax
    if c <= 0:
        share = 0.0
    elif growth <= 0:
        share = 1.0
    else:
        share = c * smax * smax / growth
    spread = float(m.max() - m.min())
    verdict = "flat" if spread < FLAT_LIMIT * float(m.min()) else "linear" if share < limit else "quadratic"
    return MemoryFit(points=len(pairs), a=a, b=b, c=c, quadratic_share=share, verdict=verdict, spread=spread)


# ---------------------------------------------------------------------------------------------- one trial

@dataclass
class Trial:
    row: str
    ranks: int
    seq: int
    status: str  # fits | oom | timeout | refused | error
    reason: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of the trial's rank processes, summed
    peak_rss: list = field(default_factory=list)  # per rank, bytes: VmHWM of the step (reset after the build)
    rss_before_step: list = field(default_factory=list)  # per rank, bytes: VmHWM of the build (model, engine)
    loss: Optional[float] = None
    # per rank, bytes after the step: the parameters this rank holds (its ZeRO-3 partition, its tp shard) and the
    # optimizer's own tensors (its fp32 parameter copies and the Adam state), gradients not counted
    param_bytes: list = field(default_factory=list)
    optimizer_bytes: list = field(default_factory=list)
    purpose: str = "search"  # search | fit (an extra length measured for the memory fit of the best row)

    @property
    def peak(self) -> Optional[int]:
        return max(self.peak_rss) if self.peak_rss else None


def model_flags(a) -> list[str]:
    return ["--num-layers", a.layers, "--hidden-size", a.hidden, "--num-attention-heads", a.heads,
            "--num-key-value-heads", a.kv_heads, "--ffn-hidden-size", a.ffn, "--swiglu", "--normalization",
            "rmsnorm", "--disable-bias-linear", "--use-rotary-position-embeddings",
            "--untie-embeddings-and-output-weights", "--attention-dropout", 0, "--hidden-dropout", 0]


def our_flags(row: str, ranks: int, seq: int, a) -> list[str]:
    """pretrain_gpt.py's flags for one trial of `row` on `ranks` ranks (one step, micro-batch 1, fp32)."""
    flags = model_flags(a) + [
        "--seq-length", seq, "--max-position-embeddings", seq, "--micro-batch-size", 1, "--global-batch-size", 1,
        "--train-iters", 1, "--optimizer", "adamw", "--lr", 1e-4, "--lr-decay-style", "constant",
        "--weight-decay", 0.1, "--clip-grad", 1.0, "--mock-data", "--vocab-size", a.vocab, "--seed", 1234,
        "--distributed-backend", "gloo"]
    if row == "tp":
        flags += ["--tensor-model-parallel-size", ranks, "--zero-stage", 0]
    elif row == "megatron-sp":
        flags += ["--tensor-model-parallel-size", ranks, "--zero-stage", 0, "--sequence-parallel",
                  "--checkpoint-activations"]
    elif row in ("ulysses-zero3", "ulysses-zero3-offload-tiled"):
        flags += ["--ds-sequence-parallel-size", ranks, "--zero-stage", 3, "--checkpoint-activations",
                  "--zero-reduce-bucket-size", ZERO_BUCKET]
        if row == "ulysses-zero3-offload-tiled":
            flags += TILING_FLAGS
    else:
        raise ValueError(f"row {row!r} has no flags of ours")
    return [str(f) for f in flags]


def layout_refusal(row: str, ranks: int, a) -> Optional[str]:
    """Why our CLI refuses `row` at `ranks` (parse + layout checks, as pretrain_gpt.py does before any process
    group), or None. The HF row runs on one process only."""
    if row == "hf":
        return None if ranks == 1 else "one process only"
    from megatron.config.arguments import validate_run
    from megatron.cli import parse_args
    from megatron.errors import MegatronError

    try:
        run = parse_args(our_flags(row, ranks, 64 * ranks, a))
        validate_run(run, world_size=ranks)
    except (MegatronError, SystemExit) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return None


def classify(returncodes: list, reports: list, logs: list, timed_out: bool) -> tuple[str, str]:
    """(status, reason) of a trial from each rank's exit code (None: killed by us after another rank failed),
    its report ({"status": ...} or None) and the tail of its log."""
    if timed_out:
        return "timeout", "the step did not finish within --trial-timeout"
    if all(rc == 0 for rc in returncodes) and all(r and r.get("status") == "fits" for r in reports):
        return "fits", ""
    for rank, report in enumerate(reports):  # a rank that caught its own failed allocation says so
        if report and report.get("status") == "oom" and "error building extension" not in report.get("reason",
                                                                                                    "").lower():
            return "oom", f"rank {rank}: {report.get('reason', '')}"
    failed = [(rank, rc) for rank, rc in enumerate(returncodes) if rc not in (0, None)]
    for rank, rc in failed:  # a C++ extension built at run time (e.g. DeepSpeed's shm comm) whose compiler failed,
        if "error building extension" in logs[rank].lower():  # maybe out of memory under the cap: not the step's
            return "error", f"rank {rank} exit {rc}: {last_line_with(logs[rank], ('error building extension',))}"
    for rank, rc in failed:
        text = logs[rank].lower()
        if rc == -signal.SIGKILL:
            return "oom", f"rank {rank} killed by SIGKILL (the kernel's OOM killer)"
        if any(w in text for w in OOM_WORDS):
            return "oom", f"rank {rank} exit {rc}: {last_line_with(logs[rank], OOM_WORDS)}"
    for rank, rc in failed:
        if rc == 2:
            return "refused", f"rank {rank}: {last_lines(logs[rank], 2)}"
    if failed:
        rank, rc = failed[0]
        return "error", f"rank {rank} exit {rc}: {last_lines(logs[rank], 3)}"
    return "error", "no rank reported a result"


def last_lines(text: str, n: int) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-400:]


def last_line_with(text: str, words) -> str:
    for line in reversed(text.splitlines()):
        if any(w in line.lower() for w in words):
            return line.strip()[-300:]
    return last_lines(text, 1)


def run_trial(row: str, ranks: int, seq: int, a) -> Trial:
    """One trial as `ranks` fresh processes of this script (--rank-trial), each capped; at most --trial-timeout
    seconds. When a rank fails, the others (blocked in a collective) are killed after a short grace."""
    from megatron.distributed.launcher import free_port

    with tempfile.TemporaryDirectory(prefix="longseq-") as tmp:
        spec = {"row": row, "ranks": ranks, "seq": seq, "cap": a.cap_bytes, "dir": tmp,
                "flags": our_flags(row, ranks, seq, a) if row != "hf" else None,
                "model": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")}}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        port = free_port("127.0.0.1")
        procs, log_files = [], []
        start = time.perf_counter()
        cpu_before = children_cpu_seconds()
        for rank in range(ranks):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(a.threads),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            log_files.append(log)
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--rank-trial", spec_path],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)))
        timed_out, first_failure, killed = False, None, set()
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.perf_counter()
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = now
            if now - start > a.trial_timeout:
                timed_out = True
            if timed_out or (first_failure is not None and now - first_failure > 15):
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                        killed.add(rank)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        cpu = children_cpu_seconds() - cpu_before  # every rank has been waited for: its time is counted
        codes = [None if rank in killed else p.returncode for rank, p in enumerate(procs)]  # None: killed by us
        reports = []
        for rank in range(ranks):
            path = os.path.join(tmp, f"rank{rank}.json")
            reports.append(json.load(open(path)) if os.path.exists(path) else None)
        logs = []
        for log in log_files:
            log.seek(0)
            logs.append(log.read()[-20000:])
            log.close()
        status, reason = classify(codes, reports, logs, timed_out)
        trial = Trial(row, ranks, seq, status, reason, round(seconds, 1), round(cpu, 1))
        if status == "fits":
            trial.peak_rss = [r["peak_rss"] for r in reports]
            trial.rss_before_step = [r["rss_before_step"] for r in reports]
            trial.loss = reports[0].get("loss")
            trial.param_bytes = [r["param_bytes"] for r in reports]
            trial.optimizer_bytes = [r["optimizer_bytes"] for r in reports]
        return trial


def children_cpu_seconds() -> float:
    """User + system seconds of this process's children that have ended and been waited for."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- a rank

def rank_trial(spec_path: str) -> int:
    """The body of one rank of a trial: cap, build, one step, report. Exit 0 (fits), EXIT_OOM, 2 (refused)."""
    with open(spec_path) as f:
        spec = json.load(f)
    set_memory_cap(int(spec["cap"]))  # before torch: every later allocation of this process counts
    rank = int(os.environ.get("RANK", "0"))
    out = os.path.join(spec["dir"], f"rank{rank}.json")

    def report(payload: dict) -> None:
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, out)

    try:
        step = hf_step if spec["row"] == "hf" else our_step
        before, loss, state = step(spec)
        report({"status": "fits", "peak_rss": proc_status_bytes("VmHWM")["VmHWM"], "rss_before_step": before,
                "loss": loss, **state})
        return 0
    except BaseException as e:  # noqa: BLE001 - classify, then leave without waiting on the other ranks
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, MemoryError) or any(w in text.lower() for w in OOM_WORDS):
            try:
                report({"status": "oom", "reason": " ".join(text.split())[:300]})
            except BaseException:  # noqa: BLE001 - even the report may not fit; the exit code still says it
                pass
            print(f"rank {rank}: out of memory under the cap: {text[:300]}", file=sys.stderr, flush=True)
            os._exit(EXIT_OOM)
        from megatron.errors import MegatronError

        if isinstance(e, MegatronError):
            print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
            os._exit(2)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def sample_tokens(seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, seq + 1), generator=g)  # every rank the same full sample


def our_step(spec: dict) -> tuple[int, float]:
    import torch

    from megatron.cli import parse_args
    from megatron.config.arguments import validate_run
    from megatron.distributed import destroy_distributed, initialize_distributed
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.engine import build_engine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run = parse_args(spec["flags"])
    env = initialize_distributed(run.parallel.distributed_backend)
    validate_run(run, world_size=env.world_size)
    engine = build_engine(run, ParallelState.build(run.parallel, run.model), env.device)
    tokens = sample_tokens(spec["seq"], spec["model"]["vocab"])
    before = reset_peak_rss()
    loss = engine.train_step(iter([{"tokens": tokens}])).loss
    state = model_state_bytes(engine.engine.module, engine.engine.optimizer)
    engine.destroy()
    destroy_distributed()
    return before, float(loss), state


def hf_step(spec: dict) -> tuple[int, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m, seq = spec["model"], spec["seq"]
    config = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"],
                         num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                         num_key_value_heads=m["kv_heads"], max_position_embeddings=seq + 1, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0,
                         attention_bias=False, mlp_bias=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    tokens = sample_tokens(seq, m["vocab"])
    before = reset_peak_rss()
    # labels = inputs: HF shifts them by one inside the loss (seq - 1 predicted tokens against our seq)
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return before, float(loss.item()), model_state_bytes(model, optimizer)


def model_state_bytes(module, optimizer) -> dict:
    """{"param_bytes": the parameters this process holds, "optimizer_bytes": the optimizer's own tensors} after
    a step. A ZeRO-3 parameter's own tensor is emptied after use; what the rank keeps is its partition
    (`ds_tensor`). The optimizer's tensors are the torch optimizer's parameters (under ZeRO: its fp32 flat
    partitions) that are not the model's, and its state (Adam's two moments); each storage is counted once."""
    import torch

    seen, params = set(), 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3: the partition this rank owns
        seen.add(t.untyped_storage().data_ptr())
        params += t.numel() * t.element_size()
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wraps the torch optimizer
    tensors = [p for group in base.param_groups for p in group["params"]]
    tensors += [v for state in base.state.values() for v in state.values() if torch.is_tensor(v)]
    opt = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            opt += t.untyped_storage().nbytes()
    return {"param_bytes": params, "optimizer_bytes": opt}


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class Search:
    row: str
    ranks: int
    longest: Optional[int] = None
    first_failure: Optional[int] = None
    status: str = "done"  # done | not available | stopped
    note: str = ""
    seconds: float = 0.0
    trials: list = field(default_factory=list)
    fit: Optional[MemoryFit] = None


def predict_start(previous: list, ranks: int, default: int) -> int:
    """The first length to probe for a row at `ranks`, from the same row's searches on fewer ranks (ascending):
    the last longest fit, grown per doubling of ranks by the growth the row showed from its second-last to its
    last rank count (clipped to 1-2x; 1.5x when only one is known). A row that reached --max-seq starts there.
    It only picks the first probe: doubling then bisection decide the result."""
    done = [s for s in previous if s.longest]
    if not done:
        return default
    last = done[-1]
    if last.first_failure is None:
        return last.longest
    growth = 1.5
    if len(done) >= 2:
        growth = (last.longest / done[-2].longest) ** (1 / math.log2(last.ranks / done[-2].ranks))
    growth = min(2.0, max(1.0, growth))
    return max(64 * ranks, round_down(last.longest * growth ** math.log2(ranks / last.ranks), 64 * ranks))


def search_row(row: str, ranks: int, start: int, a, say, max_seq: int) -> Search:
    result = Search(row, ranks)
    refusal = layout_refusal(row, ranks, a)
    if refusal:
        result.status, result.note = "not available", refusal
        say(f"{row} @ {ranks}: not available: {refusal}")
        return result
    t0 = time.perf_counter()
    last_failure = {}

    def fits(seq: int) -> bool:
        trial = run_trial(row, ranks, seq, a)
        result.trials.append(trial)
        say_trial(trial, say)
        if trial.status in ("refused", "error"):
            raise TrialError(f"seq {seq}: {trial.status}: {trial.reason}")
        if trial.status != "fits":
            last_failure[seq] = f"{trial.status}: {trial.reason}"
        return trial.status == "fits"

    try:
        result.longest, result.first_failure, _ = longest_fitting(fits, start, 64 * ranks, a.tolerance, max_seq)
        if result.first_failure is not None:
            result.note = f"{result.first_failure:,} failed: {last_failure.get(result.first_failure, '')}"
        else:
            result.note = f"fits up to the search's bound {max_seq:,} (not probed longer)"
    except TrialError as e:
        result.status, result.note = "stopped", str(e)
    result.seconds = round(time.perf_counter() - t0, 1)
    refit(result)
    return result


def say_trial(trial: Trial, say) -> None:
    say(f"{trial.row} @ {trial.ranks} ranks, seq {trial.seq:,}{' (fit point)' if trial.purpose == 'fit' else ''}: "
        f"{trial.status} ({trial.seconds:.0f} s, CPU {trial.cpu_seconds:.0f} s"
        + (f", peak RSS {format_size(trial.peak)}" if trial.peak else "") + ")"
        + (f" - {trial.reason}" if trial.reason else ""))


def refit(result: Search) -> None:
    fitted = [t for t in result.trials if t.status == "fits"]
    result.fit = fit_memory([t.seq for t in fitted], [t.peak for t in fitted])


def add_fit_points(result: Search, a, say, points: int = 4) -> None:
    """Measure extra lengths (half, a quarter, an eighth ... of the longest fit) for a search with fewer than
    `points` fitted lengths, so that its memory fit has a verdict. Marked purpose="fit" in the outputs; they
    do not change the search's longest / first failure."""
    if not result.longest:
        return
    t0 = time.perf_counter()
    k = 2
    while len({t.seq for t in result.trials if t.status == "fits"}) < points:
        seq = round_down(result.longest / k, 64 * result.ranks)
        k *= 2
        if seq < 64 * result.ranks:
            break
        if any(t.seq == seq for t in result.trials):
            continue
        trial = run_trial(result.row, result.ranks, seq, a)
        trial.purpose = "fit"
        result.trials.append(trial)
        say_trial(trial, say)
        if trial.status in ("refused", "error"):
            break
    result.seconds = round(result.seconds + time.perf_counter() - t0, 1)
    refit(result)


def best_search(searches: list) -> Optional[Search]:
    """Our row with the longest fit at the most ranks that any row of ours fitted at (the first on a tie)."""
    ours = [s for s in searches if s.row != "hf" and s.longest]
    if not ours:
        return None
    most = max(s.ranks for s in ours)
    return max((s for s in ours if s.ranks == most), key=lambda s: s.longest)


def quiet_wall_seconds(trials: list, cores: int) -> float:
    """What the trials would take on an otherwise idle machine of `cores` cores: each trial's CPU time over the
    cores its ranks could use (min(cores, ranks)); the parent's own work (layout checks, the fit) is not in it."""
    return sum(t.cpu_seconds / max(1, min(cores, t.ranks)) for t in trials)


def targets(searches: list) -> list[str]:
    """The issue's two targets, from one run's searches."""
    lines = []
    hf = next((s for s in searches if s.row == "hf" and s.longest), None)
    ours = [s for s in searches if s.row != "hf" and s.longest]
    if not ours:
        return ["no row of ours fitted any length"]
    best = best_search(searches)
    most = best.ranks
    if hf:
        ratio = best.longest / hf.longest
        bounded = best.first_failure is None  # every probe fitted: the search stopped at --max-seq, not memory
        if most != 8:
            verdict = "not measured at 8 ranks"
        elif ratio >= TARGET_RATIO:
            verdict = "met"
        else:
            verdict = "undecided: every length up to --max-seq fitted" if bounded else "NOT met"
        lines.append(f"best row at {most} ranks: {best.row} {'>= ' if bounded else ''}{best.longest:,} tokens = "
                     f"{'>= ' if bounded else ''}{ratio:.1f}x the HF peer's {hf.longest:,} "
                     f"(target >= {TARGET_RATIO:.0f}x at 8 ranks: {verdict})")
    else:
        lines.append("the HF peer fitted no length: no ratio")
    fit = best.fit
    if fit and fit.verdict != "too few points":
        lines.append(f"{best.row} @ {most}: peak RSS = {fit.a / 2**20:.0f} MiB + {fit.b / 1024:.1f} KiB/token·s "
                     f"+ {fit.c:.3g} B/token²·s²; quadratic share at {best.longest:,}: {fit.quadratic_share:.1%} "
                     f"-> {fit.verdict}" + (f" (the peaks spread {fit.spread / 2**20:.0f} MiB)" if fit.verdict == "flat"
                                            else "")
                     + f" (target: linear: {'met' if fit.verdict in ('linear', 'flat') else 'NOT met'})")
    else:
        lines.append(f"{best.row} @ {most}: too few fitted lengths for a fit")
    return lines


def table(searches: list, cap: int) -> str:
    lines = [f"per-rank cap: RLIMIT_DATA {format_size(cap)}; peak RSS = max over ranks of VmHWM; params / "
             "optimizer = bytes this rank holds after the step (its shard or ZeRO-3 partition; the optimizer's "
             "fp32 copies and Adam state), max over ranks",
             "| row | ranks | longest seq | first failure | step's peak RSS at longest | build's peak RSS | "
             "params / optimizer per rank | trials | time (CPU) | memory fit | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in searches:
        at = next((t for t in s.trials if t.seq == s.longest and t.status == "fits"), None)
        fit = s.fit
        fit_text = "-" if fit is None or fit.verdict == "too few points" else \
            f"{fit.verdict} ({fit.b / 1024:.1f} KiB/token, s² share {fit.quadratic_share:.0%}, spread " \
            f"{fit.spread / 2**20:.0f} MiB)"
        state = f"{format_size(max(at.param_bytes))} / {format_size(max(at.optimizer_bytes))}" \
            if at and at.param_bytes else "-"
        longest = "-" if s.longest is None else f"{'>= ' if s.first_failure is None else ''}{s.longest:,}"
        cpu = sum(t.cpu_seconds for t in s.trials)
        lines.append(f"| {ROW_TITLES[s.row]} | {s.ranks} | {longest} | "
                     f"{'-' if s.first_failure is None else f'{s.first_failure:,}'} | "
                     f"{format_size(at.peak if at else None)} | "
                     f"{format_size(max(at.rss_before_step) if at else None)} | {state} | {len(s.trials)} | "
                     f"{s.seconds:.0f} s ({cpu:.0f} s) | {fit_text} | {s.status if s.status != 'done' else ''} "
                     f"{short_note(s.note)} |")
    return "\n".join(lines)


def short_note(note: str, limit: int = 160) -> str:
    """A search's note for the table: torch's allocator boilerplate dropped, cut at a word with an ellipsis."""
    note = re.sub(r"RuntimeError: \[enforce fail at [^\]]*\] err == 0\. DefaultCPUAllocator: ", "", note)
    return note if len(note) <= limit else note[:limit].rsplit(" ", 1)[0] + " …"


def load_searches(doc: dict) -> list:
    """The Search objects (trials and fits) of a run's JSON, as write_outputs wrote them."""
    searches = []
    for d in doc["searches"]:
        trials = [Trial(**t) for t in d["trials"]]
        s = Search(**{k: v for k, v in d.items() if k not in ("trials", "fit")}, trials=trials)
        refit(s)
        searches.append(s)
    return searches


def write_outputs(searches: list, a, header: dict) -> None:
    from megatron.fileio import write_text_atomically

    doc = {**header, "searches": [dict(asdict(s), trials=[asdict(t) for t in s.trials]) for s in searches]}
    write_text_atomically(a.json, json.dumps(doc, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "ranks", "seq", "purpose", "status", "peak_rss_max", "peak_rss_per_rank",
                "rss_before_step_max", "param_bytes_max", "optimizer_bytes_max", "seconds", "cpu_seconds", "loss",
                "reason"])
    for s in searches:
        for t in s.trials:
            w.writerow([t.row, t.ranks, t.seq, t.purpose, t.status, t.peak or "", " ".join(map(str, t.peak_rss)),
                        max(t.rss_before_step) if t.rss_before_step else "",
                        max(t.param_bytes) if t.param_bytes else "",
                        max(t.optimizer_bytes) if t.optimizer_bytes else "", t.seconds, t.cpu_seconds,
                        "" if t.loss is None else f"{t.loss:.4f}", t.reason])
    write_text_atomically(a.csv, buf.getvalue())


def plot(json_paths: str, png_path: str) -> None:
    """Peak RSS (max over ranks) against sequence length, one panel per rank count, one line per row; from one
    run's JSON or several (comma-separated, same cap: each (row, ranks) drawn from the run with most fitted
    lengths of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.load(open(path)) for path in json_paths.split(",")]
    doc = docs[0]
    if len({d["cap_bytes"] for d in docs}) != 1:
        raise SystemExit(f"--plot-from: the runs {json_paths} have different caps; plot them separately")
    best: dict = {}
    for d in docs:
        for s in d["searches"]:
            n_fit = sum(t["status"] == "fits" for t in s["trials"])
            key = (s["row"], s["ranks"])
            if n_fit and n_fit > best.get(key, (0, None))[0]:
                best[key] = (n_fit, s)
    searches = [s for _, s in best.values()]
    rank_counts = sorted({s["ranks"] for s in searches if s["row"] != "hf"}) or [1]
    hf = next((s for s in searches if s["row"] == "hf"), None)
    fig, axes = plt.subplots(1, len(rank_counts), figsize=(max(6.5, 4.2 * len(rank_counts)), 3.8), squeeze=False)
    colors = {"tp": "C0", "megatron-sp": "C1", "ulysses-zero3": "C2", "ulysses-zero3-offload-tiled": "C3",
              "hf": "k"}
    for ax, n in zip(axes[0], rank_counts):
        for s in [s for s in searches if s["ranks"] == n and s["row"] != "hf"] + ([hf] if hf else []):
            pts = sorted((t["seq"], max(t["peak_rss"]) / 2**20) for t in s["trials"] if t["status"] == "fits")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if s["row"] != "hf" else "s--",
                    color=colors.get(s["row"]), label=ROW_TITLES[s["row"]], markersize=4)
        ax.axhline(doc["cap_bytes"] / 2**20, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{n} rank{'s' if n > 1 else ''} (cap {doc['cap_bytes'] / 2**20:.0f} MiB RLIMIT_DATA)",
                     fontsize=9)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("peak RSS per rank (MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"one training step, {doc.get('model_text', '')}", fontsize=9)
    fig.tight_layout()
    tmp = f"{png_path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png_path)


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--vocab", type=int, default=32000, help="a multiple of 128 × 8, so that no layout pads it")
    p.add_argument("--cap", default="900MiB", help="per-rank RLIMIT_DATA (e.g. 1GiB, 1536M)")
    p.add_argument("--ranks", default="1,2,4,8", help="rank counts, comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--start", type=int, default=1024, help="first length probed for a row's first rank count "
                   "(later rank counts start from a prediction: see predict_start)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="bisect until (first failure - longest fit) <= tolerance × longest fit")
    p.add_argument("--max-seq", type=int, default=0, help="the longest length a search probes; 0 (auto): "
                   f"{TARGET_RATIO:.0f}x the HF peer's longest (the target), rounded up to a multiple of 512")
    p.add_argument("--trial-timeout", type=float, default=1200.0, help="seconds for one trial (all its ranks)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per rank")
    p.add_argument("--quick", action="store_true", help="ranks 1,2 and --tolerance 0.5 (unless given)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "long_sequence.json"))
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "long_sequence.csv"))
    p.add_argument("--png", default=str(ROOT / "benchmarks" / "long_sequence.png"))
    p.add_argument("--table-from", metavar="JSON", help="only print the table and the targets of a run's JSON "
                   "(also of an interrupted run: its finished searches)")
    p.add_argument("--plot-from", metavar="JSON", help="only draw the PNG from a run's JSON, or several runs' "
                   "(comma-separated), with matplotlib")
    p.add_argument("--rank-trial", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if a.quick:
        if "--ranks" not in given:
            a.ranks = "1,2"
        if "--tolerance" not in given:
            a.tolerance = 0.5
    try:
        a.cap_bytes = parse_size(a.cap)
        a.rank_counts = [int(n) for n in a.ranks.split(",") if n.strip()]
    except ValueError as e:
        p.error(f"--cap / --ranks: {e}")
    a.row_list = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in a.row_list if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if any(n < 1 for n in a.rank_counts):
        p.error("--ranks: each count must be >= 1")
    if a.max_seq < 0:
        p.error("--max-seq must be >= 0 (0: 16x the HF peer's longest)")
    if not 0 < a.tolerance < 1:
        p.error("--tolerance must be in (0, 1)")
    return a


def main(argv=None) -> int:
    a = parse_cli(argv)
    if a.rank_trial:
        return rank_trial(a.rank_trial)
    if a.table_from:
        doc = json.load(open(a.table_from))
        searches = load_searches(doc)
        print(table(searches, doc["cap_bytes"]))
        print("\n" + "\n".join(targets(searches)))
        print(f"{'complete' if doc.get('complete') else 'INCOMPLETE (interrupted)'} run: wall {doc.get('seconds', 0):.0f} s, "
              f"trials' CPU {doc.get('trial_cpu_seconds', 0):.0f} s, estimated quiet wall "
              f"{doc.get('quiet_wall_seconds_estimate', 0):.0f} s on {doc.get('cores', '?')} cores")
        return 0
    if a.plot_from:
        plot(a.plot_from, a.png)
        print(f"peak memory plot: {a.png}")
        return 0
    sys.path.insert(0, str(ROOT))
    model_text = (f"Llama L{a.layers} h{a.hidden}, {a.heads} heads / {a.kv_heads} kv, SwiGLU {a.ffn}, "
                  f"vocab {a.vocab:,}, untied, fp32, AdamW, micro-batch 1")
    print(f"{model_text}; per-rank cap {format_size(a.cap_bytes)} (RLIMIT_DATA); ranks {a.rank_counts}; "
          f"rows {a.row_list}; tolerance {a.tolerance}", flush=True)
    t0 = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - t0:7.0f} s] {text}", flush=True)  # noqa: E731
    searches = []
    header = {"model_text": model_text, "cap_bytes": a.cap_bytes, "cap_kind": "RLIMIT_DATA",
              "args": {k: v for k, v in vars(a).items()  # not the output paths: no path of this machine in the file
                       if k not in ("rank_trial", "plot_from", "table_from", "json", "csv", "png")}}
    cores = os.cpu_count() or 1

    def save(complete: bool) -> None:
        trials = [t for s in searches for t in s.trials]
        header.update(seconds=round(time.perf_counter() - t0, 1), complete=complete,
                      trial_cpu_seconds=round(sum(t.cpu_seconds for t in trials), 1), cores=cores,
                      quiet_wall_seconds_estimate=round(quiet_wall_seconds(trials, cores), 1))
        write_outputs(searches, a, header)  # an interrupted run keeps what it measured

    # The peer first: its longest length sets the bound of our rows' searches when --max-seq is auto (0).
    max_seq = a.max_seq
    for row in sorted(a.row_list, key=lambda r: r != "hf"):
        done = []
        for n in ([1] if row == "hf" else a.rank_counts):
            if not max_seq and row != "hf":
                hf = next((s for s in searches if s.row == "hf" and s.longest), None)
                max_seq = -(-int(TARGET_RATIO * (hf.longest if hf else a.start)) // 512) * 512
                header["max_seq_used"] = max_seq
                say(f"our rows' searches stop at {max_seq:,} tokens: {TARGET_RATIO:.0f}x "
                    + (f"the HF peer's {hf.longest:,}" if hf else f"--start {a.start:,} (no HF length)")
                    + ", rounded up to a multiple of 512")
            s = search_row(row, n, predict_start(done, n, a.start), a, say,
                           (a.max_seq if row == "hf" else max_seq) or (1 << 20))
            searches.append(s)
            done.append(s)
            save(False)
    best = best_search(searches)
    if best:
        add_fit_points(best, a, say)
    save(True)
    print("\n" + table(searches, a.cap_bytes))
    header["targets"] = targets(searches)
    print("\n" + "\n".join(header["targets"]))
    save(True)
    print(f"\ntrials: {a.json}, {a.csv}")
    print(f"wall time {header['seconds']:.0f} s on this machine (load average now "
          f"{os.getloadavg()[0]:.1f}); the trials' CPU time {header['trial_cpu_seconds']:.0f} s; estimated wall "
          f"time on a quiet {cores}-core machine (each trial's CPU time / min({cores}, ranks)): "
          f"{header['quiet_wall_seconds_estimate']:.0f} s")
    try:
        plot(a.json, a.png)
        print(f"peak memory plot: {a.png}")
    except ImportError:
        print(f"no matplotlib here (pip install matplotlib, the 'bench' extra): draw the PNG afterwards with "
              f"`python benchmarks/bench_long_sequence.py --plot-from {a.json} --png {a.png}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
