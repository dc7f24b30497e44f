"""Saving and resuming: where, how often, and what to restore; the flags (`add_checkpoint_arguments`) and
`checkpoint_from_args`. (--use-checkpoint-args is read in config/arguments.py, before the other checks.)"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from megatron.config.argtypes import pos_int


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


def add_checkpoint_arguments(g) -> None:
    """--save ... --use-checkpoint-args, in the "run control, evaluation and checkpoints" group (config/training.py)."""
    g.add_argument("--save")
    g.add_argument("--save-interval", type=pos_int)
    g.add_argument("--load")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and optimizer")
    g.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints hold no optimizer state (no DeepSpeed optimizer/ZeRO files); resuming one "
                        "needs --no-load-optim (or --finetune). Refused at --zero-stage 3, whose weights live in "
                        "the optimizer shards")
    g.add_argument("--no-save-rng", action="store_true",
                   help="checkpoints hold no RNG states (no rng_state_rank_*.pt); resuming one needs --no-load-rng")
    g.add_argument("--no-load-lr-state", action="store_true",
                   help="do not load the checkpoint's LR scheduler state: the schedule the flags describe starts "
                        "over from its step 0 (warmup included) at the resumed iteration")
    g.add_argument("--load-tag", help="the checkpoint under --load to resume (e.g. global_step100), instead of the one "
                                      "latest_checkpointed_iteration.txt / latest names; verified, no fallback")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape (layers, hidden, heads, seq length, ...), tp and pp sizes from the "
                        "arguments saved in the --load checkpoint, as upstream's load_args_from_checkpoint does "
                        "(shape flags you give yourself win for num-layers/hidden/ffn/heads/seq/positions)")


def checkpoint_from_args(ns: argparse.Namespace) -> CheckpointConfig:
    return CheckpointConfig(save=ns.save, save_interval=ns.save_interval, load=ns.load,
                            no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng, finetune=ns.finetune,
                            no_save_optim=ns.no_save_optim, no_save_rng=ns.no_save_rng,
                            no_load_lr_state=ns.no_load_lr_state, load_tag=ns.load_tag,
                            use_checkpoint_args=ns.use_checkpoint_args)
