"""Upstream's run-control flags around the step loop: iterations to skip, the kill-switch file, and torch.profiler.

- `--train-iters-to-skip N ...` and `--train-range-to-skip A B [C D ...]` (iterations as the log line numbers
  them, ranges inclusive): the step's micro-batches are read from the data iterator and the LR schedule
  advances, but nothing is computed or updated; DeepSpeed counts the step as skipped (upstream's semantics).
- `--kill-switch-file PATH`: checked after every iteration (on every rank, the verdict all-reduced so all ranks
  agree); when the file exists the run saves (with --save) and exits.
- `--profile pt|pt-full --profile_steps A,B --profile-ranks R ... --trace-dir DIR`: torch.profiler records
  steps A..B of this launch (1-based) on the chosen ranks (default all) and writes a Chrome trace
  DIR/torch-trace-RANK-of-WORLD-stepsA-B.json; pt-full adds Python stacks and tensor shapes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


class IterationSkipper:
    def __init__(self, iters: Optional[list] = None, ranges: Optional[list] = None):
        self.iters = {int(i) for i in (iters or [])}
        ranges = list(ranges or [])
        self.ranges = list(zip(ranges[::2], ranges[1::2]))

    def __bool__(self) -> bool:
        return bool(self.iters or self.ranges)

    def skips(self, iteration: int) -> bool:
        return iteration in self.iters or any(a <= iteration <= b for a, b in self.ranges)


def kill_switch_found(path: Optional[str], device: torch.device) -> bool:
    """Whether `path` exists on any rank (collective when distributed)."""
    if not path:
        return False
    found = torch.tensor([1 if os.path.exists(path) else 0], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())


class StepProfiler:
    """torch.profiler over steps [start, end] of this launch on the selected ranks; a no-op elsewhere."""

    def __init__(self, mode: Optional[str], steps: str, ranks: Optional[list], trace_dir: str, rank: int,
                 world_size: int, device: torch.device):
        self.active = bool(mode) and (not ranks or rank in ranks)
        self.start, self.end = (int(x) for x in steps.split(","))
        self.mode, self.trace_dir, self.rank, self.world_size = mode, trace_dir, rank, world_size
        self.device, self.profiler, self.step = device, None, 0
        self.path: Optional[str] = None

    def before_step(self) -> None:
        self.step += 1
        if self.active and self.step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            elif self.device.type == "xpu" and hasattr(torch.profiler.ProfilerActivity, "XPU"):
                activities.append(torch.profiler.ProfilerActivity.XPU)
            full = self.mode == "pt-full"
            self.profiler = torch.profiler.profile(activities=activities, with_stack=full, record_shapes=full)
            self.profiler.__enter__()

    def after_step(self) -> None:
        if self.profiler is not None and self.step == self.end:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the profiled steps)."""
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        os.makedirs(self.trace_dir, exist_ok=True)
        self.path = os.path.join(self.trace_dir, f"torch-trace-{self.rank}-of-{self.world_size}-steps"
                                                 f"{self.start}-{min(self.step, self.end)}.json")
        self.profiler.export_chrome_trace(self.path)
        self.profiler = None
