"""Benchmark tools/preprocess_data.py against the tokenizer's own batch-encode speed (the physical limit).

    python benchmarks/bench_preprocess.py                  # builds the stdlib corpus, trains a BPE
    python benchmarks/bench_preprocess.py --input 'data/corpus/*/*.jsonl' --tokenizer-type GPT2BPETokenizer \\
        --vocab-file V --merge-file M --rounds 5
"raw" tokenizes the same texts, already in memory, with tokenize_batch in this one process, in the
same batches as the tool's tasks, with the library's own threading (all cores). preprocess_data.py runs as a
subprocess (end to end: start-up, reading, JSON, tokenizing, writing) at each --workers value; runs
alternate so load from other processes hits all alike. The table gives medians and ratios to raw,
for wall-clock time and for CPU time (user + sys of all threads / child processes), which shows
the tool's overhead even when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.data.indexed_dataset import read_index_header  # noqa: E402
from megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from tools.preprocess_data import expand_input_paths, iter_json_texts  # noqa: E402


def prepare(args, work: str):
    """The input files and tokenizer flags: given ones, or the stdlib corpus and a freshly trained BPE."""
    if args.input:
        paths = expand_input_paths(args.input)
    else:
        from tools.build_corpus import build_corpus

        corpus = os.path.join(work, "corpus")
        if os.path.exists(os.path.join(corpus, "data_file_list.txt")):
            print(f"reusing the corpus in {corpus}")
        else:
            print(f"building the stdlib corpus (--max-mb {args.max_mb} per corpus) in {corpus}")
            build_corpus(corpus, shards=4, max_mb=args.max_mb)
        paths = expand_input_paths([os.path.join(corpus, name) for name in ("code", "prose", "text")])
    if args.tokenizer_type:
        flags = ["--tokenizer-type", args.tokenizer_type]
        for flag, value in (("--tokenizer-model", args.tokenizer_model), ("--vocab-file", args.vocab_file),
                            ("--merge-file", args.merge_file), ("--vocab-size", args.vocab_size)):
            if value is not None:
                flags += [flag, str(value)]
    else:
        from tools.train_tokenizer import train_bpe

        directory = os.path.join(work, f"tokenizer-bpe-{args.train_vocab_size}")
        if os.path.exists(os.path.join(directory, "merges.txt")):
            print(f"reusing the tokenizer in {directory}")
        else:
            print(f"training a byte-level BPE with {args.train_vocab_size} ids in {directory}")
            train_bpe(iter_json_texts(paths, ["text"]), args.train_vocab_size, directory)
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(directory, "vocab.json"),
                 "--merge-file", os.path.join(directory, "merges.txt")]
    return paths, flags


def batches_like_the_tool(texts, block_bytes: int):
    batches, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text.encode("utf-8")) + 16
        if size >= block_bytes:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def run_raw(tokenizer, batches) -> tuple[float, float, int]:
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) for batch in batches for ids in tokenizer.tokenize_batch(batch))
    return time.perf_counter() - start, time.process_time() - cpu_start, tokens


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the tool's pool workers, once reaped
    return usage.ru_utime + usage.ru_stime


def run_tool(paths, flags, workers: int, output_prefix: str, block_mb: float) -> tuple[float, float, float, int]:
    command = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", *paths,
               "--output-prefix", output_prefix, "--workers", str(workers), "--block-mb", str(block_mb),
               "--quiet", *flags]
    start, cpu_start = time.perf_counter(), _children_cpu()
    result = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if result.returncode:
        raise SystemExit(f"preprocess_data.py failed:\n{result.stderr}")
    inside = float(re.search(r" in ([0-9.]+)s ", result.stdout).group(1))
    tokens = read_index_header(output_prefix + "_text_document").num_tokens
    return wall, inside, cpu, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=None, help="jsonl inputs (default: build the stdlib corpus)")
    parser.add_argument("--max-mb", type=float, default=6.0, help="corpus cap per corpus when building it")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                        help="use this tokenizer (default: train a byte-level BPE on the corpus)")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--train-vocab-size", type=int, default=32000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-mb", type=float, default=0.25, help="batch size of raw and of the tool's tasks")
    parser.add_argument("--work-dir", default=None, help="keep corpus, tokenizer and outputs here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        paths, flags = prepare(args, work)
        texts = list(iter_json_texts(paths, ["text"]))
        megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
        kwargs = {flag.lstrip("-").replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])}
        if "vocab_size" in kwargs:
            kwargs["vocab_size"] = int(kwargs["vocab_size"])
        tokenizer = build_tokenizer(**kwargs)
        batches = batches_like_the_tool(texts, int(args.block_mb * 1024 * 1024))
        print(f"{len(texts):,} documents, {megabytes:.1f} MB of text in {len(paths)} files; {tokenizer}; "
              f"{os.cpu_count()} CPUs; {args.rounds} alternating rounds")

        times: dict = {}
        token_counts = {}
        for round_index in range(args.rounds):
            wall, cpu, token_counts["raw"] = run_raw(tokenizer, batches)
            times.setdefault("raw", []).append((wall, cpu))
            line = [f"round {round_index + 1}: raw {token_counts['raw'] / wall:,.0f} tok/s"]
            for workers in args.workers:
                wall, inside, cpu, token_counts[f"w{workers}"] = run_tool(
                    paths, flags, workers, os.path.join(work, f"bench_w{workers}"), args.block_mb)
                times.setdefault(f"w{workers}", []).append((wall, cpu))
                times.setdefault(f"w{workers}-in", []).append((inside, None))
                line.append(f"{workers} worker(s) {token_counts[f'w{workers}'] / wall:,.0f} tok/s")
            print(", ".join(line), flush=True)

        if len(set(token_counts.values())) != 1:
            raise SystemExit(f"token counts differ between raw and the tool: {token_counts}")
        tokens = token_counts["raw"]

        def medians(key):
            walls = [wall for wall, _ in times[key]]
            cpus = [cpu for _, cpu in times[key] if cpu is not None]
            return statistics.median(walls), (statistics.median(cpus) if cpus else None)

        raw_wall, raw_cpu = medians("raw")
        print(f"\n{'run':<40} {'wall s':>7} {'tokens/s':>11} {'vs raw':>7} {'CPU s':>7} {'tok/CPU-s':>10} "
              f"{'vs raw':>7}")
        rows = [("raw tokenize_batch, 1 process", "raw")]
        for workers in args.workers:
            rows += [(f"preprocess --workers {workers}, end to end", f"w{workers}"),
                     (f"preprocess --workers {workers}, inside tool", f"w{workers}-in")]
        for label, key in rows:
            wall, cpu = medians(key)
            cpu_columns = (f"{cpu:7.2f} {tokens / cpu:10,.0f} {raw_cpu / cpu:7.2f}" if cpu is not None
                           else f"{'':7} {'':10} {'':7}")
            print(f"{label:<40} {wall:7.2f} {tokens / wall:11,.0f} {raw_wall / wall:7.2f} {cpu_columns}")
        print(f"({tokens:,} tokens; medians of {args.rounds} rounds; 'inside tool' is the tool's own timer, "
              "without interpreter start-up and imports; CPU s of the tool include its workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
