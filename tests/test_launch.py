"""pretrain_gpt.py runs the same way under torchrun and under mpiexec (MPICH from the venv), and a multi-rank
launch says each warning and start-up notice once, not once per rank."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "3",
        "--log-interval", "1", "--lr", "1e-3", "--eval-iters", "1"]


def launch(cmd, timeout=240):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    repeated = repeated_lines(proc.stdout) + repeated_lines(proc.stderr)
    assert not repeated, f"printed by several ranks: {repeated}"
    return proc.stdout


def repeated_lines(text: str) -> list[str]:
    """Lines printed more than once (every rank printing the same warning or notice); rules of dashes (they
    frame each evaluation line) and a warning's echoed source line (`  return func(...)`) aside."""
    lines = [line for line in text.splitlines() if line.strip() and set(line.strip()) != {"-"}
             and not line.startswith("  ")]
    return sorted({line for line in lines if lines.count(line) > 1})


def test_torchrun_launch_trains_with_tp2_dp2_and_warns_once():
    out = launch([str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port()), "pretrain_gpt.py", *TINY,
                  "--tensor-model-parallel-size", "2", "--no-pipeline-parallel"])
    assert "world 4 = tp 2 × sp 1 × dp 2 × pp 1" in out and "(gloo, torchrun)" in out
    assert out.count("lm loss") >= 3 and "done at iteration 3" in out


@pytest.mark.skipif(shutil.which("mpiexec", path=str(BIN)) is None and shutil.which("mpiexec") is None,
                    reason="no mpiexec: tools/setup_env.sh installs MPICH into .venv")
def test_mpiexec_launch_trains_with_pp2_dp2_and_warns_once():
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    extra = ["--allow-run-as-root", "--oversubscribe"] if "openmpi" in subprocess.run(
        [mpiexec, "--version"], capture_output=True, text=True).stdout.lower() else []
    out = launch([mpiexec, *extra, "-n", "4", sys.executable, "pretrain_gpt.py", *TINY,
                  "--pipeline-model-parallel-size", "2"])
    assert "world 4 = tp 1 × sp 1 × dp 2 × pp 2" in out
    assert "(gloo, mpich)" in out or "(gloo, openmpi)" in out  # ranks came from the MPI launcher
    assert "done at iteration 3" in out
