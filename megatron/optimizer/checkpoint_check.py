"""Refuse to resume one optimizer's state into another (--optimizer adam state loaded into muon, say).

DeepSpeed loads whatever optimizer state dict a checkpoint holds: AdamW state loads silently into Adam,
Lamb or ADOPT (same keys) and changes the run without a word. The checkpoint records the run's arguments;
before the engine loads anything we compare the optimizer it names with --optimizer. --finetune and
--no-load-optim start the optimizer fresh, so they may switch optimizers.
"""

from __future__ import annotations

import os

import torch

from megatron.config.arguments import ConfigError

# names that run the same optimizer with the same state layout here
_SAME = {"apex.adam": "adamw", "apex.sgd": "sgd", "ipex.fusedlamb": "ipex.lamb"}


def checkpoint_saved_args(load_dir: str, tag: str) -> dict | None:
    """The run's arguments recorded in checkpoint `tag` under `load_dir`, or None when it records none."""
    from megatron.deepspeed_compat import model_states_name

    path = os.path.join(load_dir, tag, model_states_name(0))
    if not os.path.isfile(path):
        return None  # a converted or universal checkpoint: weights only, nothing to compare
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    args = state.get("args") if isinstance(state, dict) else None
    return args if isinstance(args, dict) else None


def checkpoint_optimizer_name(load_dir: str, tag: str) -> str | None:
    """The --optimizer recorded in checkpoint `tag` under `load_dir`, or None when it records none."""
    name = (checkpoint_saved_args(load_dir, tag) or {}).get("optimizer")
    return str(name) if name else None


def check_data_parallel_random_init(load_dir: str, run, tag: str) -> None:
    """Upstream's check_checkpoint_args: with --data-parallel-random-init, the checkpoint must come from a run
    that had it too (each data-parallel rank's RNG streams differ only then)."""
    if not run.training.data_parallel_random_init or run.checkpoint.finetune:
        return
    saved = (checkpoint_saved_args(load_dir, tag) or {}).get("data_parallel_random_init")
    if saved is not None and not saved:
        raise ConfigError(f"--load {load_dir}: --data-parallel-random-init is given, but checkpoint {tag} was saved "
                          "by a run without it (as upstream, the two must match); drop the flag to resume, or pass "
                          "--finetune to start a new run from these weights")


ADAM_STATE = ("adam", "adamw", "apex.adam")  # what the converters and resharding carry across layouts


def check_optimizer_state(load_dir: str, run, tag: str, ps=None) -> None:
    """Raise ConfigError when the checkpoint's optimizer state would be loaded into another optimizer, or
    through a conversion that carries Adam state only (another layout, universal or argonne checkpoints)."""
    if run.checkpoint.finetune or run.checkpoint.no_load_optim:
        return
    mine = run.training.optimizer.optimizer
    if mine not in ADAM_STATE:
        from megatron.convert.argonne import is_argonne_checkpoint
        from megatron.convert.reshard import checkpoint_layout_differs

        converted = run.training.zero.universal_checkpoint or is_argonne_checkpoint(load_dir) or (
            ps is not None and checkpoint_layout_differs(os.path.join(load_dir, tag), run, ps))
        if converted:
            raise ConfigError(f"--load {load_dir} needs its optimizer state converted (another tp/pp/dp/ZeRO layout, a "
                              f"universal or an argonne checkpoint), which carries Adam state only, not --optimizer "
                              f"{mine}'s; resume at the checkpoint's layout, or pass --no-load-optim (fresh optimizer "
                              "state, schedule kept)")
    theirs = checkpoint_optimizer_name(load_dir, tag)
    if theirs is None or _SAME.get(theirs, theirs) == _SAME.get(mine, mine):
        return
    raise ConfigError(f"--load {load_dir} holds the state of --optimizer {theirs}, but this run uses --optimizer "
                      f"{mine}; resume with --optimizer {theirs}, or start the new optimizer fresh with "
                      "--no-load-optim (keeps the iteration and LR schedule) or --finetune")
