"""Upstream's sample order (`--sample-mode upstream`): global sample -> tokens exactly as argonne's code.

The dataset on top of upstream_index.py (which derives upstream's four levels, its split, sample counts, per-file
doc_idx/sample_idx/shuffle_idx and greedy blends, and what exactness costs): `build_upstream_datasets` reads a
DataConfig as upstream's entry points read their flags (pretrain_gpt_alcf.py's "weight prefix corpus" triplets
or one prefix; pretrain_gpt.py's --<split>-data-path), and `UpstreamOrderDataset` serves global samples:
global sample -> corpus sample (the greedy blend over the corpora) -> file sample (the corpus's permutation,
then its concatenation or blend of files) -> tokens (the file's order, then its .idx and .bin).

What is built, where it lives: a file's order and a corpus's permutation are built when a sample first needs
them; large ones are written once per node into node-local RAM (/dev/shm) and memory-mapped by the node's
other ranks (`SharedArrays`: no barrier, no rank waits for another, nothing on a shared filesystem). With
--data-cache-path, upstream's own blend indices found there are read as upstream reads them on a resume,
and the counts of the blends computed here are kept there for the next resume. `choose_sample_mode` makes
this mode the default when --load is an upstream checkpoint (or one of ours saved in this order).
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
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron.data.data_list import SPLIT_NAMES, paused_gc
from megatron.data.indexed_dataset import TokenFile, read_index_header
from megatron.data.upstream_index import (
    CachedIndex, Concatenation, FileOrder, GreedyBlend, UpstreamOrderError, build_file_order, cached_top_blend,
    load_cached_index, per_file_samples, upstream_epochs, upstream_split, upstream_split_weights,
)
from megatron.fileio import replace_atomically

logger = logging.getLogger(__name__)

SHARE_MIN_BYTES = 1 << 20  # a file order this large is written once per node and memory-mapped by its ranks
DEFAULT_PRIVATE_BYTES = 256 << 20  # per process: the most bytes of smaller (unshared) file orders kept
MAX_KEPT_ORDERS = 8192  # file orders (mapped or not) one process keeps at most


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
            cached = load_cached_index(os.path.join(store, key), self.size, len(self.files), None)
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

    Three shapes, as upstream builds them: `weights` and `corpora` (its corpus blend of a --data-file-list or
    --data-path triplets); `weights` alone (a --<split>-data-path's files blended directly); neither (one file,
    upstream's unblended GPTDataset). `requested`: the (train, valid, test) samples the loop asks for (all
    three: a corpus blend's file counts and weights depend on the train count)."""

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
            cached = cached_top_blend(blend_store, [c.description for c in self.corpora], achieved,
                                      self.num_samples, self.blend) if blend_store else None
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

    def summary(self) -> str:
        """One line for the start-up log (upstream's order has no blend report here)."""
        if self.corpora:
            shape = (f"{len(self.corpora)} corpora ({', '.join(f'{c.name} {c.size:,}' for c in self.corpora[:8])}"
                     f"{', ...' if len(self.corpora) > 8 else ''}) of {len(self.files)} files")
        else:
            shape = f"{len(self.files)} file{'s' if len(self.files) > 1 else ''}"
        where = f", blend index from upstream's cache {self.blend.path}" if isinstance(self.blend, CachedIndex) else ""
        return f"{SPLIT_NAMES[self.split]}: {self.num_samples:,} samples in upstream's order from {shape}{where}"

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


OTHER_ORDER_HINT = ("--sample-mode samples or documents reads this blend in our own order (upstream's is the "
                    "default only when --load is an upstream checkpoint or was trained in it)")


def build_upstream_datasets(data_config, seq_length: int, seed: int, num_samples: Sequence[int],
                            vocab_size: Optional[int] = None, progress: bool = False) -> tuple:
    """(train, valid, test) in upstream's order from a DataConfig, as upstream builds them: "weight prefix
    corpus" triplets (--data-file-list lines or --data-path words; every entry needs its corpus), one
    --data-path prefix, or each split's own --<split>-data-path (pretrain_gpt.py's build_dataset). None for a
    split with no samples asked, a zero --split weight, or no path of its own. A blend upstream cannot read is
    refused with its problems and how to read it in another order."""
    try:
        return _build_upstream_datasets(data_config, seq_length, seed, num_samples, vocab_size, progress)
    except UpstreamOrderError as error:
        raise UpstreamOrderError(error.source, error.problems + [OTHER_ORDER_HINT]) from None


def _build_upstream_datasets(data_config, seq_length: int, seed: int, num_samples: Sequence[int],
                             vocab_size: Optional[int], progress: bool) -> tuple:
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
