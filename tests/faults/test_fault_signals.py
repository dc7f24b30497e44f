"""--exit-signal-handler: SIGTERM (or SIGUSR1) reaches a save-and-exit whichever process receives it: the
launcher (torchrun, mpiexec), the whole process group (what PBS and Slurm do at walltime), or one rank.
DataLoader workers (--num-workers 1) ignore it; every rank exits 0 with a complete, verified checkpoint,
and nothing of the job is left running."""

import os
import signal

import pytest

from faultrun import Job, mpiexec, pointer
from megatron.checkpoint.format import verify_manifest

NO_MPIEXEC = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (tools/setup_env.sh installs MPICH)")
# Every (launcher, target) pair runs in the README's test command; FAULT_MATRIX=0 keeps one case per launcher
# and per target for a quick local run (the rest of the matrix costs a 2-rank launch each, ~10 s).
FULL = os.environ.get("FAULT_MATRIX", "1") != "0"
MATRIX = "FAULT_MATRIX=0: one case per launcher and target only"
DEFAULT_CASES = {("torchrun", "launcher"), ("mpiexec", "group"), ("none", "rank")}


def case(launcher, target):
    marks = [NO_MPIEXEC] if launcher == "mpiexec" else []
    if not FULL and (launcher, target) not in DEFAULT_CASES:
        marks.append(pytest.mark.skip(reason=MATRIX))
    return pytest.param(launcher, target, marks=marks, id=f"{launcher}-{target}")


def _run_and_signal(tmp_path, launcher, target, sig=signal.SIGTERM, extra=()):
    save = tmp_path / "ckpt"
    job = Job.start_until(tmp_path, launcher, f"iteration={3:8d}/", "--train-iters", "100000", "--exit-signal-handler",
                          "--num-workers", "1", "--save", str(save), "--save-interval", "100000", *extra)
    try:
        if target == "launcher":
            job.signal_launcher(sig)
        elif target == "group":
            job.signal_group(sig)
        else:
            job.signal_rank(1, sig)
        codes = job.wait(timeout=90)
        left = job.leftovers()
    finally:
        job.close()
    return job, save, codes, left


def _assert_saved_and_clean(job, save, codes, left, launcher, target, signame="SIGTERM"):
    out = job.output()
    if launcher == "torchrun" and target in ("launcher", "group"):
        # torchrun itself was signalled: it forwards SIGTERM to the ranks, waits for them, then re-raises the
        # signal as its own SignalException (exit 1). The ranks must have finished cleanly before that.
        assert out.count("Traceback") == out.count("SignalException: Process"), out[-3000:]
        assert "ChildFailedError" not in out, out[-3000:]
    else:
        assert all(code == 0 for code in codes), (codes, out[-3000:])
        assert "Traceback" not in out, out[-3000:]
    assert "killed by signal" not in out, out[-3000:]
    assert f"exit signal received ({signame}" in out or "exit signal received (on another rank" in out
    iteration = pointer(save)
    assert iteration is not None and iteration >= 3, out[-3000:]
    tag = save / f"global_step{iteration}"
    assert {"rng_state_rank_00000.pt", "rng_state_rank_00001.pt", "manifest.json"} <= {p.name for p in tag.iterdir()}
    assert verify_manifest(str(tag)) == []
    assert f"done at iteration {iteration}" in out
    assert not [p for p in save.iterdir() if p.name.startswith(".tmp-")]
    assert left == [], left  # no orphaned rank or DataLoader worker


@pytest.mark.parametrize("launcher, target", [case(launcher, target) for launcher in ("torchrun", "mpiexec", "none")
                                              for target in ("launcher", "group", "rank") if launcher != "none"
                                              or target != "launcher"])
def test_exit_signal_saves_a_complete_checkpoint_and_every_rank_exits_0(tmp_path, launcher, target):
    # SIGUSR1 (an exit signal by default, what PBS/Slurm can be told to send first) for one rank without a
    # launcher; SIGTERM otherwise (tests/test_training_signals.py sends SIGTERM to one rank without launcher).
    sig = signal.SIGUSR1 if (launcher, target) == ("none", "rank") else signal.SIGTERM
    job, save, codes, left = _run_and_signal(tmp_path, launcher, target, sig=sig)
    _assert_saved_and_clean(job, save, codes, left, launcher, target, signame=signal.Signals(sig).name)
