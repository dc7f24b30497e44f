"""Save and resume a training run: DeepSpeed engine state + our progress counters + every rank's RNG streams.

Layout under --save (paths look like Megatron-DeepSpeed's):

    <save>/iter_0000100/                    DeepSpeed's files (mp_rank_XX_model_states.pt, zero_*_optim_states.pt, ...)
    <save>/iter_0000100/rng_state_rank_00003.pt   python/numpy/torch/device RNG and the model's RNG tracker, per rank
    <save>/latest_checkpointed_iteration.txt      Megatron's pointer ("100")
    <save>/latest                                  DeepSpeed's pointer ("iter_0000100")

A checkpoint is written under `<save>/.tmp-iter_N`, renamed to `iter_N` by rank 0 once every rank has
finished, and only then do the two pointer files change (each written to a temporary file and
os.replace'd), so a crash mid-save never leaves a pointer to a half-written checkpoint.
The training progress (iteration, consumed samples, the run's arguments, the model config) travels in
DeepSpeed's `client_state`, which every rank gets back from `engine.load_checkpoint`. A checkpoint written
at another tp / pp / dp / ZeRO stage, or by tools/convert_checkpoint.py, is loaded through
megatron.convert.reshard instead (the loop passes `run=` to `load_checkpoint`).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"  # Megatron's pointer file
DEEPSPEED_LATEST_FILENAME = "latest"  # DeepSpeed's pointer file
TMP_PREFIX = ".tmp-"
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the path and what to do."""


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_state_filename(rank: int) -> str:
    return f"rng_state_rank_{rank:05d}.pt"


@dataclass
class TrainingProgress:
    """What the loop needs to pick up where it left off (besides model/optimizer/scheduler state)."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    args: dict = field(default_factory=dict)
    checkpoint_path: Optional[str] = None
    extra: dict = field(default_factory=dict)  # everything else the saver put in client_state


# ---- RNG states -----------------------------------------------------------------------------------

def capture_rng_state(device: torch.device, tracker_states: Optional[Callable[[], dict]] = None) -> dict:
    """Every random stream this rank draws from; `tracker_states()` gives the model's RNG tracker states."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    elif device.type == "xpu":
        state["device"] = torch.xpu.get_rng_state(device)
    if tracker_states is not None:
        state["tracker"] = tracker_states()
    return state


def restore_rng_state(state: dict, device: torch.device,
                      set_tracker_states: Optional[Callable[[dict], None]] = None) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
    elif "device" in state and device.type == "xpu":
        torch.xpu.set_rng_state(state["device"], device)
    if set_tracker_states is not None and "tracker" in state:
        set_tracker_states(state["tracker"])


# ---- small file helpers ---------------------------------------------------------------------------

def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save_atomically(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- pointers ---------------------------------------------------------------------------------------

def read_latest_tag(load_dir: str) -> str:
    """The tag that --load resumes from, with an error naming the path when there is none."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    ds_latest = os.path.join(load_dir, DEEPSPEED_LATEST_FILENAME)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise CheckpointError(
                f"{tracker} should hold an iteration number, found {text!r}; fix or delete the file")
        tag, pointer = checkpoint_tag(int(text)), tracker
    elif os.path.isfile(ds_latest):
        tag, pointer = open(ds_latest).read().strip(), ds_latest
    else:
        raise CheckpointError(
            f"--load {load_dir}: neither {TRACKER_FILENAME} nor {DEEPSPEED_LATEST_FILENAME} is there, so there "
            "is no complete checkpoint to resume (a save that was interrupted leaves only a .tmp-iter_* dir); "
            "point --load at a directory written by --save, or drop --load to start from scratch")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(
            f"{pointer} points at {tag!r} but {os.path.join(load_dir, tag)} does not exist; "
            "restore that directory or edit the pointer to an existing iter_* directory")
    return tag


def _publish(save_dir: str, tmp_tag: str, tag: str, iteration: int) -> None:
    """Rank 0: make the finished checkpoint visible under its final name, then move the pointers."""
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):  # saving the same iteration twice (e.g. exit right after an interval save)
        stale = os.path.join(save_dir, f"{TMP_PREFIX}old-{tag}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(os.path.join(save_dir, tmp_tag), final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(os.path.join(save_dir, tmp_tag), final)
    _write_text_atomically(os.path.join(save_dir, TRACKER_FILENAME), str(iteration))
    _write_text_atomically(os.path.join(save_dir, DEEPSPEED_LATEST_FILENAME), tag)


# ---- save / load ------------------------------------------------------------------------------------

def save_checkpoint(engine, save_dir: str, progress: TrainingProgress, device: torch.device,
                    tracker_states: Optional[Callable[[], dict]] = None, extra_state: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    tag = checkpoint_tag(progress.iteration)
    tmp_tag = TMP_PREFIX + tag
    rank = _world_rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(os.path.join(save_dir, tmp_tag), ignore_errors=True)  # left by an interrupted save
    _barrier()
    client_state = {
        "checkpoint_version": CHECKPOINT_FORMAT_VERSION,
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "consumed_tokens": progress.consumed_tokens,
        "args": dict(progress.args),
    }
    if extra_state:
        client_state.update(extra_state)
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    rng_path = os.path.join(save_dir, tmp_tag, rng_state_filename(rank))
    _torch_save_atomically(capture_rng_state(device, tracker_states), rng_path)
    _barrier()
    if rank == 0:
        _publish(save_dir, tmp_tag, tag, progress.iteration)
    _barrier()
    return os.path.join(save_dir, tag)


def load_checkpoint(training_engine, load_dir: str, device: torch.device, *, run=None, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False,
                    set_tracker_states: Optional[Callable[[dict], None]] = None) -> TrainingProgress:
    """Restore what `save_checkpoint` wrote into an initialised TrainingEngine; returns the progress to resume from.

    finetune: weights only; iteration, consumed samples, optimizer and LR scheduler start fresh.
    load_optim=False (--no-load-optim): the optimizer state starts fresh; the LR schedule is still resumed.
    load_rng=False (--no-load-rng): keep this run's seeds.
    run: this run's RunConfig. With --universal-checkpoint, `load_dir` is a universal folder (or holds a
    latest_universal pointer) and megatron.convert.universal loads it. When given and the checkpoint was written at another tp / pp / dp / ZeRO stage
    (or by tools/convert_checkpoint.py), megatron.convert.reshard loads it instead of DeepSpeed; RNG streams
    then start fresh from the seed (they cannot be mapped onto other ranks).
    """
    if run is not None and run.training.zero.universal_checkpoint:
        from megatron.convert.universal import load_universal_checkpoint

        progress = load_universal_checkpoint(training_engine, load_dir, load_optim=load_optim, finetune=finetune)
        _barrier()
        return progress
    from megatron.convert.argonne import is_argonne_checkpoint, load_argonne_checkpoint

    if is_argonne_checkpoint(load_dir):  # written by argonne-lcf/Megatron-DeepSpeed (AuroraGPT)
        progress = load_argonne_checkpoint(training_engine, load_dir, load_optim=load_optim, finetune=finetune)
        _barrier()
        return progress
    tag = read_latest_tag(load_dir)
    if run is not None:
        from megatron.convert.reshard import checkpoint_layout_differs, load_checkpoint_any_layout

        if checkpoint_layout_differs(load_dir, run, training_engine.ps):
            progress = load_checkpoint_any_layout(training_engine, load_dir, load_optim=load_optim,
                                                  finetune=finetune)
            _barrier()
            return progress
    engine = training_engine.engine
    path = os.path.join(load_dir, tag)
    load_path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=load_optim and not finetune,
        load_lr_scheduler_states=not finetune, load_module_only=finetune)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}; see the log above for why")
    client_state = client_state or {}
    if finetune:
        progress = TrainingProgress(args=client_state.get("args", {}), checkpoint_path=path, extra=client_state)
    else:
        if "iteration" not in client_state:
            raise CheckpointError(
                f"{path} has no training progress (iteration, consumed samples): it was not written by this "
                "framework's --save; use --finetune to load its weights only")
        progress = TrainingProgress(iteration=int(client_state["iteration"]),
                                    consumed_samples=int(client_state["consumed_samples"]),
                                    consumed_tokens=int(client_state.get("consumed_tokens", 0)),
                                    args=client_state.get("args", {}), checkpoint_path=path,
                                    extra=client_state)
    if load_rng and not finetune:
        rng_path = os.path.join(path, rng_state_filename(_world_rank()))
        if not os.path.isfile(rng_path):
            raise CheckpointError(
                f"{rng_path} is missing (the checkpoint was written by a different number of ranks?); "
                "pass --no-load-rng to resume with fresh random streams")
        restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False), device,
                          set_tracker_states)
    _barrier()
    return progress
