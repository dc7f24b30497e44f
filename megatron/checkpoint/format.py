"""The checkpoint on-disk contract: tags, pointer files, atomic + fsynced writes, the manifest, TrainingProgress.

Layout under a --save directory (the names Megatron-DeepSpeed uses):

    <save>/global_step100/...                    one checkpoint (engine files, RNG states, manifest.json)
    <save>/global_step100/manifest.json          written last: every other file's size and CRC-32
    <save>/latest_checkpointed_iteration.txt     Megatron's pointer ("100")
    <save>/latest                                DeepSpeed's pointer ("global_step100")

Tags are DeepSpeed's `global_step<N>`, as upstream's DeepSpeed path writes them (and its
`ALCF/helpers.sh convert_ckpt_to_universal` reads them); `iter_<N:07d>` directories, which this framework
wrote before, are read too.
    <save>/.tmp-*                                a save in progress (or one that died): never read

How a checkpoint becomes visible, so that a crash at any point leaves the previous one as the latest:
1. every file is written under `<save>/.tmp-global_stepN/` and fsynced;
2. the manifest (sizes and checksums of all those files) is written there, last, and fsynced;
3. the directory tree is fsynced and renamed to `global_stepN`, then `<save>` itself is fsynced;
4. only then do the pointer files change, each by write-temporary + fsync + rename + fsync of `<save>`.
A node crash before step 3's rename leaves a `.tmp-` directory (removed at the next start-up); after it
and before step 4, a `global_stepN` that is complete but not yet pointed to (the pointer still names N-k).

This module imports only megatron.errors and megatron.fileio (the atomic writes and retried reads, which
datasets, tokenizers and HF exports use too), and needs no process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

from megatron.deepspeed_compat import LATEST_FILENAME, global_step_tag
from megatron.errors import CheckpointError
from megatron.fileio import TMP_PREFIX, fsync_dir, fsync_tree, os_error_text, write_text_atomically

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"  # Megatron's pointer file
DEEPSPEED_LATEST_FILENAME = LATEST_FILENAME  # DeepSpeed's pointer file
MANIFEST_FILENAME = "manifest.json"
# Our format marker, in the client state of every mp_rank_*_model_states.pt: {"name": ..., "version": ...}.
# Megatron-(DeepSpeed) readers key their QKV row order on "checkpoint_version" (0 and 1.0: legacy orders they
# transpose; 3.0 their current one), so we write no "checkpoint_version" at all. Version 1 is what this
# framework wrote before the marker (checkpoint_version = 1, no marker); it reads the same and still loads.
CHECKPOINT_FORMAT_KEY = "checkpoint_format"
CHECKPOINT_FORMAT_NAME = "megatron-ds-lite"
CHECKPOINT_FORMAT_VERSION = 2
# What a checkpoint holds beyond the weights, in its manifest and client state: {"optimizer": bool, "rng": bool}
# (False after --no-save-optim / --no-save-rng); absent means both (checkpoints written before these flags).
CONTENTS_KEY = "contents"
MANIFEST_FORMAT = "megatron-checkpoint-manifest"
MANIFEST_VERSION = 1
TAG_PATTERN = re.compile(r"^(?:global_step(\d+)|iter_(\d{7,}))$")  # ours and upstream's; iter_: our older tags
_CHUNK = 8 << 20


def checkpoint_format_marker() -> dict:
    return {"name": CHECKPOINT_FORMAT_NAME, "version": CHECKPOINT_FORMAT_VERSION}


def checkpoint_format_version(client_state: dict, where: str) -> int:
    """The format version of one of our checkpoints (1 for those written before the marker); an error naming
    `where` for a checkpoint of another framework or of a newer version of this one."""
    marker = client_state.get(CHECKPOINT_FORMAT_KEY)
    if isinstance(marker, dict) and marker.get("name") == CHECKPOINT_FORMAT_NAME:
        version = int(marker.get("version", 0))
        if version > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{where} was written in checkpoint format {version} by a newer "
                                  f"{CHECKPOINT_FORMAT_NAME} (this one reads up to {CHECKPOINT_FORMAT_VERSION}); "
                                  "upgrade to read it")
        return version
    if marker is not None:
        raise CheckpointError(f"{where} carries the format marker {marker!r}, not {CHECKPOINT_FORMAT_NAME}'s")
    legacy = client_state.get("checkpoint_version")
    if legacy == 1 and isinstance(client_state.get("args"), dict):
        return 1
    raise CheckpointError(
        f"{where} is not a {CHECKPOINT_FORMAT_NAME} checkpoint (checkpoint_version {legacy!r}, arguments of type "
        f"{type(client_state.get('args')).__name__}); a Megatron-DeepSpeed checkpoint is read by "
        "megatron/checkpoint/argonne.py (tools/convert_checkpoint.py and --load detect it)")


def checkpoint_tag(iteration: int) -> str:
    """DeepSpeed's tag for the checkpoint of `iteration`, as upstream's DeepSpeed path names it."""
    return global_step_tag(iteration)


def legacy_checkpoint_tag(iteration: int) -> str:
    """The tag this framework wrote before it used DeepSpeed's (read, never written)."""
    return f"iter_{iteration:07d}"


def iteration_of_tag(tag: str) -> Optional[int]:
    """N for `global_stepN` and `iter_000000N`; None for any other name ("release", a universal folder...)."""
    match = TAG_PATTERN.match(tag)
    return int(match.group(1) or match.group(2)) if match else None


def tag_for_iteration(load_dir: str, iteration: int) -> str:
    """The tag directory under `load_dir` that holds `iteration`: DeepSpeed's `global_stepN`, or our older
    `iter_N` where only that exists (DeepSpeed's name when neither does, for the error messages)."""
    for tag in (checkpoint_tag(iteration), legacy_checkpoint_tag(iteration)):
        if os.path.isdir(os.path.join(load_dir, tag)):
            return tag
    return checkpoint_tag(iteration)


@dataclass
class TrainingProgress:
    """What the loop needs to pick up where it left off (besides model/optimizer/scheduler state)."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    args: dict = field(default_factory=dict)
    checkpoint_path: Optional[str] = None
    extra: dict = field(default_factory=dict)  # everything else the saver put in client_state


def publish_directory(tmp_dir: str, final_dir: str) -> None:
    """Make a fully written directory visible under its final name (replacing one of the same name)."""
    fsync_tree(tmp_dir)
    parent = os.path.dirname(os.path.abspath(final_dir))
    if os.path.exists(final_dir):  # saving the same iteration twice (e.g. exit right after an interval save)
        stale = os.path.join(parent, f"{TMP_PREFIX}old-{os.path.basename(final_dir)}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final_dir, stale)
        os.replace(tmp_dir, final_dir)
        fsync_dir(parent)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(parent)


def remove_stale_tmp(save_dir: str) -> list[str]:
    """Remove `.tmp-*` entries directly under `save_dir` (saves that died); returns their names.
    Call it only while no save is in progress (start-up, or after a failed save on every rank)."""
    if not os.path.isdir(save_dir):
        return []
    removed = []
    for name in sorted(os.listdir(save_dir)):
        if not name.startswith(TMP_PREFIX):
            continue
        full = os.path.join(save_dir, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(full)
        if not os.path.lexists(full):
            removed.append(name)
    return removed


# ---- pointer files ----------------------------------------------------------------------------------

def read_pointer(load_dir: str) -> Optional[str]:
    """The tag the pointer files name (Megatron's first, then DeepSpeed's), None when there is none."""
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    ds_latest = os.path.join(load_dir, DEEPSPEED_LATEST_FILENAME)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text.isdigit():
            return tag_for_iteration(load_dir, int(text))
        if text == "release":  # Megatron's marker for a converted release checkpoint
            return "release"
        raise CheckpointError(
            f"{tracker} should hold an iteration number, found {text!r}; fix or delete the file")
    if os.path.isfile(ds_latest):
        with open(ds_latest) as f:
            text = f.read().strip()
        if not text:
            raise CheckpointError(f"{ds_latest} is empty; write the tag of an existing checkpoint into it, "
                                  "or delete it")
        return text
    return None


RESUME_ADVICE = "point --load at a directory written by --save, or drop --load to start from scratch"
READ_ADVICE = ("point --load at a directory written by pretrain_gpt.py --save, or at one of its global_step* "
               "directories")


def read_latest_tag(load_dir: str, advice: str = RESUME_ADVICE) -> str:
    """The tag that --load resumes from, with an error naming the path when there is none. `advice`: what to do
    then (a training run may start from scratch; a converter or generate.py needs a checkpoint: READ_ADVICE)."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    tag = read_pointer(load_dir)
    if tag is None:
        raise CheckpointError(
            f"--load {load_dir}: neither {TRACKER_FILENAME} nor {DEEPSPEED_LATEST_FILENAME} is there, so there "
            "is no complete checkpoint to read (a save that was interrupted leaves only a .tmp-global_step* dir); "
            + advice)
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(
            f"the pointer in {load_dir} names {tag!r} but {os.path.join(load_dir, tag)} does not exist; "
            "restore that directory or edit the pointer to an existing global_step* directory")
    return tag


def write_pointers(save_dir: str, iteration: int, tag: Optional[str] = None) -> None:
    """Point both pointer files at `tag` (default global_step<iteration>), as upstream writes them: Megatron's
    `latest_checkpointed_iteration.txt` holds the iteration, DeepSpeed's `latest` the tag; each write is atomic
    and fsynced."""
    write_text_atomically(os.path.join(save_dir, TRACKER_FILENAME), str(iteration))
    write_text_atomically(os.path.join(save_dir, DEEPSPEED_LATEST_FILENAME), tag or checkpoint_tag(iteration))


def list_checkpoint_tags(save_dir: str) -> list[str]:
    """The global_step* (and older global_step*) directories under `save_dir`, oldest first (no .tmp- ones)."""
    if not os.path.isdir(save_dir):
        return []
    tags = [n for n in os.listdir(save_dir) if TAG_PATTERN.match(n) and os.path.isdir(os.path.join(save_dir, n))]
    return sorted(tags, key=iteration_of_tag)


# ---- the manifest -----------------------------------------------------------------------------------

def file_checksum(path: str) -> str:
    """CRC-32 of a file's bytes (zlib's, hex): fast, in the standard library, catches torn and zeroed blocks."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def list_files(directory: str) -> list[str]:
    """Every file under `directory`, relative, '/'-separated, sorted; the manifest itself excluded."""
    names = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != MANIFEST_FILENAME:
                names.append(rel)
    return sorted(names)


def describe_files(directory: str, names: Iterable[str]) -> dict:
    """{name: {"size": bytes, "crc32": hex}} for the given files under `directory`."""
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        out[name] = {"size": os.path.getsize(path), "crc32": file_checksum(path)}
    return out


def write_manifest(directory: str, files: Optional[dict] = None, **meta) -> dict:
    """Write `directory`/manifest.json (atomically), describing `files` (default: every file there now).
    Call it after every other file of the checkpoint is complete."""
    if files is None:
        files = describe_files(directory, list_files(directory))
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "checksum": "crc32", **meta,
                "files": dict(sorted(files.items()))}
    write_text_atomically(os.path.join(directory, MANIFEST_FILENAME), json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of a checkpoint directory; None when it has none (written by another tool, or before
    manifests existed). Raises CheckpointError when it is there but unreadable."""
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); the checkpoint is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest; the checkpoint is damaged")
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise CheckpointError(f"{path} has manifest version {manifest['version']}, newer than this framework "
                              f"reads ({MANIFEST_VERSION}); upgrade megatron to load it")
    return manifest


def verify_manifest(directory: str, manifest: Optional[dict] = None, checksum_names: Optional[Iterable[str]] = None
                    ) -> list[str]:
    """Problems found in a checkpoint directory against its manifest (empty: it verifies).

    Every listed file must exist with its size; the CRC-32 is compared for `checksum_names` (default all;
    ranks of a job split the reading between them). A directory without a manifest gives no problem here:
    callers decide how to treat it (`read_manifest` returns None).
    """
    manifest = manifest if manifest is not None else read_manifest(directory)
    if manifest is None:
        return []
    problems = []
    files = manifest["files"]
    for name, entry in files.items():
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        except OSError as error:
            problems.append(f"{path} cannot be read: {os_error_text(error)}")
            continue
        if size != entry["size"]:
            problems.append(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
    bad = {p.split(" ", 1)[0] for p in problems}
    for name in (files if checksum_names is None else checksum_names):
        path = os.path.join(directory, name)
        if name not in files or path in bad:
            continue
        try:
            crc = file_checksum(path)
        except OSError as error:
            problems.append(f"{path} cannot be read: {os_error_text(error)}")
            continue
        if crc != files[name]["crc32"]:
            problems.append(f"{path} has CRC-32 {crc}, the manifest says {files[name]['crc32']} (corrupt)")
    return problems
