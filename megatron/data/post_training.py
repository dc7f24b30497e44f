"""Post-training datasets (SFT, DPO) over the files tools/preprocess_data.py --task sft|dpo writes.

Three levels, as for pretraining: the files (`open_post_training_data`: tokens, the loss-mask sidecar and the
.post_training.json description, checked against each other) -> rows (which examples fill each sequence of
seq_length + 1 tokens) -> samples (rows in a keyed order per epoch). Worked example, SFT, seq_length 8,
--split 1, examples of 4, 12 and 5 tokens:

    overlong   the 12-token example exceeds 9 tokens: "truncate" keeps its first 9 (if a response token is
               left among the labels, tokens[1:]), "drop" leaves it out; both are counted in the report
    padding    one example per row: [e0 e0 e0 e0 pad pad pad pad pad]; the loss mask is the sidecar's mask of
               the labels (mask[1:]), 0 on padding
    packing    examples in a seeded shuffled order, each put in the open row it fills most tightly, else a
               new one (best fit): [e2 e2 e2 e2 e2 e0 e0 e0 e0] with document_ids [0 0 0 0 0 1 1 1] and position_ids
               [0 1 2 3 4 0 1 2]: attention stays inside each example (the model's document mask), positions
               restart, and the label that would cross from one example into the next has loss mask 0
    order      sample i of the run is row perm_e(i mod R) of epoch e = i div R, perm_e a keyed permutation of the
               R rows from (seed, split, e): the same for every rank and layout, and resumable from
               consumed_samples with no state

DPO: one item is one pair (chosen, rejected), each padded to seq_length + 1; `collate` of n pairs stacks the n
chosen rows, then the n rejected rows, so a pair always lands in one micro-batch; `pair_ids` are the pairs'
example numbers in the file (the key of stored reference log-probabilities). Packed, one item is a row pair:
pairs are best-fit by the longer of their two sequences, and a row pair holds the chosen sequences of its pairs
one after another in its chosen row and their rejected sequences in the same order in its rejected row
(sequence d of each row is document d, as packed SFT), so a pair still lands in one micro-batch, and the loss
sums each document's log-probabilities (megatron/post_training/losses.py pair_logps).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron.config.data import OVERLONG_CHOICES
from megatron.data.data_list import parse_split, split_boundaries
from megatron.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megatron.data.permutation import KeyedPermutation, derive_key, shuffled_range
from megatron.data.post_training_format import FORMAT_VERSION, TASKS, loss_mask_prefix, metadata_path
from megatron.errors import ConfigError, MegatronError

SPLIT_NAMES = ("train", "valid", "test")
_PACK_SALT, _ORDER_SALT = 0x5F7A, 0x0D3E  # keep the packing shuffle and the epoch orders independent


class PostTrainingDataError(MegatronError, ValueError):
    """Post-training files that are missing, inconsistent or of the wrong task; the message names them."""


# ------------------------------------------------------------------------------------------------- the files
@dataclass
class PostTrainingData:
    """The three files of one preprocessed set: tokens, loss mask (same sizes), description."""

    prefix: str
    metadata: dict
    tokens: IndexedDataset
    loss_mask: IndexedDataset
    fingerprint: str  # sha256 of the .post_training.json bytes (it holds the sources', data's and mask's sha256)
    _lengths: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return self.metadata["task"]

    @property
    def num_examples(self) -> int:
        return int(self.metadata["examples"])

    @property
    def sequences_per_example(self) -> int:
        return 2 if self.task == "dpo" else 1

    def sequence_lengths(self) -> np.ndarray:
        """[examples, sequences per example]: SFT one column, DPO (chosen, rejected)."""
        if self._lengths is None:
            self._lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64).reshape(
                -1, self.sequences_per_example)
        return self._lengths

    def sequence(self, index: int, length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int64, loss mask uint8) of sequence `index`, its first `length` tokens if given."""
        return (self.tokens.get(index, 0, length).astype(np.int64), self.loss_mask.get(index, 0, length))


def _resolve_prefix(prefix: str) -> str:
    for suffix in (".bin", ".idx", ".post_training.json"):
        if prefix.endswith(suffix):
            prefix = prefix[:-len(suffix)]
    if not os.path.exists(metadata_path(prefix)) and os.path.exists(metadata_path(f"{prefix}_text_document")):
        prefix = f"{prefix}_text_document"  # the --output-prefix given to preprocessing
    return prefix


def open_post_training_data(prefix: str) -> PostTrainingData:
    """Open and cross-check P_text_document(.bin/.idx), its _loss_mask sidecar and .post_training.json."""
    prefix = _resolve_prefix(prefix)
    meta_path = metadata_path(prefix)
    remedy = "write the set with tools/preprocess_data.py --task sft|dpo"
    if not os.path.exists(meta_path):
        raise PostTrainingDataError(f"{meta_path}: not found, so {prefix} is not post-training data; {remedy} and "
                                    "give its P_text_document prefix to --data-path")
    with open(meta_path, "rb") as f:
        raw = f.read()
    try:
        metadata = json.loads(raw)
        version, task = metadata["format"], metadata["task"]
        examples, sequences = int(metadata["examples"]), int(metadata["sequences"])
    except (ValueError, KeyError, TypeError) as error:
        raise PostTrainingDataError(f"{meta_path}: not a post-training description ({type(error).__name__}: "
                                    f"{error}); {remedy}") from None
    if version != FORMAT_VERSION or task not in TASKS:
        raise PostTrainingDataError(f"{meta_path}: format {version!r}, task {task!r}; this version reads format "
                                    f"{FORMAT_VERSION} with task one of {', '.join(TASKS)}; {remedy}")
    for path in (data_file_path(prefix), index_file_path(prefix), data_file_path(loss_mask_prefix(prefix)),
                 index_file_path(loss_mask_prefix(prefix))):
        if not os.path.exists(path):
            raise PostTrainingDataError(f"{path}: missing beside {meta_path}; {remedy}")
    tokens, mask = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    problems = []
    if mask.dtype != np.uint8:
        problems.append(f"the loss mask is {mask.dtype}, not uint8")
    if len(tokens) != sequences or len(mask) != sequences:
        problems.append(f"the description says {sequences} sequences; the tokens hold {len(tokens)}, the loss mask "
                        f"{len(mask)}")
    elif not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
        problems.append("the loss mask's sequence sizes differ from the tokens'")
    if sequences != examples * (2 if task == "dpo" else 1):
        problems.append(f"{examples} {task} examples cannot hold {sequences} sequences")
    if problems:
        raise PostTrainingDataError(f"{prefix}: the post-training files disagree ({'; '.join(problems)}); "
                                    f"{remedy} again")
    return PostTrainingData(prefix, metadata, tokens, mask, hashlib.sha256(raw).hexdigest())


# ----------------------------------------------------------------------------------------------- the report
@dataclass
class SplitCounts:
    examples: int = 0  # in the split before the overlong rule
    kept: int = 0
    truncated: int = 0  # kept, cut to seq_length + 1 tokens
    dropped_overlong: int = 0  # --overlong-examples drop
    dropped_no_response: int = 0  # truncation left no response token among the labels
    rows: int = 0
    tokens: int = 0  # example tokens in the rows (after truncation)


@dataclass
class PostTrainingReport:
    """What the datasets did with the examples, per split; `lines()` is what the training log prints."""

    task: str
    seq_length: int
    pack: bool
    overlong: str
    splits: dict = field(default_factory=dict)  # split name -> SplitCounts

    def lines(self) -> list[str]:
        out = [f"post-training data ({self.task}, seq_length {self.seq_length}, "
               f"{'packed' if self.pack else 'padded'}, overlong examples: {self.overlong}):"]
        unit = "pairs" if self.task == "dpo" else "examples"
        for name, c in self.splits.items():
            capacity = c.rows * (self.seq_length + 1) * (2 if self.task == "dpo" else 1)
            fill = f", {100.0 * c.tokens / capacity:.1f}% of the row tokens are data" if capacity else ""
            out.append(f"  {name}: {c.kept:,} of {c.examples:,} {unit} kept, {c.truncated:,} truncated, "
                       f"{c.dropped_overlong:,} dropped as too long, {c.dropped_no_response:,} dropped with no "
                       f"response token left; {c.rows:,} {'rows' if self.task == 'sft' else 'row pairs'}{fill}")
        return out


# ---------------------------------------------------------------------------------------------- the datasets
class _Rows:
    """Rows of one split and their keyed order per epoch: sample i -> row perm_e(i mod R), e = i div R."""

    def __init__(self, row_bounds: np.ndarray, members: np.ndarray, split: int, seed: int,
                 num_samples: Optional[int]):
        self.row_bounds, self.members = row_bounds, members  # row r holds members[row_bounds[r]:row_bounds[r+1]]
        self.num_rows = len(row_bounds) - 1
        self.split, self.seed = split, int(seed)
        self.num_samples = self.num_rows if num_samples is None else int(num_samples)
        self._permutation: tuple = (None, None)

    def __len__(self) -> int:
        return self.num_samples

    def row_of(self, sample: int) -> np.ndarray:
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} outside [0, {self.num_samples})")
        epoch, position = divmod(int(sample), self.num_rows)
        if self._permutation[0] != epoch:
            key = derive_key(self.seed, _ORDER_SALT, self.split, epoch)
            self._permutation = (epoch, KeyedPermutation(self.num_rows, key))
        row = self._permutation[1][position]
        return self.members[self.row_bounds[row]:self.row_bounds[row + 1]]


class SFTDataset:
    """Items {"tokens": int64[s+1], "loss_mask": float32[s]} (+ "document_ids", "position_ids" int64[s] packed)."""

    def __init__(self, data: PostTrainingData, rows: _Rows, lengths: np.ndarray, seq_length: int, pack: bool,
                 pad: int):
        self.data, self.rows, self.lengths = data, rows, lengths  # lengths: per example, after truncation
        self.seq_length, self.pack, self.pad = int(seq_length), bool(pack), int(pad)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sample: int) -> dict:
        s = self.seq_length
        tokens = np.full(s + 1, self.pad, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        document_ids = np.zeros(s, dtype=np.int64)
        position_ids = np.zeros(s, dtype=np.int64)
        offset = 0
        members = self.rows.row_of(sample)
        for number, example in enumerate(members):
            length = int(self.lengths[example])
            ids, mask = self.data.sequence(int(example), length)
            tokens[offset:offset + length] = ids
            # label t is token t + 1: its mask inside this example; the label crossing into the next is 0
            loss_mask[offset:offset + length - 1] = mask[1:]
            end = min(offset + length, s)
            document_ids[offset:end] = number
            position_ids[offset:end] = np.arange(end - offset)
            offset += length
        if offset < s:  # padding: its own document, so that it attends to nothing real
            document_ids[offset:] = len(members)
            position_ids[offset:] = np.arange(s - offset)
        item = {"tokens": tokens, "loss_mask": loss_mask}
        if self.pack:
            item.update(document_ids=document_ids, position_ids=position_ids)
        return item

    def __getitems__(self, samples: Sequence[int]) -> list[dict]:
        return [self[int(i)] for i in samples]


class DPODataset:
    """Padded: items {"chosen", "rejected": int64[s+1], "chosen_loss_mask", "rejected_loss_mask": float32[s],
    "pair_id": int}, one preference pair each. Packed (a row pair): several pairs, {"pair_ids": int64[k]} and, per
    side, the tokens and loss mask of the k chosen (rejected) sequences one after another, with
    "chosen_document_ids", "chosen_position_ids" (rejected likewise) int64[s]: sequence d of both rows is pair
    pair_ids[d]'s, document d; the padding after them is document k."""

    def __init__(self, data: PostTrainingData, rows: _Rows, lengths: np.ndarray, seq_length: int, pad: int,
                 pack: bool = False):
        self.data, self.rows, self.lengths = data, rows, lengths  # lengths: [examples, 2] after truncation
        self.seq_length, self.pad, self.pack = int(seq_length), int(pad), bool(pack)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sample: int) -> dict:
        members = self.rows.row_of(sample)
        s = self.seq_length
        item = {"pair_ids": members.astype(np.int64)} if self.pack else {"pair_id": int(members[0])}
        for column, name in enumerate(("chosen", "rejected")):
            tokens = np.full(s + 1, self.pad, dtype=np.int64)
            loss_mask = np.zeros(s, dtype=np.float32)
            document_ids = np.zeros(s, dtype=np.int64)
            position_ids = np.zeros(s, dtype=np.int64)
            offset = 0
            for number, pair in enumerate(members):
                length = int(self.lengths[pair, column])
                ids, mask = self.data.sequence(2 * int(pair) + column, length)
                tokens[offset:offset + length] = ids
                loss_mask[offset:offset + length - 1] = mask[1:]  # the label crossing into the next has none
                end = min(offset + length, s)
                document_ids[offset:end] = number
                position_ids[offset:end] = np.arange(end - offset)
                offset += length
            if offset < s:
                document_ids[offset:] = len(members)
                position_ids[offset:] = np.arange(s - offset)
            item[name], item[f"{name}_loss_mask"] = tokens, loss_mask
            if self.pack:
                item[f"{name}_document_ids"], item[f"{name}_position_ids"] = document_ids, position_ids
        return item

    def __getitems__(self, samples: Sequence[int]) -> list[dict]:
        return [self[int(i)] for i in samples]


def collate(items: list[dict]) -> dict:
    """Stack items into a micro-batch of torch tensors.

    SFT: {"tokens": int64[b, s+1], "loss_mask": float32[b, s]} (+ "document_ids", "position_ids" int64[b, s]).
    DPO, n pairs: {"tokens": int64[2n, s+1] (rows 0..n-1 chosen, n..2n-1 rejected), "loss_mask":
    float32[2n, s], "pair_ids": int64[n]}. DPO packed, n row pairs of at most k pairs: "pair_ids" int64[n, k]
    (-1 where a row holds fewer), and "document_ids", "position_ids" int64[2n, s] in the rows' order."""
    import torch  # the datasets themselves are numpy-only (DataLoader workers, tools)

    def rows(key):
        return torch.from_numpy(np.stack([i[f"chosen{key}"] for i in items] + [i[f"rejected{key}"] for i in items]))

    if "pair_id" in items[0]:
        return {"tokens": rows(""), "loss_mask": rows("_loss_mask"),
                "pair_ids": torch.tensor([i["pair_id"] for i in items], dtype=torch.int64)}
    if "pair_ids" in items[0]:
        width = max(len(i["pair_ids"]) for i in items)
        pair_ids = torch.full((len(items), width), -1, dtype=torch.int64)
        for row, item in enumerate(items):
            pair_ids[row, :len(item["pair_ids"])] = torch.from_numpy(item["pair_ids"])
        return {"tokens": rows(""), "loss_mask": rows("_loss_mask"), "document_ids": rows("_document_ids"),
                "position_ids": rows("_position_ids"), "pair_ids": pair_ids}
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


def _fit(data: PostTrainingData, examples: np.ndarray, seq_length: int, overlong: str,
         counts: SplitCounts) -> tuple[np.ndarray, np.ndarray]:
    """(kept example numbers, their sequence lengths after truncation [n, k]) under the overlong rule."""
    limit = seq_length + 1
    lengths = data.sequence_lengths()[examples]
    too_long = (lengths > limit).any(axis=1)
    keep = ~too_long
    counts.examples = len(examples)
    if overlong == "drop":
        counts.dropped_overlong = int(too_long.sum())
    else:
        k = data.sequences_per_example
        for row in np.flatnonzero(too_long):
            # kept only if every sequence still has a response token among its labels (tokens 1..seq_length)
            first = int(examples[row]) * k
            if all(data.sequence(first + j, min(int(lengths[row, j]), limit))[1][1:].any() for j in range(k)):
                keep[row] = True
                counts.truncated += 1
            else:
                counts.dropped_no_response += 1
    counts.kept = int(keep.sum())
    return examples[keep], np.minimum(lengths[keep], limit)


def _pack_best_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(row bounds [R+1], positions into `lengths` row by row): each example, in order, goes to the open row
    whose free space fits it most tightly, else to a new row (best fit, as TRL's packing).

    Open rows are kept in buckets by free space; a segment tree over the free-space values 0..capacity holds,
    per leaf, that value when its bucket is not empty, so "the smallest free space >= length" is the leftmost
    leaf >= length: O(log capacity) per example."""
    size = 1
    while size <= capacity:
        size *= 2
    tree = [0] * (2 * size)  # node n covers its leaves' max; leaf size + f is f when a row has f free, else 0
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]
    rows: list[list[int]] = []

    def set_leaf(free: int, value: int) -> None:
        node = free + size
        tree[node] = value
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node >>= 1

    for position, length in enumerate(lengths.tolist()):
        if tree[1] >= length:
            node = 1
            while node < size:
                node <<= 1
                if tree[node] < length:
                    node += 1
            free = node - size
            bucket = buckets[free]
            row = bucket.pop()
            if not bucket:
                set_leaf(free, 0)
        else:
            row, free = len(rows), capacity
            rows.append([])
        rows[row].append(position)
        left_over = free - length
        if left_over > 0:
            if not buckets[left_over]:
                set_leaf(left_over, left_over)
            buckets[left_over].append(row)
    bounds = np.zeros(len(rows) + 1, dtype=np.int64)
    bounds[1:] = np.cumsum([len(row) for row in rows])
    return bounds, np.asarray([position for row in rows for position in row], dtype=np.int64)


def build_post_training_datasets(prefix, task: str, seq_length: int, *, pack: bool, overlong: str, split: str,
                                 seed: int, eod: int, pad: int,
                                 num_samples: Optional[Sequence[Optional[int]]] = None):
    """((train, valid, test), report) over the preprocessed set `prefix` (a path or a PostTrainingData).

    The examples (DPO: pairs) are cut into train/valid/test by --split in file order, as Megatron cuts
    documents; a split without examples is None. `num_samples[i]`: how many samples split i must serve (the
    rows repeat, each epoch in a new keyed order); None: one epoch. `eod` is checked against the tokenizer the
    data was written with; `pad` fills the rows past the data (its loss mask is 0)."""
    data = prefix if isinstance(prefix, PostTrainingData) else open_post_training_data(prefix)
    if task not in TASKS:
        raise ConfigError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if data.task != task:
        raise PostTrainingDataError(f"{metadata_path(data.prefix)}: holds {data.task} data, but the run is --task "
                                    f"{task}; preprocess with tools/preprocess_data.py --task {task}")
    if overlong not in OVERLONG_CHOICES:
        raise ConfigError(f"--overlong-examples {overlong}: choose one of {', '.join(OVERLONG_CHOICES)}")
    if seq_length < 1:
        raise ConfigError(f"--seq-length {seq_length}: must be >= 1")
    recorded_eod = data.metadata.get("tokenizer", {}).get("eod")
    if recorded_eod is not None and int(recorded_eod) != int(eod):
        raise PostTrainingDataError(f"{metadata_path(data.prefix)}: written with a tokenizer whose EOD is "
                                    f"{recorded_eod}, but the run's is {eod}; give the run the tokenizer flags the "
                                    f"data was preprocessed with ({data.metadata['tokenizer']})")
    requested = list(num_samples) if num_samples is not None else [None, None, None]
    bounds = split_boundaries(parse_split(split), data.num_examples)
    report = PostTrainingReport(task, int(seq_length), bool(pack), overlong)
    datasets = []
    for number, name in enumerate(SPLIT_NAMES):
        examples = np.arange(bounds[number], bounds[number + 1], dtype=np.int64)
        if examples.size == 0 or requested[number] == 0:
            datasets.append(None)
            continue
        counts = report.splits[name] = SplitCounts()
        kept, lengths = _fit(data, examples, seq_length, overlong, counts)
        if kept.size == 0:
            datasets.append(None)
            continue
        all_lengths = np.zeros(data.sequence_lengths().shape, dtype=np.int64)
        all_lengths[kept] = lengths
        if pack:
            order = kept[shuffled_range(kept.size, int(derive_key(seed, _PACK_SALT, number)[0]))]
            # DPO: a pair's chosen and rejected sequences go to the same row pair, so it needs the longer's room
            row_bounds, positions = _pack_best_fit(all_lengths[order].max(axis=1), seq_length + 1)
            members = order[positions]
        else:
            row_bounds, members = np.arange(kept.size + 1, dtype=np.int64), kept
        rows = _Rows(row_bounds, members, number, seed, requested[number])
        counts.rows, counts.tokens = rows.num_rows, int(lengths.sum())
        if task == "sft":
            datasets.append(SFTDataset(data, rows, all_lengths[:, 0], seq_length, pack, pad))
        else:
            datasets.append(DPODataset(data, rows, all_lengths, seq_length, pad, pack))
    return tuple(datasets), report

