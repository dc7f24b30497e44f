"""Open any checkpoint by what is on disk: a DeepSpeed universal folder, a checkpoint of argonne-lcf/Megatron-
DeepSpeed (AuroraGPT), a Hugging Face model folder, or one of ours. Each is a FullModelSource; all but the Hugging
Face folder also have `full_optimizer_tensor(name, key)`, so to-hf, reshard and zero-to-fp32 take them all.
resume.py opens what --load names through the same readers."""

from __future__ import annotations

import os
from typing import Optional

from megatron.checkpoint.format import TRACKER_FILENAME
from megatron.checkpoint.layout import FullModelSource
from megatron.deepspeed_compat import LATEST_FILENAME


def open_checkpoint(path: str, weights: str = "auto", vocab_size: Optional[int] = None) -> FullModelSource:
    from megatron.checkpoint.argonne import ArgonneCheckpoint, is_argonne_checkpoint
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.checkpoint.layout import ConversionError
    from megatron.checkpoint.universal import LATEST_UNIVERSAL_FILENAME, UniversalCheckpoint, is_universal_folder

    if os.path.isdir(path) and is_universal_folder(path):
        if weights == "module":
            raise ConversionError(f"{path} is a universal checkpoint: it holds fp32 weights only (drop --weights module)")
        return UniversalCheckpoint(path, vocab_size=vocab_size)
    if is_argonne_checkpoint(path):
        return ArgonneCheckpoint(path, weights=weights, vocab_size=vocab_size)
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron.checkpoint.hf import HFModelSource

        return HFModelSource(path)
    has_ours = any(os.path.isfile(os.path.join(path, n)) for n in (LATEST_FILENAME, TRACKER_FILENAME))
    if os.path.isdir(path) and not has_ours and os.path.isfile(os.path.join(path, LATEST_UNIVERSAL_FILENAME)):
        return UniversalCheckpoint(path, vocab_size=vocab_size)
    return DeepSpeedCheckpoint(path, weights=weights, vocab_size=vocab_size)
