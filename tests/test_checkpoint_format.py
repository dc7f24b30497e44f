"""The checkpoint on-disk contract (megatron/checkpoint/format.py) and how --load picks a checkpoint from it:
atomic fsynced writes, the manifest and its verification, fallback to the newest checkpoint that verifies,
a missing checkpoint (warn and start from scratch, or --exit-on-missing-checkpoint), stale .tmp- cleanup,
retention, and the save-directory check."""

import ast
import json
import os
from pathlib import Path

import pytest

from megatron import fileio
from megatron.checkpoint import format as fmt
from megatron.errors import CheckpointError
from megatron.checkpoint import deepspeed_io as checkpointing

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(save: Path, iteration: int, files=None, pointer=True, manifest=True) -> Path:
    """A global_stepN directory as save_checkpoint leaves it: files, manifest written last, then the pointers."""
    tmp = save / f".tmp-global_step{iteration}"
    tmp.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"m" * 1000 + bytes([iteration]),
                                 "sub/zero_pp_rank_0_optim_states.pt": b"o" * 300}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    if manifest:
        fmt.write_manifest(str(tmp), iteration=iteration)
    final = save / f"global_step{iteration}"
    fmt.publish_directory(str(tmp), str(final))
    if pointer:
        fmt.write_pointers(str(save), iteration)
    return final


def test_the_format_module_builds_only_on_the_leaf_modules_and_training_and_convert_both_use_it():
    source = (ROOT / "megatron/checkpoint/format.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("megatron")} <= {"megatron.errors", "megatron.fileio",
                                                                  "megatron.deepspeed_compat"}
    for user in ("megatron/checkpoint/reshard.py", "megatron/checkpoint/ds_checkpoint.py"):
        tree = ast.parse((ROOT / user).read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not [m for m in modules if m.startswith("megatron.training")], user
    assert "megatron.checkpoint.format" in (ROOT / "megatron/checkpoint/deepspeed_io.py").read_text()


def test_no_bare_os_replace_is_left_in_the_package():
    sites = [str(p) for p in (ROOT / "megatron").rglob("*.py") if "os.replace(" in p.read_text()
             and p.name not in ("fileio.py", "format.py")]
    assert sites == []


def test_atomic_output_fsyncs_file_and_directory_before_and_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync

    def spy_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("rename", str(b))), real_replace(a, b)))
    target = tmp_path / "latest"
    fileio.write_text_atomically(str(target), "global_step3")
    assert target.read_text() == "global_step3"
    kinds = [k for k, _ in calls]
    rename = kinds.index("rename")
    assert any(path.startswith(str(tmp_path / ".tmp-latest")) for k, path in calls[:rename])  # the file
    assert ("fsync", str(tmp_path)) in calls[rename:]  # the directory entry, after the rename
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_output_leaves_the_old_file_and_no_debris_when_writing_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        with fileio.atomic_output(str(target)) as tmp:
            Path(tmp).write_bytes(b"half")
            raise ValueError("writer died")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_manifest_lists_every_file_with_size_and_checksum_and_is_written_last(tmp_path):
    final = fake_checkpoint(tmp_path, 4)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["iteration"] == 4 and manifest["checksum"] == "crc32"
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "sub/zero_pp_rank_0_optim_states.pt"}
    assert manifest["files"]["mp_rank_00_model_states.pt"]["size"] == 1001
    assert fmt.verify_manifest(str(final)) == []


@pytest.mark.parametrize("damage, words", [
    ("truncate", "has 500 bytes, the manifest says 1001"),
    ("delete", "is missing"),
    ("flip", "CRC-32"),
])
def test_verification_names_the_damaged_file_and_what_is_wrong(tmp_path, damage, words):
    final = fake_checkpoint(tmp_path, 4)
    victim = final / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        os.truncate(victim, 500)
    elif damage == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[10] ^= 0xFF
        victim.write_bytes(bytes(data))
    problems = fmt.verify_manifest(str(final))
    assert len(problems) == 1 and str(victim) in problems[0] and words in problems[0]


def test_load_falls_back_to_the_newest_checkpoint_that_verifies_and_says_why(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 6)
    os.truncate(newest / "sub/zero_pp_rank_0_optim_states.pt", 10)
    (tmp_path / "global_step4" / "mp_rank_00_model_states.pt").unlink()
    lines = []
    assert checkpointing.find_checkpoint(str(tmp_path), log=lines.append) == "global_step2"
    assert len(lines) == 1 and "falling back to" in lines[0] and str(tmp_path / "global_step2") in lines[0]
    assert "zero_pp_rank_0_optim_states.pt has 10 bytes" in lines[0] and "global_step4" in lines[0]


@pytest.mark.parametrize("flag, strict, exit_on_missing", [("--no-checkpoint-fallback", True, False),
                                                           ("--exit-on-missing-checkpoint", False, True)])
def test_strict_flags_make_a_damaged_newest_checkpoint_an_error(tmp_path, flag, strict, exit_on_missing):
    fake_checkpoint(tmp_path, 2)
    os.truncate(fake_checkpoint(tmp_path, 4) / "mp_rank_00_model_states.pt", 3)
    with pytest.raises(CheckpointError, match=flag) as info:
        checkpointing.find_checkpoint(str(tmp_path), strict=strict, exit_on_missing=exit_on_missing)
    assert "mp_rank_00_model_states.pt has 3 bytes" in str(info.value)


def test_no_checkpoint_that_verifies_is_an_error_naming_every_problem(tmp_path):
    os.truncate(fake_checkpoint(tmp_path, 2) / "mp_rank_00_model_states.pt", 1)
    with pytest.raises(CheckpointError, match="no checkpoint there verifies.*global_step2"):
        checkpointing.find_checkpoint(str(tmp_path))


def test_a_pointer_to_a_deleted_directory_falls_back_to_an_older_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fmt.write_pointers(str(tmp_path), 8)
    lines = []
    assert checkpointing.find_checkpoint(str(tmp_path), log=lines.append) == "global_step2"
    assert "global_step8" in lines[0] and "does not exist" in lines[0]


def test_a_checkpoint_without_manifest_loads_unverified_with_a_warning(tmp_path):
    fake_checkpoint(tmp_path, 3, manifest=False)
    lines = []
    assert checkpointing.find_checkpoint(str(tmp_path), log=lines.append) == "global_step3"
    assert "no manifest.json" in lines[0] and "unverified" in lines[0]


@pytest.mark.parametrize("make", ["absent", "empty", "only-tmp"])
def test_load_dir_without_checkpoint_warns_and_starts_from_scratch(tmp_path, make):
    load = tmp_path / "ckpt"
    if make != "absent":
        load.mkdir()
    if make == "only-tmp":
        (load / ".tmp-global_step5").mkdir()  # a save that died
    lines = []
    assert checkpointing.find_checkpoint(str(load), log=lines.append) is None
    assert "starts from scratch" in lines[0] and str(load) in lines[0] and "--exit-on-missing-checkpoint" in lines[0]
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint") as info:
        checkpointing.find_checkpoint(str(load), exit_on_missing=True)
    assert str(load) in str(info.value)


def test_stale_tmp_entries_are_removed_and_finished_checkpoints_kept(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / ".tmp-global_step4").mkdir()
    (tmp_path / ".tmp-global_step4" / "half.pt").write_bytes(b"x")
    (tmp_path / ".tmp-latest.123").write_text("global_step4")
    assert fmt.remove_stale_tmp(str(tmp_path)) == [".tmp-global_step4", ".tmp-latest.123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "latest",
                                                          "latest_checkpointed_iteration.txt"]


def test_retention_keeps_the_newest_n_and_never_the_pointed_or_newer_ones(tmp_path):
    for it in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, it)
    fake_checkpoint(tmp_path, 5, pointer=False)  # published, pointer not yet moved: never touched
    removed = checkpointing.apply_retention(str(tmp_path), 2)
    assert [Path(p).name for p in removed] == ["global_step1", "global_step2"]
    assert fmt.list_checkpoint_tags(str(tmp_path)) == ["global_step3", "global_step4", "global_step5"]


def test_retention_never_deletes_the_only_verified_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2, manifest=False)
    assert checkpointing.apply_retention(str(tmp_path), 1) == []
    assert fmt.list_checkpoint_tags(str(tmp_path)) == ["global_step1", "global_step2"]


def test_save_dir_check_names_the_path_and_the_shortfall(tmp_path):
    save = tmp_path / "save"
    checkpointing.check_save_dir(str(save), 1024)
    assert save.is_dir()
    with pytest.raises(CheckpointError, match="GiB free but one checkpoint needs") as info:
        checkpointing.check_save_dir(str(save), 1 << 60)
    assert str(save) in str(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot be created") as info:
        checkpointing.check_save_dir(str(blocker / "sub"), 1)
    assert "ENOTDIR" in str(info.value)


def test_transient_read_errors_are_retried_then_fail_naming_the_file(tmp_path):
    import errno

    attempts, lines = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(errno.ESTALE, "Stale file handle")
        return "data"

    assert checkpointing.with_retries(flaky, "/lustre/x.pt", retries=3, backoff_s=0.001, log=lines.append) == "data"
    assert len(attempts) == 3 and len(lines) == 2 and "ESTALE" in lines[0] and "/lustre/x.pt" in lines[0]

    def broken():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(CheckpointError, match=r"/lustre/y.pt: reading failed 3 times with EIO"):
        checkpointing.with_retries(broken, "/lustre/y.pt", retries=2, backoff_s=0.001, log=lines.append)
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        checkpointing.with_retries(lambda: open(tmp_path / "nope"), "nope", backoff_s=0.001)


def test_transient_data_read_errors_are_retried_then_fail_naming_the_file(tmp_path, monkeypatch, caplog):
    import errno

    from megatron.data import indexed_dataset
    from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetError, write_synthetic_dataset

    prefix = str(tmp_path / "corpus")
    write_synthetic_dataset(prefix, num_tokens=1000, num_documents=10, seed=1)
    monkeypatch.setattr(fileio, "RETRY_BACKOFF_S", 0.001)
    failures = {"left": 2}

    real_open = os.open

    def flaky_open(path, *args, **kwargs):  # a fault-injecting open: EIO on the first opens of the .idx
        if str(path).endswith(".idx") and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(indexed_dataset.os, "open", flaky_open)
    with caplog.at_level("WARNING"):
        assert len(IndexedDataset(prefix)) == 10
    retries = [r.getMessage() for r in caplog.records if "EIO" in r.getMessage()]
    assert len(retries) == 2 and prefix + ".idx" in retries[0] and "retry 1/3" in retries[0]
    failures["left"] = 100
    with pytest.raises(IndexedDatasetError, match=r"corpus.idx: reading failed 4 times with EIO"):
        IndexedDataset(prefix)


def test_tags_are_deepspeeds_global_step_and_our_older_iter_tags_still_resolve(tmp_path):
    assert fmt.checkpoint_tag(3) == "global_step3" and fmt.iteration_of_tag("global_step3") == 3
    assert fmt.iteration_of_tag("iter_0000007") == 7 and fmt.iteration_of_tag("release") is None
    older = fake_checkpoint(tmp_path, 2)
    older.rename(tmp_path / "iter_0000002")  # as this framework wrote it before
    fmt.write_text_atomically(str(tmp_path / "latest"), "iter_0000002")
    assert fmt.read_pointer(str(tmp_path)) == "iter_0000002"
    (tmp_path / "latest").unlink()  # Megatron's tracker alone: "2" finds the older name
    assert fmt.read_pointer(str(tmp_path)) == "iter_0000002"
    fake_checkpoint(tmp_path, 5)  # a newer save writes DeepSpeed's names and both pointers
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert fmt.list_checkpoint_tags(str(tmp_path)) == ["iter_0000002", "global_step5"]
    assert checkpointing.find_checkpoint(str(tmp_path)) == "global_step5"
