"""Checkpoints that survive the filesystem, on a real 2-rank pretrain_gpt.py job (no launcher):
- kill -9 of the whole job during a save: the pointer still names the previous, verified checkpoint;
- a truncated file in the newest checkpoint: the relaunch warns, falls back to the one before, removes the
  dead save's .tmp- directory, and continues the loss of the uninterrupted run exactly (to the logged digits);
- a full filesystem (a 4 MiB tmpfs mounted by the test; we are root), filled before the save is asked for: the
  save fails naming the path and ENOSPC, exit 2 on every rank, no debris, the previous checkpoint stays the latest;
- an unwritable --save (root with CAP_DAC_OVERRIDE dropped through setpriv, so permissions apply): refused at
  start-up, before the model is built, exit 2 naming the path and EACCES."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from faultrun import Job, pointer
from megatron.checkpoint.format import list_checkpoint_tags, verify_manifest

LOSS = re.compile(r"iteration= *(\d+)/ *\d+ \|.*?\| lm loss=([0-9.e+-]+) \|")  # upstream's key=value line


def losses(text: str) -> dict:
    return {int(i): v for i, v in LOSS.findall(text)}


def test_kill_9_during_a_save_then_a_truncated_newest_checkpoint_resume_falls_back_and_continues_exactly(tmp_path):
    save = tmp_path / "ckpt"
    first = Job.start_until(tmp_path, "none", f"iteration={7:8d}/",  # two checkpoints (3, 6) published
                            "--train-iters", "100000", "--num-workers", "0", "--save", str(save),
                            "--save-interval", "3")
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(".tmp-global_step") for p in save.iterdir()):  # a save in progress
            assert time.time() < deadline and first.procs[0].poll() is None, first.output()[-3000:]
        first.signal_group(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.close()
    run1 = losses(first.output())
    newest = pointer(save)
    assert newest is not None and newest >= 6
    tags = list_checkpoint_tags(str(save))
    assert all(verify_manifest(str(save / t)) == [] for t in tags)  # what is published is complete
    assert any(p.name.startswith(".tmp-global_step") for p in save.iterdir())  # the killed save's debris

    victim = save / f"global_step{newest}" / "mp_rank_00_model_states.pt"
    os.truncate(victim, victim.stat().st_size // 2)
    previous = newest - 3
    (tmp_path / "second").mkdir()
    second = Job.start(tmp_path / "second", "none", "--train-iters", "100000", "--exit-interval", str(previous + 4),
                       "--num-workers", "0",
                       "--save", str(save), "--save-interval", "3", "--load", str(save))
    try:
        codes = second.wait(timeout=240)
    finally:
        second.close()
    out = second.output()
    assert codes == [0, 0], out[-3000:]
    assert f"falling back to {save / f'global_step{previous}'}" in out and str(victim) in out and "truncated" in out
    assert "left by a save that did not finish" in out and f"exiting at iteration {previous + 4}" in out
    assert f"loaded {save / f'global_step{previous}'} at iteration {previous}" in out
    run2 = losses(out)
    resumed = sorted(i for i in run2 if i in run1)
    assert resumed and resumed[0] == previous + 1, (sorted(run2), sorted(run1)[-5:])
    assert [run2[i] for i in resumed] == [run1[i] for i in resumed]  # the same run, continued
    first_resumed = [line for line in out.splitlines() if f"iteration={previous + 1:8d}/" in line][0]
    assert "| learning_rate=0.001 |" in first_resumed  # a resumed run really trains (not at LR 0)
    assert not any(p.name.startswith(".tmp-") for p in save.iterdir())


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk case needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_filesystem_fails_the_save_naming_path_and_enospc_and_keeps_the_previous_checkpoint(
        tmp_path, small_tmpfs):
    """Deterministic: the first run saves iteration 40 and stops; the second resumes (its start-up checks see room),
    the test fills the disk while it trains (--save-interval too large to save on its own), then SIGTERM
    (--exit-signal-handler) makes it save into the full filesystem. The recovery scripts DeepSpeed copies into
    --save on a ZeRO save (zero_to_fp32.py) fail there as well, and are reported like the other files."""
    save = small_tmpfs / "ckpt"
    first = Job.start(tmp_path, "none", "--train-iters", "100000", "--num-workers", "0", "--save", str(save),
                      "--save-interval", "40", "--exit-interval", "40")
    try:
        codes = first.wait(timeout=180)
    finally:
        first.close()
    assert codes == [0, 0] and pointer(save) == 40, first.output()[-3000:]
    (tmp_path / "second").mkdir()
    job = Job.start_until(tmp_path / "second", "none", f"iteration={42:8d}/", "--train-iters", "100000",
                          "--num-workers", "0", "--save", str(save), "--load", str(save),
                          "--save-interval", "1000000", "--exit-signal-handler")
    try:
        filler = small_tmpfs / "filler"
        with open(filler, "wb") as f:  # what is left of the 4 MiB, minus a few KiB: the next save cannot fit
            free = shutil.disk_usage(small_tmpfs).free
            f.write(b"\0" * max(0, free - 16 * 1024))
        job.signal_group(signal.SIGTERM)
        codes = job.wait(timeout=180)
    finally:
        job.close()
    out = job.output()
    assert codes == [2, 2], out[-3000:]
    assert "ENOSPC" in out and str(save) in out and "failed" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "the latest checkpoint is still global_step40" in out
    assert pointer(save) == 40 and verify_manifest(str(save / "global_step40")) == []
    assert not [p.name for p in save.iterdir() if p.name.startswith(".tmp-")]


def test_an_unwritable_save_directory_is_refused_at_start_up_naming_it(tmp_path):
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE (the suite runs as root on CI)")
    save = tmp_path / "readonly"
    save.mkdir()
    os.chown(save, 65534, 65534)  # nobody's, mode 755: not writable by a root without CAP_DAC_OVERRIDE
    save.chmod(0o755)
    job = Job.start(tmp_path, "none", "--train-iters", "5", "--num-workers", "0", "--save", str(save),
                    "--save-interval", "5",
                    wrapper=[setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"])
    try:
        codes = job.wait(timeout=180)
    finally:
        job.close()
    out = job.output()
    assert codes == [2, 2], out[-3000:]
    assert f"--save {save} is not writable from rank 0: EACCES" in out and "Traceback" not in out, out[-3000:]
    assert "iteration" not in out  # refused before training
