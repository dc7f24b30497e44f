"""Convert one of our checkpoints to a DeepSpeed universal folder (DeepSpeed's ds_to_universal, with the
parameter folders renamed to our GPTModel names); megatron/checkpoint/universal.py reads and resumes them.

    convert_to_universal("runs/x/checkpoints")      # -> runs/x/checkpoints/global_stepN_universal
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from typing import Optional

from megatron import deepspeed_compat as compat
from megatron.checkpoint.layout import ConversionError
from megatron.checkpoint.universal import (LATEST_UNIVERSAL_FILENAME, UNIVERSAL_SUFFIX, UniversalCheckpoint,
                                           full_name_of)
from megatron.config.model import TransformerConfig


def default_universal_folder(tag_dir: str) -> str:
    return tag_dir.rstrip(os.sep) + UNIVERSAL_SUFFIX


def convert_to_universal(load: str, out: Optional[str] = None, *, workers: int = 1) -> str:
    """Run DeepSpeed's ds_to_universal on our checkpoint `load` (a --save dir or a global_step* dir); returns the folder.

    out: default `<iter dir>_universal` next to the source, with `<save>/latest_universal` pointing at it.
    """
    from deepspeed.checkpoint import ds_to_universal

    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint, _has_optim_files
    from megatron.checkpoint.format import CONTENTS_KEY, publish_directory
    from megatron.fileio import write_text_atomically

    source = DeepSpeedCheckpoint(load)
    if (source.client_state.get(CONTENTS_KEY) or {}).get("optimizer") is False:
        raise ConversionError(
            f"{source.tag_dir} was saved with --no-save-optim: it holds no optimizer shards, and DeepSpeed's universal "
            "converter reads the weights from those. Resume it on another layout by pointing --load at it directly "
            "(with --no-load-optim), or convert it with `reshard`")
    if _whole_matrix_optimizer(source):
        if workers != 1:
            raise ConversionError(f"--workers {workers}: {source.tag_dir} holds a whole-matrix optimizer's state "
                                  "(no ZeRO shards to extract in parallel), which one process writes; drop --workers")
        return _convert_whole_matrix(source, out)
    if not _has_optim_files(source.tag_dir):
        raise ConversionError(
            f"{source.tag_dir} holds no ZeRO or bf16 optimizer shards (an fp32 run without ZeRO keeps its optimizer "
            "in the model files), and DeepSpeed's universal converter reads only those. Resume it on another layout "
            "by pointing --load at it directly, or train with --zero-stage 1 to make convertible checkpoints")
    state_info = source.client_state.get("universal_checkpoint_info")
    if not state_info:
        raise ConversionError(
            f"{source.tag_dir} carries no universal_checkpoint_info (written before this framework saved it); "
            "resume it on the new layout with --load (the loader reshards), or convert with `reshard`")
    out, tmp = _output_folders(source, out)
    args = argparse.Namespace(input_folder=source.tag_dir, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            ds_to_universal.main(args)
        _rename_to_model_names(os.path.join(tmp, compat.UNIVERSAL_ZERO_DIR), source.config, source.pipeline)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomically(os.path.join(os.path.dirname(out), LATEST_UNIVERSAL_FILENAME), os.path.basename(out))
    UniversalCheckpoint(out)  # every parameter is there, with the shape the configuration says
    return out


def _rename_to_model_names(zero_dir: str, config: TransformerConfig, pipeline: bool) -> None:
    if not pipeline:
        return
    for local in os.listdir(zero_dir):
        if os.path.isdir(os.path.join(zero_dir, local)):
            os.rename(os.path.join(zero_dir, local), os.path.join(zero_dir, full_name_of(local, config, True)))




def _whole_matrix_optimizer(source) -> Optional[str]:
    """The --optimizer of a checkpoint holding a whole-matrix optimizer's state (full_matrix/2), else None."""
    from megatron.checkpoint.full_matrix_state import FORMAT
    from megatron.checkpoint.zero_shards import load_mmap

    name = source.args.get("optimizer")
    osd = load_mmap(source.model_files[0], remember=True).get("optimizer") if 0 in source.model_files else None
    return name if isinstance(osd, dict) and osd.get("format") == FORMAT else None


def _convert_whole_matrix(source, out: Optional[str]) -> str:
    """A whole-matrix optimizer's checkpoint as a universal folder, written here (DeepSpeed's converter reads ZeRO's
    flat optimizer files, which these runs do not write): megatron/checkpoint/full_matrix_state.py describes the
    files. The model-states files are copied without the optimizer state they carried."""
    from tqdm import tqdm

    from megatron.checkpoint.format import publish_directory
    from megatron.checkpoint.full_matrix_state import (SavedFullMatrixState, write_universal_folder_state,
                                                       write_universal_parameter)
    from megatron.checkpoint.layout import VOCAB_ROWS, full_parameter_names
    from megatron.checkpoint.zero_shards import load_mmap
    from megatron.fileio import write_text_atomically

    import torch

    out, tmp = _output_folders(source, out)
    state = SavedFullMatrixState(source)
    try:
        zero_dir = os.path.join(tmp, compat.UNIVERSAL_ZERO_DIR)
        os.makedirs(zero_dir)
        for path in source.model_files.values():
            model_state = dict(load_mmap(path))
            model_state["optimizer"] = None
            torch.save(model_state, os.path.join(tmp, os.path.basename(path)))
        for param in tqdm(full_parameter_names(source.config), desc=f"to-universal {os.path.basename(out)}",
                          unit="param"):
            write_universal_parameter(os.path.join(zero_dir, param), state.parameter_state(param),
                                      state.master(param), vocab=param in VOCAB_ROWS)
        write_universal_folder_state(zero_dir, _whole_matrix_optimizer(source), state.groups())
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomically(os.path.join(os.path.dirname(out), LATEST_UNIVERSAL_FILENAME), os.path.basename(out))
    UniversalCheckpoint(out).full_matrix_state()  # every parameter is there, with the shape the configuration says
    return out


def _output_folders(source, out: Optional[str]) -> tuple[str, str]:
    """The universal folder to publish (refused if it exists) and the emptied temporary folder it is built in."""
    out = os.path.abspath(out or default_universal_folder(source.tag_dir))
    if os.path.exists(out):
        raise ConversionError(f"{out} already exists; remove it or choose another --out")
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, ".tmp-" + name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out, tmp
