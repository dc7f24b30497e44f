"""Hang watchdog and rank heartbeats: a stuck job says which rank stopped, and where, then exits.

Every rank runs one daemon thread. Once a second it publishes this rank's heartbeat (time, phase,
iteration) in a key-value store every rank can reach (a client of the job's rendezvous TCPStore at
MASTER_ADDR:MASTER_PORT, on its own connection, so it works while the main thread is blocked in a
collective). It also watches its own rank: when the current training step has run longer than
`factor` × the median of the recent steps (and at least `min_seconds`; before 3 steps, and while saving,
evaluating or loading, the bound is the distributed timeout), it prints every rank's last phase, names
the ranks whose heartbeat stopped (SIGSTOP, a dead process or node) or that lag behind the others, and
ends the process with EXIT_HANG. A launcher then ends the other ranks; without one, each healthy rank
reaches the same verdict on its own.

`describe_failure(error)` gives the same diagnosis when a collective fails instead of hanging (gloo
notices a dead peer, or the --distributed-timeout-minutes timeout fires).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional

EXIT_HANG = 3  # a rank stopped answering: documented in docs/RELIABILITY.md
STEP_PHASES = ("data", "forward", "backward", "optimizer")
_KEY = "megatron_watchdog/heartbeat/{rank}"


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
                 period_s: float = 1.0, store=None, exit_fn: Callable[[int], None] = os._exit):
        self.rank, self.world_size = rank, world_size
        self.factor, self.min_seconds, self.timeout_s = factor, min_seconds, timeout_s
        self.printer, self.period_s, self.exit_fn = printer, period_s, exit_fn
        self.store = store
        self.durations: deque = deque(maxlen=20)
        self.phase_name, self.iteration = "startup", 0
        self.step_started = self.phase_started = time.time()
        self._stop = threading.Event()
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
        while not self._stop.wait(self.period_s):
            self._publish()
            if self.phase_name != "idle" and self.elapsed_s() > self.limit_s():
                self._report_hang()
                return

    def _publish(self) -> None:
        if self.store is None:
            return
        with self._lock:
            beat = {"t": time.time(), "phase": self.phase_name, "iteration": self.iteration,
                    "since": self.phase_started, "pid": os.getpid()}
        try:
            self.store.set(_KEY.format(rank=self.rank), json.dumps(beat))
        except (RuntimeError, OSError):
            pass  # the store's host (rank 0, or the launcher) is gone: the report will say so

    def heartbeats(self) -> Optional[dict]:
        """{rank: heartbeat dict or None} for every rank; None when the store cannot be reached."""
        if self.store is None:
            return None
        beats = {}
        for rank in range(self.world_size):
            key = _KEY.format(rank=rank)
            try:
                beats[rank] = json.loads(self.store.get(key)) if self.store.check([key]) else None
            except (RuntimeError, OSError, ValueError):
                return None
        return beats

    def diagnose(self, stale_after_s: Optional[float] = None) -> tuple[list[int], list[str]]:
        """(stuck ranks, one line per rank) from the heartbeats."""
        stale_after_s = stale_after_s or max(5.0, 5 * self.period_s)
        beats = self.heartbeats()
        now = time.time()
        if beats is None:
            return [0], ["the rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by rank 0 or the launcher) does not "
                         "answer: rank 0 or the launcher is gone"]
        with self._lock:  # this rank's own state is known first-hand, whatever its last published beat says
            beats[self.rank] = {"t": now, "phase": self.phase_name, "iteration": self.iteration,
                                "since": self.phase_started, "pid": os.getpid()}
        lines, stale = [], []
        for rank, beat in beats.items():
            if beat is None:
                lines.append(f"rank {rank}: no heartbeat ever")
                stale.append(rank)
                continue
            age = now - beat["t"]
            state = f"last heartbeat {age:.1f} s ago"
            if age > stale_after_s:
                state += " (stopped, killed, or its node is gone)"
                stale.append(rank)
            lines.append(f"rank {rank}: phase {beat['phase']} of iteration {beat['iteration']} for "
                         f"{now - beat['since']:.1f} s, {state}")
        if stale:
            return stale, lines
        # Every rank is alive: the stuck ones are those behind the others (an older iteration), else all.
        oldest = min(b["iteration"] for b in beats.values())
        behind = [r for r, b in beats.items() if b["iteration"] == oldest]
        return (behind if len(behind) < len(beats) else sorted(beats)), lines

    def _report_hang(self) -> None:
        with self._lock:
            phase, iteration = self.phase_name, self.iteration
        median = statistics.median(self.durations) if self.durations else None
        stuck, lines = self.diagnose()
        self.printer(
            f"WATCHDOG (rank {self.rank}): {phase} of iteration {iteration} has taken {self.elapsed_s():.1f} s "
            f"(limit {self.limit_s():.1f} s"
            + (f", recent median step {median:.2f} s" if median is not None else "") + "); stuck rank(s): "
            + ", ".join(map(str, stuck)) + "\n  " + "\n  ".join(lines)
            + f"\nExiting with code {EXIT_HANG}; relaunch to resume from the latest checkpoint "
            "(see docs/RELIABILITY.md)")
        self.exit_fn(EXIT_HANG)

    def describe_failure(self, error: BaseException, wait_s: float = 6.0) -> str:
        """A collective failed: name the ranks that stopped answering (waits until their heartbeat is stale)."""
        with self._lock:
            phase, iteration = self.phase_name, self.iteration
        stuck, lines = self.diagnose()
        deadline = time.time() + wait_s
        while time.time() < deadline and (not lines or stuck == sorted(range(self.world_size))) \
                and self.store is not None:
            time.sleep(self.period_s)
            stuck, lines = self.diagnose()
        return (f"rank {self.rank}: a collective failed during {phase} of iteration {iteration} "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); rank(s) not "
                "answering: " + ", ".join(map(str, stuck)) + "\n  " + "\n  ".join(lines)
                + "\nRelaunch to resume from the latest checkpoint (see docs/RELIABILITY.md)")


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

    instructions = getattr(type(engine), "_INSTRUCTION_MAP", None)
    if isinstance(instructions, dict):
        phases = {"LoadMicroBatch": "data", "ForwardPass": "forward", "BackwardPass": "backward",
                  "OptimizerStep": "optimizer"}
        engine.__dict__["_INSTRUCTION_MAP"] = {
            cmd: wrap(fn, phases[cmd.__name__]) if cmd.__name__ in phases else fn for cmd, fn in instructions.items()}
        return
    for method, phase in (("backward", "backward"), ("step", "optimizer")):
        engine.__dict__[method] = wrap(getattr(engine, method), phase)


class CollectiveFailure(RuntimeError):
    """A collective failed because a rank stopped answering; the message names the rank(s)."""


def is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out",
                                   "timed out", "Broken pipe", "ProcessGroupGloo", "NCCL communicator",
                                   "Socket Timeout", "Connection refused"))
