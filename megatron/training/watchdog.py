"""Hang watchdog and rank heartbeats: a stuck job says which rank stopped, and where, then exits.

Every rank runs one daemon thread. It publishes this rank's heartbeat (time, phase, iteration, and who the
process is: pid, host) in a key-value store every rank can reach (a client of the job's rendezvous TCPStore
at MASTER_ADDR:MASTER_PORT, on its own connection, so it works while the main thread is blocked in a
collective). A beat goes out as soon as the phase or iteration changes, and at least once a second: a rank
that stops is known by the phase it was in, not by one up to a second older. Changes are published at most
every `min_interval_s` (0.1 s; more on a job of over 1,000 ranks, so that the whole job's on-change beats
stay under about 10,000 a second at the store). Keys are scoped to the launcher's restart attempt (torchrun
keeps its store across --max-restarts), so a beat of an earlier attempt is never read as a live one.

The thread also watches its own rank: when the current training step has run longer than `factor` × the
median of the recent steps (and at least `min_seconds`; before 3 steps, and while saving, evaluating or
loading, the bound is the distributed timeout), it prints every rank's last phase, names the ranks whose
heartbeat stopped (SIGSTOP, a dead process or node) or that lag behind the others, and ends the process
with EXIT_HANG. Just before, it SIGKILLs the stuck ranks that are stopped processes (SIGSTOP, SIGTSTP; not a
debugger's stop) on its own node, verified by pid, start time, boot and pid namespace: a stopped process
cannot act on the SIGTERM a launcher or batch system sends first, and would otherwise keep the job (and its
nodes) alive. A launcher then ends the other ranks; without one, each healthy rank reaches the same verdict
on its own.

`describe_failure(error)` gives the same diagnosis (and the same end for stopped peers) when a collective
fails instead of hanging (gloo notices a dead peer, or the --distributed-timeout-minutes timeout fires).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional

from megatron.errors import MegatronError

EXIT_HANG = 3  # a rank stopped answering: documented in docs/RELIABILITY.md
STEP_PHASES = ("data", "forward", "backward", "optimizer")
MIN_INTERVAL_S = 0.1  # a phase change is published within this (on a job of up to 1,000 ranks)
STORE_BEATS_PER_S = 10_000  # the most on-change beats a second the whole job sends the rendezvous store


def heartbeat_key(rank: int, env=None) -> str:
    """The store key of `rank`'s heartbeat in this launch attempt. torchrun hosts the store in its agent and
    keeps it across worker restarts (--max-restarts); it scopes its own worker keys the same way
    (/worker/attempt_N), by TORCHELASTIC_RESTART_COUNT."""
    env = os.environ if env is None else env
    return f"megatron_watchdog/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/heartbeat/{rank}"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid) -> Optional[tuple[str, str]]:
    """(state letter, start time in clock ticks since boot) of a process, from /proc (Linux); None elsewhere
    or when the process is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the command may hold spaces
    return fields[0], fields[19]  # proc(5): field 3 is the state, field 22 the start time


def process_identity(pid: Optional[int] = None) -> dict:
    """Who a process (this one by default) is, beyond its pid, which the kernel reuses: its host, its start
    time, the boot and the pid namespace it lives in. A rank on the same node compares all of them before it
    signals it."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    try:
        pid_ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        pid_ns = None
    return {"pid": pid, "host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns, "start": stat[1] if stat else None}


def stopped_on_this_node(beat: Optional[dict], here: Optional[dict] = None) -> bool:
    """Whether the process a heartbeat describes runs on this node and is stopped (state T: SIGSTOP, SIGTSTP,
    SIGTTIN/OU). False when it is elsewhere, gone, running, held by a debugger (state t: left for whoever
    debugs it), or no longer the same process (its pid reused: the start time differs)."""
    here = here or process_identity()
    if not beat or not beat.get("start") or any(here.get(k) is None or beat.get(k) != here.get(k)
                                                for k in ("host", "boot", "pid_ns")):
        return False
    pid = beat.get("pid")
    stat = _proc_stat(pid) if isinstance(pid, int) and pid > 0 and pid != os.getpid() else None
    return stat is not None and stat[1] == beat["start"] and stat[0] == "T"


def end_stopped(beat: dict) -> Optional[str]:
    """SIGKILL a process that stopped_on_this_node(beat) found stopped (checked again just before); None when
    done, else why not. A stopped process cannot act on SIGTERM until it is continued; SIGKILL ends it."""
    if not stopped_on_this_node(beat):
        return "it is no longer a stopped process on this node"
    try:
        os.kill(beat["pid"], signal.SIGKILL)
    except OSError as error:
        return error.strerror
    return None


def _connect_store(timeout_s: float):
    """A new client of the job's rendezvous store; None when there is none (one process, no MASTER_*)."""
    import datetime

    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or not dist.is_available():
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, ValueError, OSError):
        return None


class Watchdog:
    """One rank's heartbeat publisher and hang detector (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, factor: float, min_seconds: float, timeout_s: float,
                 printer: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                 period_s: float = 1.0, store=None, exit_fn: Callable[[int], None] = os._exit,
                 min_interval_s: Optional[float] = None):
        self.rank, self.world_size = rank, world_size
        self.factor, self.min_seconds, self.timeout_s = factor, min_seconds, timeout_s
        self.printer, self.period_s, self.exit_fn = printer, period_s, exit_fn
        self.min_interval_s = (max(MIN_INTERVAL_S, world_size / STORE_BEATS_PER_S) if min_interval_s is None
                               else min_interval_s)
        self.store = store
        self.key = heartbeat_key(rank)
        self.identity = process_identity()
        self.durations: deque = deque(maxlen=20)
        self.phase_name, self.iteration = "startup", 0
        self.step_started = self.phase_started = time.time()
        self._stop = threading.Event()
        self._changed = threading.Event()  # set by phase(): the thread publishes without waiting its period
        self._pending_end: dict = {}  # stopped ranks named by describe_failure, ended by end_stopped_ranks
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # ---- called by the loop (cheap: no I/O) ----
    def phase(self, name: str, iteration: Optional[int] = None) -> None:
        now = time.time()
        with self._lock:
            if name == "data" and self.phase_name not in STEP_PHASES:
                self.step_started = now  # a new step begins
            self.phase_name, self.phase_started = name, now
            if iteration is not None:
                self.iteration = iteration
        self._changed.set()

    def step_done(self, seconds: float) -> None:
        self.durations.append(seconds)
        self.phase("idle")

    # ---- the thread ----
    def start(self) -> "Watchdog":
        if self.store is None and self.world_size > 1:
            self.store = _connect_store(timeout_s=10.0)
        self._publish()  # at once: a rank that dies in its first second is still known
        self._thread = threading.Thread(target=self._run, name="megatron-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()  # wakes the thread
        if self._thread is not None:
            self._thread.join(timeout=5)

    def limit_s(self) -> float:
        """How long the current phase may take before it counts as a hang."""
        with self._lock:
            in_step = self.phase_name in STEP_PHASES
        if in_step and len(self.durations) >= 3:
            return max(self.min_seconds, self.factor * statistics.median(self.durations))
        return max(self.min_seconds, self.timeout_s)

    def elapsed_s(self, now: Optional[float] = None) -> float:
        now = time.time() if now is None else now
        with self._lock:
            return now - (self.step_started if self.phase_name in STEP_PHASES else self.phase_started)

    def _run(self) -> None:
        """Publish on every change (at most every min_interval_s) and at least every period_s; check for a hang
        each time round."""
        last = time.time()  # start() has just published
        while True:
            changed = self._changed.wait(max(0.0, last + self.period_s - time.time()))
            if self._stop.is_set():
                return
            if changed and self._stop.wait(max(0.0, last + self.min_interval_s - time.time())):
                return  # (the wait is the rate limit: changes in the meantime go out in one beat)
            self._changed.clear()  # before the snapshot: a change during the publish is published next time
            self._publish()
            last = time.time()
            if self.phase_name != "idle" and self.elapsed_s() > self.limit_s():
                self._report_hang()
                return

    def _beat(self, now: Optional[float] = None) -> dict:
        with self._lock:
            return {"t": time.time() if now is None else now, "phase": self.phase_name,
                    "iteration": self.iteration, "since": self.phase_started, **self.identity}

    def _publish(self) -> None:
        if self.store is None:
            return
        beat = self._beat()
        try:
            self.store.set(self.key, json.dumps(beat))
        except (RuntimeError, OSError):
            pass  # the store's host (rank 0, or the launcher) is gone: the report will say so

    def heartbeats(self) -> Optional[dict]:
        """{rank: heartbeat dict or None} for every rank; None when the store cannot be reached."""
        if self.store is None:
            return None
        beats = {}
        for rank in range(self.world_size):
            key = heartbeat_key(rank)
            try:
                beats[rank] = json.loads(self.store.get(key)) if self.store.check([key]) else None
            except (RuntimeError, OSError, ValueError):
                return None
        return beats

    def diagnose(self, stale_after_s: Optional[float] = None) -> tuple[list[int], list[str]]:
        """(stuck ranks, one line per rank) from the heartbeats."""
        stuck, lines, _ = self._verdict(stale_after_s)
        return stuck, lines

    def _verdict(self, stale_after_s: Optional[float] = None) -> tuple[list[int], list[str], dict]:
        """(stuck ranks, one line per rank, {stuck rank: its beat} for those whose heartbeat stopped)."""
        stale_after_s = stale_after_s or max(5.0, 5 * self.period_s)
        beats = self.heartbeats()
        now = time.time()
        if beats is None:
            return [0], ["the rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by rank 0 or the launcher) does not "
                         "answer: rank 0 or the launcher is gone"], {}
        # this rank's own state is known first-hand, whatever its last published beat says
        beats[self.rank] = self._beat(now)
        lines, stale = [], {}
        for rank, beat in beats.items():
            if beat is None:
                lines.append(f"rank {rank}: no heartbeat ever")
                stale[rank] = None
                continue
            age = now - beat["t"]
            state = f"last heartbeat {age:.1f} s ago"
            if age > stale_after_s:
                state += " (stopped, killed, or its node is gone)"
                stale[rank] = beat
            where = f"; pid {beat['pid']} on {beat['host']}" if beat.get("host") else ""
            lines.append(f"rank {rank}: phase {beat['phase']} of iteration {beat['iteration']} for "
                         f"{now - beat['since']:.1f} s, {state}{where}")
        if stale:
            return sorted(stale), lines, stale
        # Every rank is alive: the stuck ones are those behind the others (an older iteration), else all.
        oldest = min(b["iteration"] for b in beats.values())
        behind = [r for r, b in beats.items() if b["iteration"] == oldest]
        return (behind if len(behind) < len(beats) else sorted(beats)), lines, {}

    def _stopped_here(self, stale: dict) -> dict:
        """{rank: beat} of the ranks whose heartbeat stopped because they are stopped processes on this node."""
        return {r: b for r, b in stale.items() if r != self.rank and stopped_on_this_node(b, self.identity)}

    def _end(self, stopped: dict) -> None:
        """SIGKILL the stopped ranks of this node (after the report is out: a launcher may end this process as
        soon as a peer dies)."""
        for rank, beat in stopped.items():
            failure = end_stopped(beat)
            if failure:
                self.printer(f"WATCHDOG (rank {self.rank}): could not end rank {rank} (pid {beat['pid']}): {failure}")

    @staticmethod
    def _ending_note(stopped: dict) -> str:
        if not stopped:
            return ""
        return ("\n  ending rank(s) " + ", ".join(map(str, stopped)) + " with SIGKILL: stopped process(es) on this "
                "node cannot act on a launcher's SIGTERM, and would keep the job alive")

    def _report_hang(self) -> None:
        with self._lock:
            phase, iteration = self.phase_name, self.iteration
        median = statistics.median(self.durations) if self.durations else None
        stuck, lines, stale = self._verdict()
        stopped = self._stopped_here(stale)
        self.printer(
            f"WATCHDOG (rank {self.rank}): {phase} of iteration {iteration} has taken {self.elapsed_s():.1f} s "
            f"(limit {self.limit_s():.1f} s"
            + (f", recent median step {median:.2f} s" if median is not None else "") + "); stuck rank(s): "
            + ", ".join(map(str, stuck)) + "\n  " + "\n  ".join(lines) + self._ending_note(stopped)
            + f"\nExiting with code {EXIT_HANG}; relaunch to resume from the latest checkpoint "
            "(see docs/RELIABILITY.md)")
        self._end(stopped)
        self.exit_fn(EXIT_HANG)

    def describe_failure(self, error: BaseException, wait_s: float = 6.0) -> str:
        """A collective failed: name the ranks that stopped answering (waits until their heartbeat is stale).
        Stopped ranks on this node are ended (SIGKILL) once the message is built: the caller prints it and exits."""
        with self._lock:
            phase, iteration = self.phase_name, self.iteration
        stuck, lines, stale = self._verdict()
        deadline = time.time() + wait_s
        while time.time() < deadline and (not lines or stuck == sorted(range(self.world_size))) \
                and self.store is not None:
            time.sleep(self.period_s)
            stuck, lines, stale = self._verdict()
        stopped = self._stopped_here(stale)
        self._pending_end = stopped
        return (f"rank {self.rank}: a collective failed during {phase} of iteration {iteration} "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); rank(s) not "
                "answering: " + ", ".join(map(str, stuck)) + "\n  " + "\n  ".join(lines) + self._ending_note(stopped)
                + "\nRelaunch to resume from the latest checkpoint (see docs/RELIABILITY.md)")

    def end_stopped_ranks(self) -> None:
        """After the caller printed describe_failure's message: end the stopped ranks it named on this node."""
        pending, self._pending_end = self._pending_end, {}
        self._end(pending)


class _TrackedBatches:
    """An iterator of micro-batches that tells the watchdog when a step waits for data and when it computes."""

    def __init__(self, batches, watchdog: Watchdog):
        self.batches, self.watchdog = batches, watchdog

    def __iter__(self):
        return self

    def __next__(self):
        self.watchdog.phase("data")
        batch = next(self.batches)
        self.watchdog.phase("forward")
        return batch


def track_batches(batches, watchdog: Watchdog):
    return _TrackedBatches(batches, watchdog)


def instrument_engine(engine, watchdog: Watchdog) -> None:
    """Report the forward / backward / optimizer phases of DeepSpeed's engine to the watchdog. Checked against
    DeepSpeed 0.19.8: DeepSpeedEngine.backward and .step (wrapped on the instance), and PipelineEngine's
    class-level _INSTRUCTION_MAP, which its train_batch schedule looks up on the instance (copied, wrapped)."""

    def wrap(fn, phase):
        def wrapped(*args, **kwargs):
            watchdog.phase(phase)
            return fn(*args, **kwargs)
        return wrapped

    from megatron import deepspeed_compat as compat

    phases = {"LoadMicroBatch": "data", "ForwardPass": "forward", "BackwardPass": "backward",
              "OptimizerStep": "optimizer"}
    if compat.wrap_pipeline_instructions(engine, lambda fn, name: wrap(fn, phases[name]) if name in phases else fn):
        return
    for method, phase in (("backward", "backward"), ("step", "optimizer")):
        engine.__dict__[method] = wrap(getattr(engine, method), phase)


class CollectiveFailure(MegatronError, RuntimeError):
    """A collective failed because a rank stopped answering; the message names the rank(s). Whoever reports it
    calls `after_report()` once the message is out, then exits (EXIT_HANG): stopped ranks on this node are ended
    then (Watchdog.end_stopped_ranks)."""

    exit_code = EXIT_HANG

    def __init__(self, message: str, after_report: Callable[[], None] = lambda: None):
        super().__init__(message)
        self.after_report = after_report


def is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out",
                                   "timed out", "Broken pipe", "ProcessGroupGloo", "NCCL communicator",
                                   "Socket Timeout", "Connection refused"))
