"""Save a training run through DeepSpeed (engine state + our progress counters + every rank's RNG streams), and
load one with DeepSpeed's own loader when resume.py has planned that (same layout).

Layout under --save (DeepSpeed's tags, as upstream's DeepSpeed path writes them):

    <save>/global_step100/                           DeepSpeed's files (mp_rank_XX_model_states.pt, ...)
    <save>/global_step100/rng_state_rank_00003.pt    python/numpy/torch/device RNG and the model's RNG tracker
    <save>/latest_checkpointed_iteration.txt         Megatron's pointer ("100")
    <save>/latest                                    DeepSpeed's pointer ("global_step100")

A checkpoint is written under `<save>/.tmp-global_stepN`, renamed to `global_stepN` by rank 0 once every rank
has finished, and only then do the two pointer files change (each written to a temporary file and
os.replace'd), so a crash mid-save never leaves a pointer to a half-written checkpoint.
The training progress (iteration, consumed samples, the run's arguments, the model config) travels in
DeepSpeed's `client_state`, which every rank gets back from `engine.load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpoint.format import (CHECKPOINT_FORMAT_KEY, CONTENTS_KEY, DEEPSPEED_LATEST_FILENAME,
                                        MANIFEST_FILENAME, TRACKER_FILENAME, TrainingProgress, checkpoint_tag,
                                        describe_files, iteration_of_tag, list_checkpoint_tags, list_files,
                                        publish_directory, read_manifest, read_pointer,
                                        remove_stale_tmp, verify_manifest, write_manifest, write_pointers,
                                        checkpoint_format_marker)
from megatron.deepspeed_compat import CheckpointIO as _CheckpointIO
from megatron.deepspeed_compat import MODEL_STATES_SUFFIX, deepspeed_version, zero3_module_weights
from megatron.checkpoint.layout import ConversionError
from megatron.errors import CheckpointError
from megatron.fileio import TMP_PREFIX, fsync_file, os_error_text, with_retries


def rng_state_filename(rank: int) -> str:
    return f"rng_state_rank_{rank:05d}.pt"


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


# ---- process-group helpers ------------------------------------------------------------------------

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if _world_size() == 1:
        return [obj]
    out = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- DeepSpeed's checkpoint engine, adapted: megatron/deepspeed_compat.py (with every other DeepSpeed detail) ----

def _remember_model_states(path: str, obj) -> None:
    """A model-states file DeepSpeed read, kept for its second read and the resume's reader (one read a file)."""
    from megatron.checkpoint.zero_shards import remember_loaded

    if os.path.basename(path).endswith(MODEL_STATES_SUFFIX):
        remember_loaded(path, obj)


def _read_for_deepspeed(path: str):
    """What DeepSpeed's load gets for `path`: the object a reader of this resume already read, else the file read
    through the restricted unpickler (retried, memory-mapped) and kept if it is a model-states file."""
    from megatron.checkpoint.zero_shards import load_mmap, take_remembered

    obj = take_remembered(path)
    if obj is None:
        obj = load_mmap(path)
        _remember_model_states(path, obj)
    return obj


def _probe_write(directory: str) -> Optional[OSError]:
    """Write and fsync 1 MiB in `directory`; the OS error it raises (None when it works)."""
    probe = os.path.join(directory, f"{TMP_PREFIX}probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as error:
        return error
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def _describe_write_error(path: str, error: BaseException) -> str:
    if isinstance(error, OSError):
        return f"writing {path} failed: {os_error_text(error)}"
    # torch.save reports a full disk as "inline_container.cc: unexpected pos ...": ask the filesystem why.
    probe = _probe_write(os.path.dirname(path)) if os.path.isdir(os.path.dirname(path)) else None
    cause = f"; writing a test file there fails with {os_error_text(probe)}" if probe is not None else ""
    return f"writing {path} failed: {error}{cause}"


# ---- save ---------------------------------------------------------------------------------------------

def save_checkpoint(engine, save_dir: str, progress: TrainingProgress, device: torch.device,
                    tracker_states: Optional[Callable[[], dict]] = None, extra_state: Optional[dict] = None,
                    keep_last_n: Optional[int] = None, log: Callable[[str], None] = print,
                    save_optim: bool = True, save_rng: bool = True) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    save_optim=False (--no-save-optim): no optimizer state is written (see deepspeed_compat.without_optimizer_state);
    save_rng=False (--no-save-rng): no rng_state_rank_*.pt. The manifest records what the checkpoint holds
    ("contents"), so that a resume that would need the missing state is refused naming the flag to add.

    Raises CheckpointError on every rank when any rank's write failed: the partial `.tmp-` directory is
    removed and the pointers still name the previous checkpoint.
    """
    tag = checkpoint_tag(progress.iteration)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = os.path.join(save_dir, tmp_tag), os.path.join(save_dir, tag)
    rank = _world_rank()
    setup_error = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by an interrupted save
        except OSError as error:
            setup_error = f"--save {save_dir}: cannot create it: {os_error_text(error)}"
    if any(_all_gather(setup_error)):
        raise CheckpointError(setup_error or f"--save {save_dir}: rank 0 could not prepare it (see its message)")
    client_state = {
        CHECKPOINT_FORMAT_KEY: checkpoint_format_marker(),
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "consumed_tokens": progress.consumed_tokens,
        "args": dict(progress.args),
        CONTENTS_KEY: {"optimizer": save_optim, "rng": save_rng},
    }
    if extra_state:
        client_state.update(extra_state)
    with _CheckpointIO(engine, log=log, drop_optimizer=not save_optim) as io:
        engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
        if save_rng:
            io.save(capture_rng_state(device, tracker_states), os.path.join(tmp_dir, rng_state_filename(rank)))
    entries, errors = {}, [_describe_write_error(p, e) for p, e in io.errors]
    if not errors:
        try:  # this rank's own files: flush them (only the writer can) and checksum them while they are cached
            for path in io.written:
                fsync_file(path)
            entries = describe_files(tmp_dir, [os.path.relpath(p, tmp_dir).replace(os.sep, "/") for p in io.written])
        except OSError as error:
            errors.append(f"flushing the checkpoint files in {tmp_dir} failed: {os_error_text(error)}")
    gathered = _all_gather((errors, entries))
    errors = [f"rank {r}: {e}" for r, (errs, _) in enumerate(gathered) for e in errs]
    publish_error = None
    if not errors and rank == 0:
        try:
            files = {}
            for _errs, part in gathered:
                files.update(part)
            others = [n for n in list_files(tmp_dir) if n not in files]  # anything DeepSpeed wrote another way
            files.update(describe_files(tmp_dir, others))
            write_manifest(tmp_dir, files, iteration=progress.iteration, world_size=_world_size(),
                           deepspeed_version=deepspeed_version(),
                           **{CONTENTS_KEY: {"optimizer": save_optim, "rng": save_rng}})
            publish_directory(tmp_dir, final_dir)
            write_pointers(save_dir, progress.iteration, tag)
        except OSError as error:
            publish_error = f"rank 0: publishing {final_dir} failed: {os_error_text(error)}"
    if not errors:
        publish_error = _all_gather(publish_error)[0]
        if publish_error:
            errors = [publish_error]
    if errors:
        _barrier()
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = read_pointer_quietly(save_dir)
        raise CheckpointError(
            f"saving iteration {progress.iteration} to --save {save_dir} failed; "
            + "; ".join(sorted(set(errors)))
            + f". The partial {tmp_tag} was removed; the latest checkpoint is still "
            + (f"{previous}" if previous else "none")
            + ". Free space or fix permissions on the filesystem, then relaunch (it resumes from the latest)")
    if rank == 0 and keep_last_n:
        for removed in apply_retention(save_dir, keep_last_n):
            log(f"removed old checkpoint {removed} (--keep-last-n-checkpoints {keep_last_n})")
    _barrier()
    return final_dir


def read_pointer_quietly(save_dir: str) -> Optional[str]:
    try:
        return read_pointer(save_dir)
    except (CheckpointError, OSError):
        return None


def apply_retention(save_dir: str, keep_last_n: int) -> list[str]:
    """Delete the oldest global_step* directories so that `keep_last_n` remain; never the one the pointer names,
    never one newer than it, and never the last one that has a manifest. Returns the removed paths."""
    pointed = read_pointer_quietly(save_dir)
    tags = list_checkpoint_tags(save_dir)
    if pointed not in tags:
        return []
    tags = tags[:tags.index(pointed) + 1]  # the pointed one and older
    doomed = tags[:-keep_last_n] if len(tags) > keep_last_n else []
    kept_verified = [t for t in tags
                     if t not in doomed and os.path.isfile(os.path.join(save_dir, t, MANIFEST_FILENAME))]
    removed = []
    for tag in doomed:
        if not kept_verified:
            break
        path = os.path.join(save_dir, tag)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---- start-up checks --------------------------------------------------------------------------------

def check_save_dir(save_dir: str, bytes_needed: int, log: Callable[[str], None] = print) -> None:
    """Collective. Before training: `save_dir` exists or can be created, is writable from every rank and
    has room for one more checkpoint (`bytes_needed`, an estimate); stale `.tmp-*` saves are removed.
    Raises CheckpointError (the same on every rank) naming the path, the OS error and the fix."""
    rank = _world_rank()
    problem = None
    try:
        if rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            for name in remove_stale_tmp(save_dir):
                log(f"removed {os.path.join(save_dir, name)} (left by a save that did not finish)")
    except OSError as error:
        problem = f"--save {save_dir} cannot be created: {os_error_text(error)}; choose a writable directory"
    problems = _all_gather(problem)
    if not any(problems):
        probe = _probe_write(save_dir) if os.path.isdir(save_dir) else FileNotFoundError(
            errno.ENOENT, "No such file or directory (not visible from this node)")
        problem = None if probe is None else (f"--save {save_dir} is not writable from rank {rank}: "
                                              f"{os_error_text(probe)}; fix its permissions or choose another")
        if problem is None and rank == 0:
            free = shutil.disk_usage(save_dir).free
            if free < bytes_needed:
                problem = (f"--save {save_dir} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
                           f"{bytes_needed / 2**30:.2f} GiB; free space or choose another filesystem")
        problems = _all_gather(problem)
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(problems[0] if len(set(problems)) == 1 else "; ".join(sorted(set(problems))))


def estimate_checkpoint_bytes(model_config, precision=None) -> int:
    """One checkpoint's size from the model's parameter count: the weights at their dtype, plus fp32 master
    weights and two Adam moments (12 bytes per parameter). Other optimizers keep less; ZeRO splits the same
    total over files."""
    half = precision is not None and (precision.bf16 or precision.fp16)
    return int(model_config.num_parameters() * ((2 if half else 4) + 12))


# ---- choosing what to load ---------------------------------------------------------------------------

def find_checkpoint(load_dir: str, *, strict: bool = False, exit_on_missing: bool = False,
                    log: Callable[[str], None] = print, tag: Optional[str] = None) -> Optional[str]:
    """Collective. The tag under `load_dir` to resume from, verified against its manifest; None when there is
    no checkpoint at all (the run starts from scratch, with a warning) unless `exit_on_missing`.

    The pointer's checkpoint comes first. When it is incomplete or corrupt (a file missing, truncated, or
    with another checksum) the newest older checkpoint that verifies is used instead, with a warning naming
    what is wrong; `strict` (--no-checkpoint-fallback) or `exit_on_missing` make that an error. Ranks split
    the checksum reading between them and agree on the result.

    tag (--load-tag): that checkpoint, whatever the pointer says; it must exist and verify (no fallback).
    """
    rank, world = _world_rank(), _world_size()
    if tag is not None:
        return _chosen_tag(load_dir, tag)
    if not os.path.isdir(load_dir):
        return _missing(load_dir, f"--load {load_dir} does not exist", exit_on_missing, log)
    problems_of: dict[str, list[str]] = {}
    try:
        pointed = read_pointer(load_dir)
    except (CheckpointError, OSError) as error:
        pointed, problems_of["the pointer"] = None, [str(error)]
    tags = list_checkpoint_tags(load_dir)
    if pointed is None and not tags and not problems_of:
        return _missing(load_dir, f"--load {load_dir} holds no checkpoint yet", exit_on_missing, log)
    if pointed is not None and pointed not in tags:
        if os.path.isdir(os.path.join(load_dir, pointed)):  # "release" or another tag name: trust the pointer
            tags.append(pointed)
        else:
            problems_of[pointed] = [f"the pointer in {load_dir} names {pointed} but "
                                    f"{os.path.join(load_dir, pointed)} does not exist"]
    if pointed in tags:
        newest = iteration_of_tag(pointed)
        older = [t for t in tags if t != pointed and (newest is None or (iteration_of_tag(t) or 0) < newest)]
        candidates = [pointed] + older[::-1]
    else:  # no usable pointer: only checkpoints whose manifest proves them complete
        candidates = [t for t in tags if os.path.isfile(os.path.join(load_dir, t, MANIFEST_FILENAME))][::-1]
        if not candidates and not problems_of:
            raise CheckpointError(
                f"--load {load_dir}: neither {TRACKER_FILENAME} nor {DEEPSPEED_LATEST_FILENAME} is there, and "
                f"none of {', '.join(tags)} has a {MANIFEST_FILENAME} that proves it complete; write the "
                "iteration of a complete one into the pointer file, or point --load at a directory written by "
                "--save (or drop --load to start from scratch)")
    for tag in candidates:
        directory = os.path.join(load_dir, tag)
        try:
            manifest = read_manifest(directory)
            problems = [] if manifest is None else verify_manifest(
                directory, manifest, checksum_names=sorted(manifest["files"])[rank::world])
        except CheckpointError as error:
            manifest, problems = None, [str(error)]
        problems = sorted({p for part in _all_gather(problems) for p in part})
        if problems:
            problems_of[tag] = problems
            continue
        if problems_of:
            what = "; ".join(f"{p}" for ps in problems_of.values() for p in ps)
            if strict or exit_on_missing:
                flag = "--no-checkpoint-fallback" if strict else "--exit-on-missing-checkpoint"
                raise CheckpointError(f"--load {load_dir}: the newest checkpoint does not verify ({what}); "
                                      f"{directory} does, but {flag} forbids falling back to it. Restore the "
                                      "damaged files, or drop the flag to resume from the older checkpoint")
            if rank == 0:
                log(f"WARNING: --load {load_dir}: the newest checkpoint does not verify ({what}); "
                    f"falling back to {directory}, the newest one that does")
        elif manifest is None and rank == 0:
            log(f"WARNING: {directory} has no {MANIFEST_FILENAME} (written by another tool or an older version): "
                "loading it unverified")
        return tag
    what = "; ".join(p for ps in problems_of.values() for p in ps)
    raise CheckpointError(f"--load {load_dir}: no checkpoint there verifies ({what}); restore the damaged files "
                          "from a copy, or drop --load to start from scratch")


def _chosen_tag(load_dir: str, tag: str) -> str:
    """Collective. --load-tag: `tag` under `load_dir`, verified against its manifest (the same verdict on every
    rank); a ConfigError naming it and the checkpoints there when it is missing, a CheckpointError when it is
    damaged."""
    from megatron.config.arguments import ConfigError

    directory = os.path.join(load_dir, tag)
    if not os.path.isdir(directory):
        there = list_checkpoint_tags(load_dir)
        pointed = read_pointer_quietly(load_dir) if os.path.isdir(load_dir) else None
        if pointed and pointed not in there and os.path.isdir(os.path.join(load_dir, pointed)):
            there.append(pointed)
        raise ConfigError(f"--load-tag {tag}: {directory} does not exist; the checkpoints under --load {load_dir} "
                          f"are: {', '.join(there) if there else 'none'}")
    try:
        manifest = read_manifest(directory)
        problems = [] if manifest is None else verify_manifest(
            directory, manifest, checksum_names=sorted(manifest["files"])[_world_rank()::_world_size()])
    except CheckpointError as error:
        problems = [str(error)]
    problems = sorted({p for part in _all_gather(problems) for p in part})
    if problems:
        raise CheckpointError(f"--load-tag {tag}: {directory} does not verify ({'; '.join(problems)}); restore the "
                              "damaged files, or choose another tag (or drop --load-tag to take the newest that "
                              "verifies)")
    return tag


def checkpoint_contents(directory: str) -> dict:
    """What a checkpoint of ours holds: {"optimizer": bool, "rng": bool} from its manifest; both True for one
    without a manifest or written before --no-save-optim/--no-save-rng existed."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        manifest = None
    contents = (manifest or {}).get(CONTENTS_KEY) or {}
    return {"optimizer": bool(contents.get("optimizer", True)), "rng": bool(contents.get("rng", True))}


@contextlib.contextmanager
def lr_scheduler_detached(engine, detach: bool):
    """--no-load-lr-state: every loader (DeepSpeed's, the resharding and argonne ones) restores the LR schedule
    only through `engine.lr_scheduler`; without it there the schedule keeps the state the flags built."""
    scheduler = engine.lr_scheduler
    if detach:
        engine.lr_scheduler = None
    try:
        yield
    finally:
        engine.lr_scheduler = scheduler


def _missing(load_dir: str, what: str, exit_on_missing: bool, log) -> None:
    if exit_on_missing:
        raise CheckpointError(f"{what} and --exit-on-missing-checkpoint is set; check the path, or drop the flag "
                              "to start from scratch when there is no checkpoint")
    if _world_rank() == 0:
        log(f"WARNING: {what}; training starts from scratch (pass --exit-on-missing-checkpoint to make this an error)")
    return None


# ---- load ---------------------------------------------------------------------------------------------

def load_with_deepspeed(training_engine, load_dir: str, tag: str, device: torch.device, *, load_optim: bool = True,
                        load_rng: bool = True, finetune: bool = False,
                        set_tracker_states: Optional[Callable[[dict], None]] = None,
                        log: Callable[[str], None] = print, source=None) -> TrainingProgress:
    """Restore checkpoint `tag` under `load_dir`, written by `save_checkpoint` at this run's layout, through
    DeepSpeed's own loader (resume.py decided that it can; it plans every other case). source: the resume's
    opened DeepSpeedCheckpoint of it (the ZeRO-3 weights without optimizer states come from it).

    finetune: weights only; iteration, consumed samples, optimizer and LR scheduler start fresh.
    load_optim=False (--no-load-optim): the optimizer state starts fresh; the LR schedule is still resumed.
    load_rng=False (--no-load-rng): keep this run's seeds.
    """
    path = os.path.join(load_dir, tag)
    engine = training_engine.engine
    try:
        # what the resume's reader already read is handed over; DeepSpeed (0.19.8) reads a model-states file twice
        # in one load_checkpoint (its SDLoader's check, then the load), so what it reads is kept for the second.
        # Every file DeepSpeed reads goes through the restricted unpickler (unpickle.safe_load).
        with _CheckpointIO(engine, log=log, preloaded=_read_for_deepspeed), \
                _zero3_weights_of_tag(training_engine, tag, source):
            load_path, client_state = engine.load_checkpoint(
                load_dir, tag=tag, load_optimizer_states=load_optim and not finetune,
                load_lr_scheduler_states=not finetune, load_module_only=finetune)
    except CheckpointError:
        raise
    except ConversionError as error:  # a file missing, or pickling a class the restricted unpickler refuses
        raise CheckpointError(str(error)) from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} cannot be loaded: {error}; restore it, or delete it so that --load takes "
                              "the previous one") from error
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}; see the log above for why")
    client_state = client_state or {}
    if finetune:
        return TrainingProgress(args=client_state.get("args", {}), checkpoint_path=path, extra=client_state)
    if "iteration" not in client_state:
        raise CheckpointError(
            f"{path} has no training progress (iteration, consumed samples): it was not written by this "
            "framework's --save; use --finetune to load its weights only")
    progress = TrainingProgress(iteration=int(client_state["iteration"]),
                                consumed_samples=int(client_state["consumed_samples"]),
                                consumed_tokens=int(client_state.get("consumed_tokens", 0)),
                                args=client_state.get("args", {}), checkpoint_path=path, extra=client_state)
    if load_rng:
        rng_path = os.path.join(path, rng_state_filename(_world_rank()))
        if not os.path.isfile(rng_path):
            raise CheckpointError(
                f"{rng_path} is missing (the checkpoint was written by a different number of ranks?); "
                "pass --no-load-rng to resume with fresh random streams")
        from megatron.checkpoint.unpickle import safe_load

        state = with_retries(lambda: safe_load(rng_path), rng_path, log=log)
        restore_rng_state(state, device, set_tracker_states)
    return progress


def _zero3_weights_of_tag(training_engine, tag: str, source=None):
    """At ZeRO-3 without optimizer states (--no-load-optim, --finetune), DeepSpeed takes the module weights from
    a function that follows the `latest` pointer, not the tag being loaded (--load-tag, --load of a tag
    directory, a fallback past a damaged newest checkpoint), merges one model-parallel rank only (it fails at
    tp × pp > 1) and reads every file again (megatron/deepspeed_compat.py zero3_module_weights). With `source`
    (the resume's DeepSpeedCheckpoint of that tag) the weights are this rank's tp shards of the checkpoint's
    fp32 masters, read through it; without, DeepSpeed's own function is asked for the tag."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    def provide(checkpoint_dir, tag_arg):
        if source is not None and hasattr(source, "full_optimizer_tensor"):
            return _fp32_module_state(training_engine, source)
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag if tag_arg is None else tag_arg)

    return zero3_module_weights(provide)


def _fp32_module_state(training_engine, source) -> dict:
    """The module state dict of this rank (its tp shards) from the checkpoint's fp32 master weights."""
    from megatron.checkpoint.reshard import _full_name
    from megatron.model.sharding import shard_state_dict

    module, config, ps = training_engine.engine.module, training_engine.model_config, training_engine.ps
    local_of = {id(p): local for local, p in module.named_parameters()}
    out = {}
    for key, value in module.state_dict(keep_vars=True).items():
        local = local_of.get(id(value))
        if local is None:  # a buffer (the model registers none): this run's
            out[key] = value.detach().clone()
            continue
        name = _full_name(local, config, training_engine.is_pipeline)
        full = source.full_optimizer_tensor(name, "fp32")
        out[key] = shard_state_dict({name: full}, config, ps.tp_size, ps.tp_rank)[name].float()
    return out


def barrier() -> None:
    """Every rank, when there is a process group."""
    _barrier()
