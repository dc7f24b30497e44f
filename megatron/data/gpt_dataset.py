"""GPT training samples: `build_datasets` turns a DataConfig into train/valid/test datasets of token windows.

The middle of the data stack (indexed file -> GPT dataset -> blend): a dataset asks the arithmetic
blend (megatron/data/blend.py) which file and sample a global sample number is, then reads its
seq_length + 1 tokens. sample_mode "samples" (default) reads consecutive windows of each file's token
stream; "documents" follows Megatron (documents shuffled per epoch, samples spanning documents) with a
per-file index built lazily in background threads. `MockGPTDataset` makes learnable fake data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import Future
from typing import Optional, Sequence

import numpy as np

from megatron.data.blend import DEFAULT_WINDOW, PHASE_PERIOD, BlendedIndex
from megatron.data.data_list import (SPLIT_NAMES, DataListError, FileSplits, blend_entries, parse_split,
                                     scan_files)
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.permutation import derive_key

logger = logging.getLogger(__name__)
SAMPLE_MODES = ("samples", "documents")


class DocumentIndex:
    """Megatron's document-aware index, one (file, epoch) at a time, built lazily and never behind a barrier.

    For file f and epoch e: `order` is the split's sequences shuffled by a generator keyed by
    (seed, split, f, e); `sample_idx[t] = (position in order, token offset)` is where sample t starts
    when the shuffled sequences are laid end to end (a vectorised walk: searchsorted on their running
    lengths); sample t spans sample_idx[t] .. sample_idx[t + 1] inclusive (seq_length + 1 tokens).
    The blend's Feistel permutation plays the part of Megatron's shuffle_idx.

    At construction, a background thread starts building epoch 0 of the files with f % world == rank;
    a rank needing any other (file, epoch) builds it itself on the spot (a thread needing one that
    another thread of the same rank is building waits on that thread's Future). Building is deterministic,
    so all ranks agree without talking. `cache_dir` (optional) stores indices with atomic renames
    and reuses them when present; nothing depends on it.
    """

    def __init__(self, dataset: "GPTDataset", rank: int = 0, world_size: int = 1,
                 cache_dir: Optional[str] = None, background: bool = True):
        self.dataset = dataset
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._built: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._claimed: dict[tuple[int, int], Future] = {}  # being built by some thread of this rank
        self._stop = threading.Event()
        world_size = max(int(world_size), 1)
        self.own_files = list(range(int(rank) % world_size, dataset.num_files, world_size))
        self._thread = None
        if background and self.own_files:
            # a daemon thread, so that an exiting trainer never waits for index builds it no longer needs
            self._thread = threading.Thread(target=self._build_own_files, name="document-index", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _build_own_files(self) -> None:
        for file in self.own_files:
            if self._stop.is_set():
                return
            try:
                self.get(file, 0)
            except Exception:  # the rank that needs this file will build it and raise there
                logger.exception("background document index build of file %d failed", file)

    def _cache_path(self, file: int, epoch: int) -> Optional[str]:
        if not self.cache_dir:
            return None
        ds = self.dataset
        description = (f"{ds.files[file].prefix}|{ds.files[file].sequence_range(ds.split)}|{ds.seq_length}|"
                       f"{ds.seed}|{ds.split}|{file}|{epoch}")
        digest = hashlib.sha1(description.encode()).hexdigest()[:20]
        return os.path.join(self.cache_dir, f"document_index_{digest}.npz")

    def build(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, sample_idx) of one file and epoch, from the cache when there is one, else computed."""
        path = self._cache_path(file, epoch)
        if path and os.path.exists(path):
            with np.load(path) as stored:
                return stored["order"], stored["sample_idx"]
        ds = self.dataset
        start, stop = ds.files[file].sequence_range(ds.split)
        lengths = np.asarray(ds.reader(file).sequence_lengths[start:stop], dtype=np.int64)
        key = int(derive_key(ds.seed, ds.split, file, epoch, 0xD0C)[0])
        order = np.random.default_rng(key).permutation(stop - start).astype(np.int64)
        running = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=running[1:])
        starts = np.arange(ds.samples_per_file[file] + 1, dtype=np.int64) * ds.seq_length
        position = np.searchsorted(running, starts, side="right") - 1
        sample_idx = np.stack([position, starts - running[position]], axis=1)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}.npz"
            np.savez(temporary, order=order, sample_idx=sample_idx)
            os.replace(temporary, path)
        return order, sample_idx

    def get(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The index of (file, epoch): already built, being built by another thread here, or built now."""
        key = (file, epoch)
        with self._lock:
            if key in self._built:
                return self._built[key]
            claimed = self._claimed.get(key)
            if claimed is None:
                mine = self._claimed[key] = Future()
        if claimed is not None:
            return claimed.result()  # a thread of this rank is on it: never waits for another rank
        try:
            result = self.build(file, epoch)
        except BaseException as error:
            with self._lock:
                del self._claimed[key]
            mine.set_exception(error)
            raise
        with self._lock:
            self._built[key] = result
            del self._claimed[key]
        mine.set_result(result)
        return result

    def num_built(self) -> int:
        with self._lock:
            return len(self._built)


class GPTDataset:
    """Samples of one split of a blend: `ds[g] -> {"tokens": int64 array [seq_length + 1]}`, len = num_samples.

    Global sample g is placed by the arithmetic `BlendedIndex`; in "samples" mode file f's sample s is
    tokens [start_f + s * seq_length, start_f + (s + 1) * seq_length + 1) of its flat token stream
    (start_f: the split's first token), so neighbouring samples share one token as in Megatron.
    Token ids >= vocab_size are caught when a sample is read, with the file named.
    """

    def __init__(self, files: Sequence[FileSplits], weights: Sequence[float], split: int, seq_length: int,
                 seed: int, num_samples: int, vocab_size: Optional[int] = None, sample_mode: str = "samples",
                 rank: int = 0, world_size: int = 1, window: int = DEFAULT_WINDOW,
                 document_index_cache: Optional[str] = None, corpora: Optional[Sequence[str]] = None,
                 left_out: Sequence[tuple[str, int]] = (), source: str = "data"):
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
        self.num_files = len(self.files)
        self.samples_per_file = np.array([f.num_samples(self.split, self.seq_length) for f in self.files],
                                         dtype=np.int64)
        self.token_start = np.array([f.token_range(self.split)[0] for f in self.files], dtype=np.int64)
        self.index = BlendedIndex(self.samples_per_file, weights, seed, window=window, salt=self.split)
        starved = self.index.starved_files()
        if starved.size:
            smallest = 1.0 / (self.index.window * PHASE_PERIOD)
            raise DataListError(source, [
                f"{self.files[f].prefix}: weight {weights[f]:g} is {self.index.weights[f]:.3g} of the "
                f"{SPLIT_NAMES[self.split]} blend, too small for the schedule ever to give it a sample (it needs "
                f"a share above ~{smallest:.1g}); raise its weight or drop the file" for f in starved.tolist()])
        self.corpora = list(corpora) if corpora is not None else [os.path.basename(f.prefix) for f in self.files]
        self.left_out = list(left_out)
        self._readers: dict[int, IndexedDataset] = {}
        self._readers_lock = threading.Lock()
        self._rank, self._world_size, self._cache = rank, world_size, document_index_cache
        self.document_index = (DocumentIndex(self, rank, world_size, document_index_cache)
                               if sample_mode == "documents" else None)

    def __getstate__(self) -> dict:
        """For DataLoader worker processes: memory maps, locks and index threads are rebuilt there."""
        state = dict(self.__dict__)
        state.update(_readers={}, _readers_lock=None, document_index=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._readers_lock = threading.Lock()
        if self.sample_mode == "documents":  # a worker builds what it needs, on demand
            self.document_index = DocumentIndex(self, self._rank, self._world_size, self._cache, background=False)

    def __len__(self) -> int:
        return self.num_samples

    def reader(self, file: int) -> IndexedDataset:
        """The memory-mapped file, opened on first use (start-up never opens the files)."""
        reader = self._readers.get(file)
        if reader is None:
            with self._readers_lock:
                reader = self._readers.get(file)
                if reader is None:
                    reader = self._readers[file] = IndexedDataset(self.files[file].prefix)
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

    def _read_window(self, file: int, sample: int) -> np.ndarray:
        start = int(self.token_start[file]) + sample * self.seq_length
        return self.reader(file).tokens(start, start + self.seq_length + 1)

    def _read_documents(self, file: int, sample: int, epoch: int) -> np.ndarray:
        order, sample_idx = self.document_index.get(file, epoch)
        (first, offset), (last, end) = sample_idx[sample], sample_idx[sample + 1]
        reader = self.reader(file)
        base = self.files[file].sequence_range(self.split)[0]
        if first == last:
            return reader.get(base + int(order[first]), int(offset), int(end - offset) + 1)
        pieces = [reader.get(base + int(order[first]), int(offset))]
        pieces += [reader.get(base + int(order[p])) for p in range(first + 1, last)]
        pieces.append(reader.get(base + int(order[last]), 0, int(end) + 1))
        return np.concatenate(pieces)

    def get_tokens(self, global_samples) -> np.ndarray:
        """Tokens of many global samples at once: int64 array [len(global_samples), seq_length + 1]."""
        samples = np.asarray(global_samples, dtype=np.int64).reshape(-1)
        self._check_range(samples)
        location = self.index.locate(samples)
        out = np.empty((samples.size, self.seq_length + 1), dtype=np.int64)
        for row, (file, sample, epoch) in enumerate(zip(location.file.tolist(), location.sample.tolist(),
                                                        location.epoch.tolist())):
            if self.document_index is None:
                tokens = self._read_window(file, sample)
            else:
                tokens = self._read_documents(file, sample, epoch)
            self._check_vocab(tokens, file, sample)
            out[row] = tokens
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
            flag = f"--{SPLIT_NAMES[split]}-data-path"
            entries = blend_entries(path, flag=flag)
            whole_file = tuple(1.0 if s == split else 0.0 for s in range(3))  # this split's range = the file
            sources.append((entries, scan_files(entries, whole_file, flag, progress=progress), flag))
        return sources
    entries = blend_entries(data_config.data_path, data_config.data_file_list)
    fractions = parse_split(data_config.split)
    source = f"--data-file-list {data_config.data_file_list}" if data_config.data_file_list else "--data-path"
    files = scan_files(entries, fractions, source, progress=progress)
    return [(entries, files, source) if fractions[split] > 0 else None for split in range(3)]


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
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if data_config.mock_data:
        vocab = vocab_size or data_config.vocab_size
        return tuple(MockGPTDataset(n, seq_length, vocab, seed, split) if n > 0 else None
                     for split, n in enumerate(num_samples))
    mode = sample_mode or data_config.sample_mode
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
                                   seq_length, seed, requested, vocab_size, mode, rank, world_size,
                                   document_index_cache=cache, corpora=corpora, left_out=left_out,
                                   source=source))
    return tuple(datasets)
