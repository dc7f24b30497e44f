"""Every --optimizer on the same small Llama and the same data: loss curves, step time and state memory vs AdamW.

Trains one rank (CPU or one GPU) through the framework's own path (parse_args → build_engine → train_step)
on the embedded corpus (the Python standard library, built, tokenized and preprocessed like
ALCF/demo_cpu.sh does, reused from --data-dir when present), each optimizer from the same initial weights
and on the same sample stream, at its own learning rate (the defaults below were picked for this model).
Prints a table (loss after N steps; step time, fastest and median step, and optimizer-state bytes, each
relative to AdamW) and the load average around the runs (step-time ratios mean little on a loaded machine:
the fastest step is the least disturbed one), and writes the loss curves to a PNG.
Not a test: `python benchmarks/bench_optimizers.py --help`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# learning rates that suit this model for each optimizer (constant schedule after a short warmup)
LR = {"adam": 3e-3, "adamw": 3e-3, "sgd": 0.3, "adamwschedulefree": 3e-3, "sgdschedulefree": 0.5, "adopt": 3e-3,
      "sophiag": 1e-3, "ds.fusedlamb": 0.02, "ipex.lamb": 0.02, "muon": 0.01, "muonclip": 0.01, "galoreadamw": 3e-3,
      "dshampooadamw": 3e-3}


def parse_cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default=",".join(LR), help="comma-separated --optimizer names")
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


def flags(a, name: str, file_list: Path, tokenizer: Path) -> list[str]:
    values = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--num-attention-heads", a.heads,
              "--ffn-hidden-size", a.ffn, "--seq-length", a.seq, "--max-position-embeddings", a.seq,
              "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--attention-dropout", 0,
              "--hidden-dropout", 0, "--micro-batch-size", a.batch, "--global-batch-size", a.batch,
              "--train-iters", a.steps, "--optimizer", name, "--lr", LR.get(name, 3e-3), "--lr-decay-style",
              "constant", "--lr-warmup-iters", max(1, a.steps // 20), "--weight-decay", 0.1, "--clip-grad", 1.0,
              "--data-file-list", file_list, "--split", "1000,0,0", "--tokenizer-type", "Llama2Tokenizer",
              "--tokenizer-model", tokenizer, "--num-workers", 0, "--seed", 1234, "--eval-iters", 0,
              "--zero-stage", 0, "--distributed-backend", "nccl" if a.device == "cuda" else "gloo"]
    return [str(v) for v in values]


def state_bytes(obj) -> int:
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def train_one(a, name: str, file_list: Path, tokenizer: Path, ps_cache: dict) -> dict:
    import torch

    from megatron.config.arguments import parse_args, validate_run
    from megatron.data.data_iterator import build_data_iterator
    from megatron.data.gpt_dataset import build_datasets
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.engine import build_engine
    from megatron.training.loop import resolve_vocab, seed_everything

    run = parse_args(flags(a, name, file_list, tokenizer))
    validate_run(run, 1)
    run, _ = resolve_vocab(run)
    device = torch.device(a.device)
    if "ps" not in ps_cache:
        ps_cache["ps"] = ParallelState.build(run.parallel, run.model)
    ps = ps_cache["ps"]
    seed_everything(run.training.seed, ps, device)
    te = build_engine(run, ps, device)
    train_ds, _, _ = build_datasets(run.data, run.model.seq_length, run.training.seed,
                                    (a.steps * a.batch, 0, 0), run.model.vocab_size, 0, 1)
    batches = build_data_iterator(train_ds, a.batch, 0, 1, 0)
    losses, times = [], []
    try:
        for _ in range(a.steps):
            start = time.perf_counter()
            losses.append(te.train_step(batches).loss)
            times.append(time.perf_counter() - start)
        memory = state_bytes(te.engine.optimizer.state_dict())
    finally:
        te.destroy()
    steady = times[2:] or times  # the first steps build caches
    return {"losses": losses, "step_s": statistics.median(steady), "step_min_s": min(steady), "state_bytes": memory}


def main() -> None:
    a = parse_cli()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    file_list, tokenizer = ensure_data(Path(a.data_dir))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if a.device == "cuda" else "gloo", auto_mpi_discovery=False)
    names = [n.strip() for n in a.optimizers.split(",") if n.strip()]
    if "adamw" not in names:
        names.insert(0, "adamw")
    results, ps_cache = {}, {}
    load_before = os.getloadavg()
    for name in names:
        print(f"training with --optimizer {name} ...", flush=True)
        results[name] = train_one(a, name, file_list, tokenizer, ps_cache)
    base = results["adamw"]
    load_after = os.getloadavg()
    print(f"\n{a.steps} steps, Llama L{a.layers} h{a.hidden} ffn {a.ffn}, batch {a.batch} × seq {a.seq}, {a.device}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"(AdamW step: fastest {base['step_min_s'] * 1e3:.0f} ms, median {base['step_s'] * 1e3:.0f} ms)\n")
    print("| optimizer | lr | loss at step 1 | loss after N | step time vs AdamW (fastest / median) "
          "| state memory vs AdamW |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {LR.get(name, 3e-3):g} | {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | "
              f"{r['step_min_s'] / base['step_min_s']:.2f}× / {r['step_s'] / base['step_s']:.2f}× | "
              f"{r['state_bytes'] / max(1, base['state_bytes']):.2f}× |")
    import matplotlib

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


if __name__ == "__main__":
    main()
