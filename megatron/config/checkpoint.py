"""Saving and resuming: where, how often, and what to restore."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only; reset iteration, optimizer and scheduler
    no_save_optim: bool = False  # checkpoints without the optimizer state (resume them with --no-load-optim)
    no_save_rng: bool = False  # checkpoints without the RNG states (resume them with --no-load-rng)
    no_load_lr_state: bool = False  # the LR schedule starts over instead of continuing the checkpoint's
    load_tag: Optional[str] = None  # the checkpoint under --load to read, instead of the pointer's
    use_checkpoint_args: bool = False  # the model shape came from the checkpoint's saved arguments
