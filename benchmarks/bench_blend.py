"""Blend benchmark: our blended datasets vs megatron-core 0.16.1's BlendedMegatronDatasetBuilder + GPTDataset.

Like with like, in one run: every row is a cold process (interpreter, numpy and torch imported on both
sides) that builds the training blend and then fetches the tokens of the first global batch; peak RSS
and the process's CPU seconds (less sensitive to a loaded machine than wall time) are reported for
every row. Each configuration runs once untimed first, so the token pages it reads are in the page
cache for its timed runs (on both sides). Peak RSS is reported at the first batch and over the whole
process (4 batches), with the resident memory at the end split into anonymous (the process's own)
and file-backed (pages of memory-mapped files: megatron-core maps the token files, ours reads them
with pread). On the real Dolma list's shape (2,419 files, 14 corpora, its weights; from
../shared/data-lists/aurora-dolma-v1.7.txt, found relative to the repository) at 5B tokens, each
corpus with its average document length in Dolma v1.7 (DOLMA_DOCUMENTS; --peer-documents 2048 for
the earlier equal-length shape):
  megatron-core GPTDataset (document-shuffled), cold (empty index cache) and warm (its cache reused),
  ours with --sample-mode documents (document-shuffled: the like-for-like row),
  ours with --sample-mode samples (our default, a different sampling: reported beside it, as what it is);
and ours alone on the same shape at 2T tokens. Data files are synthetic: real .idx files, sparse .bin
files (never copy the --workdir with cp/tar: it is terabytes of holes). The peer ratios are judged on
the work after the imports (building the blend and fetching the first batch's tokens, memory above
each process's RSS once its imports are done); whole-process ratios are printed too, and include
importing torch (~1.5 s, ~220 MB), which neither builder can avoid or shorten.
Usage: .venv/bin/python benchmarks/bench_blend.py [--skip-mcore] [--repeats 3] [--peer-documents dolma|N]
       [--large-documents 64|dolma|N]
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
from megatron.fileio import replace_atomically  # noqa: E402
from megatron.data.indexed_dataset import write_synthetic_dataset  # noqa: E402

DOLMA_LIST_NAME = Path("shared") / "data-lists" / "aurora-dolma-v1.7.txt"
MCORE_VENV = ROOT / "benchmarks" / ".venv-mcore"
MCORE_WORKER = ROOT / "benchmarks" / "mcore_blend_worker.py"
MAX_DOCUMENT_TOKENS = 1 << 30
# Dolma v1.7's dataset card (allenai/dolma, "Summary Statistics (v1.7)"): documents (millions) and tokens
# (billions) per source, under the corpus names of the data list; their ratio sets the synthetic files'
# average document length, so that both builders see Dolma's document count (megatron-core's index
# memory and the pages its memory maps touch grow with it). Overall: 2,532 M documents, 2,308 B tokens.
DOLMA_DOCUMENTS = {  # corpus: (documents M, tokens B)
    "cc": (875.2, 1195.5), "falcon": (664.0, 456.4), "starcoder": (206.6, 263.8), "c4": (249.9, 138.4),
    "reddit": (377.4, 79.9), "pes2o": (38.8, 57.2), "arxiv": (1.6, 28.0), "stackexchange": (29.3, 19.6),
    "tulu": (52.1, 16.5), "open-web-math-train": (2.9, 12.6), "algebraic-stack-train": (2.8, 12.6),
    "books": (0.0556, 5.3), "megawika": (3.2, 4.6), "wiki": (6.2, 3.7),
}


def dolma_document_tokens(corpus: str | None) -> int:
    """Average tokens per document of a Dolma v1.7 corpus (the whole dataset's average for others)."""
    documents, tokens = DOLMA_DOCUMENTS.get(corpus or "", (2532.0, 2308.5))
    return max(int(round(tokens * 1e9 / (documents * 1e6))), 1)

# a cold process of ours: imports (torch too, as a trainer has it) + build_datasets + first batch's tokens
OURS_CHILD = r"""
import json, os, resource, sys, tempfile, time
start = time.perf_counter()
import numpy as np
import torch
from megatron.config.data import DataConfig
from megatron.data.gpt_dataset import build_datasets
imported = time.perf_counter()
def peak_rss_mb():  # VmHWM: this address space since exec (ru_maxrss also counts the parent's RSS at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
file_list, seq, train_samples, split, batch, mode = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                     int(sys.argv[5]), sys.argv[6])
shared = tempfile.mkdtemp(prefix="bench-docidx-")  # cold: no index from an earlier run
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
rss_imported, usage = rss_mb(), resource.getrusage(resource.RUSAGE_SELF)
cpu_imported = usage.ru_utime + usage.ru_stime
config = DataConfig(data_file_list=file_list, split=split, sample_mode=mode)
train, _, _ = build_datasets(config, seq, 1234, (train_samples, 0, 0), 32000, document_index_cache=shared)
built = time.perf_counter()
tokens = train.get_tokens(np.arange(batch))
ready = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu_to_first_batch = usage.ru_utime + usage.ru_stime  # CPU seconds of the whole process so far
peak_at_first_batch = peak_rss_mb()
spawn_to_first_batch = time.time() - float(os.environ["BENCH_SPAWN_EPOCH"])
assert tokens.shape == (batch, seq + 1)
rng = np.random.default_rng(0)
times = []
for _ in range(3):
    first = int(rng.integers(0, train_samples - batch))
    t0 = time.perf_counter()
    train.get_tokens(np.arange(first, first + batch))
    times.append(time.perf_counter() - t0)
peak = peak_rss_mb()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
anon_mb, file_mb = (int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile"))
if train.document_index is not None:
    train.document_index.close()
os.rmdir(shared) if not os.listdir(shared) else None
print(json.dumps({"import_s": imported - start, "build_s": built - imported, "first_batch_s": ready - built,
                  "to_first_batch_s": ready - start, "spawn_to_first_batch_s": spawn_to_first_batch,
                  "batch_s": float(np.median(times)), "peak_rss_mb": peak, "files": train.num_files,
                  "rss_first_batch_mb": peak_at_first_batch, "anon_mb": anon_mb, "file_mb": file_mb,
                  "cpu_to_first_batch_s": cpu_to_first_batch, "rss_imported_mb": rss_imported,
                  "cpu_imported_s": cpu_imported}))
"""


def find_dolma_list(explicit: Path | None) -> Path:
    """--data-list, else shared/data-lists/aurora-dolma-v1.7.txt in the repository's parent or above."""
    if explicit:
        return explicit
    for directory in ROOT.parents:  # ../shared for a checkout, ../../shared for a worktree under it
        if (directory / DOLMA_LIST_NAME).exists():
            return directory / DOLMA_LIST_NAME
    sys.exit(f"{DOLMA_LIST_NAME} not found next to the repository or above it; pass --data-list PATH")


def make_blend(directory: Path, entries, total_tokens: float, average_document, label: str) -> Path:
    """Sparse synthetic files with the entries' weights and corpora; returns the data file list.

    average_document: tokens per document (an int), "dolma" (each corpus's Dolma v1.7 average), or None
    (64 documents per file)."""
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
        if average_document == "dolma":
            documents = max(int(count // dolma_document_tokens(entry.corpus)), 1)
        else:
            documents = max(int(count // average_document), 1) if average_document else 64
        documents = max(documents, -(-int(count) // MAX_DOCUMENT_TOKENS))
        write_synthetic_dataset(str(prefix), int(count), documents, np.uint16, seed=i, sparse=True)
        lines.append(f"{entry.weight!r} {prefix} {entry.corpus or 'corpus'}\n")
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    replace_atomically(tmp, listing)
    stamp.write_text(description)
    return listing


def run_json(command: list[str], env=None, timeout=3600, cwd=None) -> dict:
    """Run a cold process; its last stdout line is JSON (`spawn_to_first_batch_s`: from just before this
    spawn, passed in BENCH_SPAWN_EPOCH, to the first global batch's tokens, start-up and imports included)."""
    env = dict(os.environ if env is None else env)
    env["BENCH_SPAWN_EPOCH"] = repr(time.time())
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Median over repeats of each timing; the largest peak RSS."""
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key.endswith("_s")}
    for key in ("peak_rss_mb", "rss_first_batch_mb", "anon_mb", "file_mb", "rss_imported_mb"):
        out[key] = max(run[key] for run in runs)
    return out


def ours(listing: Path, seq: int, train_samples: int, split: str, batch: int, mode: str, repeats: int) -> dict:
    """A warm-up process first (untimed: it brings the pages of the tokens it reads into the page cache,
    as megatron-core's warm-up does for its own), then `repeats` timed cold processes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", OURS_CHILD, str(listing), str(seq), str(train_samples), split, str(batch), mode]
    run_json(command, env)
    return summarize([run_json(command, env) for _ in range(repeats)])


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


def mcore(listing: Path, seq: int, train_samples: int, split: str, batch: int, repeats: int,
          workdir: Path) -> tuple[dict, dict]:
    """(cold, warm): a cold run builds into an empty index cache, the warm run after it reuses that cache.

    An untimed warm-up run comes first, so that the token pages of the first batch are in the page
    cache for the timed runs on both sides (reading sparse files' pages for the first time costs far
    more than the work compared here; each builder reads its own positions, so each warms its own).
    """
    python = ensure_mcore_venv()
    cold, warm = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    for attempt in range(repeats + 1):
        cache = Path(tempfile.mkdtemp(prefix="mcore-cache-", dir=workdir))
        command = [str(python), str(MCORE_WORKER), "--data-file-list", str(listing), "--seq-length", str(seq),
                   "--train-samples", str(train_samples), "--split", split, "--cache", str(cache),
                   "--global-batch", str(batch)]
        try:
            if attempt == 0:
                run_json(command, env, cwd=str(MCORE_VENV))  # the warm-up
                continue
            cold.append(run_json(command, env, cwd=str(MCORE_VENV)))
            warm.append(run_json(command, env, cwd=str(MCORE_VENV)))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return summarize(cold), summarize(warm)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--data-list", type=Path, help="default: ../shared/data-lists/aurora-dolma-v1.7.txt")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--split", default="100,0,0",
                        help="megatron-core 0.16.1 never finishes when a file has no document in a split: it "
                             "loops on a zero-token epoch (the Dolma shape at 5B has such files in a 1%% split)")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--large-tokens", type=float, default=2e12, help="ours alone on the Dolma shape")
    parser.add_argument("--peer-tokens", type=float, default=5e9, help="both builders on the Dolma shape")
    parser.add_argument("--large-documents", default="64",
                        help="documents of the large blend: '64' per file (default: a few MB of .idx), 'dolma' "
                             "(Dolma v1.7's lengths: ~2.2 billion documents, ~44 GB of .idx files at 2T), or "
                             "tokens per document")
    parser.add_argument("--peer-documents", default="dolma",
                        help="document length of the peer blend: 'dolma' (each corpus's average in Dolma v1.7, "
                             "212-95,000 tokens, ~900 overall) or a number of tokens for every document")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mcore", action="store_true")
    args = parser.parse_args()
    dolma_path = find_dolma_list(args.data_list)
    dolma = parse_data_file_list(str(dolma_path))
    corpora = len({e.corpus for e in dolma})
    seq, batch, repeats = args.seq_length, args.global_batch, args.repeats
    train_fraction = float(args.split.split(",")[0]) / sum(float(x) for x in args.split.split(","))

    peer_documents = "dolma" if args.peer_documents == "dolma" else int(args.peer_documents)
    peer_list = make_blend(args.workdir / f"dolma-{args.peer_tokens:.3g}-docs-{peer_documents}", dolma,
                           args.peer_tokens, peer_documents, "Dolma-shaped blend (peer)")
    large_documents = None if args.large_documents == "64" else (
        "dolma" if args.large_documents == "dolma" else int(args.large_documents))
    large_dir = "dolma-2T" if large_documents is None else f"dolma-{args.large_tokens:.3g}-docs-{large_documents}"
    large_list = make_blend(args.workdir / large_dir, dolma, args.large_tokens, large_documents,
                            "Dolma-shaped blend (large)")
    peer_samples = int(args.peer_tokens * train_fraction / seq)
    large_samples = int(args.large_tokens * train_fraction / seq)
    peer = f"{args.peer_tokens:.3g} tok, docs {'as Dolma' if peer_documents == 'dolma' else f'~{peer_documents}'}"
    large = f"{args.large_tokens:.3g} tok, " + (
        "64 docs/file" if large_documents is None else
        "docs as Dolma" if large_documents == "dolma" else f"docs ~{large_documents}")

    rows = []
    if not args.skip_mcore:
        cold, warm = mcore(peer_list, seq, peer_samples, args.split, batch, repeats, args.workdir)
        rows += [("megatron-core GPTDataset, cold", peer, cold), ("megatron-core GPTDataset, warm cache", peer, warm)]
    rows.append(("ours documents", peer, ours(peer_list, seq, peer_samples, args.split, batch, "documents", repeats)))
    rows.append(("ours samples", peer, ours(peer_list, seq, peer_samples, args.split, batch, "samples", repeats)))
    rows.append(("ours documents", large, ours(large_list, seq, large_samples, args.split, batch, "documents",
                                               repeats)))
    rows.append(("ours samples", large, ours(large_list, seq, large_samples, args.split, batch, "samples", repeats)))

    print(f"\nblend benchmark: {len(dolma)} files / {corpora} corpora with the weights of {dolma_path.name}; seq {seq}, "
          f"global batch {batch}, split {args.split}; median of {repeats} cold processes (peak RSS: the largest); "
          f"{platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}, commit {git_commit()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = (f"{'builder':<36}{'blend':<26}{'import s':>9}{'build s':>9}{'1st batch s':>12}{'spawn->batch s':>15}"
              f"{'CPU->batch s':>13}{'next batch s':>13}{'RSS@1st MB':>11}{'peak RSS MB':>12}{'end anon/file MB':>17}")
    print(header)
    print("-" * len(header))
    for name, label, r in rows:
        print(f"{name:<36}{label:<26}{r['import_s']:>9.2f}{r['build_s']:>9.2f}{r['first_batch_s']:>12.2f}"
              f"{r['spawn_to_first_batch_s']:>15.2f}{r['cpu_to_first_batch_s']:>13.2f}{r['batch_s']:>13.2f}"
              f"{r['rss_first_batch_mb']:>11.0f}{r['peak_rss_mb']:>12.0f}"
              f"{'%.0f / %.0f' % (r['anon_mb'], r['file_mb']):>17}")
    by_name = {(name, label): r for name, label, r in rows}
    documents = by_name[("ours documents", peer)]
    if not args.skip_mcore:
        cold = by_name[("megatron-core GPTDataset, cold", peer)]
        warm = by_name[("megatron-core GPTDataset, warm cache", peer)]
        speed = cold["spawn_to_first_batch_s"] / documents["spawn_to_first_batch_s"]
        cpu = cold["cpu_to_first_batch_s"] / documents["cpu_to_first_batch_s"]
        memory = cold["peak_rss_mb"] / documents["peak_rss_mb"]
        memory_first = cold["rss_first_batch_mb"] / documents["rss_first_batch_mb"]
        print(f"\nwhole processes (document-shuffled blend, spawn to the first batch's tokens, importing torch "
              f"included: ~1.5 s and ~220 MB on either side): megatron-core cold / ours documents = {speed:.1f}x wall "
              f"time, {cpu:.1f}x CPU time, {memory:.1f}x peak RSS over 4 batches, {memory_first:.1f}x peak RSS at the "
              f"first batch; warm megatron-core / ours documents = "
              f"{warm['spawn_to_first_batch_s'] / documents['spawn_to_first_batch_s']:.1f}x time")

        def work(r):  # after the imports (torch on both sides): build + the first batch's tokens
            return r["build_s"] + r["first_batch_s"], r["cpu_to_first_batch_s"] - r["cpu_imported_s"], \
                r["peak_rss_mb"] - r["rss_imported_mb"]
        (mw, mc, mm), (ow, oc, om) = work(cold), work(documents)
        print(f"target: the same work after the imports (build + first batch; memory above the RSS after the "
              f"imports): megatron-core cold / ours documents = {mw / ow:.1f}x wall ({mw:.2f} / {ow:.2f} s), "
              f"{mc / oc:.1f}x CPU ({mc:.2f} / {oc:.2f} s) (>= 30x: {'met' if min(mw / ow, mc / oc) >= 30 else 'MISSED'}"
              f"), {mm / om:.1f}x memory ({mm:.0f} / {om:.0f} MB) (>= 10x: {'met' if mm / om >= 10 else 'MISSED'})")
    big_docs, big_samples = by_name[("ours documents", large)], by_name[("ours samples", large)]
    print(f"target: documents mode at {args.large_tokens:.3g} tokens: first batch {big_docs['first_batch_s']:.2f} s "
          f"after build (<= 3 s: {'met' if big_docs['first_batch_s'] <= 3 else 'MISSED'}), peak RSS "
          f"{big_docs['peak_rss_mb']:.0f} MB (<= 1024: {'met' if big_docs['peak_rss_mb'] <= 1024 else 'MISSED'})")
    print(f"target: samples mode at {args.large_tokens:.3g} tokens: spawn to first batch "
          f"{big_samples['spawn_to_first_batch_s']:.2f} s, build + first batch "
          f"{big_samples['build_s'] + big_samples['first_batch_s']:.2f} s (<= 1 s: "
          f"{'met' if big_samples['build_s'] + big_samples['first_batch_s'] <= 1 else 'MISSED'})")


if __name__ == "__main__":
    main()
