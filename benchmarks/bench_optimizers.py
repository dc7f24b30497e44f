"""Every --optimizer on the same small Llama and the same data: loss curves, step time and state memory vs AdamW.

Trains through the framework's own path (parse_args → build_engine → train_step) on the embedded corpus (the
Python standard library, built, tokenized and preprocessed like ALCF/demo_cpu.sh does, reused from --data-dir
when present; --mock-data uses random tokens instead), each optimizer from the same initial weights and on the
same sample stream, at its own learning rate (the defaults below were picked for this model). Two sections:

fp32 (--optimizers): one rank (CPU or one GPU). A table of the loss after N steps, step time (fastest / median
step, paired rounds) and optimizer-state bytes, each relative to AdamW, and the loss curves as a PNG (with
matplotlib).

bf16 (--bf16-optimizers): each optimizer with --bf16 --zero-stage 1 (or --bf16-zero-stage 2), against AdamW bf16
on the same model, at every data-parallel size of --bf16-dp (one launch of that many ranks each, every optimizer
interleaved; the global batch stays --batch). Per optimizer: loss, step time vs AdamW's (fastest / median at the
first dp size, paired rounds at every dp size), and memory counted from the tensors each rank holds after the
last step (`optimizer_memory`):
  - state: the optimizer's own state tensors (moments, momentum, quantised 8-bit state and its scales,
    preconditioners, projections), per parameter of the whole model;
  - fp32 masters: the fp32 copies of the parameters the optimizer steps (DeepSpeed's flat partitions, or the
    whole-matrix masters of megatron/optimizer/full_matrix.py), stated separately;
  - per rank at each dp size: state + masters, and its ratio to the first dp size (ZeRO-1 partitions both:
    about 1/2 at dp 2); on CUDA also the allocator's peak per rank (torch.cuda.max_memory_allocated) that the
    optimizer's engine adds over its build and warmup steps (the engines built before it are idle then).
Then the issue's targets (Muon's state <= AdamW's, 8-bit Adam's <= 1/2 of AdamW's, Muon's step <= 1.3 x AdamW's
by the median paired ratio, dp 2's optimizer memory per rank about 1/2 of dp 1's), each marked met or not met.
A combination the framework refuses is printed as refused, with its message.

Timing on a shared machine. Every optimizer of a section is built (and run for 2 untimed warmup steps) first,
then their timed steps are interleaved: round after round, each optimizer runs --round-steps steps in turn (the
order rotated by one every round), so a burst of someone else's load falls on all of them alike. Each optimizer
still sees only its own samples in order, so its losses are those of a run alone. Reported per optimizer: the
fastest and the median step relative to AdamW's (as before), and the paired ratio: in each round the optimizer's
mean step over AdamW's, the median over the rounds with its interquartile range [p25-p75]; on CPU also the
same paired ratio of process CPU time (which leaves out the time the machine gives to others).

The load average around the runs is printed too: on a loaded machine even paired ratios move; run more steps
(--bf16-steps 40) where the interquartile range is wide. Not a test: `python benchmarks/bench_optimizers.py --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# learning rates that suit this model for each optimizer (constant schedule after a short warmup)
LR = {"adam": 3e-3, "adamw": 3e-3, "sgd": 0.3, "adamwschedulefree": 3e-3, "sgdschedulefree": 0.5, "adopt": 3e-3,
      "sophiag": 1e-3, "ds.fusedlamb": 0.02, "ipex.lamb": 0.02, "muon": 0.01, "muonclip": 0.01, "galoreadamw": 3e-3,
      "dshampooadamw": 3e-3, "adam8bit": 3e-3}
BF16_DEFAULT = "adamw,muon,muonclip,adam8bit,galoreadamw,dshampooadamw"


def parse_cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default=",".join(n for n in LR if n != "adam8bit"),
                   help="comma-separated --optimizer names for the fp32 rows ('none': no fp32 section)")
    p.add_argument("--bf16-optimizers", default=BF16_DEFAULT,
                   help="comma-separated --optimizer names for the bf16 rows, AdamW first ('none': no bf16 section)")
    p.add_argument("--bf16-dp", default="1,2", help="data-parallel sizes of the bf16 rows, one launch each")
    p.add_argument("--bf16-zero-stage", type=int, choices=(1, 2), default=1,
                   help="--zero-stage of the bf16 rows (2 also partitions the reduced gradients)")
    p.add_argument("--bf16-steps", type=int, default=20, help="steps of each bf16 row")
    p.add_argument("--round-steps", type=int, default=1,
                   help="steps of each optimizer per interleaved round (the timed steps after the 2 warmup steps "
                        "are cut into rounds; each round runs every optimizer in turn)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--mock-data", action="store_true", help="random tokens (vocabulary 4096) instead of the corpus")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a bf16 rank: write results to this file
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data-dir", default=str(ROOT / "data" / "demo"), help="corpus/tokenizer (shared with the demo)")
    p.add_argument("--png", default=str(ROOT / "benchmarks" / "optimizers_loss.png"))
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def ensure_data(data_dir: Path) -> tuple[Path, Path]:
    """(data_file_list, tokenizer model), built like ALCF/demo_cpu.sh when absent (about a minute)."""
    py = sys.executable
    corpus, tokenizer = data_dir / "corpus", data_dir / "tokenizer" / "tokenizer.model"
    if not (corpus / "data_file_list.txt").is_file():
        subprocess.run([py, "tools/build_corpus.py", "--output-dir", str(corpus), "--shards", "4", "--max-mb", "4"],
                       check=True, cwd=ROOT)
    if not tokenizer.is_file():
        subprocess.run([py, "tools/train_tokenizer.py", "--input", str(corpus / "*" / "*.jsonl"), "--type",
                        "sentencepiece", "--vocab-size", "4096", "--output-dir", str(tokenizer.parent)],
                       check=True, cwd=ROOT)
    for jsonl in sorted(corpus.glob("*/*.jsonl")):
        prefix = corpus / "tokenized" / jsonl.parent.name / jsonl.stem
        if not Path(f"{prefix}_text_document.idx").is_file():
            subprocess.run([py, "tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(prefix),
                            "--json-keys", "text", "--append-eod", "--tokenizer-type", "Llama2Tokenizer",
                            "--tokenizer-model", str(tokenizer), "--workers", "2", "--quiet"], check=True, cwd=ROOT)
    return corpus / "data_file_list.txt", tokenizer


def flags(a, name: str, file_list: Path, tokenizer: Path, *, steps: Optional[int] = None, dp: int = 1,
          extra: tuple = ()) -> list[str]:
    steps = a.steps if steps is None else steps
    data = ["--mock-data", "--vocab-size", 4096, "--tokenizer-type", "NullTokenizer"] if a.mock_data else [
        "--data-file-list", file_list, "--split", "1000,0,0", "--tokenizer-type", "Llama2Tokenizer",
        "--tokenizer-model", tokenizer]
    values = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--num-attention-heads", a.heads,
              "--ffn-hidden-size", a.ffn, "--seq-length", a.seq, "--max-position-embeddings", a.seq,
              "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--attention-dropout", 0,
              "--hidden-dropout", 0, "--micro-batch-size", a.batch // dp, "--global-batch-size", a.batch,
              "--train-iters", steps, "--optimizer", name, "--lr", LR.get(name, 3e-3), "--lr-decay-style",
              "constant", "--lr-warmup-iters", max(1, steps // 20), "--weight-decay", 0.1, "--clip-grad", 1.0,
              *data, "--num-workers", 0, "--seed", 1234, "--eval-iters", 0,
              "--distributed-backend", "nccl" if a.device == "cuda" else "gloo", *(extra or ("--zero-stage", 0))]
    return [str(v) for v in values]


def state_bytes(obj, _depth: int = 0) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists, tuples, and the attributes of state objects such as
    GaLore's projector), each counted once."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj, {}, 0).values())


def _tensors(obj, found: dict, depth: int) -> dict:
    import torch

    if torch.is_tensor(obj):
        found.setdefault((obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel()), obj)
    elif depth > 4:
        pass
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, found, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        _tensors(vars(obj), found, depth + 1)
    return found


def leaf_optimizers(optimizer) -> list:
    """The torch optimizers that hold state: DeepSpeed's wrappers (ZeRO, bf16, fp16) keep theirs as `.optimizer`,
    megatron/optimizer/full_matrix.py's FullMatrixOptimizer its two inner ones as `.matrix` and `.other`."""
    found = []
    for attr in ("optimizer", "matrix", "other"):
        inner = getattr(optimizer, attr, None)
        if inner is not None and inner is not optimizer and hasattr(inner, "param_groups") and hasattr(inner, "state"):
            found += leaf_optimizers(inner)
    return found or [optimizer]


def optimizer_memory(optimizer, model) -> dict:
    """What this rank holds for the optimizer, counted from its tensors: 'state' (the leaf optimizers' state
    tensors) and 'masters' (the tensors they step that are not the model's own parameters: fp32 master copies,
    DeepSpeed's flat fp32 partitions), in bytes."""
    own = {id(p) for p in model.parameters()}
    leaves = leaf_optimizers(optimizer)
    state = state_bytes([leaf.state for leaf in leaves])
    stepped = [p for leaf in leaves for g in leaf.param_groups for p in g["params"] if id(p) not in own]
    return {"state": state, "masters": state_bytes(stepped)}


WARMUP_STEPS = 2  # each optimizer's first steps build caches and its state: run, not timed


def build_contender(a, name: str, file_list: Path, tokenizer: Path, ps_cache: dict, *, steps: int, dp: int = 1,
                    dp_rank: int = 0, extra: tuple = ()) -> dict:
    """`name`'s engine and sample stream from the shared seed, after its untimed warmup steps (collective).
    On CUDA `peak_bytes` is what this engine added to the allocator's peak over its build and warmup (the
    engines built before it are idle then, so the peak above the memory they hold is this one's)."""
    import torch

    from megatron.config.arguments import parse_args, validate_run
    from megatron.data.data_iterator import build_data_iterator
    from megatron.data.gpt_dataset import build_datasets
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.engine import build_engine
    from megatron.training.loop import resolve_vocab, seed_everything

    run = parse_args(flags(a, name, file_list, tokenizer, steps=steps, dp=dp, extra=extra))
    validate_run(run, dp)
    run, _ = resolve_vocab(run)
    device = torch.device(a.device, int(os.environ.get("LOCAL_RANK", 0))) if a.device == "cuda" else \
        torch.device(a.device)
    if "ps" not in ps_cache:
        ps_cache["ps"] = ParallelState.build(run.parallel, run.model)
    ps = ps_cache["ps"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held_before = torch.cuda.memory_allocated(device)
    seed_everything(run.training.seed, ps, device)
    te = build_engine(run, ps, device)
    train_ds, _, _ = build_datasets(run.data, run.model.seq_length, run.training.seed,
                                    (steps * a.batch, 0, 0), run.model.vocab_size, dp_rank, dp)
    c = {"name": name, "te": te, "batches": build_data_iterator(train_ds, a.batch // dp, dp_rank, dp, 0),
         "device": device, "losses": [], "times": [], "cpu_times": [], "round_s": [], "round_cpu_s": []}
    try:
        for _ in range(min(WARMUP_STEPS, steps - 1)):
            _timed_step(c)
    except BaseException:
        te.destroy()
        raise
    c["times"].clear()
    c["cpu_times"].clear()
    c["peak_bytes"] = torch.cuda.max_memory_allocated(device) - held_before if device.type == "cuda" else None
    return c


def _timed_step(c: dict) -> None:
    import torch

    start, cpu = time.perf_counter(), time.process_time()
    c["losses"].append(c["te"].train_step(c["batches"]).loss)
    if c["device"].type == "cuda":
        torch.cuda.synchronize(c["device"])
    c["times"].append(time.perf_counter() - start)
    c["cpu_times"].append(time.process_time() - cpu)


def train_interleaved(a, names: list[str], file_list: Path, tokenizer: Path, *, steps: int, dp: int = 1,
                      dp_rank: int = 0, extra: tuple = ()) -> dict:
    """Every optimizer in `names` for `steps` steps, their timed steps interleaved: all engines are built (and
    warmed up) first, then each round runs --round-steps steps of each optimizer in turn, the order rotated by one
    every round (A B C, B C A, ...), so that a burst of load on a shared machine falls on every optimizer alike
    and each round gives a paired ratio. Each optimizer still sees only its own samples, in order: its losses
    are those of a run alone. A refused name (MegatronError, raised before any collective) gets {"refused"}."""
    from megatron.errors import MegatronError

    ps_cache: dict = {}
    contenders, results = [], {}
    try:
        for name in names:
            if dp_rank == 0:
                print(f"building --optimizer {name} ({' '.join(extra) or 'fp32'}) ...", flush=True)
            try:
                contenders.append(build_contender(a, name, file_list, tokenizer, ps_cache, steps=steps, dp=dp,
                                                  dp_rank=dp_rank, extra=extra))
            except MegatronError as e:  # the same on every rank
                results[name] = {"refused": str(e)}
        timed = steps - min(WARMUP_STEPS, steps - 1)
        rounds = max(1, timed // a.round_steps)
        if dp_rank == 0:
            print(f"{len(contenders)} optimizers interleaved: {rounds} rounds of {a.round_steps} step(s) each ...",
                  flush=True)
        for r in range(rounds):
            shift = r % max(1, len(contenders))
            for c in contenders[shift:] + contenders[:shift]:
                count = a.round_steps if r < rounds - 1 else timed - a.round_steps * (rounds - 1)
                for _ in range(count):
                    _timed_step(c)
                c["round_s"].append(sum(c["times"][-count:]) / count)
                c["round_cpu_s"].append(sum(c["cpu_times"][-count:]) / count)
        for c in contenders:
            te = c["te"]
            held = optimizer_memory(te.engine.optimizer, te.engine.module)
            results[c["name"]] = {
                "losses": c["losses"], "step_s": statistics.median(c["times"]), "step_min_s": min(c["times"]),
                "step_cpu_s": statistics.median(c["cpu_times"]), "round_s": c["round_s"],
                "round_cpu_s": c["round_cpu_s"],
                "state_bytes": state_bytes(te.engine.optimizer.state_dict()) if not extra else None,
                "held_state": held["state"], "held_masters": held["masters"],
                "parameters": sum(p.numel() for p in te.engine.module.parameters()), "peak_bytes": c["peak_bytes"]}
    finally:
        for c in contenders:
            c["te"].destroy()
    return {name: results[name] for name in names}


def paired(r: dict, base: dict, key: str = "round_s") -> tuple[float, float, float]:
    """The median of the per-round ratios r / base (each round's steps of both, run one after the other) and
    their interquartile range (low, high; the lowest and highest ratio under 4 rounds)."""
    ratios = sorted(x / y for x, y in zip(r[key], base[key]))
    if len(ratios) < 4:
        return statistics.median(ratios), ratios[0], ratios[-1]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), low, high


def _rounds_text(a, base: dict) -> str:
    return (f"{len(base['round_s'])} interleaved rounds of {a.round_steps} step(s) after {WARMUP_STEPS} warmup "
            f"steps")


def _paired_text(r: dict, base: dict, key: str = "round_s") -> str:
    mid, low, high = paired(r, base, key)
    return f"{mid:.2f}× [{low:.2f}–{high:.2f}]"


def _names(text: str) -> list[str]:
    """The comma-separated names, each once, AdamW first unless given ('none' or '': no names)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"))
    if names and "adamw" not in names:
        names.insert(0, "adamw")
    return names


def main() -> None:
    a = parse_cli()
    if a.worker:
        return bf16_worker(a)
    file_list, tokenizer = (None, None) if a.mock_data else ensure_data(Path(a.data_dir))
    measured = {}
    if _names(a.optimizers):
        measured["fp32"] = fp32_section(a, file_list, tokenizer)
    if _names(a.bf16_optimizers):
        measured["bf16"] = bf16_section(a)
    if a.json:
        from megatron.fileio import write_text_atomically

        write_text_atomically(a.json, json.dumps(measured, indent=1))


def fp32_section(a, file_list, tokenizer) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if a.device == "cuda" else "gloo", auto_mpi_discovery=False)
    names = _names(a.optimizers)
    load_before = os.getloadavg()
    results = train_interleaved(a, names, file_list, tokenizer, steps=a.steps)
    base = results["adamw"]
    load_after = os.getloadavg()
    if "refused" in base:
        raise SystemExit(f"bench_optimizers: AdamW (fp32) was refused, nothing to compare with: {base['refused']}")
    print(f"\n{a.steps} steps, Llama L{a.layers} h{a.hidden} ffn {a.ffn}, batch {a.batch} × seq {a.seq}, {a.device}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"(AdamW step: fastest {base['step_min_s'] * 1e3:.0f} ms, median {base['step_s'] * 1e3:.0f} ms; "
          f"{_rounds_text(a, base)})\n")
    print("| optimizer | lr | loss at step 1 | loss after N | step time vs AdamW (fastest / median) "
          "| paired rounds vs AdamW: median [IQR] | state memory vs AdamW |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "refused" in r:
            print(f"| {name} | refused: {r['refused'].splitlines()[-1].strip()} |")
            continue
        print(f"| {name} | {LR.get(name, 3e-3):g} | {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | "
              f"{r['step_min_s'] / base['step_min_s']:.2f}× / {r['step_s'] / base['step_s']:.2f}× | "
              f"{_paired_text(r, base)} | {r['state_bytes'] / max(1, base['state_bytes']):.2f}× |")
    results = {name: r for name, r in results.items() if "refused" not in r}
    if a.png:
        write_png(a, results)
    return results


def write_png(a, results: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        print("\nno loss-curve PNG: matplotlib is not installed (pip install matplotlib, or --png '' to skip)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.get_cmap("tab20").colors
    for i, (name, r) in enumerate(results.items()):  # distinct colour and dash per optimizer
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, linewidth=1.3,
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], linestyle=("-", "--", ":")[i % 3])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"--optimizer on Llama L{a.layers} h{a.hidden} (stdlib corpus, batch {a.batch}×{a.seq})")
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    tmp = f"{a.png}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, a.png)
    print(f"\nloss curves: {a.png}")


# ---- the bf16 section: one launch of dp ranks per dp size, every optimizer in sequence -------------------------

def bf16_section(a) -> dict:
    names = _names(a.bf16_optimizers)
    sizes = [int(d) for d in a.bf16_dp.split(",") if d.strip()]
    if a.device == "cuda":
        import torch

        fit = [d for d in sizes if d <= torch.cuda.device_count()]
        if fit != sizes:
            print(f"bf16 rows: dp {', '.join(str(d) for d in sizes if d not in fit)} left out: one rank a GPU and "
                  f"{torch.cuda.device_count()} GPU(s) here", flush=True)
        sizes = fit
    if not sizes:
        raise SystemExit("bench_optimizers: no --bf16-dp size can run here")
    by_dp = {}
    load_before = os.getloadavg()
    for dp in sizes:
        print(f"bf16 rows at dp {dp} (ZeRO-{a.bf16_zero_stage}): {', '.join(names)} ...", flush=True)
        by_dp[dp] = _launch_workers(a, dp)
    load_after = os.getloadavg()
    report_bf16(a, names, sizes, by_dp, load_before, load_after)
    return {str(dp): rows for dp, rows in by_dp.items()}


def _launch_workers(a, dp: int) -> dict:
    """Run this script's bf16 worker on `dp` ranks (environment as torchrun sets it); rank 0's gathered results."""
    from megatron.distributed.launcher import free_port

    port = free_port("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), *sys.argv[1:]]
        procs = []
        for rank in range(dp):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(dp), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(dp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT))
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):  # a rank failed: the others would wait for it in a collective
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.5)
        codes = [p.wait() for p in procs]
        if any(codes) or not out.is_file():
            raise SystemExit(f"bench_optimizers: the bf16 ranks at dp {dp} failed (exit codes {codes})")
        return json.loads(out.read_text())


def bf16_worker(a) -> None:
    """One rank of a bf16 launch: every --bf16-optimizers name at --bf16 --zero-stage N; rank 0 writes every
    rank's measurements (or the refusal) to --worker's file."""
    import deepspeed
    import torch.distributed as dist

    file_list, tokenizer = (None, None) if a.mock_data else ensure_data(Path(a.data_dir))
    deepspeed.init_distributed(dist_backend="nccl" if a.device == "cuda" else "gloo", auto_mpi_discovery=False)
    rank, dp = dist.get_rank(), dist.get_world_size()
    mine = train_interleaved(a, _names(a.bf16_optimizers), file_list, tokenizer, steps=a.bf16_steps, dp=dp,
                             dp_rank=rank, extra=("--bf16", "--zero-stage", str(a.bf16_zero_stage)))
    rows = {}
    for name, result in mine.items():
        every = [None] * dp
        dist.all_gather_object(every, result)
        rows[name] = every
    if rank == 0:
        from megatron.fileio import write_text_atomically

        write_text_atomically(a.worker, json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def report_bf16(a, names: list[str], sizes: list[int], by_dp: dict, load_before, load_after) -> None:
    first = sizes[0]
    rows = by_dp[first]
    base = rows["adamw"][0]
    print(f"\nbf16, ZeRO-{a.bf16_zero_stage}: {a.bf16_steps} steps, Llama L{a.layers} h{a.hidden} ffn {a.ffn}, global batch {a.batch} "
          f"× seq {a.seq}, {a.device}; dp {', '.join(map(str, sizes))}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    if "refused" in base:
        print(f"AdamW bf16 was refused, nothing to compare with: {base['refused']}")
        return
    params = base["parameters"]
    cpu = a.device == "cpu"
    print(f"{params:,} parameters; AdamW bf16 step at dp {first}: fastest {base['step_min_s'] * 1e3:.0f} ms, "
          f"median {base['step_s'] * 1e3:.0f} ms" + (f", CPU time {base['step_cpu_s'] * 1e3:.0f} ms" if cpu else "")
          + f"; {_rounds_text(a, base)}\n")
    other = [d for d in sizes if d != first]
    head = (f"| optimizer | loss at step 1 | loss after N | step vs AdamW (fastest / median), dp {first} "
            + "".join(f"| paired rounds vs AdamW, dp {d}: median [IQR]" + ("; CPU time" if cpu else "") + " "
                      for d in sizes) + "|"
            + f" state B/param | fp32 masters B/param | state + masters per rank, dp {first} |"
            + "".join(f" dp {d} (vs dp {first}) |" for d in other))
    if a.device == "cuda":
        head += "".join(f" CUDA peak per rank added by its engine (build + warmup), dp {d} |" for d in sizes)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    held = {}
    for name in names:
        r = rows[name][0]
        if "refused" in r:
            reason = r["refused"].splitlines()[-1].strip()
            print(f"| {name} | refused: {reason[2:] if reason.startswith('- ') else reason} |")
            continue
        per_rank = {d: max(x["held_state"] + x["held_masters"] for x in by_dp[d][name]) for d in sizes
                    if "refused" not in by_dp[d][name][0]}
        held[name] = per_rank
        line = (f"| {name} | {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | "
                f"{r['step_min_s'] / base['step_min_s']:.2f}× / {r['step_s'] / base['step_s']:.2f}× |")
        for d in sizes:
            there, there_base = by_dp[d][name][0], by_dp[d]["adamw"][0]
            if "refused" in there or "refused" in there_base:
                line += " - |"
                continue
            line += f" {_paired_text(there, there_base)}"
            line += f"; CPU {_paired_text(there, there_base, 'round_cpu_s')} |" if cpu else " |"
        line += (f" {r['held_state'] / params:.2f} | {r['held_masters'] / params:.2f} | "
                 f"{_mib(per_rank.get(first))} |")
        for d in other:
            line += (f" {_mib(per_rank[d])} ({per_rank[d] / per_rank[first]:.2f}×) |" if d in per_rank
                     else " refused |")
        if a.device == "cuda":
            line += "".join(f" {_mib(max(x['peak_bytes'] for x in by_dp[d][name]))} |" if d in per_rank else " - |"
                            for d in sizes)
        print(line)
    print("\npaired rounds: each optimizer's mean step over a round divided by AdamW's in the same round (the "
          "optimizers run in turn, the order rotated each round), median and interquartile range over the rounds "
          "(rank 0's times)" + ("; CPU time: this process's, all its threads, so it leaves out the time a loaded "
                                 "machine gives to others" if cpu else ""))
    print("state and masters: bytes of the tensors each rank holds after the last step (the largest rank); "
          f"B/param: at dp {first}, per parameter of the whole model")
    print("\ntargets (issue 19):")
    state = {n: rows[n][0]["held_state"] for n in names if "refused" not in rows[n][0]}

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if "muon" in state:
        print(f"  Muon state <= AdamW's: {state['muon'] / params:.2f} vs {state['adamw'] / params:.2f} B/param: "
              f"{mark(state['muon'] <= state['adamw'])}")
        fastest = rows["muon"][0]["step_min_s"] / base["step_min_s"]
        mid, low, high = paired(rows["muon"][0], base)
        verdict = mark(mid <= 1.3) + ("" if (low <= 1.3) == (high <= 1.3) else
                                      " (the rounds' interquartile range straddles 1.3: run more --bf16-steps or on "
                                      "a quieter machine)")
        also = ""
        if cpu:
            cpu_mid, cpu_low, cpu_high = paired(rows["muon"][0], base, "round_cpu_s")
            also = f"; CPU time {cpu_mid:.2f}x [IQR {cpu_low:.2f}-{cpu_high:.2f}]"
        print(f"  Muon step <= 1.3 x AdamW's (dp {first}, median of {len(base['round_s'])} paired rounds): "
              f"{mid:.2f}x [IQR {low:.2f}-{high:.2f}; fastest steps {fastest:.2f}x{also}]: {verdict}")
    if "adam8bit" in state:
        print(f"  8-bit Adam state <= 1/2 of AdamW's: {state['adam8bit'] / params:.2f} vs "
              f"{state['adamw'] / params:.2f} B/param: {mark(state['adam8bit'] <= 0.5 * state['adamw'])}")
    for d in other:
        for name, per_rank in held.items():
            if d in per_rank:
                ratio = per_rank[d] / per_rank[first]
                print(f"  {name}: optimizer memory per rank at dp {d} vs dp {first}: {ratio:.2f}x (about "
                      f"{first / d:.2f}x wanted): {mark(abs(ratio - first / d) <= 0.1 * first / d + 0.05)}")
    refused = [n for n in names if "refused" in rows[n][0]]
    if refused:
        print(f"  refused in bf16 here: {', '.join(refused)} (no row, no target)")


if __name__ == "__main__":
    main()
