"""Upstream's sample order, the algorithms: argonne-lcf/Megatron-DeepSpeed's index arrays, recomputed exactly.

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
  memory-mapped by every rank that needs it (upstream_order.py's `SharedArrays`): no barrier, no rank waits
  for another (a rank that finds no file builds it: the same bytes), nothing on a shared filesystem, removed
  by its writer at exit. Orders under 1 MiB stay private to the process;
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

import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from megatron.data.data_list import DataListError
from megatron.fileio import replace_atomically

logger = logging.getLogger(__name__)

UPSTREAM_NUM_SAMPLES_FACTOR = 1.005  # dataset_utils.get_datasets_weights_and_num_samples
LAST_EPOCH_FRACTION = 0.80  # gpt_dataset._build_index_mappings: separate_last_epoch below 80 % of an epoch
BLEND_BLOCK = 4096  # the greedy blend keeps its counts every this many samples
STORE_EVERY_BLOCKS = 256  # with --data-cache-path, the counts are written after this many new blocks
PROGRESS_SAMPLES = 10_000_000  # a longer recomputation of a blend shows a progress bar (rank 0)


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


def load_cached_index(stem: str, size: int, datasets: int, check: Optional["GreedyBlend"]) -> Optional[CachedIndex]:
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


def cached_top_blend(cache_dir: str, corpus_descriptions: Sequence[str], weights: np.ndarray, size: int,
                     check: "GreedyBlend") -> Optional[CachedIndex]:
    """Upstream's BlendableDataset index from its --data-cache-path. Its files are named by the md5 of their
    description, which prints the weights with numpy: looked up directly with this numpy's print, else found
    by the `.dsc` that lists these corpora and this size (the weights' print aside)."""
    head = "Blendable dataset\n\nDatasets:\n" + "".join(d + "\n\n" for d in corpus_descriptions)
    description = head + f"Weights: {np.asarray(weights, dtype=np.float64)}\nSize: {size}\n"
    direct = load_cached_index(os.path.join(cache_dir, hashlib.md5(description.encode("utf-8")).hexdigest()), size,
                               len(corpus_descriptions), check)
    if direct is not None:
        return direct
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
            found = load_cached_index(os.path.join(cache_dir, name[:-len(".dsc")]), size, len(corpus_descriptions),
                                       check)
            if found is not None:
                return found
    return None
