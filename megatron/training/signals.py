"""When to stop training early: SIGTERM (--exit-signal-handler), wall-clock (--exit-duration-in-mins), --exit-interval.

A signal handler only sets a flag; the loop asks `ExitConditions.check(...)` once per step and every
rank gets the same answer (a MAX all-reduce of the local flags), so all ranks save and stop together.

Whichever process gets the signal (the launcher, which forwards it; the whole process group, as PBS and
Slurm send it at walltime; or one rank), the run saves and exits 0. The handler is installed before any
DataLoader worker is forked, so workers inherit it; in a worker (another pid) it does nothing, so the
workers outlive the signal and the rank shuts them down itself when it finishes.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


class SignalFlag:
    """Records that one of `signals` arrived; restores the previous handlers on `restore()`."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict = {}
        self._owner = os.getpid()

    def install(self) -> "SignalFlag":
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # runs between bytecodes of the main thread: keep it tiny
        if os.getpid() == self._owner:  # a forked DataLoader worker ignores it: its rank decides
            self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def job_start_time(local_start: float, device: torch.device) -> float:
    """The job's start for --exit-duration-in-mins: the earliest rank's (a MIN all-reduce in float64, as
    upstream's pretrain() does with _TRAIN_START_TIME). Collective when torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local_start
    start = torch.tensor([local_start], dtype=torch.float64, device=device)
    dist.all_reduce(start, op=dist.ReduceOp.MIN)
    return float(start.item())


@dataclass
class ExitDecision:
    should_exit: bool
    reason: str = ""


@dataclass
class ExitConditions:
    """The three early-exit rules of Megatron, agreed on by every rank.

    `check(iteration)` is collective when `group_size > 1` (an all-reduce over the world).
    """

    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    start_time: float = field(default_factory=time.time)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    flag: Optional[SignalFlag] = None
    signals: tuple = (signal.SIGTERM,)
    _installed_here: bool = False

    def __post_init__(self):
        if self.exit_interval is not None and self.exit_interval <= 0:
            raise ValueError(f"--exit-interval must be positive (got {self.exit_interval})")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ValueError(f"--exit-duration-in-mins must be positive (got {self.exit_duration_in_mins})")

    def install(self) -> "ExitConditions":
        """Catch the exit signals from now on (before DataLoader workers start); `restore()` undoes it."""
        if self.exit_signal_handler and self.flag is None:
            self.flag = SignalFlag(self.signals).install()
        return self

    def restore(self) -> None:
        if self.flag is not None:
            self.flag.restore()
            self.flag = None

    def __enter__(self) -> "ExitConditions":
        self._installed_here = self.exit_signal_handler and self.flag is None
        return self.install()

    def __exit__(self, *exc) -> None:
        if self._installed_here:  # installed by install(): its owner restores it
            self.restore()

    def _needs_collective(self) -> bool:
        # The interval rule is the same on every rank; signals and the clock are not.
        return self.exit_signal_handler or self.exit_duration_in_mins is not None

    def check(self, iteration: int) -> ExitDecision:
        if self._needs_collective():
            signal_seen = float(self.flag is not None and self.flag.received is not None)
            elapsed_min = (time.time() - self.start_time) / 60.0
            over_time = float(self.exit_duration_in_mins is not None and elapsed_min > self.exit_duration_in_mins)
            local = torch.tensor([signal_seen, over_time], dtype=torch.float32, device=self.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(local, op=dist.ReduceOp.MAX)
            if local[0].item() > 0:
                mine = self.flag.received if self.flag is not None else None
                name = signal.Signals(mine).name if mine else "on another rank"
                return ExitDecision(True, f"exit signal received ({name}, --exit-signal-handler)")
            if local[1].item() > 0:
                return ExitDecision(True, f"--exit-duration-in-mins {self.exit_duration_in_mins} reached")
        if self.exit_interval is not None and iteration % self.exit_interval == 0:
            return ExitDecision(True, f"--exit-interval {self.exit_interval} reached at iteration {iteration}")
        return ExitDecision(False)
