"""Tokenize jsonl documents into Megatron `.bin/.idx` files, in parallel (Megatron-DeepSpeed's flags).

    python tools/preprocess_data.py --input 'data/corpus/code/*.jsonl' --json-keys text --append-eod \\
        --tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M --output-prefix out/code --workers 2
writes out/code_text_document.bin/.idx. The main process reads the input in ~0.25 MiB blocks of whole
lines and writes tokens; `--workers` processes parse JSON and tokenize blocks with the tokenizer's
batch path. `--partitions P` splits the input into P byte ranges handled by P processes (each with
workers/P tokenizers) and merges their outputs in order: the result is identical to P=1.

`--task sft|dpo` reads post-training examples instead (tools/preprocess_post_training.py; the forms are in
megatron/data/post_training_format.py, the files in docs/POST_TRAINING.md).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import queue
import sys
import time
from collections import deque, namedtuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path,
)
from megatron.data.post_training_format import TASKS  # noqa: E402
from megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from megatron.errors import MegatronError  # noqa: E402

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")  # what a directory given as --input contributes
Segment = namedtuple("Segment", ["path", "start", "end"])  # byte range [start, end) of a file; end None = EOF


class BadInputError(MegatronError, ValueError):
    """A malformed input line; the message names the file and line."""


# ----------------------------------------------------------------------------------------------- input
def expand_input_paths(inputs) -> list[str]:
    """Files from --input values: files, directories (their *.jsonl[.gz] files) or globs; sorted."""
    if isinstance(inputs, str):
        inputs = [inputs]
    paths: list[str] = []
    for value in inputs:
        if os.path.isdir(value):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(value)
                           for name in names if name.endswith(JSONL_SUFFIXES))
            if not found:
                raise BadInputError(f"--input {value}: directory holds no *.jsonl / *.jsonl.gz files")
        elif any(char in value for char in "*?["):
            found = sorted(path for path in glob.glob(value, recursive=True) if os.path.isfile(path))
            if not found:
                raise BadInputError(f"--input {value}: the glob matches no files")
        elif os.path.isfile(value):
            found = [value]
        else:
            raise BadInputError(f"--input {value}: no such file, directory or glob match")
        paths.extend(path for path in found if path not in paths)
    return paths


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_json_texts(paths, keys, max_docs=None):
    """Strings under `keys` of every jsonl line, serially (for training tokenizers and benchmarks)."""
    count = 0
    for path in paths:
        with open_binary(path) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if max_docs is not None and count >= max_docs:
                    return
                document = _parse_line(line, keys, path, line_number)
                count += 1
                yield from document


def _parse_line(line: bytes, keys, path, line_number) -> list[str]:
    try:
        document = json.loads(line)
        values = [document[key] for key in keys]
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"{path}:{line_number}: {_describe(error, keys)}") from None
    for key, value in zip(keys, values):
        if not isinstance(value, str):
            raise BadInputError(f"{path}:{line_number}: key {key!r} holds {type(value).__name__}, not a string")
    return values


def _describe(error: Exception, keys) -> str:
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r} (--json-keys {' '.join(keys)})"
    if isinstance(error, TypeError):
        return "line is JSON but not an object"
    return f"invalid JSON ({error})"


def line_number_at(path: str, byte_offset: int) -> int:
    """1-based number of the line starting at byte_offset (of the decompressed stream); only on errors."""
    newlines, remaining = 0, byte_offset
    with open_binary(path) as f:
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            remaining -= len(chunk)
    return newlines + 1


def split_into_partitions(paths, partitions: int) -> list[list[Segment]]:
    """Cut the concatenated input into `partitions` contiguous parts of about equal bytes.

    Plain files may be cut anywhere (readers move to the next line start); .gz files stay whole.
    """
    sizes = [os.path.getsize(path) for path in paths]
    target = sum(sizes) / partitions
    parts: list[list[Segment]] = [[] for _ in range(partitions)]
    part, base = 0, 0
    for path, size in zip(paths, sizes):
        start = 0
        while part < partitions - 1 and not path.endswith(".gz") and (part + 1) * target - base < size:
            cut = max(start, int((part + 1) * target - base))
            if cut > start:
                parts[part].append(Segment(path, start, cut))
            start = cut
            part += 1
        parts[part].append(Segment(path, start, None))
        base += size
        while part < partitions - 1 and (part + 1) * target <= base:
            part += 1
    return parts


def read_blocks(segment: Segment, block_bytes: int):
    """Yield (block, offset, input_bytes): ~block_bytes of whole lines of the segment, the block's byte
    offset in the (decompressed) file, and the bytes of the input file consumed (for progress).

    A line belongs to the segment holding its first byte, so adjacent segments never share a line.
    """
    compressed = segment.path.endswith(".gz")
    with open_binary(segment.path) as f:
        raw = f.fileobj if compressed else f
        position = raw_position = 0
        if segment.start > 0:
            f.seek(segment.start - 1)
            position = segment.start - 1 + len(f.readline())
        end = segment.end
        while end is None or position < end:
            block = f.read(block_bytes)
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()
            if end is not None and position + len(block) > end:
                cut = block.find(b"\n", end - position - 1)
                if cut != -1:
                    block = block[:cut + 1]
            if compressed:
                consumed, raw_position = raw.tell() - raw_position, raw.tell()
            else:
                consumed = len(block)
            yield block, position, consumed
            position += len(block)


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(tokenizer_kwargs, keys, append_eod, dtype, skip_bad_lines, num_threads):
    if "tokenizer" not in _WORKER:  # inherited through fork when possible; rebuilt under spawn
        _WORKER["tokenizer"] = build_tokenizer(**tokenizer_kwargs)
    _WORKER["tokenizer"].set_num_threads(num_threads)
    _WORKER.update(keys=keys, append_eod=append_eod, dtype=np.dtype(dtype), skip_bad_lines=skip_bad_lines)


def tokenize_block(block: bytes, offset: int):
    """Parse and tokenize one block of jsonl lines in a worker.

    Returns (outputs, bad_lines, empty_documents): outputs[key] = (tokens, document_lengths);
    bad_lines is a list of (byte offset, message); with skip_bad_lines off, the first bad line stops.
    """
    keys, tokenizer = _WORKER["keys"], _WORKER["tokenizer"]
    texts: list[list[str]] = [[] for _ in keys]
    positions: list[int] = []  # byte offset of each accepted line, to name it if the tokenizer refuses it
    bad_lines = []
    position = offset
    loads = json.loads
    for line in block.split(b"\n"):
        if line.strip():
            try:
                document = loads(line)
                values = [document[key] for key in keys]
                if not all(isinstance(value, str) for value in values):
                    wrong = next(key for key, value in zip(keys, values) if not isinstance(value, str))
                    raise TypeError(f"key {wrong!r} does not hold a string")
            except (ValueError, KeyError, TypeError) as error:
                message = str(error) if str(error).startswith("key ") else _describe(error, keys)
                bad_lines.append((position, message))
                if not _WORKER["skip_bad_lines"]:
                    return {}, bad_lines, 0
            else:
                positions.append(position)
                for column, value in zip(texts, values):
                    column.append(value)
        position += len(line) + 1

    token_lists = []
    for column in texts:
        try:
            token_lists.append(tokenizer.tokenize_batch(column))
        except ValueError:  # e.g. NullTokenizer given a non-integer: find the lines and name them
            return _tokenize_one_by_one(texts, positions, bad_lines)
    return _pack(token_lists, bad_lines)


def _tokenize_one_by_one(texts, positions, bad_lines):
    tokenizer = _WORKER["tokenizer"]
    token_lists: list[list] = [[] for _ in texts]
    for row, position in enumerate(positions):
        try:
            ids = [tokenizer.tokenize(column[row]) for column in texts]
        except ValueError as error:
            bad_lines.append((position, f"the tokenizer refused the text: {error}"))
            if not _WORKER["skip_bad_lines"]:
                return {}, bad_lines, 0
            continue
        for token_list, document_ids in zip(token_lists, ids):
            token_list.append(document_ids)
    return _pack(token_lists, bad_lines)


def _pack(token_lists, bad_lines):
    """Per key: drop documents without tokens, append eod, and concatenate into one array + lengths."""
    outputs, empty_documents = {}, 0
    eod, dtype = _WORKER["tokenizer"].eod, _WORKER["dtype"]
    for key, documents in zip(_WORKER["keys"], token_lists):
        ids = [document_ids for document_ids in documents if document_ids]
        empty_documents += len(documents) - len(ids)
        if _WORKER["append_eod"]:
            for document_ids in ids:
                document_ids.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        outputs[key] = (tokens, lengths)
    return outputs, bad_lines, empty_documents


# --------------------------------------------------------------------------------------------- pipeline
def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


class Stats:
    def __init__(self):
        self.documents = self.tokens = self.bad_lines = self.empty_documents = self.bytes_read = 0
        self.bad_examples: list[str] = []


def process_segments(segments, prefixes: dict, tokenizer, tokenizer_kwargs, options, workers: int,
                     num_threads: int, on_progress) -> Stats:
    """Tokenize `segments` with a pool of `workers` into {key: prefix}; outputs renamed when complete."""
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    keys = list(prefixes)
    stats = Stats()
    _WORKER["tokenizer"] = tokenizer
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = context.Pool(workers, initializer=_init_worker,
                        initargs=(tokenizer_kwargs, keys, options.append_eod, dtype.str, options.skip_bad_lines,
                                  num_threads))
    builders = {}
    in_flight: deque = deque()
    block_bytes = int(options.block_mb * 1024 * 1024)

    def collect():
        segment, pending, compressed_delta = in_flight.popleft()
        outputs, bad_lines, empty = pending.get()
        for offset, message in bad_lines:
            stats.bad_lines += 1
            if not options.skip_bad_lines or len(stats.bad_examples) < 5:
                where = f"{segment.path}:{line_number_at(segment.path, offset)}"
                if not options.skip_bad_lines:
                    raise BadInputError(f"{where}: {message} (use --skip-bad-lines to skip such lines)")
                stats.bad_examples.append(f"{where}: {message}")
        stats.empty_documents += empty
        for key, (tokens, lengths) in outputs.items():
            builders[key].add_documents(tokens, lengths)
            stats.tokens += len(tokens)
        stats.documents += len(outputs[keys[0]][1]) if outputs else 0
        stats.bytes_read += compressed_delta
        on_progress(stats)

    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(data_file_path(prefix), dtype)
        for segment in segments:
            for block, offset, consumed in read_blocks(segment, block_bytes):
                in_flight.append((segment, pool.apply_async(tokenize_block, (block, offset)), consumed))
                while len(in_flight) > 2 * workers + 1:
                    collect()
        while in_flight:
            collect()
        pool.close()
        for key, prefix in prefixes.items():
            builders[key].finalize(index_file_path(prefix))
    except BaseException:
        pool.terminate()
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        pool.join()
    return stats


def _partition_main(index, segments, prefixes, tokenizer, tokenizer_kwargs, options, workers, num_threads,
                    counters, messages):
    """Body of one partition process: report progress in shared counters, the outcome in `messages`."""
    def on_progress(stats):
        counters[4 * index:4 * index + 4] = [stats.documents, stats.tokens, stats.bytes_read, stats.bad_lines]
    try:
        stats = process_segments(segments, prefixes, tokenizer, tokenizer_kwargs, options, workers, num_threads,
                                 on_progress)
        messages.put(("done", index, (stats.empty_documents, stats.bad_examples)))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        messages.put(("error", index, str(error) if isinstance(error, BadInputError)
                      else f"{type(error).__name__}: {error}"))


def run_partitions(partitions, prefixes, tokenizer, tokenizer_kwargs, options, on_progress) -> Stats:
    """P processes, each with its own pool, write part files; then merged in order into `prefixes`."""
    count = len(partitions)
    part_prefixes = [{key: f"{prefix}.part{i:03d}-of-{count:03d}" for key, prefix in prefixes.items()}
                     for i in range(count)]
    workers = max(1, options.workers // count)
    threads = max(1, (os.cpu_count() or 1) // (workers * count))
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    counters = context.Array("q", 4 * count, lock=False)
    messages = context.Queue()
    processes = [context.Process(target=_partition_main, name=f"partition-{i}",
                                 args=(i, partitions[i], part_prefixes[i], tokenizer, tokenizer_kwargs, options,
                                       workers, threads, counters, messages)) for i in range(count)]
    stats = Stats()
    try:
        for process in processes:
            process.start()
        # A bad line is reported from the earliest partition that has one, so the error names the
        # first bad line of the input whatever the timing: later partitions are stopped, earlier
        # ones are awaited.
        reported: set[int] = set()
        errors: dict[int, str] = {}
        while len(reported) < count and not (errors and reported.issuperset(range(min(errors)))):
            try:
                kind, index, payload = messages.get(timeout=0.25)
            except queue.Empty:
                kind = None
                if any(p.exitcode not in (None, 0) for i, p in enumerate(processes) if i not in reported):
                    raise BadInputError("a partition process died without reporting (out of memory?)")
            if kind == "error":
                errors[index] = payload
                for later in range(index + 1, count):
                    if later not in reported:
                        processes[later].terminate()
                        reported.add(later)
            if kind is not None:
                reported.add(index)
            if kind == "done":
                stats.empty_documents += payload[0]
                stats.bad_examples.extend(payload[1])
            totals = np.frombuffer(counters, dtype=np.int64).reshape(count, 4).sum(axis=0)
            stats.documents, stats.tokens, stats.bytes_read, stats.bad_lines = (int(x) for x in totals)
            on_progress(stats)
        if errors:
            first = min(errors)
            raise BadInputError(f"partition {first}: {errors[first]}")
        for process in processes:
            process.join()
        dtype = best_dtype(tokenizer.vocab_size)
        for key, prefix in prefixes.items():
            builder = IndexedDatasetBuilder(data_file_path(prefix), dtype)
            try:
                for part in part_prefixes:
                    builder.add_index(part[key])
                builder.finalize(index_file_path(prefix))
            except BaseException:
                builder.abort()
                raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        for part in part_prefixes:
            for prefix in part.values():
                for path in glob.glob(glob.escape(prefix) + "*"):
                    os.remove(path)
    return stats


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--task", choices=("pretrain",) + TASKS, default="pretrain",
                       help="pretrain: documents under --json-keys (default); sft / dpo: post-training examples "
                            "(messages, prompt/response, prompt/chosen/rejected), written with a loss-mask sidecar "
                            "and a .post_training.json description (docs/POST_TRAINING.md)")
    group.add_argument("--input", required=True, nargs="+",
                       help="jsonl file(s), plain or .gz; directories and quoted globs are expanded, sorted")
    group.add_argument("--json-keys", nargs="+", default=None,
                       help="keys to tokenize, one output per key (default: text); --task pretrain only")
    group.add_argument("--split-sentences", action="store_true", help="not supported (needs nltk); refused")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="count and skip malformed lines instead of stopping at the first one (--task sft/dpo: "
                            "at the end of the checking pass, listing them all)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, or HF dir/tokenizer.json")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap (MMIDIDX)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="split the input into this many parts processed concurrently, then merged")
    group.add_argument("--block-mb", type=float, default=0.25,
                       help="MiB of input lines per task sent to a worker (small: even load at the end)")
    group.add_argument("--log-interval", type=float, default=0.5, help="seconds between progress-bar updates")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _check_args(args, parser) -> None:
    if args.split_sentences:
        parser.error("--split-sentences is not supported (it needs nltk's punkt models, unavailable offline); "
                     "documents are tokenized whole")
    if args.task != "pretrain":
        refused = [flag for flag, given in (("--json-keys", args.json_keys is not None),
                                            ("--append-eod", args.append_eod),
                                            ("--partitions", args.partitions != 1)) if given]
        if refused:
            pronoun = "them" if len(refused) > 1 else "it"
            parser.error(f"{', '.join(refused)} with --task {args.task}: not used by post-training data (the keys "
                         "are the example's own, EOD is appended to plain-text responses and chat templates close "
                         f"their turns, and --workers alone parallelises); leave {pronoun} out")
    elif args.json_keys is None:
        args.json_keys = ["text"]
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")
    if args.partitions < 1:
        parser.error(f"--partitions {args.partitions}: must be >= 1")
    if args.block_mb <= 0:
        parser.error(f"--block-mb {args.block_mb}: must be > 0")
    directory = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        parser.error(f"--output-prefix {args.output_prefix}: cannot create directory {directory} ({error})")


def main(argv=None) -> int:
    from tqdm import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    tokenizer_kwargs = dict(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                            vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    try:
        paths = expand_input_paths(args.input)
        tokenizer = build_tokenizer(**tokenizer_kwargs)
    except MegatronError as error:  # BadInputError, TokenizerError
        parser.error(str(error))
    total_bytes = sum(os.path.getsize(path) for path in paths)
    if args.task != "pretrain":
        # function-local: tools/preprocess_post_training.py builds on this module's readers and error type
        from tools.preprocess_post_training import post_training_main

        return post_training_main(args, paths, tokenizer, tokenizer_kwargs, total_bytes)
    prefixes = {key: output_prefix_for(args.output_prefix, key) for key in args.json_keys}
    start = time.time()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
               disable=args.quiet, mininterval=args.log_interval, smoothing=0.1)
    last_update = [0.0]

    def on_progress(stats):
        now = time.time()
        if now - last_update[0] >= args.log_interval:
            last_update[0] = now
            elapsed = max(now - start, 1e-9)
            bar.set_postfix_str(f"{stats.documents / elapsed:,.0f} docs/s, {stats.tokens / elapsed:,.0f} tok/s",
                                refresh=False)
            bar.update(stats.bytes_read - bar.n)

    try:
        if args.partitions == 1:
            threads = max(1, (os.cpu_count() or 1) // args.workers)
            segments = [Segment(path, 0, None) for path in paths]
            stats = process_segments(segments, prefixes, tokenizer, tokenizer_kwargs, args, args.workers,
                                     threads, on_progress)
        else:
            partitions = split_into_partitions(paths, args.partitions)
            stats = run_partitions(partitions, prefixes, tokenizer, tokenizer_kwargs, args, on_progress)
    except MegatronError as error:  # BadInputError, IndexedDatasetError
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code  # 2: bad input, as every entry point (docs/RELIABILITY.md)
    bar.update(total_bytes - bar.n)
    bar.close()
    elapsed = time.time() - start
    print(f"tokenized {stats.documents:,} documents, {stats.tokens:,} tokens from {len(paths)} file(s) in "
          f"{elapsed:.2f}s ({stats.documents / elapsed:,.0f} docs/s, {stats.tokens / elapsed:,.0f} tokens/s) "
          f"with {args.workers} worker(s), {args.partitions} partition(s)")
    if stats.empty_documents:
        print(f"skipped {stats.empty_documents:,} documents with no tokens")
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines:,} malformed line(s), e.g.:")
        for example in stats.bad_examples:
            print(f"  {example}")
    for prefix in prefixes.values():
        print(f"wrote {data_file_path(prefix)} and {index_file_path(prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
