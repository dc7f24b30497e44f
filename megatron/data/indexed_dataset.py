"""Megatron's MMIDIDX `.bin/.idx` token files: memory-mapped reader, streaming writer, cheap header reads.

The lowest level of the data stack (indexed file -> GPT dataset -> blend). Byte-compatible with
Megatron-LM's `megatron/core/datasets/indexed_dataset.py`; layout of `PREFIX.idx` (little-endian):

    b"MMIDIDX\\x00\\x00"        9-byte magic
    <Q version = 1            <B dtype code (DTYPE_CODES)   <Q sequence_count   <Q document_count
    int32 sizes[sequence_count]          tokens per sequence
    int64 pointers[sequence_count]       byte offset of each sequence in PREFIX.bin
    int64 document_indices[document_count]  sequence index where each document starts; starts at 0,
                                            ends at sequence_count (so document_count = documents + 1)

`PREFIX.bin` is the concatenation of every sequence's tokens in the dtype named by the header.
Worked example: two documents [5, 6, 7] and [8, 9] in uint16 give sizes [3, 2], pointers [0, 6],
document_indices [0, 1, 2], and a 10-byte .bin.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from collections import namedtuple
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron.fileio import replace_atomically, with_retries
from megatron.errors import MegatronError

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
HEADER_BYTES = _HEADER.size  # 34

DTYPE_CODES = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

IndexHeader = namedtuple("IndexHeader", ["dtype", "num_sequences", "num_documents", "bin_bytes", "num_tokens"])


class IndexedDatasetError(MegatronError, ValueError):
    """A `.bin/.idx` pair that is missing, truncated, foreign or inconsistent; the message names the file."""


class MissingFileError(IndexedDatasetError):
    """A `.bin` or `.idx` that does not exist; `suffixes` says which: (".idx",), (".bin",) or both."""

    def __init__(self, message: str, suffixes: tuple):
        super().__init__(message)
        self.suffixes = tuple(suffixes)


def missing_index_error(path_prefix: str) -> MissingFileError:
    """The error for PREFIX.idx not found, naming the .bin too when it is absent as well."""
    idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
    bin_too = not os.path.exists(bin_path)
    return MissingFileError(f"{idx_path}: index file not found (dataset prefix {path_prefix!r}"
                            f"{'; its .bin is missing too' if bin_too else ''}); check --data-path / the data "
                            "file list", (".bin", ".idx") if bin_too else (".idx",))


def best_dtype(vocab_size: Optional[int]) -> type:
    """The smallest token dtype Megatron uses for a vocabulary: uint16 under 65,500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    """The MMIDIDX header code of a numpy dtype; error for dtypes the format cannot hold."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise IndexedDatasetError(f"dtype {dtype} cannot be stored in an MMIDIDX file; use one of: {names}")
    return _CODE_OF_DTYPE[dtype]


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _strip_suffix(path_prefix: str) -> str:
    """Accept `prefix`, `prefix.bin` or `prefix.idx` the way users type them."""
    path_prefix = os.fspath(path_prefix)
    for suffix in (".bin", ".idx"):
        if path_prefix.endswith(suffix):
            return path_prefix[: -len(suffix)]
    return path_prefix


def _parse_header(idx_path: str, raw: bytes):
    if len(raw) < HEADER_BYTES:
        raise IndexedDatasetError(
            f"{idx_path}: truncated index file ({len(raw)} bytes, an MMIDIDX header needs {HEADER_BYTES}); "
            "re-run tools/preprocess_data.py for this prefix")
    magic, version, code, num_sequences, num_documents = _HEADER.unpack(raw[:HEADER_BYTES])
    if magic != INDEX_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: not a Megatron MMIDIDX index (magic {magic!r}, expected {INDEX_MAGIC!r}); "
            "older 'lazy'/'cached' Megatron formats are not supported, re-run tools/preprocess_data.py")
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{idx_path}: MMIDIDX version {version} is not supported (only version 1)")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} in the header (valid codes 1-8)")
    return DTYPE_CODES[code], num_sequences, num_documents


def _expected_index_bytes(num_sequences: int, num_documents: int) -> int:
    return HEADER_BYTES + 4 * num_sequences + 8 * num_sequences + 8 * num_documents


def _check_index_size(idx_path: str, idx_bytes: int, num_sequences: int, num_documents: int) -> None:
    expected = _expected_index_bytes(num_sequences, num_documents)
    # Megatron-LM's multimodal files append one int8 mode per sequence; those still read as text tokens.
    if idx_bytes not in (expected, expected + num_sequences):
        problem = "truncated" if idx_bytes < expected else "has unexpected trailing bytes"
        raise IndexedDatasetError(
            f"{idx_path}: index file {problem}: {idx_bytes} bytes, but its header announces {num_sequences} "
            f"sequences and {num_documents} document indices ({expected} bytes); re-create it")


def _bin_size(bin_path: str, idx_path: str) -> int:
    try:
        return os.stat(bin_path).st_size
    except FileNotFoundError:
        raise MissingFileError(
            f"{bin_path}: data file missing (its index {idx_path} exists); copy the .bin next to the .idx "
            "or re-run tools/preprocess_data.py", (".bin",)) from None


def read_index_header(path_prefix: str, fd: Optional[int] = None) -> IndexHeader:
    """Read only the 34-byte header of PREFIX.idx and stat both files: O(1) per file, no arrays.

    Checks the magic, version, dtype, the .idx size against the counts, and that the .bin holds a
    whole number of tokens. Used by the blend to start up in O(number of files). `fd`: the .idx already
    open (the caller reads more of it and closes it); else it is opened and closed here.
    """
    path_prefix = _strip_suffix(path_prefix)
    idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
    def read_header():  # one unbuffered read: a buffered open reads a whole buffer for 34 bytes
        handle = os.open(idx_path, os.O_RDONLY) if fd is None else fd
        try:
            return os.pread(handle, HEADER_BYTES, 0), os.fstat(handle).st_size
        finally:
            if handle != fd:
                os.close(handle)

    try:  # a transient EIO / ESTALE (Lustre under load) is retried, logged
        raw, idx_bytes = with_retries(read_header, idx_path, log=logger.warning, error_type=IndexedDatasetError)
    except FileNotFoundError:
        raise missing_index_error(path_prefix) from None
    dtype, num_sequences, num_documents = _parse_header(idx_path, raw)
    _check_index_size(idx_path, idx_bytes, num_sequences, num_documents)
    bin_bytes = _bin_size(bin_path, idx_path)
    if bin_bytes % dtype.itemsize:
        raise IndexedDatasetError(f"{bin_path}: size {bin_bytes} bytes is not a multiple of the {dtype} token "
                                  f"size {dtype.itemsize}; the file is truncated or belongs to another index")
    return IndexHeader(dtype, num_sequences, num_documents, bin_bytes, bin_bytes // dtype.itemsize)


# ---- upstream's --append-eod files ---------------------------------------------------------------------------
# argonne-lcf/Megatron-DeepSpeed's tools/preprocess_data.py --append-eod appends the end-of-document token to each
# non-empty document's tokens in the .bin, but counts it in no sentence size, and its index builder computes the
# pointers from the sizes alone (an exclusive scan). So the .bin ends with one unlisted token per non-empty
# document, and document k (counting non-empty ones) lies k tokens after its pointer. Upstream reads such a file
# by its pointers and sizes: each document read shifted back by the EOD tokens before it, the EODs never seen
# as such. We read it the same way (so a resumed upstream run sees the very same tokens), saying so once per file;
# tools/repair_index.py rewrites the index so that the sizes count the EOD tokens.
_WARNED_UNLISTED: set = set()
_WARNED_LOCK = threading.Lock()  # the blend scans files in threads


def unlisted_eod_tokens(bin_bytes: int, listed_end: int, itemsize: int, num_documents: int) -> int:
    """The tokens past the index's last listed byte when they look like --append-eod's (at most one per
    document, whole tokens); 0 when the .bin ends where the index says, -1 when it is not that defect."""
    extra = bin_bytes - listed_end
    if extra == 0:
        return 0
    if extra < 0 or extra % itemsize or extra // itemsize > num_documents:
        return -1
    return extra // itemsize


def warn_unlisted_eod(path_prefix: str, tokens: int) -> None:
    """One warning per file (per process) that it is read as upstream reads an --append-eod file."""
    key = os.path.abspath(path_prefix)
    with _WARNED_LOCK:
        if key in _WARNED_UNLISTED:
            return
        _WARNED_UNLISTED.add(key)
    logger.warning(
        f"{path_prefix}.bin holds {tokens} end-of-document tokens that {path_prefix}.idx does not count (written by "
        "argonne-lcf/Megatron-DeepSpeed's tools/preprocess_data.py --append-eod, whose index leaves them out of the "
        "sizes and pointers); read as upstream reads it, by the index's pointers: the EOD tokens are not trained "
        "on and each document is read shifted back by the EOD tokens before it. Repair the index with "
        f"`python tools/repair_index.py {path_prefix}` (checks every document ends in the EOD id; rewrites only "
        "the .idx)")


class IndexedDataset:
    """Memory-mapped view of one PREFIX.bin/.idx pair; cheap validation when opened.

        ds = IndexedDataset("data/corpus/code_text_document")
        len(ds), ds.num_documents, ds.num_tokens
        ds.get(3)                # tokens of sequence 3 (a view into the memory map)
        ds.tokens(1000, 3048)    # the .bin as one flat token stream
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = _strip_suffix(path_prefix)
        header = read_index_header(self.path_prefix)
        self.dtype = header.dtype
        self.num_tokens = header.num_tokens
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        s, d = header.num_sequences, header.num_documents

        self._index_map = with_retries(lambda: np.memmap(idx_path, mode="r", dtype=np.uint8), idx_path,
                                       log=logger.warning, error_type=IndexedDatasetError)
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._index_map, dtype=np.int32, count=s, offset=offset)
        offset += 4 * s
        self.sequence_pointers = np.frombuffer(self._index_map, dtype=np.int64, count=s, offset=offset)
        offset += 8 * s
        self.document_indices = np.frombuffer(self._index_map, dtype=np.int64, count=d, offset=offset)

        if d < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != s:
            first = int(self.document_indices[0]) if d else None
            last = int(self.document_indices[-1]) if d else None
            raise IndexedDatasetError(
                f"{idx_path}: document indices must start at 0 and end at the sequence count {s}, "
                f"found first={first} last={last}; the index is corrupt")
        if s:
            first_pointer = int(self.sequence_pointers[0])
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            unlisted = unlisted_eod_tokens(header.bin_bytes, end, self.dtype.itemsize, d - 1)
            non_empty = int(np.count_nonzero(np.diff(self.document_indices))) if unlisted > 0 else 0
            if unlisted > 0 and unlisted == non_empty and first_pointer == 0:  # exactly one per non-empty document
                warn_unlisted_eod(self.path_prefix, unlisted)
            elif first_pointer != 0 or end != header.bin_bytes:
                raise IndexedDatasetError(
                    f"{bin_path}: size {header.bin_bytes} bytes disagrees with {idx_path}, which ends its last "
                    f"sequence at byte {end} (first pointer {first_pointer}); the pair does not belong "
                    "together or one file is truncated")
        elif header.bin_bytes:
            raise IndexedDatasetError(f"{bin_path}: {header.bin_bytes} bytes but {idx_path} lists no sequences")

        if header.bin_bytes:
            self._bin_map = with_retries(lambda: np.memmap(bin_path, mode="r", dtype=self.dtype), bin_path,
                                         log=logger.warning, error_type=IndexedDatasetError)
        else:  # an empty file cannot be memory-mapped
            self._bin_map = np.empty(0, dtype=self.dtype)

    def __getstate__(self):  # pickle the path, not the mapped arrays (DataLoader workers, spawn)
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, dtype={self.dtype}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens})")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence `idx` from `offset`, `length` of them (default: to the end); a read-only view."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} ({n} sequences)")
        idx = int(idx) % n
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {idx} of "
                             f"{self.path_prefix}, which has {size} tokens")
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return self._bin_map[start:start + length]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return [self.get(i) for i in range(start, stop, step)]
        return self.get(idx)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole .bin read as one token stream (a view; no copy)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside {data_file_path(self.path_prefix)} "
                             f"({self.num_tokens} tokens)")
        return self._bin_map[start:stop]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (documents may span several sequences)."""
        cumulative = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(cumulative[self.document_indices])


class TokenFile:
    """Positioned reads (pread) of one PREFIX.bin, and of ranges of its .idx, without a memory map.

        tokens = TokenFile("data/corpus/code_text_document", np.uint16, num_sequences=1000)
        tokens.read_into(out[:2049], start=4096)      # tokens [4096, 6145) of the flat stream, converted
        lengths, pointers = tokens.index_range(10, 20) # sizes and token offsets of sequences 10..19

    What the training datasets read through (IndexedDataset maps the files instead). The pages read
    stay in the kernel's page cache, shared by every process of the node, but are not charged to this
    process's resident memory as the touched pages of a memory map are; and a transient EIO / ESTALE
    (Lustre under load) is retried, logged, then reported naming the file (`with_retries`), where a
    fault on a mapped page would kill the process with SIGBUS. One file descriptor per object, opened
    on first use and closed when the object is dropped (never while a read holds it), and one for the
    .idx once `index_range` or `token_offsets` reads it.
    """

    def __init__(self, path_prefix: str, dtype, num_sequences: int, num_tokens: Optional[int] = None):
        self.path_prefix = _strip_suffix(path_prefix)
        self.dtype = np.dtype(dtype)
        self.num_sequences = int(num_sequences)
        self.num_tokens = None if num_tokens is None else int(num_tokens)  # checks index_range when known
        self._fd: Optional[int] = None  # the .bin's
        self._idx_fd: Optional[int] = None  # the .idx's, for index_range / token_offsets
        self._lock = threading.Lock()

    def __del__(self):
        for name in ("_fd", "_idx_fd"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __getstate__(self):  # DataLoader workers reopen the file themselves
        return {"path_prefix": self.path_prefix, "dtype": self.dtype.str, "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"], state["dtype"], state["num_sequences"], state["num_tokens"])

    def _opened(self, name: str, path: str) -> int:
        """The descriptor kept in attribute `name` for `path`, opened on first use (retried, logged)."""
        fd = getattr(self, name)
        if fd is None:
            with self._lock:
                fd = getattr(self, name)
                if fd is None:
                    fd = with_retries(lambda: os.open(path, os.O_RDONLY), path, log=logger.warning,
                                      error_type=IndexedDatasetError)
                    setattr(self, name, fd)
        return fd

    def _bin_fd(self) -> int:
        return self._opened("_fd", data_file_path(self.path_prefix))

    @staticmethod
    def _pread_exactly(fd: int, buffer: np.ndarray, offset: int, path: str,
                       failed: Optional[OSError] = None) -> None:
        """Fill `buffer` from byte `offset`: short reads continued, transient errors retried (`failed`: the
        error of a first attempt the caller made), a file that ends too soon named."""
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            count = with_retries(lambda: os.preadv(fd, [view[done:]], offset + done), path, log=logger.warning,
                                 error_type=IndexedDatasetError, failed=failed)
            failed = None
            if count == 0:
                size = os.fstat(fd).st_size
                raise IndexedDatasetError(
                    f"{path}: {size} bytes, but bytes [{offset}, {offset + len(view)}) were asked for; the file was "
                    "truncated or replaced after the run started: restore it, then relaunch")
            done += count

    def read_into(self, out: np.ndarray, start: int, failed: Optional[OSError] = None) -> np.ndarray:
        """Fill the 1-D `out` with tokens [start, start + len(out)) of the .bin's flat token stream
        (`failed`: the error of a first attempt the caller made, counted among the retries)."""
        if start < 0:
            raise IndexError(f"token {start} before the start of {data_file_path(self.path_prefix)}")
        if out.dtype == self.dtype:
            buffer = out
        else:
            buffer = np.empty(out.shape, dtype=self.dtype)
        self._pread_exactly(self._bin_fd(), buffer, start * self.dtype.itemsize, data_file_path(self.path_prefix),
                            failed)
        if buffer is not out:
            out[...] = buffer
        return out

    def read_pieces(self, out: np.ndarray, pieces) -> None:
        """Fill `out` (1-D, this file's dtype) with the tokens of `pieces`, [(first token, count), ...] laid end
        to end: one pread per piece straight into `out`. A read that fails or comes back short goes on through
        the checked path (`read_into`: the failure counted as its first attempt, retries, the file named)."""
        if out.dtype != self.dtype:
            raise TypeError(f"read_pieces needs a {self.dtype} buffer for {data_file_path(self.path_prefix)}, "
                            f"got {out.dtype}")
        fd, size = self._bin_fd(), self.dtype.itemsize
        view, at = memoryview(out).cast("B"), 0
        for start, count in pieces:
            nbytes = count * size
            failed = None
            try:
                done = os.preadv(fd, [view[at:at + nbytes]], start * size) if start >= 0 else -1
            except OSError as error:
                done, failed = -1, error
            if done != nbytes:
                self.read_into(out[at // size:at // size + count], start, failed)
            at += nbytes

    def _index_fd(self) -> tuple[int, str]:
        """The .idx's descriptor (opened on first use, like the .bin's) and its path."""
        path = index_file_path(self.path_prefix)
        return self._opened("_idx_fd", path), path

    def _pointers_to_tokens(self, pointers: np.ndarray, path: str, where: str,
                            lengths: Optional[np.ndarray] = None) -> np.ndarray:
        """Byte pointers read from the .idx as token offsets (in place), checked: not negative, whole tokens,
        and (with `lengths`, the sequences' ends; without, their starts) within the .bin's tokens."""
        size = self.dtype.itemsize  # 1, 2, 4 or 8: whole tokens are the pointers with no low bits set
        if pointers.size and (pointers.min() < 0 or (size > 1 and (pointers & (size - 1)).any())
                              or (lengths is not None and lengths.min() < 0)):
            lengths_too = ", or a length is negative" if lengths is not None else ""
            raise IndexedDatasetError(f"{path}: a sequence pointer {where} is negative or not a multiple of the "
                                      f"{self.dtype} token size{lengths_too}; the index is corrupt: re-create it "
                                      "with tools/preprocess_data.py")
        pointers >>= size.bit_length() - 1
        ends = pointers if lengths is None else pointers + lengths
        if self.num_tokens is not None and pointers.size and ends.max() > self.num_tokens:
            raise IndexedDatasetError(f"{path}: a sequence {where} {'starts' if lengths is None else 'ends'} after "
                                      f"the {self.num_tokens} tokens of {data_file_path(self.path_prefix)}; the index "
                                      "is corrupt or belongs to another .bin: re-create it with "
                                      "tools/preprocess_data.py")
        return pointers

    def index_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(lengths int32, token offsets int64) of sequences [start, stop), read from the .idx (two preads)."""
        if not 0 <= start <= stop <= self.num_sequences:
            raise IndexError(f"sequences [{start}, {stop}) outside {index_file_path(self.path_prefix)} "
                             f"({self.num_sequences} sequences)")
        lengths = np.empty(stop - start, dtype="<i4")
        pointers = np.empty(stop - start, dtype="<i8")
        fd, path = self._index_fd()
        self._pread_exactly(fd, lengths, HEADER_BYTES + 4 * start, path)
        self._pread_exactly(fd, pointers, HEADER_BYTES + 4 * self.num_sequences + 8 * start, path)
        return lengths, self._pointers_to_tokens(pointers, path, f"in [{start}, {stop})", lengths)

    def token_offsets(self, sequences) -> np.ndarray:
        """Where each of `sequences` (any order) starts in the .bin's token stream (int64): one 8-byte pread
        per entry, so a few hundred scattered entries cost well under a millisecond and map nothing."""
        sequences = np.asarray(sequences, dtype=np.int64).reshape(-1)
        if sequences.size and (sequences.min() < 0 or sequences.max() >= self.num_sequences):
            raise IndexError(f"a sequence in {sequences.min()}..{sequences.max()} is outside "
                             f"{index_file_path(self.path_prefix)} ({self.num_sequences} sequences)")
        out = np.empty(sequences.size, dtype="<i8")
        base = HEADER_BYTES + 4 * self.num_sequences
        fd, path = self._index_fd()
        for i, sequence in enumerate(sequences.tolist()):
            self._pread_exactly(fd, out[i:i + 1], base + 8 * sequence, path)
        return self._pointers_to_tokens(out, path, f"of {sequences.size} read")


class IndexedDatasetBuilder:
    """Streams tokens into a new .bin, then writes the matching .idx.

        builder = IndexedDatasetBuilder("out_text_document.bin", np.uint16)
        builder.add_document([5, 6, 7], [3])          # or add_item(tokens) ... end_document()
        builder.add_index("other_text_document")      # append another dataset (documents kept)
        builder.finalize("out_text_document.idx")

    Writes to `NAME.tmp-PID` files and renames both on `finalize` (the .idx last), so a reader never
    sees a half-written pair under the final names. `abort()` removes the temporary files.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # refuse dtypes the format cannot name, before writing anything
        self.bin_path = os.fspath(bin_path)
        self._tmp_bin_path = f"{self.bin_path}.tmp-{os.getpid()}"
        self._bin_file = open(self._tmp_bin_path, "wb")
        self._length_chunks: list[np.ndarray] = []
        self._document_chunks: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._num_sequences = 0
        self._pending_sequences = 0  # sequences added since the last end_document

    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    def _write_tokens(self, tokens) -> int:
        array = np.asarray(tokens)
        if array.dtype != self.dtype:
            if array.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                low, high = array.min(), array.max()
                if low < info.min or high > info.max:
                    raise IndexedDatasetError(
                        f"{self.bin_path}: token id {high if high > info.max else low} does not fit the "
                        f"file's dtype {self.dtype}; build it with a wider dtype (int32)")
            array = array.astype(self.dtype)
        self._bin_file.write(np.ascontiguousarray(array).data)
        return array.size

    def add_item(self, tokens) -> None:
        """Append one sequence (it belongs to the current document until `end_document`)."""
        size = self._write_tokens(tokens)
        self._length_chunks.append(np.array([size], dtype=np.int32))
        self._num_sequences += 1
        self._pending_sequences += 1

    def end_document(self) -> None:
        """Close the current document: the sequences since the last call form one document."""
        self._document_chunks.append(np.array([self._num_sequences], dtype=np.int64))
        self._pending_sequences = 0

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append one document made of len(lengths) sequences whose tokens are concatenated in `tokens`."""
        lengths = np.asarray(lengths, dtype=np.int64)
        size = self._write_tokens(tokens)
        if int(lengths.sum()) != size:
            raise IndexedDatasetError(f"{self.bin_path}: add_document got {size} tokens but lengths sum to "
                                      f"{int(lengths.sum())}")
        self._length_chunks.append(lengths.astype(np.int32))
        self._num_sequences += len(lengths)
        self.end_document()

    def add_documents(self, tokens, document_lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` concatenated, `document_lengths` per document.

        The fast path for preprocessing: one write and two array appends per batch of documents.
        """
        document_lengths = np.asarray(document_lengths, dtype=np.int64)
        if self._pending_sequences:
            raise IndexedDatasetError(f"{self.bin_path}: add_documents called inside an open document; "
                                      "call end_document() first")
        size = self._write_tokens(tokens)
        if int(document_lengths.sum()) != size:
            raise IndexedDatasetError(f"{self.bin_path}: add_documents got {size} tokens but lengths sum to "
                                      f"{int(document_lengths.sum())}")
        if document_lengths.size and document_lengths.max() > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.bin_path}: a document of {int(document_lengths.max())} tokens "
                                      "exceeds the int32 size field")
        self._length_chunks.append(document_lengths.astype(np.int32))
        first = self._num_sequences + 1
        self._num_sequences += len(document_lengths)
        self._document_chunks.append(np.arange(first, self._num_sequences + 1, dtype=np.int64))

    def add_index(self, path_prefix: str) -> None:
        """Append every document of an existing dataset (dtype must match), copying its .bin bytes."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{data_file_path(other.path_prefix)}: dtype {other.dtype} differs from the output's "
                f"{self.dtype}; datasets can only be merged when they share a dtype (re-tokenize one of them)")
        if self._pending_sequences:
            raise IndexedDatasetError(f"{self.bin_path}: add_index called inside an open document; "
                                      "call end_document() first")
        offset = self._num_sequences
        self._length_chunks.append(np.array(other.sequence_lengths, dtype=np.int32))
        self._document_chunks.append(np.asarray(other.document_indices[1:], dtype=np.int64) + offset)
        self._num_sequences += len(other)
        with open(data_file_path(other.path_prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin_file, 16 * 1024 * 1024)

    def finalize(self, idx_path: str) -> None:
        """Write the .idx and move both files to their final names."""
        if self._pending_sequences:
            self.end_document()  # sequences left outside a document would make an invalid index
        self._bin_file.close()
        idx_path = os.fspath(idx_path)
        lengths = (np.concatenate(self._length_chunks) if self._length_chunks
                   else np.zeros(0, dtype=np.int32))
        documents = np.concatenate(self._document_chunks)
        tmp_idx_path = f"{idx_path}.tmp-{os.getpid()}"
        try:
            write_index(tmp_idx_path, self.dtype, lengths, documents)
            replace_atomically(self._tmp_bin_path, self.bin_path)
            replace_atomically(tmp_idx_path, idx_path)
        except BaseException:
            for path in (tmp_idx_path, self._tmp_bin_path):
                if os.path.exists(path):
                    os.remove(path)
            raise

    def abort(self) -> None:
        """Close and delete the temporary .bin (after an error); the final names are never touched."""
        if not self._bin_file.closed:
            self._bin_file.close()
        if os.path.exists(self._tmp_bin_path):
            os.remove(self._tmp_bin_path)


def write_index(idx_path: str, dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an .idx for sequences stored back to back (pointers are the running byte offsets)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    documents = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, dtype_code(dtype), len(lengths), len(documents)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(documents.tobytes())


def write_dataset(path_prefix: str, documents: Iterable, dtype) -> None:
    """Write a dataset of one-sequence documents from an iterable of token lists (small data, tests)."""
    builder = IndexedDatasetBuilder(data_file_path(path_prefix), dtype)
    try:
        for tokens in documents:
            builder.add_item(tokens)
            builder.end_document()
        builder.finalize(index_file_path(path_prefix))
    except BaseException:
        builder.abort()
        raise


def write_synthetic_dataset(path_prefix: str, num_tokens: int, num_documents: int, dtype=np.uint16,
                            seed: int = 0, sparse: bool = False) -> None:
    """Write a fake dataset of `num_tokens` tokens in `num_documents` one-sequence documents, quickly.

    Dense: random token ids (seeded) and random document lengths (each >= 1) summing to num_tokens.
    Sparse: the .bin is only `truncate()`d to its size (a sparse file: nothing written, reads as
    token 0) and documents have equal lengths (the first num_tokens % num_documents get one more);
    used to fake thousands of huge files for the blend's start-up benchmark.
    """
    dtype = np.dtype(dtype)
    if num_documents < 1 or num_tokens < num_documents:
        raise ValueError(f"write_synthetic_dataset({path_prefix!r}): need 1 <= num_documents <= num_tokens, "
                         f"got num_documents={num_documents}, num_tokens={num_tokens}")
    rng = np.random.default_rng(seed)
    if sparse:
        lengths = np.full(num_documents, num_tokens // num_documents, dtype=np.int64)
        lengths[: num_tokens % num_documents] += 1
    else:
        cuts = np.sort(rng.choice(np.arange(1, num_tokens), size=num_documents - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [num_tokens]]))
    if lengths.max() > np.iinfo(np.int32).max:
        raise ValueError(f"write_synthetic_dataset({path_prefix!r}): documents of {int(lengths.max())} tokens "
                         "exceed the int32 size field; use more documents")
    bin_path, idx_path = data_file_path(path_prefix), index_file_path(path_prefix)
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    with open(tmp_bin, "wb") as f:
        if sparse:
            f.truncate(num_tokens * dtype.itemsize)
        else:
            high = int(np.iinfo(dtype).max) + 1 if np.issubdtype(dtype, np.integer) else 50000
            high = min(high, 2 ** 31 - 1)
            for start in range(0, num_tokens, 1 << 24):
                count = min(1 << 24, num_tokens - start)
                f.write(rng.integers(0, high, size=count).astype(dtype).tobytes())
    write_index(tmp_idx, dtype, lengths, np.arange(num_documents + 1, dtype=np.int64))
    replace_atomically(tmp_bin, bin_path)
    replace_atomically(tmp_idx, idx_path)


def repair_appended_eod(path_prefix: str, eod_id: Optional[int] = None, check_only: bool = False) -> dict:
    """Rewrite the .idx of an upstream --append-eod file so that its sizes (and pointers) count each document's
    end-of-document token; the .bin is not touched. Returns {"documents", "eod_tokens", "eod_id", "repaired"}
    ("eod_tokens" 0: the index already lists every token, nothing is written). Refuses (IndexedDatasetError,
    nothing written) a file whose unlisted tokens are not one per non-empty document, or whose documents do not
    each end in the EOD id (naming the first that does not). `eod_id` None: the .bin's last token (the last
    document's EOD), checked against every document like a given one. With `check_only` nothing is written."""
    path_prefix = _strip_suffix(path_prefix)
    idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
    header = read_index_header(path_prefix)
    s, d = header.num_sequences, header.num_documents
    raw = np.fromfile(idx_path, dtype=np.uint8)
    sizes = np.frombuffer(raw, dtype=np.int32, count=s, offset=HEADER_BYTES).astype(np.int64)
    pointers = np.frombuffer(raw, dtype=np.int64, count=s, offset=HEADER_BYTES + 4 * s)
    documents = np.frombuffer(raw, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s).copy()
    itemsize = header.dtype.itemsize
    extra = header.num_tokens - int(sizes.sum())
    result = {"documents": d - 1, "eod_tokens": max(extra, 0), "eod_id": eod_id, "repaired": False}
    if extra == 0:
        return result
    starts = np.zeros(s, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    if extra < 0 or not np.array_equal(pointers, starts * itemsize) or d < 1 or documents[0] != 0 \
            or documents[-1] != s or (np.diff(documents) < 0).any():
        raise IndexedDatasetError(
            f"{idx_path}: not an index written by upstream's --append-eod (its pointers are not the running sum of "
            f"its sizes, or the .bin holds {header.num_tokens} tokens against the {int(sizes.sum())} listed): "
            "nothing was changed; re-create the pair with tools/preprocess_data.py")
    per_document = np.add.reduceat(sizes, documents[:-1]) if s else np.zeros(d - 1, dtype=np.int64)
    per_document[np.diff(documents) == 0] = 0  # reduceat gives a neighbour's size for an empty document
    non_empty = np.flatnonzero(per_document > 0)
    if len(non_empty) != extra:
        raise IndexedDatasetError(
            f"{bin_path}: {extra} tokens are not listed by {idx_path}, but the index has {len(non_empty)} non-empty "
            "documents; --append-eod leaves exactly one per non-empty document, so this pair has another defect: "
            "nothing was changed; re-create it with tools/preprocess_data.py")
    new_sizes = sizes.copy()
    last_sequence = documents[non_empty + 1] - 1
    new_sizes[last_sequence] += 1
    new_starts = np.zeros(s, dtype=np.int64)
    np.cumsum(new_sizes[:-1], out=new_starts[1:])
    tokens = np.memmap(bin_path, mode="r", dtype=header.dtype)
    last_tokens = np.asarray(tokens[new_starts[last_sequence] + new_sizes[last_sequence] - 1]).astype(np.int64)
    derived = eod_id is None
    if derived:
        eod_id = int(tokens[-1])
    result["eod_id"] = eod_id
    bad = np.flatnonzero(last_tokens != eod_id)
    if bad.size:
        first = int(non_empty[bad[0]])
        how = "the .bin's last token, taken as the EOD id" if derived else "--eod-id"
        raise IndexedDatasetError(
            f"{bin_path}: document {first} ends in token {int(last_tokens[bad[0]])}, not the end-of-document id "
            f"{eod_id} ({how}); {bad.size} of {len(non_empty)} documents do not: not an --append-eod file of that "
            "tokenizer, nothing was changed (give the tokenizer's --eod-id, or re-create the pair with "
            "tools/preprocess_data.py)")
    if check_only:
        return result
    if int(new_sizes.max(initial=0)) > np.iinfo(np.int32).max:
        raise IndexedDatasetError(f"{idx_path}: a sequence would exceed 2^31 tokens; nothing was changed")
    from megatron.fileio import atomic_output

    with atomic_output(idx_path) as tmp:
        write_index(tmp, header.dtype, new_sizes, documents)
    result["repaired"] = True
    return result
