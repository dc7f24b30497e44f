"""Which files to train on: parse `--data-path` / `--data-file-list`, check them, and find each split's tokens.

Every problem (malformed line, non-positive weight, missing .bin/.idx, unreadable header) is collected
and raised at once in one DataListError, before any other work. `scan_blend` (what training uses)
parses the list and reads, in one pass, only each file's header, its size and a couple of index
entries at the split boundaries (no arrays), which is all the arithmetic blend
(megatron/data/blend.py) needs; its open of each .idx is also what finds a missing file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron.fileio import with_retries
from megatron.errors import MegatronError
from megatron.data.indexed_dataset import (HEADER_BYTES, IndexedDatasetError, MissingFileError, _strip_suffix,
                                          missing_index_error, read_index_header, unlisted_eod_tokens,
                                          warn_unlisted_eod)

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
MAX_LISTED_PROBLEMS = 40  # the message lists this many; DataListError.problems holds them all
SCAN_THREADS = 32  # header reads are latency-bound on parallel filesystems (Lustre, GPFS)
SERIAL_PROBE = 64  # files read in the calling thread first, timed, before deciding on threads
SERIAL_SECONDS_PER_ITEM = 200e-6  # faster than this a file (page cache, local disk): no threads


class DataListError(MegatronError, ValueError):
    """Everything wrong with a blend specification; `.problems` lists each one ("where: what")."""

    def __init__(self, source: str, problems: Sequence[str], summary: str = ""):
        self.source = source
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = [f"{source}: {len(self.problems)} problem(s){': ' + summary if summary else ''}"]
        lines += [f"  {problem}" for problem in shown]
        if more:
            lines.append(f"  ... and {more} more (all of them in DataListError.problems)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class BlendEntry:
    """One file of the blend as the user wrote it."""
    weight: float
    prefix: str
    corpus: Optional[str] = None
    where: str = ""  # "line 12" of the file list, or "--data-path item 3"


@dataclass(frozen=True)
class FileSplits:
    """One file's header facts and, per split, its sequence range and flat-token range."""
    prefix: str
    dtype: np.dtype
    num_tokens: int
    num_sequences: int
    num_documents: int
    sequence_bounds: tuple  # 4 sequence indices: train starts at [0], valid at [1], test at [2], end [3]
    token_bounds: tuple  # the same 4 boundaries as positions in the flat token stream

    def token_range(self, split: int) -> tuple[int, int]:
        return self.token_bounds[split], self.token_bounds[split + 1]

    def sequence_range(self, split: int) -> tuple[int, int]:
        return self.sequence_bounds[split], self.sequence_bounds[split + 1]

    def num_samples(self, split: int, seq_length: int) -> int:
        """Windows of seq_length + 1 tokens that overlap by one: (range tokens - 1) // seq_length."""
        start, stop = self.token_range(split)
        return max(stop - start - 1, 0) // seq_length


@contextlib.contextmanager
def paused_gc():
    """Python's cyclic garbage collector off for a burst of small allocations, then back as it was.

    A trainer's process holds hundreds of thousands of long-lived objects (torch alone leaves ~170,000),
    and the collector's full passes walk all of them: scanning 2,419 headers or reading a batch's
    thousands of document pieces, which create short-lived objects by the thousand, triggered passes
    that took longer than the work itself (~100 ms of a 5-billion-token blend's scan). What these
    bursts allocate holds no reference cycles; it is freed by reference counting all the same. The
    collector is re-enabled only if it was enabled on entry (a run that turned it off keeps it off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---- parsing ---------------------------------------------------------------------------------
def _parse_weight(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(items: Sequence[str], flag: str = "--data-path") -> list[BlendEntry]:
    """Megatron's `--data-path`: one prefix alone (weight 1), `w1 prefix1 w2 prefix2 ...`, or argonne's
    `w1 prefix1 corpus1 w2 prefix2 corpus2 ...` (read as such when the words are not pairs, every third word is
    not a number and every weight is).

    Items may themselves hold several space-separated words (as when a shell variable is passed quoted).
    """
    entries, problems = _read_data_path(items, flag)
    if problems:
        raise DataListError(flag, problems)
    return entries


def _read_data_path(items: Sequence[str], flag: str = "--data-path") -> tuple[list[BlendEntry], list[str]]:
    words = [word for item in items for word in str(item).split()]
    if len(words) == 1:
        return [BlendEntry(1.0, words[0], None, flag)], []
    problems, entries = [], []
    if len(words) % 2:
        problems.append(f"{flag}: {len(words)} words is not 'weight prefix' pairs; give one prefix "
                        "alone or pairs like '0.3 /data/a_text_document 0.7 /data/b_text_document'")
    for pair in range(len(words) // 2):
        weight_text, prefix = words[2 * pair], words[2 * pair + 1]
        where = f"{flag} pair {pair + 1}"
        weight = _parse_weight(weight_text)
        if weight is None:
            problems.append(f"{where}: weight {weight_text!r} is not a number (prefix {prefix!r})")
        elif not weight > 0 or not np.isfinite(weight):
            problems.append(f"{where}: weight {weight_text} of {prefix} must be a positive number")
        else:
            entries.append(BlendEntry(weight, prefix, None, where))
    if problems:
        triplets = _data_path_triplets(words, flag)
        if triplets:
            return triplets, []
    return entries, problems


def _data_path_triplets(words: Sequence[str], flag: str) -> Optional[list[BlendEntry]]:
    """`weight prefix corpus` triplets (upstream's pretrain_gpt_alcf.py reads --data-path so), or None."""
    if not words or len(words) % 3:
        return None
    entries = []
    for i in range(len(words) // 3):
        weight, prefix, corpus = _parse_weight(words[3 * i]), words[3 * i + 1], words[3 * i + 2]
        if weight is None or not weight > 0 or not np.isfinite(weight) or _parse_weight(corpus) is not None:
            return None
        entries.append(BlendEntry(weight, prefix, corpus, f"{flag} triplet {i + 1}"))
    return entries


def parse_data_file_list(path: str) -> list[BlendEntry]:
    """A `--data-file-list` file: lines `weight prefix [corpus]`; `#` comments and blank lines allowed.

    Weights need not sum to 1 (the blend normalises). Malformed lines and non-positive weights are all
    reported together, with line numbers.
    """
    entries, problems = _read_data_file_list(path)
    if problems:
        raise DataListError(f"--data-file-list {path}", [text for _, text in problems])
    return entries


def _read_data_file_list(path: str) -> tuple[list[BlendEntry], list[tuple[int, str]]]:
    """Entries and (line number, problem) pairs of a data file list; only an unreadable file raises."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataListError(f"--data-file-list {path}", ["file not found; check the path"]) from None
    except UnicodeDecodeError as error:
        raise DataListError(f"--data-file-list {path}", [f"not a text file ({error})"]) from None
    problems, entries = [], []
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        where = f"line {number}"
        if len(fields) not in (2, 3):
            problems.append((number, f"{where}: expected 'weight prefix [corpus]', found {len(fields)} field(s): {text!r}"))
            continue
        weight = _parse_weight(fields[0])
        if weight is None:
            problems.append((number, f"{where}: weight {fields[0]!r} is not a number (line {text!r})"))
        elif not weight > 0 or not np.isfinite(weight):
            problems.append((number, f"{where}: weight {fields[0]} of {fields[1]} must be a positive number"))
        else:
            entries.append(BlendEntry(weight, fields[1], fields[2] if len(fields) == 3 else None, where))
    if not entries and not problems:
        problems.append((0, "no 'weight prefix [corpus]' lines found"))
    return entries, problems


def _map_in_threads(fn, items: Sequence, progress: Optional[str] = None) -> list:
    """[fn(x) for x in items], in order: in this thread while each call is fast, else in up to SCAN_THREADS
    threads. The first SERIAL_PROBE items run here and are timed: headers in the page cache or on a local
    disk take tens of microseconds a file, where handing chunks to 32 threads costs more than the reads (2-3x
    slower on 2 cores); a parallel filesystem's opens take milliseconds and overlap in threads. Items go to
    the threads in chunks (about four per thread): thousands of one-file tasks would cost more in hand-offs
    between threads than the reads themselves, and a loaded node delays every hand-off."""
    items = list(items)
    if not items:
        return []
    started = time.perf_counter()
    head = [fn(item) for item in items[:SERIAL_PROBE]]
    rest = items[SERIAL_PROBE:]
    if not rest or (time.perf_counter() - started) / len(head) < SERIAL_SECONDS_PER_ITEM:
        return head + [fn(item) for item in rest]
    threads = min(SCAN_THREADS, len(rest))
    size = -(-len(rest) // (threads * 4))
    chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(lambda chunk: [fn(item) for item in chunk], chunks)
        if progress and len(rest) > 200:
            from tqdm import tqdm
            results = tqdm(results, total=len(chunks), desc=progress, unit="chunk")
        return head + [result for chunk in results for result in chunk]


def missing_files(entries: Sequence[BlendEntry]) -> tuple[list[tuple[int, str]], str]:
    """(entry number, problem) for every entry whose .bin or .idx is missing, and a one-line summary."""
    def missing(entry: BlendEntry) -> list[str]:
        prefix = _strip_suffix(entry.prefix)
        return [suffix for suffix in (".bin", ".idx") if not os.path.isfile(prefix + suffix)]

    return _missing_report(entries, _map_in_threads(missing, entries))


def _missing_report(entries: Sequence[BlendEntry], absent: Sequence) -> tuple[list[tuple[int, str]], str]:
    """(entry number, problem) per entry with missing parts (`absent[i]`: its missing suffixes, empty when
    none), and a one-line summary naming the count and the directories most of them are under."""
    problems = [(_line_number(entry), f"{entry.where}: {_strip_suffix(entry.prefix)} is missing "
                 f"{' and '.join(parts)}") for entry, parts in zip(entries, absent) if parts]
    summary = ""
    if problems:
        directories = Counter(os.path.dirname(_strip_suffix(entry.prefix))
                              for entry, parts in zip(entries, absent) if parts)
        top = ", ".join(f"{directory or '.'} ({count})" for directory, count in directories.most_common(3))
        summary = (f"{len(problems)} of {len(entries)} files are missing (.bin/.idx), under {top}; "
                   "fix the paths or copy the data to this machine")
    return problems, summary


def _line_number(entry: BlendEntry) -> int:
    digits = "".join(ch for ch in entry.where.split()[-1] if ch.isdigit())
    return int(digits) if digits else 0


def blend_entries(data_path: Sequence[str] = (), data_file_list: Optional[str] = None,
                  check_exists: bool = True, flag: str = "--data-path") -> list[BlendEntry]:
    """The blend from `--data-path` or `--data-file-list` (not both), checked; errors all at once.

    `flag` names the option data_path came from in messages (--train-data-path etc. use the same syntax).
    """
    entries, problems, source = _read_blend(data_path, data_file_list, flag)
    summary = ""
    if check_exists:
        missing, summary = missing_files(entries)
        problems = problems + missing
    if problems:
        problems.sort(key=lambda item: item[0])  # in line order: malformed lines and missing files mixed
        raise DataListError(source, [text for _, text in problems], summary)
    return entries


def _read_blend(data_path: Sequence[str], data_file_list: Optional[str],
                flag: str) -> tuple[list[BlendEntry], list[tuple[int, str]], str]:
    """(well-formed entries, (line, problem) of the others, the source named in errors)."""
    if data_path and data_file_list:
        raise DataListError(f"{flag} / --data-file-list", ["give one of them, not both"])
    if data_file_list:
        entries, problems = _read_data_file_list(data_file_list)
        return entries, problems, f"--data-file-list {data_file_list}"
    if data_path:
        entries, problems = _read_data_path(data_path, flag)
        return entries, [(0, text) for text in problems], flag
    raise DataListError("data", ["no data: pass --data-path, --data-file-list or --mock-data"])


def scan_blend(data_path: Sequence[str] = (), data_file_list: Optional[str] = None,
               fractions: Sequence[float] = (1.0, 0.0, 0.0), flag: str = "--data-path",
               progress: bool = False) -> tuple[list[BlendEntry], list[FileSplits], str]:
    """`blend_entries` then `scan_files` in one pass over the files: (entries, their FileSplits, source).

    A missing file is found by the scan's own open of its .idx (no separate stat of every file first);
    every problem is still raised at once: malformed lines and missing files in line order, with the
    count and directories of the missing ones, then unreadable or inconsistent files."""
    entries, problems, source = _read_blend(data_path, data_file_list, flag)
    results = _scan_entries(entries, fractions, progress)
    absent = [result.suffixes if isinstance(result, MissingFileError) else () for result in results]
    missing, summary = _missing_report(entries, absent)
    problems = sorted(problems + missing, key=lambda item: item[0])
    unreadable = [result for result in results if isinstance(result, str)]
    if problems or unreadable:
        if unreadable:
            summary = (f"{summary}; " if summary else "") + (
                f"{len(unreadable)} unreadable or inconsistent .bin/.idx file(s)")
        raise DataListError(source, [text for _, text in problems] + unreadable, summary)
    return entries, results, source


# ---- splits ----------------------------------------------------------------------------------
def parse_split(split: str) -> tuple[float, float, float]:
    """`--split 990,10,0` (or '98/2/0', or one number) -> normalised train/valid/test fractions."""
    parts = [part for part in str(split).replace("/", ",").split(",") if part.strip()]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise DataListError("--split", [f"{split!r} must be comma-separated numbers like '990,10,0'"]) from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataListError("--split", [f"{split!r} needs 1-3 non-negative numbers with a positive sum"])
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return tuple(v / total for v in values)


def split_boundaries(fractions: Sequence[float], num_documents: int) -> list[int]:
    """Document boundaries of train/valid/test, by Megatron's rule (round each part, fix the last)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [bound - excess for bound in bounds[1:]]
    return [min(max(bound, 0), num_documents) for bound in bounds]


def _read_int64(handle, offset: int) -> int:
    raw = os.pread(handle, 8, offset)
    if len(raw) != 8:
        raise IndexedDatasetError(f"short read at byte {offset}")
    return int.from_bytes(raw, "little", signed=True)


def scan_file(prefix: str, fractions: Sequence[float]) -> FileSplits:
    """Header, size and the split boundaries of one file: one open of the .idx, a few small reads, no arrays."""
    prefix = _strip_suffix(prefix)
    idx_path = prefix + ".idx"
    try:
        handle = with_retries(lambda: os.open(idx_path, os.O_RDONLY), idx_path, log=logger.warning,
                              error_type=IndexedDatasetError)
    except FileNotFoundError:
        raise missing_index_error(prefix) from None
    try:
        header = read_index_header(prefix, fd=handle)
        num_sequences, num_documents = header.num_sequences, header.num_documents - 1
        doc_bounds = split_boundaries(fractions, num_documents)
        pointers_at = HEADER_BYTES + 4 * num_sequences
        doc_indices_at = pointers_at + 8 * num_sequences
        if num_sequences:  # where the .idx says the .bin ends: a truncated .bin is named as such, not the .idx
            last_length = int.from_bytes(os.pread(handle, 4, HEADER_BYTES + 4 * (num_sequences - 1)), "little",
                                         signed=True)
            end = _read_int64(handle, pointers_at + 8 * (num_sequences - 1)) + last_length * header.dtype.itemsize
            unlisted = unlisted_eod_tokens(header.bin_bytes, end, header.dtype.itemsize, num_documents)
            # upstream's --append-eod file (at most one unlisted token per document; this header scan reads no
            # arrays, IndexedDataset and tools/repair_index.py check exactly one per non-empty document): read
            # by its pointers, as upstream does
            if unlisted > 0:
                warn_unlisted_eod(prefix, unlisted)
            elif end != header.bin_bytes:
                what = "is truncated" if header.bin_bytes < end else "has bytes the index does not list"
                raise IndexedDatasetError(
                    f"{prefix}.bin: {header.bin_bytes} bytes but {prefix}.idx ends its last sequence at byte "
                    f"{end}: the .bin {what} (or the pair does not belong together); rebuild it with "
                    "tools/preprocess_data.py or restore it from a copy")
        sequence_bounds, token_bounds = [], []
        for doc in doc_bounds:
            if doc <= 0:
                sequence = 0
            elif doc >= num_documents:
                sequence = num_sequences
            else:
                sequence = _read_int64(handle, doc_indices_at + 8 * doc)
            if sequence <= 0:
                token = 0
            elif sequence >= num_sequences:
                token = header.num_tokens
            else:
                token = _read_int64(handle, pointers_at + 8 * sequence) // header.dtype.itemsize
            sequence_bounds.append(sequence)
            token_bounds.append(token)
    finally:
        os.close(handle)
    if sorted(token_bounds) != token_bounds or token_bounds[-1] > header.num_tokens:
        raise IndexedDatasetError(f"{prefix}.idx: split boundaries {token_bounds} are not increasing "
                                  f"within {header.num_tokens} tokens; the index is corrupt")
    return FileSplits(prefix, header.dtype, header.num_tokens, num_sequences, num_documents,
                      tuple(sequence_bounds), tuple(token_bounds))


def _scan_entry(entry: BlendEntry, fractions: Sequence[float]):
    """scan_file's FileSplits; a MissingFileError as it is; any other problem as "where: what"."""
    try:
        return scan_file(entry.prefix, fractions)
    except MissingFileError as error:
        return error
    except (IndexedDatasetError, OSError) as error:
        return f"{entry.where}: {error}"


def _scan_entries(entries: Sequence[BlendEntry], fractions: Sequence[float], progress: bool) -> list:
    """`_scan_entry` of every entry, in order (in threads when reads are slow), the collector paused."""
    with paused_gc():
        return _map_in_threads(lambda entry: _scan_entry(entry, fractions), entries,
                               "reading .idx headers" if progress else None)


def scan_files(entries: Sequence[BlendEntry], fractions: Sequence[float], source: str = "data",
               progress: bool = False) -> list[FileSplits]:
    """`scan_file` for every entry, in threads; every unreadable file is reported in one DataListError."""
    results = [f"{entry.where}: {result}" if isinstance(result, MissingFileError) else result
               for entry, result in zip(entries, _scan_entries(entries, fractions, progress))]
    problems = [result for result in results if isinstance(result, str)]
    if problems:
        raise DataListError(source, problems, "unreadable or inconsistent .bin/.idx files")
    return results
