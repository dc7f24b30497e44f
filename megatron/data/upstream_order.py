"""Upstream's sample order (`--sample-mode upstream`): global sample -> tokens exactly as argonne's code.

Resuming an AuroraGPT run must continue its data where upstream (argonne-lcf/Megatron-DeepSpeed) left it: the
same files, seed, split and flags give the same seq_length + 1 tokens for every global sample number. Upstream
(ffa3456d: megatron/data/gpt_dataset.py, blendable_dataset.py, dataset_utils.py, helpers.cpp,
pretrain_gpt_alcf.py, training.py) builds its order in four levels; this module recomputes each with numpy,
from the .idx files alone (upstream's index cache is not needed, and not written; its blend indices are read
when --data-cache-path holds them, see below):

1. Sample counts. The loop asks for N samples of a split (train: --train-iters x final global batch or
   --train-samples; valid: (train_iters // eval_interval + 1) x eval_iters x batch; test: eval_iters x batch).
   File f of the blend ("weight prefix corpus" triplets: --data-file-list lines or --data-path words) gets
   n_f = ceil(N x w_f x 1.005) of them, w_f its weight over the sum of all weights. A single --data-path
   prefix is upstream's plain GPTDataset: all of its (E x T - 1) // seq samples (level 2), no blend. A split
   of its own (--train-/--valid-/--test-data-path, pretrain_gpt.py's build_dataset) takes each file whole:
   one prefix is such a GPTDataset, "weight prefix" pairs blend the files' GPTDatasets directly (level 4
   with the files as the datasets and their normalised weights).
2. One file (upstream's GPTDataset). Its split is the sequence range [a, b) cut by --split with upstream's
   rounding. T = tokens of [a, b); E = the least number of epochs with (E x T - 1) // seq >= n_f; one
   `numpy.random.RandomState(seed)` then
   - shuffles the E copies of [a, b) into `doc_idx` (the last epoch shuffled on its own when it holds fewer
     than 80 % of an epoch's (T - 1) // seq samples: "separate_last_epoch");
   - shuffles [0, S) into `shuffle_idx`, S = (E x T - 1) // seq (the first ((E - 1) x T - 1) // seq and the
     rest apart when the last epoch is separate).
   Laid end to end, the documents of doc_idx are one token stream; sample i is its tokens [i x seq,
   (i + 1) x seq] (each sample starts on the token where the previous one ended), and helpers.cpp's
   `build_sample_idx` row i is (document holding token i x seq, offset in it). We get the rows at once by a
   binary search of i x seq in the running token counts. Worked example, seq = 4 and doc_idx's documents
   of 3, 5 and 2 tokens: running counts [3, 8, 10], S = (10 - 1) // 4 = 2; tokens 0, 4, 8 lie in documents
   0, 1, 2 at offsets 0, 1, 0, so sample 1 is document 1 from offset 1 (4 tokens) and document 2's first
   token. File sample j is sample shuffle_idx[j].
3. A corpus (upstream's BuildCorpusDataset): its files in list order, n_c = sum of their n_f samples.
   Corpus sample k is file sample (f, j) of either the files' samples laid end to end, or, with
   --blend-sample-in-corpus, helpers.cpp's greedy blend (below) with weights n_f / n_c; with
   --shuffle-sample-in-corpus, k first goes through a permutation of [0, n_c) by a fresh RandomState(seed).
4. The split (upstream's BlendableDataset): corpora in sorted name order, weights n_c / (the train split's
   sum of n_f), normalised; global sample g is corpus sample (c, k) of the greedy blend of size sum n_c:
   sample s goes to the first corpus c with the largest weight_c x max(s, 1) - taken_c (in doubles, as the
   C++ computes it, so that ties and roundings fall the same way).

Costs, where exactness forces them (measured at 2T tokens by benchmarks/bench_upstream_order.py, with
upstream's own functions side by side: benchmarks/RESULTS.md):
- a file's doc_idx and shuffle_idx are RandomState shuffles whose draws depend on every earlier draw:
  O(documents x epochs + samples) per file, built the first time one of its samples is read (lazily, per
  file). The result (4 bytes per document and epoch plus 12 per sample, against 4 and 20 in upstream's
  cache) is written once per node into node-local RAM (/dev/shm: a temporary name, then a rename) and
  memory-mapped by every rank that needs it (`SharedArrays`): no barrier, no rank waits for another (a rank
  that finds no file builds it: the same bytes), nothing on a shared filesystem, removed by its writer at
  exit. Orders under 1 MiB stay private to the process;
- a corpus's permutation (--shuffle-sample-in-corpus) is one RandomState shuffle: O(corpus samples), 4 bytes
  a sample, built on the corpus's first use and shared per node the same way;
- the greedy blends are sequential (each choice depends on every earlier one): O(samples x datasets) from
  sample 0, computed lazily as far as read, keeping the counts every BLEND_BLOCK samples, so that a sample
  already passed is recomputed from its block. Starting a run costs one block; resuming at
  consumed_samples = N costs O(N x corpora) once (~1 us a sample for 14 corpora, in Python), and with
  --data-cache-path the counts are kept there, so that the next resume of the same run starts at once.
  When --data-cache-path holds upstream's own blend indices (its BlendableDataset's `<md5>_index.npy` and
  `_sample_index.npy`, found by its `.dsc`; each corpus's, keyed as upstream keys them by corpus name and
  sample count), they are memory-mapped and used as upstream uses them on a resume: nothing is recomputed;
  --blend-sample-in-corpus blends a corpus's files the same way: over a corpus of more than 48 files one
  numpy step per sample (2-4 us for 1,107 files), and with --shuffle-sample-in-corpus the corpus's first
  sample read computes nearly its whole blend (upstream's C++ also costs O(samples x files) there);
Reading a sample: its file's order, then one .idx read per document it spans (where the document starts)
and one .bin read per piece, as upstream reads it (by the .idx's pointers and lengths, so --append-eod
files with their uncounted end-of-document tokens read exactly as upstream reads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing.util
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron.data.data_list import SPLIT_NAMES, DataListError, paused_gc
from megatron.data.indexed_dataset import TokenFile, read_index_header
from megatron.fileio import replace_atomically

logger = logging.getLogger(__name__)

UPSTREAM_NUM_SAMPLES_FACTOR = 1.005  # dataset_utils.get_datasets_weights_and_num_samples
LAST_EPOCH_FRACTION = 0.80  # gpt_dataset._build_index_mappings: separate_last_epoch below 80 % of an epoch
BLEND_BLOCK = 4096  # the greedy blend keeps its counts every this many samples
STORE_EVERY_BLOCKS = 256  # with --data-cache-path, the counts are written after this many new blocks
PROGRESS_SAMPLES = 10_000_000  # a longer recomputation of a blend shows a progress bar (rank 0)
SHARE_MIN_BYTES = 1 << 20  # a file order this large is written once per node and memory-mapped by its ranks
DEFAULT_PRIVATE_BYTES = 256 << 20  # per process: the most bytes of smaller (unshared) file orders kept
MAX_KEPT_ORDERS = 8192  # file orders (mapped or not) one process keeps at most


class UpstreamOrderError(DataListError):
    """A blend that upstream's order cannot serve (upstream itself would fail or hang on it)."""


# ---- level 1 and 2: counts, split, epochs ----------------------------------------------------------------
def upstream_split(split: str, num_sequences: int) -> list[int]:
    """Upstream's get_train_valid_test_split_: 4 sequence boundaries (train, valid, test, end)."""
    text = str(split)
    parts = text.split(",") if "," in text else text.split("/") if "/" in text else [text]
    try:
        fractions = [float(part) for part in parts]
    except ValueError:
        raise UpstreamOrderError("--split", [f"{split!r} must be comma-separated numbers like '969,30,1'"]) from None
    fractions = (fractions + [0.0, 0.0])[:3]
    total = sum(fractions)
    if not total > 0:
        raise UpstreamOrderError("--split", [f"{split!r} needs a positive sum"])
    fractions = [f / total for f in fractions]
    bounds = [0]
    for index, fraction in enumerate(fractions):
        bounds.append(bounds[index] + int(round(fraction * float(num_sequences))))
    excess = bounds[-1] - num_sequences
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def upstream_split_weights(split: str) -> list[int]:
    """The integer split weights upstream's data-file-list path reads (`int(d) for d in split.split(",")`)."""
    try:
        weights = [int(part) for part in str(split).split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3:
        raise UpstreamOrderError("--split", [
            f"{split!r}: --sample-mode upstream with a --data-file-list needs three comma-separated integers "
            "(upstream's blend reads them with int()), e.g. '969,30,1'"])
    return weights


def upstream_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Upstream's _num_epochs: the least E >= 1 with (E x tokens - 1) // seq_length >= num_samples."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def per_file_samples(weights: Sequence[float], requested: Sequence[int]) -> tuple[list[float], list[list[int]]]:
    """Upstream's weights over their sum and each file's [train, valid, test] samples: ceil(N x w x 1.005)."""
    weights = [float(w) for w in weights]
    total = 0.0
    for w in weights:
        total += w
    weights = [w / total for w in weights]
    return weights, [[int(math.ceil(n * w * UPSTREAM_NUM_SAMPLES_FACTOR)) for n in requested] for w in weights]


# ---- level 2: one file's order ---------------------------------------------------------------------------
class FileOrder:
    """One file's split in upstream's order, in one flat integer array (int32 where the numbers fit, so that
    it can be written once and memory-mapped): [documents, epochs, samples S]; `lengths` of the split's
    sequences; `doc_idx` (sequence numbers relative to `first`); upstream's sample_idx rows (position in
    doc_idx, offset in that document) of samples 0..S; `shuffle_idx`. 4 bytes per document and epoch plus
    12 per sample (upstream's cache: 4 and 20)."""

    def __init__(self, flat: np.ndarray, first: int):
        documents, epochs, samples = (int(v) for v in flat[:3])
        expected = 3 + documents * (1 + epochs) + 3 * samples + 2
        if flat.size != expected:
            raise ValueError(f"file order of {flat.size} numbers, expected {expected}")
        self.flat, self.first = flat, first
        self.lengths = flat[3:3 + documents]
        at = 3 + documents
        self.doc_idx = flat[at:at + documents * epochs]
        at += documents * epochs
        self.sample_idx = flat[at:at + 2 * (samples + 1)].reshape(samples + 1, 2)
        self.shuffle_idx = flat[at + 2 * (samples + 1):]

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes

    def pieces(self, sample: int, token_offsets) -> list[tuple[int, int]]:
        """[(first token in the .bin, tokens), ...] of file sample `sample`, as upstream's GPTDataset reads it;
        `token_offsets(sequences)` gives the sequences' first tokens (from the .idx)."""
        i = int(self.shuffle_idx[sample])
        (d0, o0), (d1, o1) = self.sample_idx[i].tolist(), self.sample_idx[i + 1].tolist()
        docs = self.doc_idx[d0:d1 + 1].astype(np.int64)
        starts = token_offsets(docs + self.first).tolist()
        lengths = self.lengths[docs].tolist()
        if d0 == d1:
            return [(starts[0] + o0, o1 - o0 + 1)]
        out = [(starts[0] + o0, lengths[0] - o0)]
        out += [(start, length) for start, length in zip(starts[1:-1], lengths[1:-1])]
        out.append((starts[-1], o1 + 1))
        return [piece for piece in out if piece[1] > 0]


def shuffled_doc_idx(documents: int, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool,
                     dtype=np.int32) -> np.ndarray:
    """Upstream's _build_doc_idx: E copies of [0, documents), shuffled (the last epoch apart when separate).
    RandomState.shuffle draws the same numbers for any dtype and offset, so relative numbers give upstream's
    order."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(np.arange(documents, dtype=dtype), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    head = shuffled_doc_idx(documents, num_epochs - 1, rng, False, dtype)
    return np.concatenate((head, shuffled_doc_idx(documents, 1, rng, False, dtype)))


def shuffled_samples(num_samples: int, total: int, rng: np.random.RandomState, dtype=np.int64) -> np.ndarray:
    """Upstream's _build_shuffle_idx: [0, num_samples) shuffled, then [num_samples, total) shuffled."""
    head = np.arange(num_samples, dtype=dtype)
    rng.shuffle(head)
    if num_samples == total:
        return head
    tail = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate((head, tail))


def file_order_shape(tokens: int, num_samples: int, seq_length: int) -> tuple[int, int, bool]:
    """(epochs, samples S, separate_last_epoch) of upstream's index mappings for a split of `tokens` tokens."""
    epochs = upstream_epochs(tokens, seq_length, num_samples)
    separate = False
    if epochs > 1:
        before_last = ((epochs - 1) * tokens - 1) // seq_length
        separate = num_samples - before_last < int(LAST_EPOCH_FRACTION * ((tokens - 1) // seq_length))
    return epochs, (epochs * tokens - 1) // seq_length, separate


def build_file_order(lengths: np.ndarray, first: int, num_samples: int, seq_length: int, seed: int) -> FileOrder:
    """Upstream's _build_index_mappings for one file's split: `lengths` its sequences' .idx lengths, `first` the
    split's first sequence, `num_samples` the samples asked of this file. O(documents x epochs + samples)."""
    documents = lengths.size
    tokens = int(lengths.sum(dtype=np.int64))
    epochs, samples, separate = file_order_shape(tokens, num_samples, seq_length)
    wide = max(documents * epochs, samples + 1, int(lengths.max(initial=0))) >= np.iinfo(np.int32).max - 1
    dtype = np.int64 if wide else np.int32
    rng = np.random.RandomState(seed=seed)
    doc_idx = shuffled_doc_idx(documents, epochs, rng, separate, dtype)
    ends = np.cumsum(lengths[doc_idx], dtype=np.int64)  # tokens of doc_idx's first d + 1 documents
    positions = np.arange(samples + 1, dtype=np.int64) * seq_length  # sample i starts on token i x seq
    where = np.searchsorted(ends, positions, side="right")  # the document holding that token
    offsets = positions - (ends[where] - lengths[doc_idx[where]])
    where[0] = offsets[0] = 0  # upstream's first row, even when doc_idx[0] is empty
    del ends, positions
    before_last = ((epochs - 1) * tokens - 1) // seq_length
    shuffle_idx = shuffled_samples(before_last if separate else samples, samples, rng, dtype)
    flat = np.concatenate((np.array([documents, epochs, samples], dtype=dtype), lengths.astype(dtype), doc_idx,
                           np.stack((where, offsets), axis=1).reshape(-1).astype(dtype), shuffle_idx))
    return FileOrder(flat, first)


def default_order_dir() -> str:
    """Node-local RAM (/dev/shm) where it exists, else the temporary directory; one per user."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"megatron-upstream-order-{os.getuid() if hasattr(os, 'getuid') else 0}")


def _remove_files(paths: list) -> None:
    while paths:
        with contextlib.suppress(OSError, IndexError):
            os.remove(paths.pop())


class SharedArrays:
    """Arrays computed once per node: `get(description, build)` maps `directory/<hash>.npy` when a process
    wrote it, else builds it here and, when it holds at least `min_bytes`, writes it (temporary name, then
    rename) and maps it. No process waits for another: two that miss the file both build it (the same bytes).
    A process removes the files it wrote when it exits (`close`); a process still mapping one keeps its pages."""

    def __init__(self, directory: Optional[str] = None, min_bytes: int = SHARE_MIN_BYTES):
        self.directory, self.min_bytes = directory or default_order_dir(), int(min_bytes)
        self.builds = self.loads = 0
        self._written: list[str] = []
        multiprocessing.util.Finalize(None, _remove_files, args=(self._written,), exitpriority=10)

    def get(self, description: str, build, check=lambda array: True) -> tuple[np.ndarray, bool]:
        """(array, mapped?) for `description` (hashed into the file name); `check(array)` vets a mapped file."""
        path = os.path.join(self.directory, hashlib.sha1(description.encode()).hexdigest()[:24] + ".npy")
        try:
            array = np.load(path, mmap_mode="r")
            if check(array):
                self.loads += 1
                return array, True
        except (OSError, ValueError):  # absent, being replaced, or removed by its writer: build it here
            pass
        array = build()
        self.builds += 1
        if array.nbytes < self.min_bytes:
            return array, False
        try:
            os.makedirs(self.directory, exist_ok=True)
            temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}.npy"
            np.save(temporary, array)
            replace_atomically(temporary, path)
            self._written.append(path)
            return np.load(path, mmap_mode="r"), True
        except OSError as error:  # a full or read-only directory: keep the private copy
            logger.debug("upstream order array %s not shared: %s", path, error)
            return array, False

    def close(self) -> None:
        _remove_files(self._written)

    def __getstate__(self) -> dict:  # a DataLoader worker removes only what it wrote itself
        return {"directory": self.directory, "min_bytes": self.min_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["min_bytes"])


# ---- levels 3 and 4: the greedy blend ------------------------------------------------------------------
class GreedyBlend:
    """helpers.cpp's build_blending_indices, computed lazily: sample s -> (dataset, its sample number).

    Sample s goes to the first dataset d with the largest weights[d] * max(s, 1) - taken[d], in doubles like
    the C++ (so ties and roundings fall the same way). Each choice depends on all earlier ones, so the blend
    is computed forward from 0, as far as asked; `taken` is kept at every multiple of `block`, so that a
    sample already passed is recomputed from its block (one block costs block x datasets steps)."""

    python_max_datasets = 48  # more datasets: one numpy step per sample

    def __init__(self, weights: Sequence[float], size: int, block: int = BLEND_BLOCK, store: Optional[str] = None,
                 progress: bool = False):
        self.progress = progress  # a progress bar when a forward run covers more than PROGRESS_SAMPLES
        self.weights = [float(w) for w in weights]
        self.size, self.block = int(size), int(block)
        self._checkpoints = [np.zeros(len(self.weights), dtype=np.int64)]  # taken[] at s = i * block
        self._blocks: "OrderedDict[int, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()
        # `store` (--data-cache-path): the counts are kept there, so that a later run resumes without
        # recomputing the blend from sample 0 (len(weights) x 8 bytes per block: 13 MB at 2T tokens)
        self.store_path = None
        if store:
            key = np.asarray(self.weights, dtype=np.float64).tobytes() + f"|{self.size}|{self.block}|v1".encode()
            self.store_path = os.path.join(store, f"upstream-blend-{hashlib.sha1(key).hexdigest()[:24]}.npy")
        self._stored = 0  # checkpoints read from or written to the store

    def _read_store(self) -> None:
        try:
            kept = np.load(self.store_path)
        except (OSError, ValueError):
            return
        if kept.ndim == 2 and kept.shape[1] == len(self.weights) and len(kept) > len(self._checkpoints) \
                and not kept[0].any():
            self._checkpoints = list(kept)
            self._stored = len(kept)

    def _write_store(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.store_path), exist_ok=True)
            temporary = f"{self.store_path}.tmp-{os.getpid()}-{threading.get_ident()}.npy"
            np.save(temporary, np.stack(self._checkpoints))
            replace_atomically(temporary, self.store_path)
            self._stored = len(self._checkpoints)
        except OSError as error:  # a read-only or full directory: the blend is recomputed next time
            logger.warning("--data-cache-path: could not keep the upstream blend's counts in %s: %s",
                           self.store_path, error)
            self.store_path = None

    def _run(self, start: int, taken: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`count` steps from sample `start` with counts `taken`: (dataset, sample number) arrays, new counts."""
        weights, datasets = self.weights, len(self.weights)
        chosen = np.empty(count, dtype=np.int64)
        numbers = np.empty(count, dtype=np.int64)
        if datasets == 1:
            chosen[:] = 0
            numbers[:] = np.arange(int(taken[0]), int(taken[0]) + count)
            return chosen, numbers, taken + count
        if datasets <= self.python_max_datasets:  # plain Python floats beat numpy's per-call cost for a few
            counts = [int(t) for t in taken]
            pairs = list(enumerate(weights))[1:]
            w0 = weights[0]
            out_d, out_n = [0] * count, [0] * count
            for k in range(count):
                s = float(start + k) if start + k > 1 else 1.0
                best, best_error = 0, w0 * s - counts[0]
                for d, w in pairs:
                    error = w * s - counts[d]
                    if error > best_error:
                        best, best_error = d, error
                out_d[k], out_n[k] = best, counts[best]
                counts[best] += 1
            chosen[:], numbers[:] = out_d, out_n
            return chosen, numbers, np.asarray(counts, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        counts = taken.astype(np.float64)
        errors = np.empty_like(w)
        multiply, subtract = np.multiply, np.subtract
        for k in range(count):
            multiply(w, float(start + k) if start + k > 1 else 1.0, out=errors)
            subtract(errors, counts, out=errors)
            d = int(errors.argmax())  # argmax: the first of equal maxima, as the C++'s strict '>'
            chosen[k], numbers[k] = d, int(counts[d])
            counts[d] += 1.0
        return chosen, numbers, counts.astype(np.int64)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._blocks.get(b)
            if hit is not None:
                self._blocks.move_to_end(b)
                return hit
            if self.store_path and self._stored == 0 and len(self._checkpoints) <= b:
                self._read_store()
            todo = range(len(self._checkpoints) - 1, b)  # forward from the last kept counts
            if self.progress and len(todo) * self.block > PROGRESS_SAMPLES:
                from tqdm import tqdm  # only for a long recomputation

                todo = tqdm(todo, desc="upstream's blend up to the resumed sample", unit="block",
                            unit_scale=self.block, mininterval=10)
            for known in todo:
                start = known * self.block
                _, _, taken = self._run(start, self._checkpoints[known], min(self.block, self.size - start))
                self._checkpoints.append(taken)
            if self.store_path and len(self._checkpoints) - self._stored >= STORE_EVERY_BLOCKS:
                self._write_store()
            start = b * self.block
            chosen, numbers, taken = self._run(start, self._checkpoints[b], min(self.block, self.size - start))
            if len(self._checkpoints) == b + 1 and start + self.block < self.size:
                self._checkpoints.append(taken)
            self._blocks[b] = (chosen, numbers)
            while len(self._blocks) > 8:
                self._blocks.popitem(last=False)
            return chosen, numbers

    def __getitem__(self, sample: int) -> tuple[int, int]:
        if not 0 <= sample < self.size:
            raise IndexError(f"blend sample {sample} outside [0, {self.size})")
        chosen, numbers = self._block(sample // self.block)
        return int(chosen[sample % self.block]), int(numbers[sample % self.block])

    def arrays(self, start: int = 0, stop: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(dataset_index, dataset_sample_index) of samples [start, stop), as upstream's arrays."""
        stop = self.size if stop is None else min(stop, self.size)
        parts = [self._block(b) for b in range(start // self.block, -(-stop // self.block))]
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        base = (start // self.block) * self.block
        chosen = np.concatenate([p[0] for p in parts])[start - base:stop - base]
        numbers = np.concatenate([p[1] for p in parts])[start - base:stop - base]
        return chosen, numbers

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_blocks=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Concatenation:
    """helpers.cpp's build_concat_indices, by arithmetic: sample k -> (dataset, sample) of datasets laid end
    to end."""

    def __init__(self, sizes: Sequence[int]):
        self.ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
        self.size = int(self.ends[-1]) if self.ends.size else 0

    def __getitem__(self, sample: int) -> tuple[int, int]:
        if not 0 <= sample < self.size:
            raise IndexError(f"corpus sample {sample} outside [0, {self.size})")
        d = int(np.searchsorted(self.ends, sample, side="right"))
        return d, sample - (int(self.ends[d - 1]) if d else 0)


class CachedIndex:
    """A blend index upstream wrote into its --data-cache-path (`<md5>_index.npy`, `<md5>_sample_index.npy`),
    memory-mapped: sample -> (dataset, its sample number), as upstream reads it back on a resume."""

    def __init__(self, index: np.ndarray, sample_index: np.ndarray, path: str):
        self.index, self.sample_index, self.path = index, sample_index, path
        self.size = int(index.size)

    def __getitem__(self, sample: int) -> tuple[int, int]:
        if not 0 <= sample < self.size:
            raise IndexError(f"blend sample {sample} outside [0, {self.size})")
        return int(self.index[sample]), int(self.sample_index[sample])

    def __getstate__(self) -> dict:  # a spawned DataLoader worker maps the files again (not a copy of them)
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        stem = state["path"][:-len("_index.npy")]
        self.__init__(np.load(stem + "_index.npy", mmap_mode="r"), np.load(stem + "_sample_index.npy", mmap_mode="r"),
                      state["path"])


def _load_cached_index(stem: str, size: int, datasets: int, check: Optional["GreedyBlend"]) -> Optional[CachedIndex]:
    """Upstream's cached (index, sample_index) at `stem`, or None when absent or not this blend's: the sizes,
    the dataset numbers, and (when `check` is given) the first block against the blend computed here."""
    try:
        index = np.load(stem + "_index.npy", mmap_mode="r")
        sample_index = np.load(stem + "_sample_index.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if index.shape != (size,) or sample_index.shape != (size,) or not size:
        return None
    head = min(size, BLEND_BLOCK)
    if int(index[:head].max()) >= datasets or int(index[:head].min()) < 0:
        return None
    if check is not None:
        chosen, numbers = check.arrays(0, head)
        if not (np.array_equal(chosen, index[:head]) and np.array_equal(numbers, sample_index[:head])):
            logger.warning("%s_index.npy: upstream's cached blend index differs from its own algorithm in the first "
                           "%d samples; not used (recomputed instead)", stem, head)
            return None
    return CachedIndex(index, sample_index, stem + "_index.npy")


def cached_top_blend(cache_dir: str, corpus_descriptions: Sequence[str], size: int,
                     check: "GreedyBlend") -> Optional[CachedIndex]:
    """Upstream's BlendableDataset index from its --data-cache-path: the `.dsc` that lists these corpora and
    this size (its "Weights:" line is numpy's print of the weights, not compared), its two arrays."""
    head = "Blendable dataset\n\nDatasets:\n" + "".join(d + "\n\n" for d in corpus_descriptions)
    try:
        names = [n for n in os.listdir(cache_dir) if n.endswith(".dsc")]
    except OSError:
        return None
    for name in sorted(names):
        try:
            with open(os.path.join(cache_dir, name)) as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError):
            continue
        if text.startswith(head) and text.endswith(f"\nSize: {size}\n"):
            found = _load_cached_index(os.path.join(cache_dir, name[:-len(".dsc")]), size, len(corpus_descriptions),
                                       check)
            if found is not None:
                return found
    return None


class Corpus:
    """Upstream's BuildCorpusDataset: its files' samples, concatenated or blended, optionally permuted.
    With `store` (--data-cache-path) holding upstream's own index of this corpus (keyed, as upstream keys it,
    by the corpus name and sample count only), that index is read, as upstream reads it on a resume."""

    def __init__(self, name: str, files: Sequence[int], samples: Sequence[int], seed: int, shuffle: bool,
                 blend: bool, store: Optional[str] = None, prefixes: Sequence[str] = (), seq_length: int = 0):
        self.name, self.files = name, list(files)
        counts = np.asarray(samples, dtype=np.int64)
        self.size = int(counts.sum())
        self.seed, self.shuffle = seed, shuffle
        # upstream's BuildCorpusDataset.desc, which its BlendableDataset's description lists
        self.description = "CorpusDataset:" + "".join(p + "," for p in prefixes) + f"-{self.size}-{seq_length}{seed}"
        cached = None
        if store:
            key = hashlib.md5(f"{name}\n {self.size}".encode("utf-8")).hexdigest()
            cached = _load_cached_index(os.path.join(store, key), self.size, len(self.files), None)
        # upstream: weights = num_samples_list / self.num_samples (not renormalised)
        self.index = cached or (GreedyBlend(counts / np.int64(self.size), self.size, store=store) if blend
                                else Concatenation(counts))
        self._permutation: Optional[np.ndarray] = None

    def _build_permutation(self) -> np.ndarray:
        # the shuffle draws the same numbers for any dtype: int32 where it fits
        permutation = np.arange(self.size, dtype=np.int32 if self.size < np.iinfo(np.int32).max else np.int64)
        np.random.RandomState(seed=self.seed).shuffle(permutation)
        return permutation

    def permutation(self, shared: Optional["SharedArrays"] = None) -> np.ndarray:
        """Upstream's shuffle_index of this corpus (shared once per node through `shared`)."""
        if self._permutation is None:
            if shared is None:
                self._permutation = self._build_permutation()
            else:
                self._permutation = shared.get(f"corpus|{self.size}|{self.seed}|upstream-v1", self._build_permutation,
                                               lambda array: array.shape == (self.size,))[0]
        return self._permutation

    def locate(self, sample: int, shared: Optional["SharedArrays"] = None) -> tuple[int, int]:
        """Corpus sample -> (file number in the whole list, that file's sample)."""
        if self.shuffle:
            sample = int(self.permutation(shared)[sample])
        d, j = self.index[sample]
        return self.files[d], j

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_permutation"] = None  # rebuilt where needed (O(corpus samples))
        return state


# ---- the dataset -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpstreamFile:
    """One file of upstream's blend: its prefix, header facts and this split's sequence range."""
    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_tokens: int
    first: int
    stop: int


class UpstreamOrderDataset:
    """A split in upstream's order: `get_tokens(global samples)` -> [n, seq_length + 1] int64 tokens.

    `files` with `weights` and `corpora` (None: a single --data-path prefix, upstream's unblended path);
    `requested` the (train, valid, test) samples the loop asks for (all three: file counts depend on them)."""

    def __init__(self, files: Sequence[UpstreamFile], weights: Optional[Sequence[float]],
                 corpora: Optional[Sequence[str]], split: int, requested: Sequence[int], seq_length: int,
                 seed: int, shuffle_sample_in_corpus: bool = False, blend_sample_in_corpus: bool = False,
                 vocab_size: Optional[int] = None, order_dir: Optional[str] = None,
                 cache_bytes: int = DEFAULT_PRIVATE_BYTES, share_min_bytes: int = SHARE_MIN_BYTES,
                 blend_store: Optional[str] = None, progress: bool = False):
        self.files, self.split, self.seq_length, self.seed = list(files), split, int(seq_length), int(seed)
        self.vocab_size = vocab_size
        self.shared = SharedArrays(order_dir, share_min_bytes)
        self.cache_bytes = int(cache_bytes)
        self.sample_mode = "upstream"
        self._orders: "OrderedDict[int, tuple[FileOrder, bool]]" = OrderedDict()
        self._readers: "OrderedDict[int, TokenFile]" = OrderedDict()
        self._lock = threading.Lock()
        self.corpora: list[Corpus] = []
        if corpora is None and weights is None:  # one prefix: upstream's GPTDataset, all its (E x T - 1) // seq
            self.file_samples = [int(requested[split])]
            self.blend = None
            tokens = self._split_tokens(0)
            self.num_samples = (upstream_epochs(tokens, self.seq_length, self.file_samples[0]) * tokens - 1) \
                // self.seq_length
        elif corpora is None:  # --<split>-data-path pairs: build_dataset's BlendableDataset of the files
            normalised, counts = per_file_samples(weights, [requested[split]])
            self.file_samples = [c[0] for c in counts]
            blend_weights = np.array(normalised, dtype=np.float64)
            blend_weights /= np.sum(blend_weights)
            self.num_samples = sum(self.file_samples)
            self.blend = GreedyBlend(blend_weights, self.num_samples, store=blend_store, progress=progress)
        else:
            _, counts = per_file_samples(weights, requested)
            self.file_samples = [c[split] for c in counts]
            total_train = sum(c[0] for c in counts)
            names = sorted(set(corpora))
            self.corpora = [Corpus(name, [f for f, c in enumerate(corpora) if c == name],
                                   [self.file_samples[f] for f, c in enumerate(corpora) if c == name], self.seed,
                                   shuffle_sample_in_corpus, blend_sample_in_corpus, blend_store,
                                   [file.prefix for file, c in zip(self.files, corpora) if c == name],
                                   self.seq_length) for name in names]
            achieved = np.array([float(c.size) / total_train for c in self.corpora], dtype=np.float64)
            achieved /= np.sum(achieved)
            self.num_samples = sum(self.file_samples)
            self.blend = GreedyBlend(achieved, self.num_samples, store=blend_store, progress=progress)
            cached = cached_top_blend(blend_store, [c.description for c in self.corpora], self.num_samples,
                                      self.blend) if blend_store else None
            if cached is not None:  # upstream's own index of this blend: a resume at any N costs nothing
                logger.info("sample order: the %s split's blend index read from upstream's cache %s",
                            SPLIT_NAMES[split], cached.path)
                self.blend = cached
        empty = [file.prefix for f, file in enumerate(self.files)
                 if self.file_samples[f] > 0 and file.stop <= file.first]
        if empty:  # upstream builds no dataset for them and fails when the blend first draws one: so do we
            logger.warning("--sample-mode upstream: %d file(s) have no document in the %s split but are asked for "
                           "samples (upstream fails when one is drawn; so will this run): %s", len(empty),
                           SPLIT_NAMES[split], ", ".join(empty[:20]) + (" ..." if len(empty) > 20 else ""))

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, sample: int) -> tuple[int, int]:
        """Global sample -> (file, that file's sample number)."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"{SPLIT_NAMES[self.split]} sample {sample} outside [0, {self.num_samples})")
        if self.blend is None:
            return 0, sample
        if not self.corpora:  # files blended directly (--<split>-data-path)
            return self.blend[sample]
        corpus, k = self.blend[sample]
        return self.corpora[corpus].locate(k, self.shared)

    def reader(self, file: int) -> TokenFile:
        with self._lock:
            reader = self._readers.get(file)
            if reader is None:
                meta = self.files[file]
                reader = self._readers[file] = TokenFile(meta.prefix, meta.dtype, meta.num_sequences,
                                                         meta.num_tokens)
                while len(self._readers) > 256:
                    self._readers.popitem(last=False)
            return reader

    def _load_or_build(self, file: int) -> tuple[FileOrder, bool]:
        """(order, mapped?): the node's shared copy if a process wrote it, else built here (shared when large)."""
        meta = self.files[file]
        description = (f"file|{os.path.abspath(meta.prefix)}|{meta.num_tokens}|{meta.num_sequences}|{meta.first}|"
                       f"{meta.stop}|{self.file_samples[file]}|{self.seq_length}|{self.seed}|upstream-v1")

        if meta.stop <= meta.first:
            raise UpstreamOrderError("--sample-mode upstream", [
                f"{meta.prefix}: no document in the {SPLIT_NAMES[self.split]} split (--split gives it none), but "
                f"upstream's blend asks {self.file_samples[file]} samples of it and has drawn one (upstream fails "
                "here too): give the file more documents, another --split, or drop it from the list"])

        def build() -> np.ndarray:
            lengths, _ = self.reader(file).index_range(meta.first, meta.stop)
            self._check_tokens(file, int(lengths.sum(dtype=np.int64)))
            return build_file_order(lengths, meta.first, self.file_samples[file], self.seq_length, self.seed).flat

        flat, mapped = self.shared.get(description, build,
                                       lambda array: array.size > 3 and int(array[0]) == meta.stop - meta.first)
        return FileOrder(flat, meta.first), mapped

    def file_order(self, file: int) -> FileOrder:
        """File `file`'s upstream order: from this process's cache, the node's shared copy, or built now.
        Kept: every mapped order (up to MAX_KEPT_ORDERS) and at most `cache_bytes` of private ones (LRU)."""
        with self._lock:
            hit = self._orders.get(file)
            if hit is not None:
                self._orders.move_to_end(file)
                return hit[0]
        order, mapped = self._load_or_build(file)
        with self._lock:
            self._orders[file] = (order, mapped)
            private = sum(o.nbytes for o, m in self._orders.values() if not m)
            for key in list(self._orders):
                if private <= self.cache_bytes and len(self._orders) <= MAX_KEPT_ORDERS:
                    break
                if key != file:
                    dropped, was_mapped = self._orders.pop(key)
                    private -= 0 if was_mapped else dropped.nbytes
        return order

    def close(self) -> None:
        """Remove the shared arrays this process wrote (ranks still mapping one keep its pages)."""
        self.shared.close()

    def _check_tokens(self, file: int, tokens: int) -> None:
        if tokens < 1:
            meta = self.files[file]
            raise UpstreamOrderError("--sample-mode upstream", [
                f"{meta.prefix}: no token in the {SPLIT_NAMES[self.split]} split, but upstream asks "
                f"{self.file_samples[file]} samples of it (upstream loops forever on this file): drop it from the "
                "list or give it more tokens"])

    def _split_tokens(self, file: int) -> int:
        """Tokens of file `file`'s split (its .idx lengths summed)."""
        meta = self.files[file]
        lengths, _ = self.reader(file).index_range(meta.first, meta.stop)
        tokens = int(lengths.sum(dtype=np.int64))
        self._check_tokens(file, tokens)
        return tokens

    def prepare(self, consumed_samples: int) -> None:
        """Before DataLoader workers fork: compute the blend up to `consumed_samples` here, once, rather than
        in every worker (a resume recomputes upstream's greedy blend from sample 0)."""
        if 0 < consumed_samples < self.num_samples:
            self.locate(consumed_samples)

    def sample_pieces(self, sample: int) -> tuple[int, list[tuple[int, int]]]:
        file, j = self.locate(sample)
        return file, self.file_order(file).pieces(j, self.reader(file).token_offsets)

    def get_tokens(self, global_samples) -> np.ndarray:
        samples = np.asarray(global_samples, dtype=np.int64).reshape(-1)
        out = np.empty((samples.size, self.seq_length + 1), dtype=np.int64)
        with paused_gc():
            for row, sample in enumerate(samples.tolist()):
                file, pieces = self.sample_pieces(sample)
                buffer = np.empty(self.seq_length + 1, dtype=self.files[file].dtype)
                self.reader(file).read_pieces(buffer, pieces)
                out[row] = buffer
                if self.vocab_size is not None and (buffer.max() >= self.vocab_size or buffer.min() < 0):
                    bad = int(buffer.max() if buffer.max() >= self.vocab_size else buffer.min())
                    raise ValueError(
                        f"{self.files[file].prefix}.bin: token id {bad} in {SPLIT_NAMES[self.split]} sample "
                        f"{sample} is outside the vocabulary [0, {self.vocab_size}); the file was tokenized with "
                        "another tokenizer than --tokenizer-type/--vocab-size say: re-tokenize it or fix the "
                        "tokenizer flags")
        return out

    def __getitem__(self, global_sample: int) -> dict:
        return {"tokens": self.get_tokens([global_sample])[0]}

    def __getitems__(self, global_samples: Sequence[int]) -> list[dict]:
        return [{"tokens": row} for row in self.get_tokens(global_samples)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_orders=OrderedDict(), _readers=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"UpstreamOrderDataset({SPLIT_NAMES[self.split]}, files={len(self.files)}, "
                f"corpora={len(self.corpora) or 1}, samples={self.num_samples}, seq_length={self.seq_length})")


def choose_sample_mode(data_config, load: Optional[str], upstream_checkpoint: bool,
                       checkpoint_order: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The sample mode a run uses and the line that says why (None: the usual default, nothing to say).
    An explicit --sample-mode wins; otherwise resuming an upstream checkpoint (`upstream_checkpoint`, from the
    checkpoint's description), or one of ours saved by a run in upstream's order (`checkpoint_order`, the
    "sample_order" it saved), reads upstream's order, so the run continues upstream's data."""
    mode = data_config.sample_mode
    if data_config.mock_data:
        return mode, None
    upstream_data = upstream_checkpoint or checkpoint_order == "upstream"
    if getattr(data_config, "sample_mode_given", False):
        if upstream_data and mode != "upstream":
            return mode, (f"sample order: --sample-mode {mode} (as asked), not upstream's, although --load {load} "
                          f"{'is an upstream checkpoint' if upstream_checkpoint else 'was trained in it'}: the run "
                          "will not read the samples upstream's order gives next")
        return mode, ("sample order: upstream's (--sample-mode upstream)" if mode == "upstream" else None)
    if upstream_checkpoint:
        return "upstream", (f"sample order: upstream's (its doc_idx, shuffle_idx and blend, recomputed) because "
                            f"--load {load} is an upstream checkpoint; --sample-mode overrides")
    if checkpoint_order == "upstream":
        return "upstream", (f"sample order: upstream's because --load {load} was trained in it; --sample-mode "
                            "overrides")
    return mode, None


def upstream_files(prefixes: Sequence[str], split: str) -> list[list[UpstreamFile]]:
    """Per split (train, valid, test), each prefix's header facts and upstream's sequence range."""
    out: list[list[UpstreamFile]] = [[], [], []]
    for prefix in prefixes:
        header = read_index_header(prefix)
        bounds = upstream_split(split, header.num_sequences)
        for s in range(3):
            out[s].append(UpstreamFile(prefix, header.dtype, header.num_sequences, header.num_tokens,
                                       bounds[s], bounds[s + 1]))
    return out


def _separate_split(items: Sequence[str], split: int, data_config, seq_length: int, seed: int,
                    num_samples: Sequence[int], vocab_size: Optional[int], progress: bool):
    """A split of its own (--<split>-data-path), as upstream's build_dataset makes it: one prefix is a
    GPTDataset over all the file's documents; 'weight prefix' pairs blend such datasets directly (files get
    ceil(N x w x 1.005) samples, the blend's weights are the normalised file weights). --split is not used."""
    from megatron.data.data_list import parse_data_path

    if not items or num_samples[split] <= 0:
        return None
    flag = f"--{SPLIT_NAMES[split]}-data-path"
    words = [word for item in items for word in str(item).split()]
    entries = parse_data_path(words, flag)
    if len(words) > 1 and any(e.corpus for e in entries):
        raise UpstreamOrderError(flag, ["upstream's build_dataset reads 'weight prefix' pairs here, not triplets"])
    files = []
    for entry in entries:
        header = read_index_header(entry.prefix)
        files.append(UpstreamFile(entry.prefix, header.dtype, header.num_sequences, header.num_tokens, 0,
                                  header.num_sequences))
    weights = None if len(words) == 1 else [e.weight for e in entries]
    return UpstreamOrderDataset(files, weights, None, split, num_samples, seq_length, seed, vocab_size=vocab_size,
                                blend_store=data_config.data_cache_path, progress=progress)


def build_upstream_datasets(data_config, seq_length: int, seed: int, num_samples: Sequence[int],
                            vocab_size: Optional[int] = None, progress: bool = False) -> tuple:
    """(train, valid, test) in upstream's order from a DataConfig, as upstream builds them: "weight prefix
    corpus" triplets (--data-file-list lines or --data-path words; every entry needs its corpus), one
    --data-path prefix, or each split's own --<split>-data-path (pretrain_gpt.py's build_dataset). None for a
    split with no samples asked, a zero --split weight, or no path of its own."""
    from megatron.data.data_list import blend_entries

    separate = [list(getattr(data_config, f"{name}_data_path", None) or []) for name in SPLIT_NAMES]
    if any(separate):
        return tuple(_separate_split(words, split, data_config, seq_length, seed, num_samples, vocab_size, progress)
                     for split, words in enumerate(separate))
    entries = blend_entries(data_config.data_path, data_config.data_file_list)
    words = [word for item in data_config.data_path for word in str(item).split()]
    single = not data_config.data_file_list and len(words) == 1
    if not single:
        missing = [e.where for e in entries if not e.corpus]
        if missing:  # upstream reads triplets only (get_datasets_corpuses_weights_and_num_samples)
            raise UpstreamOrderError(data_config.data_file_list or "--data-path", [
                f"{where}: no corpus; upstream's pretrain_gpt_alcf.py blends only 'weight prefix corpus' "
                "triplets (--data-file-list lines, or --data-path words)" for where in missing])
    # pretrain_gpt_alcf.py cuts a list line's file name at ".bin"; its caches name the prefix so
    prefixes = [e.prefix.split(".bin")[0] if data_config.data_file_list else e.prefix for e in entries]
    files = upstream_files(prefixes, data_config.split)
    weights = upstream_split_weights(data_config.split) if not single else None
    datasets = []
    for split in range(3):
        if num_samples[split] <= 0 or (weights is not None and weights[split] <= 0):
            datasets.append(None)
            continue
        if single:
            if files[split][0].stop <= files[split][0].first:
                datasets.append(None)  # upstream builds no dataset for an empty split
                continue
            datasets.append(UpstreamOrderDataset(files[split], None, None, split, num_samples, seq_length, seed,
                                                 vocab_size=vocab_size))
        else:
            datasets.append(UpstreamOrderDataset(
                files[split], [e.weight for e in entries], [e.corpus for e in entries], split, num_samples,
                seq_length, seed, data_config.shuffle_sample_in_corpus, data_config.blend_sample_in_corpus,
                vocab_size=vocab_size, blend_store=data_config.data_cache_path, progress=progress))
    return tuple(datasets)
