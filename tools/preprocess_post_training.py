"""`tools/preprocess_data.py --task sft|dpo`: post-training examples -> tokens, a loss-mask sidecar, a description.

    python tools/preprocess_data.py --task sft --input chats.jsonl --output-prefix data/sft --workers 4 \\
        --tokenizer-type HFTokenizer --tokenizer-model hf_tokenizer_dir
writes data/sft_text_document.bin/.idx (one document per sequence; a DPO pair is two: chosen, then rejected),
data/sft_text_document_loss_mask.bin/.idx and data/sft_text_document.post_training.json (docs/POST_TRAINING.md).
The main process reads the input in blocks of whole lines, as for pretraining (preprocess_data.read_blocks), and
`--workers` processes parse, check and tokenize them (megatron/data/post_training_format.py). Pass 1 checks and
encodes every line, keeping the results in memory up to KEEP_IN_MEMORY_BYTES; if any line is bad, all are
reported with their line numbers and nothing is written. Pass 2 writes (encoding again when pass 1's results did
not fit), the description last. The output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path,
)
from megatron.data.post_training_format import (  # noqa: E402
    FORMAT_VERSION, ExampleError, data_prefix, encode_line, loss_mask_prefix, metadata_path, tokenizer_record,
)
from megatron.data.tokenizers import TokenizerError, build_tokenizer  # noqa: E402
from megatron.errors import MegatronError  # noqa: E402
from megatron.fileio import write_text_atomically  # noqa: E402
from tools.preprocess_data import BadInputError, Segment, read_blocks  # noqa: E402

MAX_LISTED_BAD_LINES = 20  # bad lines listed one by one; the rest are counted
KEEP_IN_MEMORY_BYTES = 2 << 30  # encoded blocks kept between the checking pass and writing; beyond: encode again
_WORKER: dict = {}


def _init_example_worker(tokenizer_kwargs, task, dtype, num_threads):
    if "tokenizer" not in _WORKER:  # inherited through fork when possible; rebuilt under spawn
        _WORKER["tokenizer"] = build_tokenizer(**tokenizer_kwargs)
    _WORKER["tokenizer"].set_num_threads(num_threads)
    _WORKER.update(task=task, dtype=np.dtype(dtype))


def encode_examples_block(block: bytes, first_line: int):
    """Encode one block of example lines in a worker: (tokens, loss_mask, lengths, bad_lines, forms, fatal).

    bad_lines: [(line number, message)]; forms: Counter of example forms; fatal: None, or (line number,
    message) of an error about the whole input (the tokenizer has no chat template), which stops at once."""
    task, tokenizer = _WORKER["task"], _WORKER["tokenizer"]
    ids, masks, lengths, bad_lines, forms = [], [], [], [], Counter()
    for line_number, line in enumerate(block.split(b"\n"), first_line):
        if not line.strip():
            continue
        try:
            form, sequences = encode_line(line, task, tokenizer)
        except ExampleError as error:
            bad_lines.append((line_number, str(error)))
            continue
        except TokenizerError as error:
            return None, None, None, bad_lines, forms, (line_number, str(error))
        forms[form] += 1
        for sequence, mask in sequences:
            ids.extend(sequence)
            masks.extend(mask)
            lengths.append(len(sequence))
    tokens = np.array(ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= np.iinfo(_WORKER["dtype"]).max + 1):
        return None, None, None, bad_lines, forms, (first_line, f"token id {int(tokens.max())} does not fit "
                                                   f"{_WORKER['dtype']} (the tokenizer's vocabulary size is "
                                                   f"{tokenizer.vocab_size})")
    return (tokens.astype(_WORKER["dtype"]), np.array(masks, dtype=np.uint8), np.array(lengths, dtype=np.int64),
            bad_lines, forms, None)


class ExampleStats:
    def __init__(self):
        self.examples = self.sequences = self.tokens = self.loss_tokens = 0
        self.file_lines: dict[str, int] = {}
        self.forms: Counter = Counter()
        self.bad_lines: list[str] = []  # "path:line: message", in input order
        self.bad_count = 0


def _encode_pass(paths, pool, workers: int, block_bytes: int, stats: ExampleStats, on_progress):
    """Yield (tokens, loss_mask, lengths) per block in input order; bad lines go to `stats`."""
    in_flight: deque = deque()

    def collect():
        path, pending, consumed = in_flight.popleft()
        tokens, masks, lengths, bad_lines, forms, fatal = pending.get()
        if fatal is not None:
            raise BadInputError(f"{path}:{fatal[0]}: {fatal[1]}")
        stats.bad_count += len(bad_lines)
        for line_number, message in bad_lines:
            if len(stats.bad_lines) < MAX_LISTED_BAD_LINES:
                stats.bad_lines.append(f"{path}:{line_number}: {message}")
        stats.forms.update(forms)
        stats.examples += sum(forms.values())
        stats.sequences += len(lengths)
        stats.tokens += len(tokens)
        stats.loss_tokens += int(masks.sum(dtype=np.int64))
        on_progress(consumed)
        return tokens, masks, lengths

    for path in paths:
        line, block = 1, b""
        for block, _offset, consumed in read_blocks(Segment(path, 0, None), block_bytes):
            in_flight.append((path, pool.apply_async(encode_examples_block, (block, line)), consumed))
            line += block.count(b"\n")
            while len(in_flight) > 2 * workers + 1:
                yield collect()
        stats.file_lines[path] = line - 1 + (0 if block.endswith(b"\n") or not block else 1)
    while in_flight:
        yield collect()


def _text_sha256(template) -> Optional[str]:
    """sha256 of a chat template (a string, or named variants as a dict); None without one."""
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_post_training(args, paths, tokenizer, tokenizer_kwargs, progress) -> ExampleStats:
    """Check and encode every example, report every bad line, then write the three outputs (atomically)."""
    prefix = data_prefix(args.output_prefix)
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    _WORKER["tokenizer"] = tokenizer
    block_bytes = int(args.block_mb * 1024 * 1024)
    with context.Pool(args.workers, initializer=_init_example_worker,
                      initargs=(tokenizer_kwargs, args.task, dtype.str, threads)) as pool:
        # pass 1: every line checked and encoded; nothing is written
        stats = ExampleStats()
        kept, kept_bytes = [], 0
        for tokens, masks, lengths in _encode_pass(paths, pool, args.workers, block_bytes, stats, progress):
            if kept is not None:
                kept.append((tokens, masks, lengths))
                kept_bytes += tokens.nbytes + masks.nbytes + lengths.nbytes
                if kept_bytes > KEEP_IN_MEMORY_BYTES:
                    kept = None  # too large to hold: encode again while writing
        if stats.bad_count and not args.skip_bad_lines:
            listed = "\n  ".join(stats.bad_lines)
            more = (f"\n  ... and {stats.bad_count - len(stats.bad_lines)} more"
                    if stats.bad_count > len(stats.bad_lines) else "")
            raise BadInputError(f"{stats.bad_count} bad line(s) in the input; nothing was written:\n  {listed}{more}"
                                "\nfix them, or pass --skip-bad-lines to leave them out")
        if stats.examples == 0:
            raise BadInputError(f"--input {' '.join(args.input)}: no {args.task} example in the input")
        if kept is None:
            kept = (block for block in _encode_pass(paths, pool, args.workers, block_bytes, ExampleStats(),
                                                    lambda consumed: None))
        # pass 2: write (the metadata last: a crash before it leaves no usable set under these names)
        if os.path.exists(metadata_path(prefix)):
            os.remove(metadata_path(prefix))
        builders = [IndexedDatasetBuilder(data_file_path(prefix), dtype),
                    IndexedDatasetBuilder(data_file_path(loss_mask_prefix(prefix)), np.uint8)]
        digests = [hashlib.sha256(), hashlib.sha256()]
        try:
            for tokens, masks, lengths in kept:
                for builder, digest, array in zip(builders, digests, (tokens, masks)):
                    builder.add_documents(array, lengths)
                    digest.update(np.ascontiguousarray(array).data)
            builders[0].finalize(index_file_path(prefix))
            builders[1].finalize(index_file_path(loss_mask_prefix(prefix)))
        except BaseException:
            for builder in builders:
                builder.abort()
            raise
    metadata = {
        "format": FORMAT_VERSION, "task": args.task,
        "tokenizer": tokenizer_record(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                                      args.vocab_size, tokenizer),
        "examples": stats.examples, "sequences": stats.sequences, "tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens, "forms": dict(sorted(stats.forms.items())),
        "skipped_bad_lines": stats.bad_count,
        "chat_template": stats.forms.get("messages", 0) + stats.forms.get("chat", 0) > 0,
        "chat_template_sha256": _text_sha256(tokenizer.chat_template),
        "source": [{"path": os.path.abspath(path), "sha256": _file_sha256(path), "lines": stats.file_lines[path]}
                   for path in paths],
        "data_sha256": digests[0].hexdigest(), "loss_mask_sha256": digests[1].hexdigest(),
    }
    write_text_atomically(metadata_path(prefix), json.dumps(metadata, indent=2) + "\n")
    return stats


def post_training_main(args, paths, tokenizer, tokenizer_kwargs, total_bytes) -> int:
    """The CLI's --task sft|dpo path, after preprocess_data.main parsed and checked the flags: 0, or 2 on bad
    input (every bad line listed)."""
    from tqdm import tqdm

    start = time.time()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"check {args.task}",
               disable=args.quiet, mininterval=args.log_interval, smoothing=0.1)
    try:
        stats = run_post_training(args, paths, tokenizer, tokenizer_kwargs, bar.update)
    except MegatronError as error:  # BadInputError, TokenizerError, IndexedDatasetError
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    bar.close()
    elapsed = time.time() - start
    forms = ", ".join(f"{count:,} {form}" for form, count in sorted(stats.forms.items()))
    print(f"tokenized {stats.examples:,} {args.task} examples ({forms}) into {stats.sequences:,} sequences, "
          f"{stats.tokens:,} tokens ({stats.loss_tokens:,} with loss) from {len(paths)} file(s) in {elapsed:.2f}s "
          f"with {args.workers} worker(s)")
    if stats.bad_count:
        print(f"skipped {stats.bad_count:,} bad line(s), e.g.:")
        for example in stats.bad_lines:
            print(f"  {example}")
    prefix = data_prefix(args.output_prefix)
    print(f"wrote {data_file_path(prefix)}, {index_file_path(prefix)}, the loss mask "
          f"{data_file_path(loss_mask_prefix(prefix))} (.idx) and {metadata_path(prefix)}")
    return 0
