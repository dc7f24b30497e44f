"""The blend report: per split and corpus, how much data there is and how often the run will repeat it.

    report = blend_report(build_datasets(...), threshold=4.0)   # or blend_report_for_config(data_config, ...)
    print(report.table())                 # rank 0 at start-up, and --dry-run
    report.write(save_dir)                # blend_report.txt + blend_report.json, atomically
    report.warnings                       # corpora repeated more than `threshold` times, files left out

Every number is exact, not estimated: "samples requested" is the count of the split's first
num_samples global samples that the arithmetic blend (megatron/data/blend.py) gives the corpus's
files (`BlendedIndex.samples_before`), "epochs" is that count over the corpus's samples per epoch.
A file's corpus is the third column of --data-file-list, else the file's name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron.fileio import write_text_atomically
from megatron.data.data_list import SPLIT_NAMES

DEFAULT_EPOCHS_WARNING = 4.0
REPORT_TEXT = "blend_report.txt"
REPORT_JSON = "blend_report.json"
MAX_NAMED_FILES = 20  # a warning names this many files; the JSON report lists them all


@dataclass
class CorpusRow:
    """One corpus in one split."""
    split: str
    corpus: str
    weight: float  # share of the split's blend (the corpus's files' weights over all weights of the split)
    files: int  # files of the corpus in this split's blend
    tokens: int  # tokens of those files inside this split's document range
    samples_per_epoch: int  # samples of seq_length + 1 tokens one pass over those files gives
    samples_requested: int  # samples of this split's run drawn from the corpus
    epochs: float  # samples_requested / samples_per_epoch: how many times the corpus is repeated
    max_file_epochs: float  # the most any single file of the corpus is repeated


@dataclass
class BlendReport:
    rows: list[CorpusRow]
    warnings: list[str]
    threshold: float
    seq_length: int
    requested: dict = field(default_factory=dict)  # split name -> samples requested
    left_out: dict = field(default_factory=dict)  # split name -> [(prefix, tokens)] of files too short for it

    def table(self) -> str:
        """The report as aligned text: one block per split, then the warnings."""
        lines = [f"blend report (samples of seq_length + 1 = {self.seq_length + 1} tokens; epochs above "
                 f"{self.threshold:g} are marked !)"]
        width = max([len(r.corpus) for r in self.rows] + [6])
        header = (f"  {'corpus':<{width}} {'weight':>8} {'files':>6} {'tokens':>17} {'samples/epoch':>14} "
                  f"{'requested':>14} {'epochs':>9} {'max file':>9}")
        for split in SPLIT_NAMES:
            rows = [r for r in self.rows if r.split == split]
            if not rows:
                continue
            lines.append(f"{split}: {self.requested.get(split, 0):,} samples requested")
            lines.append(header)
            for r in rows:
                mark = " !" if r.epochs > self.threshold else ""
                lines.append(f"  {r.corpus:<{width}} {r.weight:>8.4f} {r.files:>6} {r.tokens:>17,} "
                             f"{r.samples_per_epoch:>14,} {r.samples_requested:>14,} {r.epochs:>9.3f} "
                             f"{r.max_file_epochs:>9.3f}{mark}")
            available = sum(r.samples_per_epoch for r in rows)
            drawn = sum(r.samples_requested for r in rows)
            lines.append(f"  {'total':<{width}} {sum(r.weight for r in rows):>8.4f} {sum(r.files for r in rows):>6} "
                         f"{sum(r.tokens for r in rows):>17,} {available:>14,} {drawn:>14,} "
                         f"{drawn / max(available, 1):>9.3f}")
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"seq_length": self.seq_length, "threshold": self.threshold, "requested": self.requested,
                "rows": [asdict(r) for r in self.rows], "warnings": list(self.warnings),
                "left_out": {split: [[prefix, int(tokens)] for prefix, tokens in files]
                             for split, files in self.left_out.items()}}

    def write(self, directory: str) -> list[str]:
        """blend_report.txt and .json into `directory` (created if needed), each written atomically."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name, text in ((REPORT_TEXT, self.table() + "\n"),
                           (REPORT_JSON, json.dumps(self.to_dict(), indent=1) + "\n")):
            path = os.path.join(directory, name)
            write_text_atomically(path, text)  # temporary name, fsync, rename, fsync the directory
            paths.append(path)
        return paths


def blend_report(datasets: Sequence, threshold: float = DEFAULT_EPOCHS_WARNING) -> BlendReport:
    """The report of built (train, valid, test) datasets (None entries and mock datasets are skipped)."""
    if not threshold > 0:
        raise ValueError(f"--blend-epochs-warning must be > 0, got {threshold}")
    rows, warnings, requested, seq_length, left_out = [], [], {}, 0, {}
    for dataset in datasets:
        if dataset is None or not hasattr(dataset, "index"):
            continue
        split = SPLIT_NAMES[dataset.split]
        seq_length = dataset.seq_length
        requested[split] = int(dataset.num_samples)
        drawn = dataset.index.samples_before(dataset.num_samples)
        per_file_epochs = drawn / dataset.samples_per_file
        corpora = dataset.corpora
        names = list(dict.fromkeys(corpora))  # in order of first appearance
        members = np.array([names.index(c) for c in corpora])
        for c, name in enumerate(names):
            files = np.flatnonzero(members == c)
            available = int(dataset.samples_per_file[files].sum())
            taken = int(drawn[files].sum())
            tokens = int(sum(dataset.files[f].token_range(dataset.split)[1]
                             - dataset.files[f].token_range(dataset.split)[0] for f in files))
            row = CorpusRow(split, name, float(dataset.index.weights[files].sum()), int(files.size), tokens,
                            available, taken, taken / available, float(per_file_epochs[files].max()))
            rows.append(row)
            if row.epochs > threshold:
                warnings.append(f"{split}: corpus {name} is repeated {row.epochs:.2f} times (more than "
                                f"--blend-epochs-warning {threshold:g}): {taken:,} samples drawn from "
                                f"{available:,}; add data to it or lower its weight")
        short = list(getattr(dataset, "left_out", ()))
        if short:
            left_out[split] = short
            named = "; ".join(f"{prefix} left out: {tokens} tokens" for prefix, tokens in short[:MAX_NAMED_FILES])
            more = f"; and {len(short) - MAX_NAMED_FILES} more (all in {REPORT_JSON})" \
                if len(short) > MAX_NAMED_FILES else ""
            warnings.append(f"{split}: {len(short)} file(s) hold fewer than seq_length + 1 = {dataset.seq_length + 1} "
                            f"tokens in this split and are left out of its blend: {named}{more}")
    return BlendReport(rows, warnings, float(threshold), seq_length, requested, left_out)


def blend_report_for_config(data_config, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                            threshold: float = DEFAULT_EPOCHS_WARNING, vocab_size: Optional[int] = None) -> BlendReport:
    """Build the datasets of a DataConfig (headers only, no document indices) and report on them (--dry-run)."""
    from megatron.data.gpt_dataset import build_datasets

    datasets = build_datasets(data_config, seq_length, seed, num_samples, vocab_size, sample_mode="samples")
    return blend_report(datasets, threshold)


def publish_blend_report(datasets: Sequence, threshold: float, printer, tracker=None,
                         save_dir: Optional[str] = None) -> Optional[BlendReport]:
    """Rank 0 at start-up: print the report, log it to TensorBoard/wandb, write it into --save. None for mock data."""
    report = blend_report(datasets, threshold)
    if not report.rows:
        return None
    printer(report.table())
    if tracker is not None:
        columns = ["split", "corpus", "weight", "files", "tokens", "samples_per_epoch", "samples_requested",
                   "epochs", "max_file_epochs"]
        tracker.log_table("data/blend_report", columns, [[getattr(r, c) for c in columns] for r in report.rows],
                          text=report.table())
    if save_dir:
        report.write(save_dir)
    return report
