"""Per-phase timers of a training step, at Megatron's levels (--timing-log-level), reported Megatron's way.

    timers = Timers(level=1, option="minmax", device=device)
    with timers("optimizer", level=1):
        ...
    timers.log_lines(["forward-backward", "optimizer"], group, normalizer=10)
        -> ["(min, max) time across ranks (ms):", "    optimizer ....: (12.31, 12.90)"]

Levels (upstream's meaning): 0 reports only the iteration time (the log line's "elapsed_time_per_iteration_ms");
1 adds the phases that run once per iteration: forward-backward (all micro-batches), optimizer, batch-generator
(waiting for the data iterator) and grads-all-reduce (the data-parallel gradient reduction, read from
DeepSpeed's own timer, which needs DeepSpeed's wall_clock_breakdown); 2 adds the per-micro-batch forward-compute
and backward-compute. A timer above the level costs nothing (a shared no-op). On accelerators a timer
synchronises the device at start and stop so it measures the work, not the launch. Timers never add barriers
(upstream's --no-barrier-with-level-1-timing behaviour).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

TIMING_LOG_OPTIONS = ("max", "minmax", "all")
# (timer, level): the phases of a step the engine times (pipeline engine: forward-backward only, optimizer inside)
PHASES = [("forward-backward", 1), ("forward-compute", 2), ("backward-compute", 2), ("batch-generator", 1),
          ("grads-all-reduce", 1), ("optimizer", 1)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.total, self.started = device, 0.0, None

    def start(self) -> None:
        _synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> None:
        _synchronize(self.device)
        self.total += time.perf_counter() - self.started
        self.started = None

    def add(self, seconds: float) -> None:
        self.total += seconds

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class _NoTimer:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add(self, seconds: float) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


_NO_TIMER = _NoTimer()


class Timers:
    def __init__(self, level: int = 0, option: str = "minmax", device: Optional[torch.device] = None):
        if level not in (0, 1, 2):
            raise ValueError(f"--timing-log-level must be 0, 1 or 2 (got {level})")
        if option not in TIMING_LOG_OPTIONS:
            raise ValueError(f"--timing-log-option must be one of {TIMING_LOG_OPTIONS} (got {option!r})")
        self.level, self.option = level, option
        self.device = device or torch.device("cpu")
        self.timers: dict[str, _Timer] = {}

    def __call__(self, name: str, level: int):
        """The timer `name` when `level` <= --timing-log-level, else a no-op."""
        if level > self.level:
            return _NO_TIMER
        if name not in self.timers:
            self.timers[name] = _Timer(self.device)
        return self.timers[name]

    def elapsed_ms(self, reset: bool = True) -> dict[str, float]:
        """Milliseconds accumulated by each timer since the last reset."""
        out = {name: 1000.0 * timer.total for name, timer in self.timers.items()}
        if reset:
            for timer in self.timers.values():
                timer.total = 0.0
        return out

    def names(self) -> list[str]:
        """The timers of this level, in report order (the same list on every rank)."""
        return [name for name, level in PHASES if level <= self.level]

    def gather(self, group=None, normalizer: float = 1.0, reset: bool = True) -> dict[str, list[float]]:
        """Each timer's ms per `normalizer` on every rank of `group` (collective when distributed); timers
        that measured nothing on any rank are left out."""
        local = self.elapsed_ms(reset)
        names = self.names()
        values = torch.tensor([local.get(n, 0.0) / normalizer for n in names], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and names:
            world = dist.get_world_size(group)
            gathered = [torch.zeros_like(values) for _ in range(world)]
            dist.all_gather(gathered, values, group=group)
            per_rank = torch.stack(gathered)
        else:
            per_rank = values.unsqueeze(0)
        return {name: per_rank[:, i].tolist() for i, name in enumerate(names) if any(per_rank[:, i].tolist())}

    def log_lines(self, gathered: dict[str, list[float]]) -> list[str]:
        """Megatron's report of gathered timers, by --timing-log-option."""
        if not gathered:
            return []
        if self.option == "max":
            lines = ["max time across ranks (ms):"]
            lines += [f"    {name} {'.' * max(1, 48 - len(name))}: {max(v):.2f}" for name, v in gathered.items()]
        elif self.option == "minmax":
            lines = ["(min, max) time across ranks (ms):"]
            lines += [f"    {name} {'.' * max(1, 48 - len(name))}: ({min(v):.2f}, {max(v):.2f})"
                      for name, v in gathered.items()]
        else:
            lines = ["times across ranks (ms):"]
            for name, v in gathered.items():
                lines.append(f"  {name}:")
                lines += [f"     rank {rank:2d}: {ms:.2f}" for rank, ms in enumerate(v)]
        return lines
