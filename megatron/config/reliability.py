"""Fault handling: timeouts, the hang watchdog, exit signals, NaN checks, checkpoint verification and retention.

The flags live here, in one block, so `config/arguments.py` only calls `add_reliability_arguments(parser)`
and `reliability_from_args(ns)`. Flag names are Megatron's where Megatron has the feature.
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass
from typing import Optional

from megatron.config.argtypes import non_negative_int, pos_float, pos_int

EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class ReliabilityConfig:
    distributed_timeout_minutes: float = 10.0  # Megatron's default; every process group gets it
    exit_signals: tuple = ("SIGTERM", "SIGUSR1")  # what --exit-signal-handler catches
    check_for_nan_in_loss_and_grad: bool = True
    max_consecutive_nan_steps: int = 5  # then save the last good state and stop
    hang_watchdog_factor: float = 20.0  # a step this many times the recent median ...
    hang_watchdog_min_seconds: float = 300.0  # ... and at least this long is a hang
    exit_on_missing_checkpoint: bool = False
    no_checkpoint_fallback: bool = False  # a newest checkpoint that does not verify is an error
    keep_last_n_checkpoints: Optional[int] = None
    io_retries: int = 3  # transient read errors (EIO, ESTALE, EAGAIN) are retried this often

    def signal_numbers(self) -> tuple:
        return tuple(getattr(signal, name) for name in self.exit_signals)


def _signal_list(text: str) -> tuple:
    names = tuple(n.strip().upper() for n in text.split(",") if n.strip())
    names = tuple(n if n.startswith("SIG") else "SIG" + n for n in names)
    bad = [n for n in names if n not in EXIT_SIGNALS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(EXIT_SIGNALS)}")
    return names


def add_reliability_arguments(parser: argparse.ArgumentParser) -> None:
    d = ReliabilityConfig()
    g = parser.add_argument_group("fault handling (see docs/RELIABILITY.md)")
    g.add_argument("--distributed-timeout-minutes", type=pos_float, default=d.distributed_timeout_minutes,
                   help="a collective that waits longer than this fails (every process group, ours and "
                        "DeepSpeed's); the job then exits naming the ranks that stopped answering")
    g.add_argument("--exit-signal", type=_signal_list, default=",".join(d.exit_signals), dest="exit_signals",
                   help="with --exit-signal-handler: the signals that mean save-and-exit (comma-separated; "
                        "PBS and Slurm send SIGTERM or a configured SIGUSR1 before the kill)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="do not check each step's loss and grad norm for NaN/Inf")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_true", default=True, help="(the default) skip a step whose loss or grad norm "
                   "is NaN/Inf, and stop after --max-consecutive-nan-steps of them")
    g.add_argument("--max-consecutive-nan-steps", type=pos_int, default=d.max_consecutive_nan_steps,
                   help="after this many consecutive NaN/Inf steps, save the last good state and stop")
    g.add_argument("--hang-watchdog-factor", type=pos_float, default=d.hang_watchdog_factor,
                   help="a step longer than this times the recent median (and --hang-watchdog-min-seconds) "
                        "is a hang: every rank's last phase is printed and the job exits")
    g.add_argument("--hang-watchdog-min-seconds", type=pos_float, default=d.hang_watchdog_min_seconds)
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: no checkpoint there (or none that verifies) is an error instead of a "
                        "start from scratch (or a fall back to an older checkpoint)")
    g.add_argument("--no-checkpoint-fallback", action="store_true",
                   help="with --load: a newest checkpoint that fails verification is an error, not a fall back "
                        "to the newest one that verifies")
    g.add_argument("--keep-last-n-checkpoints", type=pos_int,
                   help="after each save keep only the newest N checkpoints (never the only verified one)")
    g.add_argument("--checkpoint-io-retries", type=non_negative_int, default=d.io_retries, dest="io_retries",
                   help="retries (with doubling waits) of a checkpoint or data read failing with EIO/ESTALE/EAGAIN")


def reliability_from_args(ns: argparse.Namespace) -> ReliabilityConfig:
    signals = ns.exit_signals if isinstance(ns.exit_signals, tuple) else _signal_list(ns.exit_signals)
    return ReliabilityConfig(
        distributed_timeout_minutes=ns.distributed_timeout_minutes, exit_signals=signals,
        check_for_nan_in_loss_and_grad=ns.check_for_nan_in_loss_and_grad,
        max_consecutive_nan_steps=ns.max_consecutive_nan_steps, hang_watchdog_factor=ns.hang_watchdog_factor,
        hang_watchdog_min_seconds=ns.hang_watchdog_min_seconds,
        exit_on_missing_checkpoint=ns.exit_on_missing_checkpoint, no_checkpoint_fallback=ns.no_checkpoint_fallback,
        keep_last_n_checkpoints=ns.keep_last_n_checkpoints, io_retries=ns.io_retries)
