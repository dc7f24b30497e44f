"""pretrain_gpt.py runs the same way under torchrun and under mpiexec (MPICH from the venv), and a multi-rank
launch says each warning and start-up notice once, not once per rank.

The launches are the README's own: its cpu-runnable launch block (4 ranks under torchrun at tp 2 × dp 2 with
ZeRO-2, then 4 under mpiexec at pp 2 × dp 2), shrunk by TRAIN_ITERS as tests/test_docs_run.py shrinks every docs
block, and run here one launch at a time so that each launch's output is checked on its own; tests/test_docs_run.py
leaves that block to this file."""

import re

from docs_blocks import SHRINK, launch_block, run_block, scratch

ACTIVATE = "source .venv/bin/activate"
ITERS = SHRINK["TRAIN_ITERS"]


def readme_launches() -> dict:
    """{"torchrun": command, "mpiexec": command} from the README's launch block, continuation lines joined."""
    commands, other = {}, []
    for line in launch_block().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith(("torchrun ", "mpiexec ")):
            commands[line.split()[0]] = line
        elif line and not line.startswith("#") and line != ACTIVATE:
            other.append(line)
    # the block holds the two launches and nothing else this file would leave unrun
    assert sorted(commands) == ["mpiexec", "torchrun"] and not other, (commands, other)
    return commands


def launch(launcher: str, tmp_path) -> str:
    """Run the README's `launcher` command after its `source .venv/bin/activate`; its stdout."""
    proc = run_block(f"{ACTIVATE}\n{readme_launches()[launcher]}", scratch(tmp_path), f"the README's {launcher} launch")
    repeated = repeated_lines(proc.stdout) + repeated_lines(proc.stderr)
    assert not repeated, f"printed by several ranks: {repeated}"
    assert re.search(rf"iteration=\s*{ITERS}/\s*{ITERS} \|.*\| lm loss=", proc.stdout), proc.stdout[-3000:]
    assert f"validation loss at iteration {ITERS}" in proc.stdout and f"done at iteration {ITERS}" in proc.stdout
    return proc.stdout


def repeated_lines(text: str) -> list[str]:
    """Lines printed more than once (every rank printing the same warning or notice); rules of dashes (they
    frame each evaluation line) and a warning's echoed source line (`  return func(...)`) aside."""
    lines = [line for line in text.splitlines() if line.strip() and set(line.strip()) != {"-"}
             and not line.startswith("  ")]
    return sorted({line for line in lines if lines.count(line) > 1})


def test_torchrun_launch_trains_with_tp2_dp2_zero2_and_warns_once(tmp_path):
    out = launch("torchrun", tmp_path)
    assert "world 4 = tp 2 × sp 1 × dp 2 × pp 1" in out and "(gloo, torchrun)" in out


def test_mpiexec_launch_trains_with_pp2_dp2_and_warns_once(tmp_path):
    out = launch("mpiexec", tmp_path)
    assert "world 4 = tp 1 × sp 1 × dp 2 × pp 2" in out
    assert "(gloo, mpich)" in out or "(gloo, openmpi)" in out  # ranks came from the MPI launcher
