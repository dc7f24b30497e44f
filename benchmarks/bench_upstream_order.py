"""What --sample-mode upstream costs at 2T tokens on the Dolma list's shape, part by part.

Upstream's order is exact only if its O(documents) and O(samples) steps are done as upstream does them
(megatron/data/upstream_order.py says which and why). This measures each at full size, on the shape of
../shared/data-lists/aurora-dolma-v1.7.txt (2,419 files, 14 corpora, its weights; each corpus with its
average document length in Dolma v1.7, as benchmarks/bench_blend.py; 2T tokens; seq 4096; --split 969,30,1;
train samples = 2T / 4096, as --train-iters x --global-batch-size):
  1. the top-level greedy blend over the corpora: the first block (what starting a run costs) and a resume at
     consumed_samples = N (default: half the run), which recomputes the blend from sample 0; and, for
     --blend-sample-in-corpus, the greedy blend over the files of the largest corpus (20,000 steps, scaled);
  2. the corpora's --shuffle-sample-in-corpus permutations (all 14: the first global batch touches every corpus);
  3. the per-file orders (doc_idx, sample_idx rows, shuffle_idx): built from in-memory document lengths with the
     file's Dolma document count, for every --file-stride-th file (default 10: 242 files, every corpus), then
     scaled to the 2,419 files; the bytes of all 2,419 orders are computed exactly.
With --upstream-python (a Python that imports upstream's code: $SIDE_ENV, see its HOWTO.md) and
--upstream-src (its source tree, helpers compiled), the same parts run through upstream's own functions in a
child process, side by side: helpers.build_blending_indices over the whole run (upstream builds it whole,
once, on rank 0), gpt_dataset._build_doc_idx + helpers.build_sample_idx + _build_shuffle_idx for the same
files and lengths, and its corpus permutation (numpy, as ours).
No .idx files are written for these (Dolma's documents would need ~44 GB of them): the costs measured are
the computations, which read nothing but the lengths.
--read-files N (0: skip) adds reading, like with like: N sparse synthetic files of 60 M tokens and 60,000
documents in 4 corpora (under --workdir), built with each --sample-mode and the same flags; CPU seconds to
build the datasets and to read global samples [0, 256) (cold: upstream's file orders and permutations are
built then) and [256, 512). One process, one thread (OMP_NUM_THREADS=1); times are the
process's CPU seconds (a loaded machine inflates wall time, not these).
Usage: .venv/bin/python benchmarks/bench_upstream_order.py [--resume-at 0.5] [--file-stride 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_blend import dolma_document_tokens, find_dolma_list, git_commit  # noqa: E402
from megatron.data.data_list import parse_data_file_list  # noqa: E402
from megatron.data.upstream_index import (  # noqa: E402
    BLEND_BLOCK, GreedyBlend, build_file_order, file_order_shape, per_file_samples, upstream_split,
)
from megatron.data.upstream_order import Corpus  # noqa: E402


# upstream's functions on the same inputs (run by --upstream-python with PYTHONPATH=--upstream-src)
UPSTREAM_CHILD = r"""
import json, sys, time, types
sys.modules["megatron.data.vit_dataset"] = types.SimpleNamespace(ClassificationTransform=object)
import numpy as np
from megatron.data import helpers
from megatron.data.gpt_dataset import _build_doc_idx, _build_shuffle_idx, _num_epochs
job = json.loads(sys.stdin.read())
out = {}
weights = np.array(job["weights"], dtype=np.float64)
index, sample = np.zeros(job["total"], np.int64), np.zeros(job["total"], np.int64)
t0 = time.process_time()
helpers.build_blending_indices(index, sample, weights, weights.size, job["total"], False)
out["blend"] = time.process_time() - t0
del index, sample
t0 = time.process_time()
for size in job["corpus_sizes"]:
    shuffle = np.arange(size)
    np.random.RandomState(seed=1234).shuffle(shuffle)
out["permutations"] = time.process_time() - t0
rng, seconds, seq = np.random.default_rng(0), 0.0, job["seq"]
for docs, mean, samples in job["files"]:
    sizes = np.maximum(rng.exponential(mean, docs), 1).astype(np.int32)
    t0 = time.process_time()
    tokens = int(np.sum(sizes))
    epochs = _num_epochs(tokens, seq, samples)
    np_rng = np.random.RandomState(seed=1234)
    separate = False
    if epochs > 1:
        before = ((epochs - 1) * tokens - 1) // seq
        separate = samples - before < int(0.80 * ((tokens - 1) // seq))
    doc_idx = _build_doc_idx(np.arange(docs, dtype=np.int32), epochs, np_rng, separate)
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq, epochs, tokens, False)
    total = sample_idx.shape[0] - 1
    _build_shuffle_idx(before if separate else total, total, np_rng)
    seconds += time.process_time() - t0
out["files"] = seconds
print(json.dumps(out))
"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_rows(workdir: Path, files: int, seq: int) -> list[tuple]:
    """(mode, build s, first 256 samples s, next 256 s) for each --sample-mode on synthetic files."""
    from megatron.config.data import DataConfig
    from megatron.data.gpt_dataset import build_datasets
    from megatron.data.indexed_dataset import write_synthetic_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(files):
        prefix = workdir / f"file{i:03d}"
        if not prefix.with_suffix(".idx").exists():
            write_synthetic_dataset(str(prefix), 60_000_000, 60_000, np.uint16, seed=i, sparse=True)
        lines.append(f"{1 + i % 3} {prefix} corpus{i % 4}\n")
    listing = workdir / "data_file_list.txt"
    listing.write_text("".join(lines))
    samples = files * 60_000_000 // seq
    rows = []
    for mode in ("upstream", "documents", "samples"):
        config = DataConfig(data_file_list=str(listing), split="969,30,1", sample_mode=mode,
                            shuffle_sample_in_corpus=True)
        t0 = time.process_time()
        train = build_datasets(config, seq, 1234, (samples, 0, 0), None)[0]
        t1 = time.process_time()
        train.get_tokens(np.arange(256))
        t2 = time.process_time()
        train.get_tokens(np.arange(256, 512))
        t3 = time.process_time()
        if hasattr(train, "close"):
            train.close()
        rows.append((mode, t1 - t0, t2 - t1, t3 - t2))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-list", type=Path)
    parser.add_argument("--tokens", type=float, default=2e12)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--resume-at", type=float, default=0.5, help="fraction of the run a resume starts at")
    parser.add_argument("--file-stride", type=int, default=10, help="build every N-th file's order")
    parser.add_argument("--read-files", type=int, default=12, help="synthetic files for the read rows (0: none)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "upstream-order")
    parser.add_argument("--upstream-python", help="a Python that imports upstream's code (side by side)")
    parser.add_argument("--upstream-src", help="upstream's source tree (helpers compiled)")
    args = parser.parse_args()
    entries = parse_data_file_list(str(find_dolma_list(args.data_list)))
    weights = np.array([e.weight for e in entries])
    file_tokens = np.maximum((weights / weights.sum() * args.tokens).astype(np.int64), 1 << 16)
    documents = [max(int(t // dolma_document_tokens(e.corpus)), 1) for e, t in zip(entries, file_tokens)]
    seq, split = args.seq_length, "969,30,1"
    train = int(args.tokens // seq)
    _, counts = per_file_samples(weights.tolist(), [train, 0, 0])
    file_samples = [c[0] for c in counts]
    corpora = [e.corpus for e in entries]
    names = sorted(set(corpora))
    sizes = [sum(n for n, c in zip(file_samples, corpora) if c == name) for name in names]
    total = sum(file_samples)
    print(f"{len(entries)} files, {len(names)} corpora, {sum(documents):,} documents, {args.tokens:.3g} tokens, "
          f"seq {seq}: {total:,} train samples (upstream's 1.005 margin included)")
    rows = []

    # 1. the greedy blend over the corpora
    achieved = np.array([float(n) / total for n in sizes])
    achieved /= np.sum(achieved)
    t0 = time.process_time()
    GreedyBlend(achieved, total)[0]
    rows.append(("greedy blend, start (first block)", time.process_time() - t0, f"{BLEND_BLOCK} samples"))
    at = int(total * args.resume_at)
    t0 = time.process_time()
    GreedyBlend(achieved, total)[at]
    seconds = time.process_time() - t0
    rows.append((f"greedy blend, resume at {at:,}", seconds, f"{seconds / max(at, 1) * 1e9:.0f} ns/sample"))

    # 1b. --blend-sample-in-corpus: the greedy blend over the files of the largest corpus (numpy per step)
    largest = names[int(np.argmax(sizes))]
    members = np.array([n for n, c in zip(file_samples, corpora) if c == largest], dtype=np.int64)
    steps = 20000
    t0 = time.process_time()
    GreedyBlend(members / np.int64(members.sum()), int(members.sum()), block=steps)[0]
    seconds = (time.process_time() - t0) / steps
    rows.append((f"in-corpus blend ({largest}: {members.size} files), whole corpus (scaled)",
                 seconds * int(members.sum()), f"{seconds * 1e6:.1f} us/sample over {int(members.sum()):,} samples"))

    # 2. the corpus permutations
    t0 = time.process_time()
    nbytes = 0
    for name, size in zip(names, sizes):
        nbytes += Corpus(name, [0], [size], 1234, True, False).permutation().nbytes
    rows.append(("corpus permutations (all 14)", time.process_time() - t0,
                 f"{nbytes / 2**30:.2f} GiB (int32), shared per node"))

    # 3. per-file orders
    rng = np.random.default_rng(0)
    built_documents = built_seconds = 0.0
    picked = range(0, len(entries), args.file_stride)
    jobs = []
    for f in picked:
        docs = upstream_split(split, documents[f])[1]  # the train split's documents
        mean = file_tokens[f] / documents[f]
        jobs.append((docs, float(mean), file_samples[f]))
        lengths = np.maximum(rng.exponential(mean, docs), 1).astype(np.int32)
        t0 = time.process_time()
        build_file_order(lengths, 0, file_samples[f], seq, 1234)
        built_seconds += time.process_time() - t0
        built_documents += docs
    all_documents = sum(upstream_split(split, d)[1] for d in documents)
    per_document = built_seconds / built_documents
    order_bytes = 0
    for f in range(len(entries)):
        docs = upstream_split(split, documents[f])[1]
        epochs, samples, _ = file_order_shape(int(file_tokens[f] * docs / documents[f]), file_samples[f], seq)
        order_bytes += 4 * (3 + docs * (1 + epochs) + 3 * samples + 2)
    rows.append((f"file orders, {len(picked)} files built", built_seconds,
                 f"{built_documents:,.0f} documents, {per_document * 1e9:.0f} ns/document"))
    rows.append(("file orders, all 2,419 (scaled)", per_document * all_documents,
                 f"{all_documents:,} documents; {order_bytes / 2**30:.1f} GiB per node (/dev/shm)"))

    reads = read_rows(args.workdir, args.read_files, seq) if args.read_files else []
    peer = {}
    if args.upstream_python:
        job = {"weights": achieved.tolist(), "total": total, "corpus_sizes": sizes, "seq": seq, "files": jobs}
        env = dict(os.environ, PYTHONPATH=args.upstream_src or "", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        result = subprocess.run([args.upstream_python, "-c", UPSTREAM_CHILD], input=json.dumps(job), env=env,
                                capture_output=True, text=True, cwd=args.upstream_src, check=True)
        peer = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, commit {git_commit()}, "
          f"numpy {np.__version__}, peak RSS {peak_rss_mb():.0f} MB\n")
    upstream = {0: None, 1: peer.get("blend"), 3: peer.get("permutations"), 4: peer.get("files"),
                5: peer.get("files") and peer["files"] * all_documents / built_documents}
    print("| part | ours, CPU s | upstream's code, CPU s | note |\n|---|---:|---:|---|")
    for i, (name, seconds, note) in enumerate(rows):
        theirs = upstream.get(i)
        peer_note = "" if theirs is None else f"{theirs:.2f}"
        if i == 1 and theirs is not None:
            peer_note += f" (whole blend, {total:,} samples)"
        print(f"| {name} | {seconds:.2f} | {peer_note} | {note} |")
    if reads:
        print(f"\nReading, {args.read_files} synthetic files (60 M tokens, 60,000 documents each, 4 corpora), "
              "--shuffle-sample-in-corpus, CPU seconds:\n")
        print("| --sample-mode | build | samples [0, 256) | samples [256, 512) |\n|---|---:|---:|---:|")
        for mode, build, first, second in reads:
            print(f"| {mode} | {build:.3f} | {first:.3f} | {second:.3f} |")


if __name__ == "__main__":
    main()
