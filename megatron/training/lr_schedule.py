"""Learning-rate schedules with Megatron's semantics: warmup, then constant, linear, cosine, inverse-square-root
or wsd (warmup-stable-decay) down to --min-lr; one object the loop hands to `deepspeed.initialize(lr_scheduler=)`.

Steps count optimizer updates (or samples when the batch ramps up: then `increment` is the batch size). At
step n the lr is, with W warmup steps and D decay steps (Megatron-LM's OptimizerParamScheduler):
    n <= W (W > 0):  max_lr · n / W                 (so the very first update uses lr 0, as in Megatron)
    n > D:           min_lr                          (constant: max_lr for ever)
    otherwise r = (n - W) / (D - W) and lr = min_lr + c · (max_lr - min_lr) with c = 1 - r (linear),
    (1 + cos(π r)) / 2 (cosine); inverse-square-root: max(min_lr, max_lr · sqrt(max(W,1) / max(n,1)));
    wsd: c = 1 until the last S = fraction · D steps, then over those S steps linear 1 - s/S,
    cosine (1 + cos(π s/S)) / 2 or exponential 2 · 0.5^(s/S) - 1.
state_dict()/load_state_dict() carry the step and the schedule's shape, so a resume continues exactly.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron.config.arguments import (
    LR_DECAY_STYLES, WSD_DECAY_STYLES, ConfigError, RunConfig, global_batch_size_at, train_iters, train_samples,
)

_STATE_KEYS = ("num_steps", "max_lr", "min_lr", "decay_style", "decay_steps", "warmup_steps", "wsd_decay_steps",
               "wsd_decay_style", "increment")


class LRSchedule:
    """Sets every param group's lr to `lr_at(num_steps)` × the group's optional "lr_mult"."""

    def __init__(self, optimizer, max_lr: float, min_lr: float = 0.0, decay_style: str = "cosine",
                 decay_steps: int = 1, warmup_steps: int = 0, wsd_decay_steps: Optional[int] = None,
                 wsd_decay_style: str = "linear", increment: int = 1):
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.decay_style, self.wsd_decay_style = decay_style, wsd_decay_style
        self.decay_steps, self.warmup_steps = int(decay_steps), int(warmup_steps)
        self.wsd_decay_steps = int(wsd_decay_steps) if wsd_decay_steps is not None else None
        self.increment = int(increment)
        self.num_steps = 0
        self._check()
        self._apply()

    def _check(self) -> None:
        errors = []
        if self.decay_style not in LR_DECAY_STYLES:
            errors.append(f"--lr-decay-style {self.decay_style!r} is not one of {LR_DECAY_STYLES}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            errors.append(f"--lr-wsd-decay-style {self.wsd_decay_style!r} is not one of {WSD_DECAY_STYLES}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            errors.append(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})")
        if self.decay_steps < 1:
            errors.append(f"the LR decay length must be >= 1 step (got {self.decay_steps}; see --lr-decay-iters)")
        if self.warmup_steps < 0 or (self.decay_style != "constant" and self.warmup_steps >= self.decay_steps):
            errors.append(f"LR warmup ({self.warmup_steps} steps) must be shorter than the decay "
                          f"({self.decay_steps} steps); lower --lr-warmup-iters/--lr-warmup-fraction or "
                          "raise --lr-decay-iters")
        if self.decay_style == "wsd":
            if self.wsd_decay_steps is None or not 1 <= self.wsd_decay_steps <= self.decay_steps - self.warmup_steps:
                errors.append(f"wsd cooldown of {self.wsd_decay_steps} steps must be between 1 and the "
                              f"{self.decay_steps - self.warmup_steps} steps after warmup; "
                              "change --lr-wsd-decay-fraction")
        if self.increment < 1:
            errors.append(f"the schedule increment must be >= 1 (got {self.increment})")
        if errors:
            raise ConfigError("invalid LR schedule:\n  - " + "\n  - ".join(errors))

    # ---- the formula ---------------------------------------------------------------------
    def lr_at(self, num_steps: int) -> float:
        W, D, n = self.warmup_steps, self.decay_steps, num_steps
        if W > 0 and n <= W:
            return self.max_lr * n / W
        if self.decay_style == "constant":
            return self.max_lr
        if n > D:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(W, 1) / max(n, 1)))
        ratio = (n - W) / (D - W)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # wsd
            cooldown_start = D - self.wsd_decay_steps
            if n <= cooldown_start:
                coeff = 1.0
            else:
                r = (n - cooldown_start) / self.wsd_decay_steps
                if self.wsd_decay_style == "linear":
                    coeff = 1.0 - r
                elif self.wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
                else:  # exponential: 1 at r=0, 0 at r=1
                    coeff = 2.0 * 0.5 ** r - 1.0
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    # ---- the scheduler interface (what DeepSpeed and checkpoints call) -----------------------
    def get_lr(self) -> float:
        return self.lr_at(self.num_steps)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, increment: Optional[int] = None) -> None:
        """Advance by `increment` steps (default self.increment: 1, or the global batch in samples)."""
        self.num_steps += self.increment if increment is None else int(increment)
        self._apply()

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step and the schedule's shape from a checkpoint (the checkpoint wins over the flags)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"LR scheduler state from the checkpoint lacks {missing}; "
                              "was it saved by this framework?")
        for key in _STATE_KEYS:
            setattr(self, key, state[key])
        self._check()
        self._apply()


def build_lr_scheduler(optimizer, run: RunConfig, dp_size: Optional[int] = None) -> LRSchedule:
    """The schedule the flags describe. Counts iterations, or samples with --rampup-batch-size (then the loop
    sets `schedule.increment = global_batch_size_at(...)` whenever the batch grows). `dp_size` is needed
    only when the length comes from --train-samples/--train-tokens without --global-batch-size."""
    opt = run.training.optimizer
    if dp_size is None:
        if run.training.rampup_batch_size or (run.training.global_batch_size is None
                                              and run.training.train_iters is None):
            raise ConfigError("build_lr_scheduler needs dp_size: the batch ramps up, or the run length is in "
                              "samples/tokens without --global-batch-size")
        dp_size = 1  # unused: every size below comes from --global-batch-size or --train-iters
    if run.training.rampup_batch_size:
        decay = run.args.get("lr_decay_samples") or train_samples(run, dp_size)
        warmup = run.args.get("lr_warmup_samples") or 0
        increment = global_batch_size_at(run, 0, dp_size)
    else:
        decay = opt.lr_decay_iters or train_iters(run, dp_size)
        warmup = opt.lr_warmup_iters
        increment = 1
    if opt.lr_warmup_fraction is not None:
        warmup = int(opt.lr_warmup_fraction * decay)
    wsd_steps = None
    if opt.lr_decay_style == "wsd":  # the cooldown never reaches back into the warmup
        wsd_steps = min(max(1, round(opt.lr_wsd_decay_fraction * decay)), decay - warmup)
    return LRSchedule(optimizer, max_lr=opt.lr, min_lr=opt.min_lr, decay_style=opt.lr_decay_style,
                      decay_steps=decay, warmup_steps=warmup, wsd_decay_steps=wsd_steps,
                      wsd_decay_style=opt.lr_wsd_decay_style, increment=increment)


class _NoParams:
    """Stands in for the optimizer when only the schedule's settings are checked."""

    param_groups: list = []


def check_lr_schedule(run: RunConfig, dp_size: Optional[int] = None) -> None:
    """Raise the ConfigError `build_lr_scheduler` would raise, without an optimizer: lets the loop refuse a bad
    schedule (e.g. warmup >= decay) before it builds the model."""
    build_lr_scheduler(_NoParams(), run, dp_size)
