"""Experiment tracking: scalars to TensorBoard (--tensorboard-dir) and wandb (--wandb-project) from rank 0 only.

`Tracker(run.logging, rank, config=run.args)` is a no-op on other ranks and when neither is configured, so the
loop calls `tracker.log({...}, step)` everywhere without checks. wandb runs offline with WANDB_MODE=offline.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron.config.logging import LoggingConfig
from megatron.errors import MegatronError


class TrackingError(MegatronError, RuntimeError):
    """A tracker (wandb) that cannot start on rank 0; the message says what to install or set."""


class Tracker:
    def __init__(self, logging: LoggingConfig, rank: int = 0, config: Optional[dict] = None,
                 wandb_dir: Optional[str] = None):
        self.rank = rank
        self.tensorboard = None
        self.wandb_run = None
        if rank != 0:
            return
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logging.tensorboard_dir, exist_ok=True)
            self.tensorboard = SummaryWriter(log_dir=logging.tensorboard_dir, max_queue=logging.tensorboard_queue_size)
            if config:
                self.tensorboard.add_text("arguments", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
        if logging.wandb_project:
            self.wandb_run = _start_wandb(logging, config, wandb_dir or logging.wandb_save_dir
                                          or logging.tensorboard_dir or os.getcwd())

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb_run is not None

    def log(self, scalars: dict, step: int) -> None:
        """Write each name → number at `step` (an iteration); None values are skipped."""
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)

    def log_table(self, name: str, columns: list, rows: list, text: str = "", step: int = 0) -> None:
        """A table: to TensorBoard as text (`text`, else a markdown table), to wandb as a wandb.Table."""
        if self.tensorboard is not None:
            if not text:
                text = "\n".join(["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
                                 + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
            self.tensorboard.add_text(name, "```\n" + text + "\n```" if text else text, step)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=list(columns), data=[list(row) for row in rows])}, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(logging: LoggingConfig, config: Optional[dict], directory: str):
    try:
        import wandb
    except ImportError:
        raise TrackingError("--wandb-project needs the wandb package: pip install wandb") from None
    os.makedirs(directory, exist_ok=True)
    try:
        return wandb.init(project=logging.wandb_project, name=logging.wandb_exp_name, dir=directory,
                          config=json.loads(json.dumps(config or {}, default=str)))
    except Exception as e:  # wandb raises its own types for login/network problems
        raise TrackingError(
            f"--wandb-project {logging.wandb_project}: wandb could not start ({e}). Run `wandb login`, or set "
            "WANDB_MODE=offline to write the run locally and `wandb sync` it later") from e
