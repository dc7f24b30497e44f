"""Experiment tracking: scalars to TensorBoard (--tensorboard-dir) and wandb from rank 0 only.

`Tracker(run.logging, rank, config=run.args, wandb_dir=...)` is a no-op on other ranks and when neither is
configured, so the loop calls `tracker.log({...}, step)` everywhere without checks. wandb runs offline with
WANDB_MODE=offline. The metric names are upstream's (argonne-lcf/Megatron-DeepSpeed's megatron/training_log.py and
evaluate_and_print_results): training/*, throughput/*, loss/*, learning-rate/*, lm-loss-training/*,
lm-loss-validation/*, optimizer/*, val/*, test/*, timers/*; TensorBoard gets the same names.

When wandb starts, as upstream:
- pretrain_gpt.py: with --wandb-project (opt-in, as upstream's plain entry), in --wandb-save-dir, else
  `${--save}/wandb`, else the working directory;
- pretrain_gpt_alcf.py: by default (`alcf_wandb_defaults`), as upstream's ALCF entry does through ezpz.setup_wandb:
  project $WB_PROJECT, else $WANDB_PROJECT, else "AuroraGPT" (--wandb-project, when given, wins), unless
  WANDB_MODE=disabled; in the working directory (ezpz's default) unless --wandb-save-dir. A wandb that cannot
  start (not installed, not logged in) is then reported and the run goes on without it, as ezpz does.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
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
            directory = logging.wandb_save_dir or wandb_dir or os.getcwd()
            try:
                self.wandb_run = _start_wandb(logging, config, directory)
            except TrackingError as error:
                if not logging.wandb_optional:
                    raise
                print(f"wandb: not started, the run goes on without it: {error}", file=sys.stderr, flush=True)

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb_run is not None

    def log(self, scalars: dict, step: int, tensorboard_only: bool = False) -> None:
        """Write each name → number at `step` (an iteration); None values are skipped. tensorboard_only: for
        upstream's TensorBoard-only series plotted against another axis (consumed samples or tokens), which
        wandb's one monotonic step cannot take."""
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None and scalars and not tensorboard_only:
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


def default_wandb_dir(save: Optional[str]) -> Optional[str]:
    """Upstream's default for --wandb-save-dir (megatron/global_vars.py): `${--save}/wandb`; None without --save."""
    return os.path.join(save, "wandb") if save else None


def alcf_wandb_defaults(logging: LoggingConfig, environ=os.environ) -> LoggingConfig:
    """pretrain_gpt_alcf.py's wandb, as upstream's ALCF entry starts it on rank 0 (ezpz.setup_wandb): on unless
    WANDB_MODE=disabled; project --wandb-project, else $WB_PROJECT, else $WANDB_PROJECT, else "AuroraGPT"; in
    --wandb-save-dir, else the working directory; a wandb that cannot start does not stop the run."""
    if str(environ.get("WANDB_MODE", "")).lower() == "disabled":
        return replace(logging, wandb_project=None)
    project = logging.wandb_project or environ.get("WB_PROJECT") or environ.get("WANDB_PROJECT") or "AuroraGPT"
    return replace(logging, wandb_project=project, wandb_save_dir=logging.wandb_save_dir or os.getcwd(),
                   wandb_optional=logging.wandb_project is None)


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
