"""Open any checkpoint the converters read, by what is on disk: a DeepSpeed universal folder, a checkpoint of
argonne-lcf/Megatron-DeepSpeed (AuroraGPT), or one of ours. Each is a FullModelSource with
`full_optimizer_tensor(name, key)`, so to-hf, reshard and zero-to-fp32 take them all."""

from __future__ import annotations

import os
from typing import Optional

from megatron.convert.model_layout import FullModelSource
from megatron.deepspeed_compat import LATEST_FILENAME


def open_checkpoint(path: str, weights: str = "auto", vocab_size: Optional[int] = None) -> FullModelSource:
    from megatron.convert.argonne import ArgonneCheckpoint, is_argonne_checkpoint
    from megatron.convert.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.convert.model_layout import ConversionError
    from megatron.convert.universal import LATEST_UNIVERSAL_FILENAME, UniversalCheckpoint, is_universal_folder

    if os.path.isdir(path) and is_universal_folder(path):
        if weights == "module":
            raise ConversionError(f"{path} is a universal checkpoint: it holds fp32 weights only (drop --weights module)")
        return UniversalCheckpoint(path, vocab_size=vocab_size)
    if is_argonne_checkpoint(path):
        return ArgonneCheckpoint(path, weights=weights, vocab_size=vocab_size)
    has_ours = any(os.path.isfile(os.path.join(path, n)) for n in (LATEST_FILENAME, "latest_checkpointed_iteration.txt"))
    if os.path.isdir(path) and not has_ours and os.path.isfile(os.path.join(path, LATEST_UNIVERSAL_FILENAME)):
        return UniversalCheckpoint(path, vocab_size=vocab_size)
    return DeepSpeedCheckpoint(path, weights=weights, vocab_size=vocab_size)


def foreign_load_tag(load_dir: str, universal: bool) -> Optional[str]:
    """The tag --load resumes from when `load_dir` is not one of our --save directories: the universal folder
    (with --universal-checkpoint; a CheckpointError when there is none) or an argonne-lcf/Megatron-DeepSpeed
    checkpoint's global_stepN. None for our own checkpoints."""
    from megatron.convert.argonne import is_argonne_checkpoint, resolve_tag_dir

    if universal:
        from megatron.convert.universal import check_universal_folder

        return os.path.basename(check_universal_folder(load_dir))
    if is_argonne_checkpoint(load_dir):
        return os.path.basename(resolve_tag_dir(load_dir))
    return None
