"""A rank that dies (SIGKILL) or stops (SIGSTOP) ends the job within its bound, with a message naming the rank:
no silent hang. Without a launcher, the surviving rank's collective fails (gloo sees the peer gone) or the
hang watchdog fires; either way the heartbeats name the rank that stopped answering and the survivor
exits 3. Under torchrun and mpiexec the launcher also ends the job (FAULT_MATRIX=1 runs those too)."""

import os
import signal
import time

import pytest

from faultrun import Job, mpiexec

FULL = os.environ.get("FAULT_MATRIX") == "1"
MATRIX = pytest.mark.skipif(not FULL, reason="set FAULT_MATRIX=1 to run the launcher variants")
NO_MPIEXEC = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (tools/setup_env.sh installs MPICH)")
# Hang detection quick enough for a test: a step 10× the median and >= 5 s is a hang; the collective
# timeout is the 1 minute.
FAST_WATCHDOG = ["--hang-watchdog-min-seconds", "5", "--hang-watchdog-factor", "10",
                 "--distributed-timeout-minutes", "1"]


def _start(tmp_path, launcher):
    return Job.start_until(tmp_path, launcher, f"iteration {3:8d}/", "--train-iters", "100000", "--num-workers", "0",
                           *FAST_WATCHDOG)


def _ended_naming_rank_1(job, started, bound_s, codes):
    out = job.output()
    assert time.time() - started < bound_s, out[-3000:]
    assert any(code not in (0, None) for code in codes), (codes, out[-3000:])
    return out


@pytest.mark.parametrize("launcher", ["none", pytest.param("torchrun", marks=MATRIX),
                                      pytest.param("mpiexec", marks=[MATRIX, NO_MPIEXEC])])
def test_a_killed_rank_ends_the_job_with_a_message_naming_it(tmp_path, launcher):
    job = _start(tmp_path, launcher)
    try:
        job.signal_rank(1, signal.SIGKILL)
        started = time.time()
        if launcher == "none":
            code0 = job.procs[0].wait(timeout=60)
            out = _ended_naming_rank_1(job, started, 60, [code0])
            assert code0 == 3, out[-3000:]
            # gloo usually notices the dead peer at once (a collective fails); otherwise the watchdog fires
            assert "rank(s) not answering: 1" in out or "stuck rank(s): 1" in out, out[-3000:]
            assert "rank 1: phase" in out, out[-3000:]  # its last phase and heartbeat age
            assert "Traceback" not in job.logs[0].read_text()
        else:
            codes = job.wait(timeout=60)
            out = _ended_naming_rank_1(job, started, 60, codes)
            if launcher == "torchrun":  # torchrun's failure report names the rank
                assert "rank 1" in out or "rank: 1" in out, out[-3000:]
            else:  # MPICH ends every process at once and names the dead one by PID and host, not by rank
                assert "BAD TERMINATION" in out and "KILLED" in out.upper(), out[-3000:]
    finally:
        job.close()


@pytest.mark.parametrize("launcher", ["none", pytest.param("torchrun", marks=MATRIX),
                                      pytest.param("mpiexec", marks=[MATRIX, NO_MPIEXEC])])
def test_a_stopped_rank_is_named_by_the_watchdog_and_the_job_exits_within_the_timeout(tmp_path, launcher):
    job = _start(tmp_path, launcher)
    try:
        job.signal_rank(1, signal.SIGSTOP)
        started = time.time()
        if launcher == "none":  # nothing can end a stopped process but a signal: rank 0 must not wait for it
            code0 = job.procs[0].wait(timeout=90)
            codes = [code0]
        else:
            codes = job.wait(timeout=90)
        out = _ended_naming_rank_1(job, started, 90, codes)
        assert "WATCHDOG (rank 0)" in out and "stuck rank(s): 1" in out, out[-3000:]
        assert "rank 1: phase" in out and "stopped, killed, or its node is gone" in out, out[-3000:]
        if launcher == "none":
            assert codes == [3]
    finally:
        job.close()


def group_timeouts(rank: int, world_size: int) -> dict:
    import datetime

    import deepspeed
    import torch

    from megatron.config.arguments import parse_args
    from megatron.dist import set_default_group_timeout
    from megatron.dist.parallel_state import ParallelState

    set_default_group_timeout(datetime.timedelta(minutes=0.7))  # what initialize_distributed does first
    run = parse_args(["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
                      "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
                      "--vocab-size", "64", "--tensor-model-parallel-size", "2"])
    ps = ParallelState.build(run.parallel, run.model)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    groups = {name: g for name, g in ps.groups.items() if g is not None and name != "world"}
    groups["deepspeed"] = deepspeed.comm.new_group([0, 1])  # DeepSpeed passes no timeout of its own
    return {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()}


def test_the_distributed_timeout_reaches_our_groups_and_deepspeeds():
    from multirank import run_ranks

    timeouts = run_ranks(2, group_timeouts)
    assert set(timeouts[0]) >= {"tp", "deepspeed"} and set(timeouts[0].values()) == {42.0}, timeouts[0]


class _DictStore:
    """The three TCPStore calls the watchdog makes, over a dict."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_the_diagnosis_reads_this_ranks_own_state_first_hand_not_its_last_published_beat():
    """A rank's published beat can lag (published once a second) or be overwritten; the rank that diagnoses
    knows its own phase and iteration, so only the other ranks are judged by their beats."""
    import json

    from megatron.training.watchdog import Watchdog

    store = _DictStore()
    now = time.time()
    store.set("megatron_watchdog/heartbeat/0", json.dumps({"t": now, "phase": "startup", "iteration": 0,
                                                           "since": now, "pid": 1}))
    store.set("megatron_watchdog/heartbeat/1", json.dumps({"t": now, "phase": "optimizer", "iteration": 7,
                                                           "since": now, "pid": 2}))
    watchdog = Watchdog(0, 2, factor=10, min_seconds=5, timeout_s=60, store=store)
    watchdog.phase("backward", 9)
    stuck, lines = watchdog.diagnose()
    assert stuck == [1], lines
    assert lines[0].startswith("rank 0: phase backward of iteration 9"), lines
