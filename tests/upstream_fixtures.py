"""Read the fixtures that argonne-lcf/Megatron-DeepSpeed itself wrote (tests/data/upstream/, see its README.md).

    from upstream_fixtures import FIXTURES, index, losses, order, copy_checkpoint, copy_data

Tests copy a checkpoint or the data before using them, so that nothing writes into the fixtures
(a resume writes new checkpoints and data caches next to what it reads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "data" / "upstream"


def index() -> dict:
    """INDEX.json: every fixture with its layout and files (paths relative to FIXTURES)."""
    return json.loads((FIXTURES / "INDEX.json").read_text())


def losses(name: str, run: str = "continuous_run") -> dict[int, float]:
    """Upstream's logged `lm loss` per iteration of checkpoint fixture `name`.

    run: "continuous_run" (iterations 1-8 without a stop), "saved_run" (1-4, then saved) or
    "resumed_run" (5-8, upstream's own resume from the saved checkpoint)."""
    data = json.loads((FIXTURES / "ckpt" / name / "losses.json").read_text())
    return {int(it): v["lm_loss"] for it, v in data[run].items()}


def order(case: str, split: str = "train") -> dict[str, np.ndarray]:
    """Upstream's samples of an order case: {"tokens": [n, seq + 1] int64, "where": [n, 5] int64}."""
    d = FIXTURES / "order" / case
    return {"tokens": np.load(d / f"{split}_tokens.npy"), "where": np.load(d / f"{split}_where.npy")}


def copy_checkpoint(name: str, dest: Path) -> Path:
    """Copy checkpoint fixture `name`'s --save directory to dest/checkpoints and return that path."""
    target = Path(dest) / "checkpoints"
    shutil.copytree(FIXTURES / "ckpt" / name / "checkpoints", target)
    return target


def copy_data(dest: Path) -> Path:
    """Copy the token files to dest/data (no JSONL) and return dest; the data-file list there names
    them relative to dest (run with dest as the working directory, or rewrite the list)."""
    shutil.copytree(FIXTURES / "data", Path(dest) / "data", ignore=shutil.ignore_patterns("*.jsonl"))
    return Path(dest)
