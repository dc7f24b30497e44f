"""GPT training samples: `build_datasets` turns a DataConfig into train/valid/test datasets of token windows.

The middle of the data stack (indexed file -> GPT dataset -> blend): a dataset asks the arithmetic
blend (megatron/data/blend.py) which file and sample a global sample number is, then reads its
seq_length + 1 tokens. sample_mode "samples" (default) reads consecutive windows of each file's token
stream (at a new offset each epoch); "documents" follows Megatron (documents shuffled per epoch, samples
spanning documents) with a per-(file, epoch) index built on demand, cached in bounded memory and shared
between the ranks of a node; "upstream" is argonne-lcf/Megatron-DeepSpeed's exact order
(megatron/data/upstream_order.py). `MockGPTDataset` makes learnable fake data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing.util
import os
import tempfile
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from megatron.data.blend import DEFAULT_WINDOW, PHASE_PERIOD, BlendedIndex, golden_step
from megatron.data.data_list import SPLIT_NAMES, DataListError, FileSplits, parse_split, paused_gc, scan_blend
from megatron.data.indexed_dataset import IndexedDatasetError, TokenFile
from megatron.data.permutation import derive_key, shuffled_range
from megatron.data.upstream_order import build_upstream_datasets
from megatron.fileio import replace_atomically

logger = logging.getLogger(__name__)
SAMPLE_MODES = ("samples", "documents")  # GPTDataset's; "upstream" is UpstreamOrderDataset (upstream_order.py)


def _default_open_files(descriptors_per_file: int = 1) -> int:
    """How many token files a dataset keeps open: their descriptors (the .bin's; the .idx's too in documents
    mode) take at most half the soft descriptor limit; at most 4,096 files."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 512 // descriptors_per_file
    if soft == getattr(resource, "RLIM_INFINITY", -1):
        return 4096
    return int(min(4096, max(16, soft // (2 * descriptors_per_file))))


DEFAULT_INDEX_CACHE_BYTES = 64 << 20  # per process: the most bytes of one-shuffle indices and block plans kept
# per process, the most bytes of built blocks kept: a block is rebuilt in ~0.3 ms and samples land in any block
# of any file, so a large cache would mostly hold blocks no one reads again soon, on every rank of a node
DEFAULT_BLOCK_CACHE_BYTES = 8 << 20
DEFAULT_SHARED_INDEX_BYTES = 2 << 30  # per node directory: indices shared between ranks (tmpfs is RAM)
SHARE_MIN_BYTES = 1 << 20  # smaller indices are cheap to rebuild; this also bounds the mapped files (fds)
SHARED_INDEX_SWEEP_EVERY = 32  # writes between two size checks of the shared directory
# documents mode shuffles a file with more documents than this in blocks of this many (--document-shuffle-block)
DEFAULT_DOCUMENT_SHUFFLE_BLOCK = 8192


def _remove_files(paths: list) -> None:
    while paths:
        with contextlib.suppress(OSError, IndexError):
            os.remove(paths.pop())


def default_shared_index_dir() -> str:
    """Node-local RAM (/dev/shm) where it exists, else the temporary directory; one per user."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"megatron-document-index-{os.getuid() if hasattr(os, 'getuid') else 0}")


class DocumentIndex:
    """Megatron's document-shuffled order, one (file, epoch) at a time, on demand, in bounded memory.

    A file of at most `block` documents in the split (--document-shuffle-block, default 8,192; every
    file when it is 0) is shuffled as one, Megatron's way: its sequences are permuted by a generator
    keyed by (seed, split, f, e) (`order`); `starts[i]` is where the i-th of them begins in the .bin's
    token stream and `ends[i]` the tokens of the first i + 1 laid end to end. Sample t of the epoch is
    tokens [t * seq, (t + 1) * seq] of that concatenation (it may span documents, as in Megatron); its
    pieces are binary searches in `ends` and reads at `starts`, so nothing per sample is stored and
    reading needs no .idx: 8 bytes per document (16 in files of 2**32 tokens or more), against
    Megatron's 16 bytes per sample plus its doc_idx. The blend's Feistel permutation plays the part of
    Megatron's shuffle_idx. Building reads the split's lengths and pointers from the .idx once.

    A larger file is shuffled in two levels, because one shuffle costs O(documents) per file and
    epoch, ~100 ns a document: at 2T tokens with Dolma's document counts the first global batch would
    touch ~800 files holding 1.2 billion documents. Each epoch rotates the split's documents by a
    keyed offset and cuts them into blocks of `block` consecutive documents; the epoch lays the blocks
    end to end in a keyed random order (the "plan": one .idx pointer per block gives its tokens, since
    documents lie back to back in the .bin), and the documents of each block in a keyed random order
    (a block is built, like a small file's index, the first time a sample needs it). Placing a sample
    costs O(block + documents / block), ~1 ms for a 1.5-million-document file, and holds 16 bytes per
    block plus 64 KiB per built block. What differs from one uniform shuffle: the documents of one
    sample (and of neighbouring samples of an epoch) come from one stretch of ~`block` consecutive
    documents of the file, a new stretch each epoch; every document still appears once per epoch,
    epochs are shuffled independently, and samples still span documents.

    Memory: least-recently-used caches hold at most `cache_bytes` (64 MiB) of one-shuffle indices and
    plans, and `block_cache_bytes` (8 MiB) of blocks, per process, however many files a run touches.
    Ranks of one node share instead of duplicating what is costly: an index of at least SHARE_MIN_BYTES
    (a one-shuffle file of 131,072 documents or more, which only --document-shuffle-block 0 or a larger
    block allows) is written once (temporary name,
    rename) into `shared_dir` (default: node-local /dev/shm) and memory-mapped by every rank that
    needs it, so its pages exist once per node. A rank that finds no file builds the index itself: no
    barrier, no rank waits on another, and nothing needs a shared filesystem (building is
    deterministic, so a duplicate build writes the same bytes). The directory is kept under
    `shared_bytes` (oldest files removed; a mapped file stays valid), and each process removes the
    files it wrote when it closes or exits. Plans and blocks are not shared: each costs well under a
    millisecond to build, less than opening and mapping a shared file.

    The last partial sample of an epoch (fewer than seq_length + 1 tokens left) is dropped, where
    Megatron lets it run into the next epoch's documents: each (file, epoch) then stands alone and can
    be built on demand by any rank; the loss is under one sample per file and epoch.
    """

    def __init__(self, dataset: "GPTDataset", shared_dir: Optional[str] = None,
                 cache_bytes: Optional[int] = None, shared_bytes: int = DEFAULT_SHARED_INDEX_BYTES,
                 share_min_bytes: int = SHARE_MIN_BYTES, block: Optional[int] = None,
                 block_cache_bytes: Optional[int] = None):
        self.dataset = dataset
        self.block = int(dataset.document_shuffle_block if block is None else block)
        self.shared_dir = shared_dir or default_shared_index_dir()
        self.shared_bytes, self.share_min_bytes = int(shared_bytes), share_min_bytes
        self._lock = threading.Lock()
        # (file, epoch) -> (starts, ends) and ("plan", file, epoch) -> (order, ends) of its blocks ...
        self._indices = _ArrayLRU(DEFAULT_INDEX_CACHE_BYTES if cache_bytes is None else cache_bytes)
        # ... and ("block", file, epoch, block) -> (starts, ends) of one built block, in their own budget
        self._blocks = _ArrayLRU(DEFAULT_BLOCK_CACHE_BYTES if block_cache_bytes is None else block_cache_bytes)
        self._written: list[str] = []
        self.builds = 0  # indices this process computed (the rest came from its cache or the shared directory)
        self.shared_loads = 0
        # run at exit in this process only, DataLoader worker processes included (atexit is not run there);
        # holds the list, not this object
        multiprocessing.util.Finalize(None, _remove_files, args=(self._written,), exitpriority=10)
        if os.path.isdir(self.shared_dir):
            self._sweep_shared_dir()  # what crashed runs left behind stays under shared_bytes

    def close(self) -> None:
        """Remove the shared files this process wrote (a rank still mapping one keeps its pages)."""
        _remove_files(self._written)

    @property
    def cache_bytes(self) -> int:
        """The most bytes of one-shuffle indices and plans this process keeps."""
        return self._indices.budget

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self._indices.budget = int(value)

    @property
    def block_cache_bytes(self) -> int:
        """The most bytes of built blocks this process keeps."""
        return self._blocks.budget

    @block_cache_bytes.setter
    def block_cache_bytes(self, value: int) -> None:
        self._blocks.budget = int(value)

    def cached_bytes(self) -> int:
        with self._lock:
            return self._indices.bytes + self._blocks.bytes

    def _shared_path(self, file: int, epoch: int) -> str:
        ds = self.dataset
        meta = ds.files[file]
        description = (f"{os.path.abspath(meta.prefix)}|{meta.num_tokens}|{meta.num_sequences}|"
                       f"{meta.sequence_range(ds.split)}|{ds.seed}|{ds.split}|{file}|{epoch}|v4")
        return os.path.join(self.shared_dir, hashlib.sha1(description.encode()).hexdigest()[:24] + ".npy")

    def order(self, file: int, epoch: int) -> np.ndarray:
        """The shuffled order of the split's sequences (positions in the split) for one file and epoch."""
        ds = self.dataset
        start, stop = ds.files[file].sequence_range(ds.split)
        key = int(derive_key(ds.seed, ds.split, file, epoch, 0xD0C)[0])
        return shuffled_range(stop - start, key)

    def build(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of one file and epoch, computed here."""
        ds = self.dataset
        start, stop = ds.files[file].sequence_range(ds.split)
        lengths, pointers = ds.reader(file).index_range(start, stop)
        order = self.order(file, epoch)
        ends = np.cumsum(lengths[order], dtype=np.int64)
        del lengths
        dtype = _position_dtype(ds.files[file].num_tokens, int(ends[-1]) if ends.size else 0)
        return pointers[order].astype(dtype, copy=False), ends.astype(dtype, copy=False)

    def _load_or_build(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        meta = self.dataset.files[file]
        n = meta.sequence_range(self.dataset.split)
        shared = (n[1] - n[0]) * (8 if meta.num_tokens < 1 << 32 else 16) >= self.share_min_bytes
        path = self._shared_path(file, epoch) if shared else None
        if path:
            try:
                both = np.load(path, mmap_mode="r")
                if both.shape == (2, n[1] - n[0]):
                    with self._lock:
                        self.shared_loads += 1
                    return both[0], both[1]
            except (OSError, ValueError):  # absent, being replaced, or removed by its writer: build it here
                pass
        order, ends = self.build(file, epoch)
        with self._lock:
            self.builds += 1
        if not path:
            return order, ends
        try:
            os.makedirs(self.shared_dir, exist_ok=True)
            temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}.npy"
            np.save(temporary, np.stack([order, ends]))
            replace_atomically(temporary, path)
            with self._lock:
                self._written.append(path)  # list.append is atomic; _remove_files pops
                sweep = len(self._written) % SHARED_INDEX_SWEEP_EVERY == 0
            if sweep:
                self._sweep_shared_dir()
            both = np.load(path, mmap_mode="r")  # this rank, too, keeps the node's one copy
            return both[0], both[1]
        except OSError as error:  # a full or read-only directory: keep the private copy
            logger.debug("document index %s not shared: %s", path, error)
            return order, ends

    def _sweep_shared_dir(self) -> None:
        """Remove the oldest shared indices while the directory holds more than shared_bytes."""
        try:
            entries = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(self.shared_dir)
                       if e.name.endswith(".npy") and ".tmp-" not in e.name]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.shared_bytes:
                break
            with contextlib.suppress(OSError):
                os.remove(path)
            total -= size

    def get(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of a (file, epoch) shuffled as one: from this process's cache, the node's shared
        copy, or built now (concurrent threads may both build: the same result, and no one waits)."""
        return self._cached((file, epoch), lambda: self._load_or_build(file, epoch), counted=False)

    # ---- files of more than `block` documents: a two-level shuffle, built a block at a time ----------

    def blocked(self, file: int) -> bool:
        """Whether (file)'s split is shuffled in blocks (more than `block` documents) or as one."""
        start, stop = self.dataset.files[file].sequence_range(self.dataset.split)
        return 0 < self.block < stop - start

    def _rotation(self, file: int, epoch: int, documents: int) -> int:
        ds = self.dataset
        return int(derive_key(ds.seed, ds.split, file, epoch, 0xB10C)[0] % np.uint64(documents))

    def build_plan(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, ends) of the blocks of a blocked (file, epoch): `order[j]` is the block at place j of the
        epoch and `ends[j]` the tokens of the first j + 1 places. Block b holds the documents at places
        [b * block, (b + 1) * block) of the split rotated by a per-epoch offset; its token count comes from
        the .idx pointers at its two ends (documents lie back to back in the .bin), so a plan reads
        documents / block entries of the .idx, not every document's length."""
        ds = self.dataset
        start, stop = ds.files[file].sequence_range(ds.split)
        first_token, last_token = ds.files[file].token_range(ds.split)
        documents = stop - start
        rotation = self._rotation(file, epoch, documents)
        blocks = -(-documents // self.block)
        places = np.minimum(np.arange(blocks + 1, dtype=np.int64) * self.block, documents)
        real = (rotation + places[:-1]) % documents  # the split's document at the start of each block
        before = ds.reader(file).token_offsets(start + real) - first_token  # tokens of the split before it
        total = last_token - first_token
        rotated = np.append(before - before[0], total)  # tokens before each block in the rotated stream
        rotated[:-1] += np.where(rotation + places[:-1] >= documents, total, 0)  # blocks after the wrap-around
        sizes = np.diff(rotated)
        key = int(derive_key(ds.seed, ds.split, file, epoch, 0xB1C0)[0])
        order = shuffled_range(blocks, key)
        return order, np.cumsum(sizes[order], dtype=np.int64)

    def build_block(self, file: int, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of block `block` of a blocked (file, epoch), its documents shuffled (as `build`)."""
        ds = self.dataset
        start, stop = ds.files[file].sequence_range(ds.split)
        documents = stop - start
        first = (self._rotation(file, epoch, documents) + block * self.block) % documents
        count = min(self.block, documents - block * self.block)
        reader = ds.reader(file)
        pieces = [reader.index_range(start + first, start + min(first + count, documents))]
        if first + count > documents:  # the block wraps around the split's end
            pieces.append(reader.index_range(start, start + first + count - documents))
        lengths, pointers = pieces[0] if len(pieces) == 1 else (np.concatenate(both) for both in zip(*pieces))
        key = int(derive_key(ds.seed, ds.split, file, epoch, block, 0xD0C)[0])
        order = shuffled_range(count, key)
        ends = np.cumsum(lengths[order], dtype=np.int64)
        starts = pointers[order]
        plan_order, plan_ends = self._cached(("plan", file, epoch), lambda: self.build_plan(file, epoch))
        place = int(np.flatnonzero(plan_order == block)[0])
        expected = int(plan_ends[place]) - (int(plan_ends[place - 1]) if place else 0)
        if int(ends[-1]) != expected:
            path = ds.files[file].prefix + ".idx"
            raise IndexedDatasetError(
                f"{path}: documents {start + first}.. of this file hold {int(ends[-1])} tokens by their lengths but "
                f"{expected} by their pointers: its documents are not laid back to back in the .bin, which "
                "--sample-mode documents needs for files of more than --document-shuffle-block documents; "
                "re-create the file with tools/preprocess_data.py, or pass --document-shuffle-block 0 "
                "(one shuffle of all its documents)")
        dtype = _position_dtype(ds.files[file].num_tokens, int(ends[-1]))
        return starts.astype(dtype, copy=False), ends.astype(dtype, copy=False)

    def _cached(self, key: tuple, build, counted: bool = True):
        """An entry of the process's LRU caches (blocks: block_cache_bytes; the rest: cache_bytes), built on a
        miss (`counted` in `builds`, unless `build` counts for itself)."""
        store = self._blocks if key[0] == "block" else self._indices
        with self._lock:
            hit = store.get(key)
        if hit is not None:
            return hit
        entry = build()
        with self._lock:
            self.builds += counted
            store.put(key, entry)
        return entry

    # ---- reading a sample ---------------------------------------------------------------------------

    def sample_pieces(self, file: int, epoch: int, sample: int) -> list[tuple[int, int]]:
        """Where sample `sample` of (file, epoch) lies in the .bin: [(first token, tokens), ...], in order,
        seq_length + 1 tokens in all, running across documents (and blocks) as Megatron's samples do."""
        need = self.dataset.seq_length + 1
        begin = sample * self.dataset.seq_length
        if not self.blocked(file):
            starts, ends = self.get(file, epoch)
            return _pieces(starts, ends, begin, need)
        order, block_ends = self._cached(("plan", file, epoch), lambda: self.build_plan(file, epoch))
        place = int(np.searchsorted(block_ends, begin, side="right"))
        offset = begin - (int(block_ends[place - 1]) if place else 0)
        pieces = []
        while need:
            block = int(order[place])
            starts, ends = self._cached(("block", file, epoch, block),
                                        lambda: self.build_block(file, epoch, block))
            taken = _pieces(starts, ends, offset, min(need, int(ends[-1]) - offset))
            pieces += taken
            need -= sum(count for _, count in taken)
            place, offset = place + 1, 0
        return pieces


def _pieces(starts: np.ndarray, ends: np.ndarray, begin: int, need: int) -> list[tuple[int, int]]:
    """Tokens [begin, begin + need) of documents laid end to end (`ends` their running totals, `starts`
    where each begins in the .bin), as [(first token in the .bin, tokens), ...]."""
    pieces = []
    place = int(np.searchsorted(ends, begin, side="right"))
    offset = begin - (int(ends[place - 1]) if place else 0)
    while need:
        size = min(need, int(ends[place]) - (int(ends[place - 1]) if place else 0) - offset)
        pieces.append((int(starts[place]) + offset, size))
        need -= size
        place, offset = place + 1, 0
    return pieces


def _position_dtype(num_tokens: int, total: int):
    """uint32 when a file's token positions (under num_tokens) and its documents' running total both fit
    4 bytes (most files: 8 bytes per document, not 16), else int64. The total can exceed the file's tokens
    only in an .idx whose entries overlap (a document listed twice)."""
    return np.uint32 if num_tokens < 1 << 32 and total < 1 << 32 else np.int64


class _ArrayLRU:
    """Least-recently-used entries of (array, array), at most `budget` bytes in all (the newest is kept even
    when it alone is larger). Not thread-safe: DocumentIndex holds its lock around every call."""

    def __init__(self, budget: int):
        self.budget, self.bytes = int(budget), 0
        self.entries: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()

    def get(self, key: tuple):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: tuple) -> None:
        if key not in self.entries:
            self.entries[key] = entry
            self.bytes += entry[0].nbytes + entry[1].nbytes
        while self.bytes > self.budget and len(self.entries) > 1:
            _, (first, second) = self.entries.popitem(last=False)
            self.bytes -= first.nbytes + second.nbytes


class GPTDataset:
    """Samples of one split of a blend: `ds[g] -> {"tokens": int64 array [seq_length + 1]}`, len = num_samples.

    Global sample g is placed by the arithmetic `BlendedIndex`; in "samples" mode file f's sample s of
    epoch e is tokens [o + s * seq_length, o + (s + 1) * seq_length + 1) of the split's token range
    (o = `window_offset(f, e)`: 0 in epoch 0, a new offset each later epoch, wrapping at the range's
    end), so neighbouring samples share one token as in Megatron and repeated epochs cut new windows.
    Token ids >= vocab_size are caught when a sample is read, with the file named.
    """

    def __init__(self, files: Sequence[FileSplits], weights: Sequence[float], split: int, seq_length: int,
                 seed: int, num_samples: int, vocab_size: Optional[int] = None, sample_mode: str = "samples",
                 window: int = DEFAULT_WINDOW, document_index_cache: Optional[str] = None,
                 corpora: Optional[Sequence[str]] = None,
                 left_out: Sequence[tuple[str, int]] = (), source: str = "data",
                 document_shuffle_block: int = DEFAULT_DOCUMENT_SHUFFLE_BLOCK):
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"DataConfig.sample_mode {sample_mode!r} is not one of {SAMPLE_MODES}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.files = list(files)
        self.split = int(split)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.vocab_size = vocab_size
        self.sample_mode = sample_mode
        if document_shuffle_block < 0:
            raise ValueError("document_shuffle_block (--document-shuffle-block) must be >= 0 (0: one shuffle per "
                             f"file), got {document_shuffle_block}")
        self.document_shuffle_block = int(document_shuffle_block)
        self.num_files = len(self.files)
        self.samples_per_file = np.array([f.num_samples(self.split, self.seq_length) for f in self.files],
                                         dtype=np.int64)
        self.token_start = np.array([f.token_range(self.split)[0] for f in self.files], dtype=np.int64)
        self.index = BlendedIndex(self.samples_per_file, weights, seed, window=window, salt=self.split)
        self._offset_step = golden_step(self.seq_length - 1) if self.seq_length > 2 else 1
        starved = self.index.starved_files()
        if starved.size:
            smallest = 1.0 / (self.index.window * PHASE_PERIOD)
            raise DataListError(source, [
                f"{self.files[f].prefix}: weight {weights[f]:g} is {self.index.weights[f]:.3g} of the "
                f"{SPLIT_NAMES[self.split]} blend, too small for the schedule ever to give it a sample (it needs "
                f"a share above ~{smallest:.1g}); raise its weight or drop the file" for f in starved.tolist()])
        self.corpora = list(corpora) if corpora is not None else [os.path.basename(f.prefix) for f in self.files]
        self.left_out = list(left_out)
        self._readers: "OrderedDict[int, TokenFile]" = OrderedDict()  # least recently used first
        self._readers_lock = threading.Lock()
        self.max_open_files = _default_open_files(2 if sample_mode == "documents" else 1)
        self._shared_index_dir = document_index_cache
        self.document_index = (DocumentIndex(self, document_index_cache)
                               if sample_mode == "documents" else None)

    def __getstate__(self) -> dict:
        """For DataLoader worker processes: memory maps, locks and index threads are rebuilt there."""
        state = dict(self.__dict__)
        state.update(_readers=OrderedDict(), _readers_lock=None, document_index=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers_lock = threading.Lock()
        if self.sample_mode == "documents":  # a worker builds what it needs, on demand
            self.document_index = DocumentIndex(self, self._shared_index_dir)

    def __len__(self) -> int:
        return self.num_samples

    def reader(self, file: int) -> TokenFile:
        """The file's pread reader, opened on first use (start-up never opens the files). At most
        `max_open_files` stay open, least recently used closed first (a reader in use stays valid)."""
        with self._readers_lock:
            reader = self._readers.get(file)
            if reader is not None:
                self._readers.move_to_end(file)
                return reader
            meta = self.files[file]
            reader = self._readers[file] = TokenFile(meta.prefix, meta.dtype, meta.num_sequences, meta.num_tokens)
            while len(self._readers) > max(self.max_open_files, 1):
                self._readers.popitem(last=False)
            return reader

    def _check_range(self, samples: np.ndarray) -> None:
        if samples.size and (samples.min() < 0 or samples.max() >= self.num_samples):
            bad = int(samples.min() if samples.min() < 0 else samples.max())
            raise IndexError(f"{SPLIT_NAMES[self.split]} sample {bad} outside [0, {self.num_samples})")

    def _check_vocab(self, tokens: np.ndarray, file: int, sample: int) -> None:
        if self.vocab_size is None or tokens.size == 0:
            return
        high, low = int(tokens.max()), int(tokens.min())
        if high >= self.vocab_size or low < 0:
            bad = high if high >= self.vocab_size else low
            raise ValueError(
                f"{self.files[file].prefix}.bin: token id {bad} in sample {sample} of this file is outside the "
                f"vocabulary [0, {self.vocab_size}); the file was tokenized with another tokenizer than "
                "--tokenizer-type/--vocab-size say: re-tokenize it or fix the tokenizer flags")

    def window_offset(self, file: int, epoch: int) -> int:
        """Where samples mode starts cutting file `file`'s windows in `epoch` (tokens into the split's range).

        Epoch 0 cuts at 0 (so runs shorter than one epoch read what they always read); epoch e >= 1 at
        1 + (h_f + (e - 1) * J) mod (seq - 1), with h_f from (seed, split, file) and J coprime to seq - 1:
        the first seq_length epochs of a file all start at different offsets modulo seq_length, so no
        token window of one epoch recurs in another. Epoch e's windows start at offset + s * seq_length;
        the last one may run past the split's end and wraps to its start (like a sample spanning two
        documents), ending before the epoch's first window, so an epoch still never repeats a token.
        """
        if epoch == 0 or self.seq_length < 2:
            return 0
        span = self.seq_length - 1
        start = int(derive_key(self.seed, self.split, file, 0x0FF5E7)[0] % np.uint64(span))
        return 1 + (start + (epoch - 1) * self._offset_step) % span

    def _window_pieces(self, file: int, sample: int, epoch: int) -> list[tuple[int, int]]:
        """Where samples mode's sample lies in the .bin: [(first token, tokens)], two pieces when it wraps."""
        first, stop = self.files[file].token_range(self.split)
        length = stop - first
        start = self.window_offset(file, epoch) + sample * self.seq_length
        head = min(self.seq_length + 1, length - start)  # the rest wraps to the split's start
        if head > self.seq_length:
            return [(first + start, head)]
        return [(first + start, head), (first, self.seq_length + 1 - head)]

    def sample_pieces(self, file: int, sample: int, epoch: int) -> list[tuple[int, int]]:
        """[(first token in the .bin, tokens), ...] of sample `sample` of (file, epoch), in order."""
        if self.document_index is None:
            return self._window_pieces(file, sample, epoch)
        return self.document_index.sample_pieces(file, epoch, sample)

    def get_tokens(self, global_samples) -> np.ndarray:
        """Tokens of many global samples at once: int64 array [len(global_samples), seq_length + 1].

        Each row is read with one pread per piece into a buffer of its file's dtype, then widened; the
        vocabulary is checked once for the whole batch (the first bad row is then named)."""
        samples = np.asarray(global_samples, dtype=np.int64).reshape(-1)
        self._check_range(samples)
        location = self.index.locate(samples)
        files, numbers = location.file.tolist(), location.sample.tolist()
        out = np.empty((samples.size, self.seq_length + 1), dtype=np.int64)
        buffers: dict = {}
        with paused_gc():  # thousands of small objects per batch (pieces, cached indices)
            for row, (file, sample, epoch) in enumerate(zip(files, numbers, location.epoch.tolist())):
                dtype = self.files[file].dtype
                direct = dtype == out.dtype  # int64 files: straight into the row
                buffer = out[row] if direct else buffers.get(dtype)
                if buffer is None:
                    buffer = buffers[dtype] = np.empty(self.seq_length + 1, dtype=dtype)
                self.reader(file).read_pieces(buffer, self.sample_pieces(file, sample, epoch))
                if not direct:
                    out[row] = buffer
        if self.vocab_size is not None and out.size and (out.max() >= self.vocab_size or out.min() < 0):
            for row in range(samples.size):
                self._check_vocab(out[row], files[row], numbers[row])
        return out

    def __getitem__(self, global_sample: int) -> dict:
        return {"tokens": self.get_tokens([global_sample])[0]}

    def __getitems__(self, global_samples: Sequence[int]) -> list[dict]:
        """Batched fetch used by torch's DataLoader: one vectorised blend lookup for the whole batch."""
        return [{"tokens": row} for row in self.get_tokens(global_samples)]

    def epochs_per_file(self) -> np.ndarray:
        """How many passes over each file num_samples implies (> 1: that file repeats, in a new order)."""
        return self.num_samples * self.index.weights / self.samples_per_file

    def __repr__(self) -> str:
        return (f"GPTDataset({SPLIT_NAMES[self.split]}, files={self.num_files}, samples={self.num_samples}, "
                f"seq_length={self.seq_length}, mode={self.sample_mode})")


class MockGPTDataset:
    """Deterministic fake tokens from (seed, index) with structure a model can learn.

    Each sample strings together phrases drawn from a fixed bank of 16-token phrases (the bank depends
    only on the seed and vocab size), starting at a random offset: after a phrase's first token the
    rest is predictable, so the loss falls well below log(vocab_size).
    """

    PHRASES = 512
    PHRASE_LENGTH = 16

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0, split: int = 0):
        if vocab_size is None or vocab_size < 2:
            raise ValueError(f"mock data needs --vocab-size >= 2 (got {vocab_size})")
        self.num_samples, self.seq_length, self.vocab_size = int(num_samples), int(seq_length), int(vocab_size)
        self.seed, self.split = int(seed), int(split)
        self.bank = np.random.default_rng([self.seed, 0xBA4C]).integers(
            0, self.vocab_size, size=(self.PHRASES, self.PHRASE_LENGTH), dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"mock sample {index} outside [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        count = (self.seq_length + 1) // self.PHRASE_LENGTH + 2
        stream = self.bank[rng.integers(0, self.PHRASES, size=count)].reshape(-1)
        offset = int(rng.integers(0, self.PHRASE_LENGTH))
        return {"tokens": stream[offset:offset + self.seq_length + 1].copy()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[int(i)] for i in indices]


MAX_NAMED_FILES = 20  # a warning names this many files, then counts the rest


def _split_sources(data_config, progress: bool = False) -> list:
    """Per split, (entries, files, source) of its blend, or None: --data-path/--data-file-list cut by --split,
    or --train-/--valid-/--test-data-path, each its own blend of whole files (upstream's meaning)."""
    separate = [list(getattr(data_config, f"{name}_data_path", None) or []) for name in SPLIT_NAMES]
    if any(separate):
        sources = []
        for split, path in enumerate(separate):
            if not path:
                sources.append(None)
                continue
            whole_file = tuple(1.0 if s == split else 0.0 for s in range(3))  # this split's range = the file
            sources.append(scan_blend(path, fractions=whole_file, flag=f"--{SPLIT_NAMES[split]}-data-path",
                                      progress=progress))
        return sources
    fractions = parse_split(data_config.split)
    source = scan_blend(data_config.data_path, data_config.data_file_list, fractions, progress=progress)
    return [source if fractions[split] > 0 else None for split in range(3)]


def build_datasets(data_config, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                   vocab_size: Optional[int], rank: int = 0, world_size: int = 1,
                   document_index_cache: Optional[str] = None, sample_mode: Optional[str] = None):
    """(train, valid, test) datasets of `num_samples[i]` samples each; None for a split without data.

    Every rank calls this independently: it reads only headers and a few index entries per file, and
    all ranks compute the same blend from (file list, split, seed, seq_length). A split whose weight in
    --split is 0 (or without its own --<split>-data-path), that has no file with a full sample, or for
    which 0 samples are asked, is None. Files too short for a split are left out of it and named in a
    warning (and in the blend report). `sample_mode` overrides data_config.sample_mode (the blend
    report builds "samples" datasets: the counts are the same and no document index is needed).
    `rank` only decides who logs; `world_size` is not needed (no rank depends on another) and is
    accepted so that callers can pass the layout they have.
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if data_config.mock_data:
        vocab = vocab_size or data_config.vocab_size
        return tuple(MockGPTDataset(n, seq_length, vocab, seed, split) if n > 0 else None
                     for split, n in enumerate(num_samples))
    mode = sample_mode or data_config.sample_mode
    if mode == "upstream":  # argonne-lcf/Megatron-DeepSpeed's exact order (upstream_order.py)
        return build_upstream_datasets(data_config, seq_length, seed, num_samples, vocab_size, progress=rank == 0)
    cache = document_index_cache or getattr(data_config, "data_cache_path", None)
    sources = _split_sources(data_config, progress=rank == 0) if any(n > 0 for n in num_samples) else [None] * 3
    datasets = []
    for split, requested in enumerate(num_samples):
        if requested <= 0 or sources[split] is None:
            datasets.append(None)
            continue
        entries, files, source = sources[split]
        usable = [i for i, f in enumerate(files) if f.num_samples(split, seq_length) > 0]
        left_out = [(files[i].prefix, files[i].token_range(split)[1] - files[i].token_range(split)[0])
                    for i in range(len(files)) if files[i].num_samples(split, seq_length) == 0]
        if left_out and rank == 0:
            named = ", ".join(f"{prefix} ({tokens} tokens)" for prefix, tokens in left_out[:MAX_NAMED_FILES])
            more = f" and {len(left_out) - MAX_NAMED_FILES} more" if len(left_out) > MAX_NAMED_FILES else ""
            logger.warning("%s split: %d of %d files hold fewer than seq_length + 1 = %d tokens in this split and "
                           "are left out of its blend: %s%s", SPLIT_NAMES[split], len(left_out), len(files),
                           seq_length + 1, named, more)
        if not usable:
            datasets.append(None)
            continue
        corpora = [entries[i].corpus or os.path.basename(files[i].prefix) for i in usable]
        datasets.append(GPTDataset([files[i] for i in usable], [entries[i].weight for i in usable], split,
                                   seq_length, seed, requested, vocab_size, mode,
                                   document_index_cache=cache, corpora=corpora, left_out=left_out,
                                   source=source, document_shuffle_block=data_config.document_shuffle_block))
        if mode == "documents" and rank == 0:
            _warn_if_indices_outgrow_the_cache(datasets[-1])
    return tuple(datasets)


def _warn_if_indices_outgrow_the_cache(dataset: GPTDataset) -> None:
    """Documents mode shuffles a file of at most --document-shuffle-block documents (any file with 0) as one,
    the first time a batch needs that file and epoch; when one epoch's such indices exceed the process cache,
    batches keep rebuilding them: say so at start. (Block-shuffled files build a block at a time.)"""
    index = dataset.document_index
    counts = [f.sequence_range(dataset.split)[1] - f.sequence_range(dataset.split)[0] for f in dataset.files]
    whole = [i for i in range(dataset.num_files) if not index.blocked(i)]
    documents = sum(counts[i] for i in whole)
    needed = sum((8 if dataset.files[i].num_tokens < 1 << 32 else 16) * counts[i] for i in whole)
    if needed > index.cache_bytes:
        logger.warning(
            "--sample-mode documents: the %s split's %s documents in files shuffled as one need %.1f GiB of "
            "document indices per epoch, more than the %.0f MiB a process caches: the files a batch touches get "
            "their index (a shuffle of all their documents) built again and again, which at this scale can take "
            "longer than the training step; give --document-shuffle-block a size (shuffles large files in "
            "blocks), or --sample-mode samples, which needs no index", SPLIT_NAMES[dataset.split],
            f"{documents:,}", needed / 2 ** 30, index.cache_bytes / 2 ** 20)
