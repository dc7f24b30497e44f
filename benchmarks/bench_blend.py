"""Blend start-up benchmark: our arithmetic blended index vs megatron-core's BlendedMegatronDatasetBuilder.

Writes synthetic, Dolma-shaped data (sparse .bin, real .idx) under --workdir, then measures in one run
(a) a cold process (interpreter + imports + build) until the first global batch's sample mapping and
(b) the time to map one global batch, for us on the full 2T-token, 2,419-file Dolma blend and, side by
side with megatron-core 0.16.1 (in benchmarks/.venv-mcore, created on first use), on a smaller blend it
can finish. Prints a table with ratios.  Usage: .venv/bin/python benchmarks/bench_blend.py [--skip-mcore]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.data.data_list import parse_data_file_list  # noqa: E402
from megatron.checkpoint.format import replace_atomically  # noqa: E402
from megatron.data.indexed_dataset import write_synthetic_dataset  # noqa: E402

DOLMA_LIST = Path("/work/shared/data-lists/aurora-dolma-v1.7.txt")
MCORE_VENV = ROOT / "benchmarks" / ".venv-mcore"
MCORE_WORKER = ROOT / "benchmarks" / "mcore_blend_worker.py"
MAX_DOCUMENT_TOKENS = 1 << 30

# a cold process of ours: imports + build_datasets + mapping of the first global batch
OURS_CHILD = r"""
import json, os, sys, time
start = time.perf_counter()
import numpy as np
from megatron.config.data import DataConfig
from megatron.data.gpt_dataset import build_datasets
imported = time.perf_counter()
file_list, seq, train_samples, split, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
train, _, _ = build_datasets(DataConfig(data_file_list=file_list, split=split), seq, 1234, (train_samples, 0, 0), 32000)
location = train.index.locate(np.arange(batch))
ready = time.perf_counter()
spawn_to_first_batch = time.time() - float(os.environ["BENCH_SPAWN_EPOCH"])
assert location.file.shape == (batch,)
rng = np.random.default_rng(0)
times = []
for _ in range(20):
    first = int(rng.integers(0, train_samples - batch))
    t0 = time.perf_counter()
    train.index.locate(np.arange(first, first + batch))
    times.append(time.perf_counter() - t0)
print(json.dumps({"import_s": imported - start, "build_s": ready - imported, "to_first_batch_s": ready - start,
                  "spawn_to_first_batch_s": spawn_to_first_batch, "map_batch_s": float(np.median(times)), "files": train.num_files}))
"""


def make_blend(directory: Path, entries, total_tokens: float, average_document: int | None, label: str) -> Path:
    """Sparse synthetic files with the entries' weights and corpora; returns the data file list."""
    directory.mkdir(parents=True, exist_ok=True)
    listing = directory / "data-file-list.txt"
    stamp = directory / "COMPLETE"
    description = f"{len(entries)} {total_tokens} {average_document}"
    if stamp.exists() and stamp.read_text() == description and listing.exists():
        return listing
    from tqdm import tqdm

    weights = np.array([e.weight for e in entries])
    tokens = np.maximum((weights / weights.sum() * total_tokens).astype(np.int64), 1 << 16)
    lines = []
    for i, (entry, count) in enumerate(tqdm(list(zip(entries, tokens)), desc=f"writing {label}", unit="file")):
        prefix = directory / f"{entry.corpus or 'corpus'}-{i:04d}_text_document"
        if average_document:
            documents = max(int(count // average_document), 1)
        else:
            documents = 64
        documents = max(documents, -(-int(count) // MAX_DOCUMENT_TOKENS))
        write_synthetic_dataset(str(prefix), int(count), documents, np.uint16, seed=i, sparse=True)
        lines.append(f"{entry.weight!r} {prefix} {entry.corpus or 'corpus'}\n")
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    replace_atomically(tmp, listing)
    stamp.write_text(description)
    return listing


def run_json(command: list[str], env=None, timeout=3600, cwd=None) -> tuple[dict, float]:
    """Run a cold process; its last stdout line is JSON. Returns (that dict, wall seconds).

    The child reports `spawn_to_first_batch_s`: wall-clock time from just before this spawn (passed in
    BENCH_SPAWN_EPOCH) to its first global batch's mapping, interpreter start-up and imports included,
    and nothing it does afterwards (the batch-mapping timings) — the cold-start figure compared below.
    """
    env = dict(os.environ if env is None else env)
    start = time.perf_counter()
    env["BENCH_SPAWN_EPOCH"] = repr(time.time())
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), wall


def ours(listing: Path, seq: int, train_samples: int, split: str, batch: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = [run_json([sys.executable, "-c", OURS_CHILD, str(listing), str(seq), str(train_samples), split,
                      str(batch)], env) for _ in range(repeats)]
    return summarize(runs)


def summarize(runs) -> dict:
    """Median over repeats of each timing, plus the wall time of the whole cold process."""
    out = {key: statistics.median(run[key] for run, _ in runs) for key in runs[0][0] if key.endswith("_s")}
    out["wall_s"] = statistics.median(wall for _, wall in runs)
    return out


def ensure_mcore_venv() -> Path:
    python = MCORE_VENV / "bin" / "python"
    if python.exists():
        # run outside the repository, or our own `megatron` package would shadow megatron-core's
        probe = subprocess.run([str(python), "-c", "import megatron.core.datasets.helpers_cpp"],
                               capture_output=True, cwd=str(MCORE_VENV))
        if probe.returncode == 0:
            return python
    print(f"creating {MCORE_VENV} (torch 2.13.0 CPU + megatron-core 0.16.1; a few minutes, once)")
    subprocess.run([sys.executable, "-m", "venv", str(MCORE_VENV)], check=True)
    pip = [str(MCORE_VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["-c", str(ROOT / "constraints.txt"), "megatron-core==0.16.1", "numpy"], check=True)
    return python


def mcore(listing: Path, seq: int, train_samples: int, split: str, batch: int, repeats: int, workdir: Path) -> dict:
    python = ensure_mcore_venv()
    runs = []
    for _ in range(repeats):
        cache = Path(tempfile.mkdtemp(prefix="mcore-cache-", dir=workdir))  # cold: nothing cached
        try:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            env.pop("PYTHONPATH", None)
            runs.append(run_json([str(python), str(MCORE_WORKER), "--data-file-list", str(listing),
                                  "--seq-length", str(seq), "--train-samples", str(train_samples),
                                  "--split", split, "--cache", str(cache), "--global-batch", str(batch)], env,
                                 cwd=str(MCORE_VENV)))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return summarize(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--split", default="990,10,0")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--dolma-tokens", type=float, default=2e12)
    parser.add_argument("--peer-files", type=int, default=200, help="files in the blend both builders run")
    parser.add_argument("--peer-tokens", type=float, default=50e9)
    parser.add_argument("--peer-document-tokens", type=int, default=2048, help="average document length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mcore", action="store_true")
    args = parser.parse_args()
    if not DOLMA_LIST.exists():
        sys.exit(f"{DOLMA_LIST} not found: the benchmark takes the Dolma blend's shape from it")
    dolma = parse_data_file_list(str(DOLMA_LIST))
    seq, batch = args.seq_length, args.global_batch

    dolma_list = make_blend(args.workdir / "dolma-2T", dolma, args.dolma_tokens, None, "Dolma-shaped blend")
    dolma_samples = int(args.dolma_tokens * 0.99 / seq)
    results = [("ours", f"Dolma-shaped: {len(dolma)} files, {args.dolma_tokens:.3g} tokens",
                ours(dolma_list, seq, dolma_samples, args.split, batch, args.repeats))]

    stride = max(len(dolma) // args.peer_files, 1)
    peer_entries = dolma[::stride][:args.peer_files]  # spread over all corpora
    peer_list = make_blend(args.workdir / f"peer-{args.peer_files}", peer_entries, args.peer_tokens,
                           args.peer_document_tokens, "shared blend")
    peer_samples = int(args.peer_tokens * 0.99 / seq)
    peer_label = f"{len(peer_entries)} files, {args.peer_tokens:.3g} tokens, docs ~{args.peer_document_tokens} tok"
    results.append(("ours", peer_label, ours(peer_list, seq, peer_samples, args.split, batch, args.repeats)))
    if not args.skip_mcore:
        results.append(("megatron-core 0.16.1", peer_label,
                        mcore(peer_list, seq, peer_samples, args.split, batch, args.repeats, args.workdir)))

    print(f"\nblend benchmark: seq {seq}, global batch {batch}, split {args.split}, median of {args.repeats} "
          f"cold processes; {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    header = (f"{'builder':<22}{'blend':<58}{'import s':>9}{'spawn->batch s':>15}{'process wall s':>15}"
              f"{'map 1024 ms':>12}")
    print(header)
    print("-" * len(header))
    for name, label, r in results:
        print(f"{name:<22}{label:<58}{r['import_s']:>9.2f}{r['spawn_to_first_batch_s']:>15.2f}{r['wall_s']:>15.2f}"
              f"{r['map_batch_s'] * 1e3:>12.2f}")
    if len(results) == 3:
        ours_peer, peer = results[1][2], results[2][2]
        print(f"\nratio megatron-core / ours on the shared blend: cold process to first batch "
              f"{peer['spawn_to_first_batch_s'] / ours_peer['spawn_to_first_batch_s']:.1f}x (spawn to first batch; "
              f"{peer['wall_s'] / ours_peer['wall_s']:.1f}x whole processes), build only "
              f"{peer['build_s'] / ours_peer['build_s']:.1f}x; mapping a batch "
              f"{peer['map_batch_s'] / ours_peer['map_batch_s']:.2f}x")
    target = results[0][2]["spawn_to_first_batch_s"]
    print(f"target: Dolma-shaped cold start under 10 s: {'met' if target < 10 else 'MISSED'} ({target:.2f} s)")


if __name__ == "__main__":
    main()
