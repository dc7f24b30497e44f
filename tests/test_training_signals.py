"""--exit-signal-handler: SIGTERM to ONE rank of a 2-rank pretrain_gpt.py run makes both save and exit cleanly.
--exit-duration-in-mins counts from the earliest rank's process start, as upstream's _TRAIN_START_TIME."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine_cases import flags, rank_env
from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_to_one_rank_saves_a_checkpoint_on_every_rank_and_exits_zero(tmp_path):
    save = tmp_path / "ckpt"
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *flags(
        "--train-iters", "100000", "--log-interval", "1", "--exit-signal-handler", "--save", str(save),
        "--save-interval", "100000")]
    port = free_port()
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen(argv, env=rank_env(r, 2, port), stdout=logs[r], stderr=subprocess.STDOUT, cwd=ROOT)
             for r in range(2)]
    try:
        deadline = time.time() + 180
        while f" iteration={2:8d}/" not in (tmp_path / "rank0.log").read_text():  # upstream's log line
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    out0 = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], out0[-3000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    assert "exit signal received" in out0
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= iteration < 100000
    tag = f"global_step{iteration}"
    assert (save / "latest").read_text() == tag
    files = {p.name for p in (save / tag).iterdir()}
    assert {"rng_state_rank_00000.pt", "rng_state_rank_00001.pt", "mp_rank_00_model_states.pt"} <= files
    assert f"done at iteration {iteration}" in out0


_STARTED_EARLIER = """
import runpy, sys, time
import megatron
if sys.argv[1] == "1":  # this rank's process started 90 s ago (a slow start-up, as at scale)
    megatron.START_TIME = getattr(megatron, "START_TIME", time.time()) - 90
sys.argv = ["pretrain_gpt.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_exit_duration_counts_from_the_earliest_ranks_process_start(tmp_path):
    """Upstream's clock starts when megatron/training.py is imported, the MIN over ranks; ours at
    megatron.START_TIME (set when the entry imports megatron), the MIN over ranks: a job whose start-up took 90 s
    is over --exit-duration-in-mins 1 after its first iteration, on every rank."""
    argv = flags("--train-iters", "6", "--log-interval", "1", "--exit-duration-in-mins", "1")
    port = free_port()
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]  # files: a full pipe cannot block a rank
    procs = [subprocess.Popen([sys.executable, "-c", _STARTED_EARLIER, str(r), *argv], env=rank_env(r, 2, port),
                              stdout=logs[r], stderr=subprocess.STDOUT, cwd=ROOT)
             for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    outs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "exiting at iteration 1: --exit-duration-in-mins 1.0 reached" in outs[0], outs[0][-3000:]
