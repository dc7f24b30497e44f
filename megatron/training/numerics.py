"""--check-for-nan-in-loss-and-grad: a step whose loss or gradient norm is NaN/Inf is skipped, not applied.

What skips the step depends on the optimizer DeepSpeed runs:
- ZeRO 1/2/3 and the bf16 optimizer find a non-finite gradient norm themselves (their "overflow" check)
  and skip the update and the LR step; DeepSpeed counts it in engine.skipped_steps.
- A whole-matrix optimizer in bf16/fp16 or at ZeRO-2 (megatron/optimizer/mixed_precision.py) checks the global
  gradient norm in its own step and skips the same way (its `overflow`; fp16's loss scale goes down).
- A plain torch optimizer (no ZeRO, fp32) has no such check: `guard_plain_optimizer` wraps its step so
  that a non-finite gradient on any rank (all-reduced over the world, so every rank decides alike) skips
  the update the same way (optimizer.overflow = True, which DeepSpeed's engine reads after step()).
`NanCheck.after_step` then reports the bad step (iteration, what was non-finite, the rank that prints)
and counts consecutive ones; after `max_consecutive` the loop stops and saves. Since no bad step was
applied, that checkpoint holds the last good weights and optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

EXIT_NUMERICAL = 4  # stopped after too many consecutive NaN/Inf steps (docs/RELIABILITY.md)


def _finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


def guard_plain_optimizer(optimizer, device: torch.device) -> bool:
    """Wrap a plain torch optimizer's step to skip non-finite gradients; False when DeepSpeed's optimizer
    already checks them (it has an `overflow` attribute) or it is not a torch optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "overflow"):
        return False
    original = optimizer.step

    def step(*args, **kwargs):
        bad = torch.zeros((), dtype=torch.float32, device=device)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad.fill_(1.0)
                    break
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        optimizer.overflow = bool(bad.item())
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return original(*args, **kwargs)

    optimizer.step = step
    optimizer.overflow = False
    return True


@dataclass
class NanCheck:
    enabled: bool
    max_consecutive: int
    rank: int
    printer: Callable[[str], None]
    fp16: bool = False  # fp16: an Inf grad norm is the loss scaler's business (it skips and lowers the scale)
    consecutive: int = 0
    total: int = 0

    def after_step(self, iteration: int, loss: float, grad_norm: Optional[float], skipped: bool) -> Optional[str]:
        """Report a non-finite step; the reason to stop after `max_consecutive` of them in a row (else None)."""
        if not self.enabled:
            return None
        if self.fp16:
            grad_norm = None
        if _finite(loss) and _finite(grad_norm):
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.total += 1
        what = ", ".join(f"{name} {value}" for name, value in (("lm loss", loss), ("grad norm", grad_norm))
                         if not _finite(value))
        action = "the update was skipped" if skipped else "WARNING: the optimizer applied it"
        self.printer(f"rank {self.rank}: iteration {iteration}: {what} (--check-for-nan-in-loss-and-grad); "
                     f"{action} ({self.consecutive} in a row, at most {self.max_consecutive})")
        if self.consecutive >= self.max_consecutive:
            return (f"{self.consecutive} consecutive steps with a NaN/Inf loss or grad norm (last at iteration "
                    f"{iteration}); the saved state is the last good one. Lower the LR or check the data of "
                    "these iterations, then relaunch (--max-consecutive-nan-steps sets the limit)")
        return None
