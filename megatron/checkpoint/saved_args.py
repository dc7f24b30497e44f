"""The arguments a checkpoint was saved with, for --use-checkpoint-args (upstream's load_args_from_checkpoint).

Our checkpoints carry the run's final flag values as the dict `args` in the client state of the model-states
file that DeepSpeed writes (`mp_rank_00_model_states.pt`, or `zero_pp_rank_0_mp_rank_00_model_states.pt` at ZeRO-3);
argonne-lcf/Megatron-DeepSpeed's carry an argparse Namespace under the same key (read as a dict here). Only
this small file is opened (memory-mapped); no process group is needed, so every rank reads it before start-up.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron.checkpoint.format import list_checkpoint_tags, read_pointer
from megatron.deepspeed_compat import model_states_name, zero3_model_states_name
from megatron.errors import CheckpointError

_MODEL_STATES = (model_states_name(0), zero3_model_states_name(0, 0))


def checkpoint_directory(load_dir: str, tag: Optional[str] = None) -> Optional[str]:
    """The checkpoint directory --load (and --load-tag) name; None when --load holds no checkpoint yet."""
    named_by = f"--load-tag {tag}"
    if tag is None and any(os.path.isfile(os.path.join(load_dir, n)) for n in _MODEL_STATES):
        return load_dir  # --load names one checkpoint directory itself
    if tag is None:
        if not os.path.isdir(load_dir):
            return None
        tag, named_by = read_pointer(load_dir), f"the pointer in {load_dir}"
        if tag is None:
            return None
    directory = os.path.join(load_dir, tag)
    if not os.path.isdir(directory):
        there = list_checkpoint_tags(load_dir)
        raise CheckpointError(f"--use-checkpoint-args: {directory} (named by {named_by}) does not exist; the "
                              f"checkpoints under --load {load_dir} are: {', '.join(there) if there else 'none'}")
    return directory


def read_saved_args(directory: str) -> dict:
    """The `args` the checkpoint in `directory` was saved with, as a dict; a CheckpointError naming the file when
    it has none."""
    path = next((os.path.join(directory, n) for n in _MODEL_STATES if os.path.isfile(os.path.join(directory, n))),
                None)
    if path is None:
        raise CheckpointError(f"--use-checkpoint-args: {directory} has none of {', '.join(_MODEL_STATES)}, so it "
                              "records no arguments; give the model flags yourself and drop --use-checkpoint-args")
    from megatron.checkpoint.zero_shards import load_mmap

    try:
        state = load_mmap(path, remember=True)  # a resume that follows describes the same file without reading it
    except Exception as error:  # pickle, zip and OS errors alike: the file cannot be read
        raise CheckpointError(f"--use-checkpoint-args: {path} cannot be read ({type(error).__name__}: {error})") \
            from None
    args = state.get("args") if isinstance(state, dict) else None
    if args is not None and not isinstance(args, dict):
        args = vars(args) if hasattr(args, "__dict__") else None
    if not args:
        raise CheckpointError(f"--use-checkpoint-args: {path} records no arguments; give the model flags yourself "
                              "and drop --use-checkpoint-args")
    return dict(args)


def saved_args_of(load_dir: str, tag: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """(checkpoint directory, its saved arguments) for --use-checkpoint-args (megatron.cli hands this to
    config's parse_args); None when --load holds no checkpoint yet. Errors are ConfigErrors naming the flag."""
    from megatron.errors import ConfigError

    try:
        directory = checkpoint_directory(load_dir, tag)
        return None if directory is None else (directory, read_saved_args(directory))
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
