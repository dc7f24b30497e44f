"""Read checkpoint files without running their code: `torch.load(weights_only=True)` with a short list of the
classes that the trainers we read pickle into their files, and a refusal naming any other.

    state = safe_load("ckpt/global_step10/mp_rank_00_model_states.pt", mmap=True)

What the list holds, and who pickles it:
- argonne-lcf/Megatron-DeepSpeed (megatron/checkpointing.py save_checkpoint, through DeepSpeed's client state):
  its argparse `Namespace` of arguments, which holds `megatron.core.enums.ModelType` (megatron/training.py sets
  `args.model_type`) and a torch dtype (`args.params_dtype`); its RNG states: `random.getstate()` (tuples of
  ints), `np.random.get_state()` (a numpy array) and torch byte tensors. `ModelType` is read into the stand-in
  below (same members and values), so upstream need not be installed.
- DeepSpeed (its engine and ZeRO / bf16 optimizer files, ours and upstream's alike): the ZeRO stage enum, the
  loss scaler objects, the `fragment_address` records of `param_slice_mappings`, and the `SubparamShape` of
  ds_to_universal's per-parameter files.
- our own --optimizer choices that libraries run: galore_torch's `GaLoreProjector` (galoreadamw) and
  pytorch_optimizer's Shampoo preconditioner objects (dshampooadamw); their state is tensors and numbers. They
  are allowed (and their libraries imported) only for a file that names them (OPTIMIZER_GLOBALS).
- torch's own defaults (tensors, dtypes, OrderedDict, builtins), which `weights_only` always allows.

Anything else is refused before it is built, naming the class, the file and what to do (`UnknownPickleGlobal`):
a checkpoint cannot run code in this process by being loaded.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import re
from typing import Optional

import torch

from megatron.checkpoint.layout import ConversionError


class ModelType(enum.Enum):
    """Stand-in for argonne-lcf/Megatron-DeepSpeed's `megatron.core.enums.ModelType` (same members, same values)."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4


# name in the pickle -> the object it is read into (None: import that very name, if its library is installed)
KNOWN_GLOBALS: dict[str, Optional[object]] = {
    "megatron.core.enums.ModelType": ModelType,
    "argparse.Namespace": argparse.Namespace,
    "numpy.core.multiarray._reconstruct": None,  # numpy < 2 names it so, numpy 2 as below
    "numpy._core.multiarray._reconstruct": None,
    "numpy.ndarray": None,
    "numpy.dtype": None,
    "numpy.dtypes.UInt32DType": None,
    "deepspeed.runtime.zero.config.ZeroStageEnum": None,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": None,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": None,
    "deepspeed.utils.tensor_fragment.fragment_address": None,
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape": None,  # ds_to_universal's per-parameter files
}
# The optimizer state of our own --optimizer choices that well-kept libraries run (megatron/optimizer/): galoreadamw
# keeps a projector per matrix, dshampooadamw its preconditioners (tensors and numbers inside). Allowed only for a
# file that names them, and imported only then: importing these libraries (galore_torch pulls in bitsandbytes) on
# every load would cost each reader ~60 MB of heap and seconds.
OPTIMIZER_GLOBALS = (
    "galore_torch.galore_projector.GaLoreProjector",
    "pytorch_optimizer.optimizer.utils.graft.RMSPropGraft",
    "pytorch_optimizer.optimizer.utils.partition.BlockPartitioner",
    "pytorch_optimizer.optimizer.utils.partition.PreConditionerType",
    "pytorch_optimizer.optimizer.utils.preconditioner.PreConditioner",
)
_NUMPY_RENAMED = {"numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct"}


class UnknownPickleGlobal(ConversionError):
    """A checkpoint file pickles a class or function outside KNOWN_GLOBALS."""


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    for candidate in (module, _NUMPY_RENAMED.get(name, "").rpartition(".")[0]):
        if not candidate:
            continue
        try:
            return getattr(importlib.import_module(candidate), attr)
        except (ImportError, AttributeError):
            continue
    return None


_ALLOWED: Optional[list] = None


def allowed_globals() -> list:
    """The (object, pickled name) pairs for torch.serialization.safe_globals; names whose library is not
    installed are left out (a file that needs one is then refused by name)."""
    global _ALLOWED
    if _ALLOWED is None:
        pairs = []
        for name, obj in KNOWN_GLOBALS.items():
            obj = obj if obj is not None else _resolve(name)
            if obj is not None:
                pairs.append((obj, name))
        _ALLOWED = pairs
    return _ALLOWED


def unknown_globals(path: str) -> list[str]:
    """The globals `path` pickles that this reader would refuse (empty: it loads)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError):  # not a zip-format file: only the load itself can tell
        return []
    known = {name for _obj, name in allowed_globals()}
    return sorted(n for n in names if n not in known)


def _refusal(path: str, names: list[str]) -> UnknownPickleGlobal:
    listed = ", ".join(names)
    return UnknownPickleGlobal(
        f"{path}: the file pickles {listed}, which this framework does not load (it reads checkpoints without "
        "running their code, and knows only the classes argonne-lcf/Megatron-DeepSpeed and DeepSpeed store: "
        "megatron/checkpoint/unpickle.py KNOWN_GLOBALS). If this checkpoint is from a trusted run, save it "
        "again without that object (e.g. load and re-save the state dict in the trainer that wrote it), or "
        f"report the class so that a stand-in is added")


def safe_load(path: str, mmap: bool = False):
    """torch.load(path) on CPU with weights_only=True and the known globals; UnknownPickleGlobal naming any other
    global the file needs. OS and format errors propagate as torch raises them."""
    import pickle

    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as error:
            names = unknown_globals(path) or re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
            if not names:
                raise
    optimizer_state = [(_resolve(name), name) for name in names if name in OPTIMIZER_GLOBALS]
    refused = [name for name in names if name not in OPTIMIZER_GLOBALS] + \
        [name for obj, name in optimizer_state if obj is None]  # its library is not installed here
    if refused:
        raise _refusal(path, refused)
    with torch.serialization.safe_globals(allowed_globals() + optimizer_state):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
