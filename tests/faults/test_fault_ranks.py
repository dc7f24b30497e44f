"""A rank that dies (SIGKILL) or stops (SIGSTOP) ends the job within its bound, with a message naming the rank:
no silent hang. Without a launcher, the surviving rank's collective fails (gloo sees the peer gone) or the
hang watchdog fires; either way the heartbeats name the rank that stopped answering and the survivor
exits 3. A stopped rank on the survivor's node is ended by it (SIGKILL), so under torchrun, under mpiexec
and without a launcher the whole job ends and nothing is left (FAULT_MATRIX=0 leaves the launchers out).
"""

import os
import signal
import time

import pytest

from faultrun import Job, mpiexec
from multirank import free_port

FULL = os.environ.get("FAULT_MATRIX", "1") != "0"
MATRIX = pytest.mark.skipif(not FULL, reason="FAULT_MATRIX=0: the launcher variants are left out")
NO_MPIEXEC = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (tools/setup_env.sh installs MPICH)")
# Hang detection quick enough for a test: a step 10× the median and >= 5 s is a hang; the collective
# timeout is the 1 minute.
FAST_WATCHDOG = ["--hang-watchdog-min-seconds", "5", "--hang-watchdog-factor", "10",
                 "--distributed-timeout-minutes", "1"]


def _start(tmp_path, launcher, env=None):
    return Job.start_until(tmp_path, launcher, f"iteration={3:8d}/", "--train-iters", "100000", "--num-workers", "0",
                           *FAST_WATCHDOG, env=env)


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
    # Under mpiexec, with the rendezvous exported as many job scripts do: the ranks then never initialise MPI, so
    # MPICH does not end the job when rank 0 exits (it only does for a rank that initialised MPI); rank 0 ending
    # the stopped rank of its node is what ends it. (Without MASTER_*, mpi4py sets the rendezvous up and MPICH
    # cleans up too: test_a_killed_rank... covers that.)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())} if launcher == "mpiexec" else None
    job = _start(tmp_path, launcher, env)
    try:
        job.signal_rank(1, signal.SIGSTOP)
        started = time.time()
        codes = job.wait(timeout=90)  # every process: the survivor ends the stopped rank of its node
        out = _ended_naming_rank_1(job, started, 90, codes)
        assert "WATCHDOG (rank 0)" in out and "stuck rank(s): 1" in out, out[-3000:]
        assert "rank 1: phase" in out and "stopped, killed, or its node is gone" in out, out[-3000:]
        assert "ending rank(s) 1 with SIGKILL" in out, out[-3000:]
        if launcher == "none":
            assert codes == [3, -signal.SIGKILL], (codes, out[-3000:])
        assert job.leftovers() == []
    finally:
        job.close()


def group_timeouts(rank: int, world_size: int) -> dict:
    import datetime

    import deepspeed
    import torch

    from megatron.config.arguments import parse_args
    from megatron.distributed import set_default_group_timeout
    from megatron.distributed.parallel_state import ParallelState

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
    """The three TCPStore calls the watchdog makes, over a dict; `wait_for(predicate)` waits for a set."""

    def __init__(self):
        import threading

        self.data, self.changed = {}, threading.Condition()

    def set(self, key, value):
        with self.changed:
            self.data[key] = value.encode() if isinstance(value, str) else value
            self.changed.notify_all()

    def wait_for(self, predicate, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.data), timeout)

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_the_diagnosis_reads_this_ranks_own_state_first_hand_not_its_last_published_beat():
    """A rank's published beat can lag (published once a second) or be overwritten; the rank that diagnoses
    knows its own phase and iteration, so only the other ranks are judged by their beats."""
    import json

    from megatron.training.watchdog import Watchdog

    from megatron.training.watchdog import heartbeat_key

    store = _DictStore()
    now = time.time()
    store.set(heartbeat_key(0), json.dumps({"t": now, "phase": "startup", "iteration": 0, "since": now, "pid": 1}))
    store.set(heartbeat_key(1), json.dumps({"t": now, "phase": "optimizer", "iteration": 7, "since": now, "pid": 2}))
    watchdog = Watchdog(0, 2, factor=10, min_seconds=5, timeout_s=60, store=store)
    watchdog.phase("backward", 9)
    stuck, lines = watchdog.diagnose()
    assert stuck == [1], lines
    assert lines[0].startswith("rank 0: phase backward of iteration 9"), lines


def test_a_phase_change_is_published_at_once_not_at_the_next_periodic_beat():
    """The beat a rank leaves behind when it stops is its phase of a moment before, not of the last period (a
    rank stopped within a second of starting used to be reported in phase "startup" after many steps)."""
    import json

    from megatron.training.watchdog import Watchdog, heartbeat_key

    store = _DictStore()
    watchdog = Watchdog(1, 2, factor=10, min_seconds=600, timeout_s=600, store=store, period_s=3600).start()
    try:
        published = lambda data: json.loads(data.get(heartbeat_key(1), b"{}"))  # noqa: E731
        assert published(store.data)["phase"] == "startup"
        for iteration in (1, 2, 3):
            watchdog.phase("data", iteration)
            watchdog.phase("forward")
            # the periodic beat is an hour away: only a publish on change can satisfy this
            assert store.wait_for(lambda d: (published(d)["phase"], published(d)["iteration"]) ==
                                  ("forward", iteration), timeout=60), published(store.data)
    finally:
        watchdog.stop()


def test_heartbeats_of_an_earlier_torchrun_attempt_are_not_read_as_live(monkeypatch):
    """torchrun keeps its store across --max-restarts: rank 1's beat of attempt 0 says nothing of attempt 1."""
    import json

    from megatron.training.watchdog import Watchdog, heartbeat_key

    store = _DictStore()
    old = {"t": time.time(), "phase": "optimizer", "iteration": 1234, "since": time.time(), "pid": 2}
    store.set(heartbeat_key(1, {"TORCHELASTIC_RESTART_COUNT": "0"}), json.dumps(old))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    stuck, lines = Watchdog(0, 2, factor=10, min_seconds=5, timeout_s=60, store=store).diagnose()
    assert stuck == [1] and lines[1] == "rank 1: no heartbeat ever", lines


def _sleeper():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _stopped_peer_beat(store, proc):
    """SIGSTOP `proc` and publish a stale heartbeat of it as rank 1's."""
    import json

    from megatron.training.watchdog import heartbeat_key, process_identity

    stale = time.time() - 60
    store.set(heartbeat_key(1), json.dumps({"t": stale, "phase": "backward", "iteration": 4, "since": stale,
                                            **process_identity(proc.pid)}))
    proc.send_signal(signal.SIGSTOP)
    while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_only_a_stopped_process_on_this_node_that_is_still_the_ranks_is_ended():
    from megatron.training.watchdog import end_stopped, process_identity, stopped_on_this_node

    proc = _sleeper()
    try:
        beat = process_identity(proc.pid)
        assert not stopped_on_this_node(beat)  # running: a launcher's SIGTERM reaches it
        proc.send_signal(signal.SIGSTOP)
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.05)
        assert not stopped_on_this_node({**beat, "host": beat["host"] + "-elsewhere"})  # another node
        assert not stopped_on_this_node({**beat, "start": str(int(beat["start"]) + 1)})  # its pid reused
        assert not stopped_on_this_node({**beat, "pid_ns": "pid:[1]"})  # another container
        assert stopped_on_this_node(beat)
        assert end_stopped(beat) is None
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_the_watchdog_ends_a_stopped_peer_on_its_node_after_its_report_then_exits_3():
    from megatron.training.watchdog import EXIT_HANG, Watchdog

    peer = _sleeper()
    try:
        store, events = _DictStore(), []
        _stopped_peer_beat(store, peer)
        watchdog = Watchdog(0, 2, factor=10, min_seconds=5, timeout_s=60, store=store,
                            printer=lambda line: events.append(("report", line, peer.poll())),
                            exit_fn=lambda code: events.append(("exit", code, peer.poll())))
        watchdog._report_hang()
        (kind, report, alive_then), (kind2, code, _) = events
        assert kind == "report" and alive_then is None, events  # the report is out while the peer still exists
        assert "stuck rank(s): 1" in report and "ending rank(s) 1 with SIGKILL" in report, report
        assert f"pid {peer.pid} on " in report, report
        assert (kind2, code) == ("exit", EXIT_HANG)
        assert peer.wait(timeout=60) == -signal.SIGKILL
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_a_failed_collective_names_a_stopped_peer_and_ends_it_only_once_the_message_is_reported():
    from megatron.training.watchdog import CollectiveFailure, Watchdog

    peer = _sleeper()
    try:
        store = _DictStore()
        _stopped_peer_beat(store, peer)
        watchdog = Watchdog(0, 2, factor=10, min_seconds=5, timeout_s=60, store=store)
        failure = CollectiveFailure(watchdog.describe_failure(RuntimeError("Timed out waiting 60000ms")),
                                    watchdog.end_stopped_ranks)
        assert "rank(s) not answering: 1" in str(failure) and "ending rank(s) 1 with SIGKILL" in str(failure)
        assert peer.poll() is None  # not before pretrain_gpt.py has printed the message
        failure.after_report()
        assert peer.wait(timeout=60) == -signal.SIGKILL
    finally:
        peer.kill()
        peer.wait()
