"""Learning-rate and weight-decay schedules with Megatron-DeepSpeed's semantics (argonne-lcf's
OptimizerParamScheduler); one object the loop hands to `deepspeed.initialize(lr_scheduler=)`.

Steps count optimizer updates (or samples when the batch ramps up: then `increment` is the batch size);
tokens count what the run consumed (`tokens_per_step` per update, set by the loop). A schedule runs on
one axis: steps, or tokens when --lr-decay-tokens is given. On that axis, with warmup end W, decay end D
and position n:
    n <= W (W > 0):  max_lr · n / W                 (so the very first update uses lr 0, as in Megatron)
    constant:        max_lr; with --lr_constant_plus_cooldown the last C = frac · D of [W, D] cools down
                     as min_lr + (max_lr - min_lr) · (1 - sqrt(s / C)), and min_lr after D
    n > D:           min_lr
    inverse-square-root: max(min_lr, max_lr · sqrt(max(W,1) / max(n,1)))
    infinite-cosine / infinite-inv-square-root (never reach a hard end; for continual pretraining):
                     cooldown over K = --lr-cooldown-fraction · D (or --lr-cooldown-tokens) from max_lr to
                     --constant-lr (cosine, or max_lr - Δ · f(s/K)/f(1) with f(t) = 1/sqrt(1 + timescale · t) - 1),
                     then --constant-lr for P = --lr-constant-fraction · D (or --lr-constant-tokens), then an
                     exponential decay from --constant-lr reaching min_lr at D
    otherwise r = (n - W) / (D - W) and lr = min_lr + c · (max_lr - min_lr) with c = 1 - r (linear),
    (1 + cos(π r)) / 2 (cosine); wsd: c = 1 until the last S = fraction · D steps, then over those S
    steps linear 1 - s/S, cosine (1 + cos(π s/S)) / 2 or exponential 2 · 0.5^(s/S) - 1.
Weight decay (--weight-decay-incr-style linear/cosine) goes from --start-weight-decay to
--end-weight-decay over the run's steps; each group's decay is that times its "wd_mult".

Resume (Megatron's rules): the checkpoint's step and tokens always continue. The schedule's shape (max/min
LR, warmup, decay length and style, ...) comes from the flags with --override-opt_param-scheduler, from
the checkpoint with --use-checkpoint-opt_param-scheduler, and otherwise must be the same in both: a
difference is an error naming both values.

Warmup by --lr-warmup-fraction f is f × the decay length, not rounded (upstream's get_optimizer_param_scheduler:
0.05 × 50 iterations is a warmup of 2.5, so the third update runs at lr = max_lr · 2 / 2.5). Versions of ours
before the state recorded "warmup_rounding" rounded it down to whole steps (2 here). Their checkpoints hold a whole
warmup and no "warmup_rounding"; such a state is read as "floor": the check compares it with the flags' schedule
as those versions built it (warmup ⌊f × decay⌋, and the wsd cooldown capped by that warmup), and the resumed run
keeps the checkpoint's warmup, so it continues the schedule it started with and its later checkpoints say "floor".
"""

from __future__ import annotations

import math
from typing import Optional

from megatron.config.arguments import (
    LR_DECAY_STYLES, WSD_DECAY_STYLES, ConfigError, RunConfig, global_batch_size_at, train_iters, train_samples,
)

# The shape: compared on resume. (state key, what the user changes it with)
_SHAPE = {
    "max_lr": "--lr", "min_lr": "--min-lr", "decay_style": "--lr-decay-style",
    "decay_steps": "--lr-decay-iters/--lr-decay-samples (default: the run length)",
    "warmup_steps": "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction",
    "wsd_decay_steps": "--lr-wsd-decay-fraction", "wsd_decay_style": "--lr-wsd-decay-style",
    "decay_tokens": "--lr-decay-tokens", "warmup_tokens": "--lr-warmup-tokens",
    "constant_plus_cooldown_steps": "--lr_constant_plus_cooldown/--lr_constant_plus_cooldown_frac",
    "constant_lr": "--constant-lr", "constant_steps": "--lr-constant-fraction/--lr-constant-tokens",
    "cooldown_steps": "--lr-cooldown-fraction/--lr-cooldown-tokens", "timescale": "--timescale",
    "start_wd": "--start-weight-decay", "end_wd": "--end-weight-decay", "wd_incr_style": "--weight-decay-incr-style",
    "wd_incr_steps": "the run length (weight-decay increments)",
}
_PROGRESS = ("num_steps", "num_tokens", "increment", "warmup_end_tokens")
_REQUIRED = ("num_steps", "max_lr", "min_lr", "decay_style", "decay_steps", "warmup_steps", "wsd_decay_steps",
             "wsd_decay_style", "increment")  # present in every checkpoint this framework wrote
RESUME_POLICIES = ("check", "override", "checkpoint")
WARMUP_ROUNDINGS = ("none", "floor")  # the warmup as the flags give it (upstream's), or rounded down (older ours)


class LRSchedule:
    """Sets every param group's lr to `lr_at(...)` × the group's optional "lr_mult" (and, with a weight-decay
    increment style, its weight_decay to `wd_at(...)` × "wd_mult")."""

    def __init__(self, optimizer, max_lr: float, min_lr: float = 0.0, decay_style: str = "cosine",
                 decay_steps: int = 1, warmup_steps: int = 0, wsd_decay_steps: Optional[int] = None,
                 wsd_decay_style: str = "linear", increment: int = 1, *, tokens_per_step: int = 0,
                 decay_tokens: Optional[int] = None, warmup_tokens: Optional[int] = None,
                 constant_plus_cooldown_steps: Optional[float] = None, constant_lr: float = 0.0,
                 constant_steps: Optional[float] = None, cooldown_steps: Optional[float] = None,
                 timescale: float = 10.0, start_wd: Optional[float] = None, end_wd: Optional[float] = None,
                 wd_incr_style: str = "constant", wd_incr_steps: int = 1, on_resume: str = "check",
                 warmup_rounding: str = "none", floor_shape: Optional[dict] = None):
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.decay_style, self.wsd_decay_style = decay_style, wsd_decay_style
        self.decay_steps, self.warmup_steps = int(decay_steps), _whole_or_float(warmup_steps)
        self.wsd_decay_steps = int(wsd_decay_steps) if wsd_decay_steps is not None else None
        self.increment = int(increment)
        self.tokens_per_step = int(tokens_per_step)
        self.decay_tokens, self.warmup_tokens = decay_tokens, warmup_tokens
        self.constant_plus_cooldown_steps = constant_plus_cooldown_steps
        self.constant_lr, self.constant_steps, self.cooldown_steps = float(constant_lr), constant_steps, cooldown_steps
        self.timescale = float(timescale)
        self.start_wd, self.end_wd, self.wd_incr_style = start_wd, end_wd, wd_incr_style
        self.wd_incr_steps = int(wd_incr_steps)
        if on_resume not in RESUME_POLICIES:
            raise ValueError(f"on_resume must be one of {RESUME_POLICIES}, got {on_resume!r}")
        self.on_resume = on_resume
        if warmup_rounding not in WARMUP_ROUNDINGS:
            raise ValueError(f"warmup_rounding must be one of {WARMUP_ROUNDINGS}, got {warmup_rounding!r}")
        self.warmup_rounding = warmup_rounding
        # the shape settings as versions that rounded the warmup down built them from the same flags (module doc)
        self.floor_shape = {"warmup_steps": math.floor(self.warmup_steps), **(floor_shape or {})}
        self.num_steps, self.num_tokens = 0, 0
        self.warmup_end_tokens: Optional[int] = None  # step warmup + token decay: tokens when warmup ended
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
        if self.warmup_steps < 0 or (self.decay_style != "constant" and self.decay_tokens is None
                                     and self.warmup_steps >= self.decay_steps):
            errors.append(f"LR warmup ({self.warmup_steps} steps) must be shorter than the decay "
                          f"({self.decay_steps} steps); lower --lr-warmup-iters/--lr-warmup-fraction or "
                          "raise --lr-decay-iters")
        if self.decay_tokens is not None and (self.warmup_tokens or 0) >= self.decay_tokens:
            errors.append(f"--lr-warmup-tokens ({self.warmup_tokens}) must be below --lr-decay-tokens "
                          f"({self.decay_tokens})")
        if self.decay_style == "wsd":
            if self.wsd_decay_steps is None or not 1 <= self.wsd_decay_steps <= self.decay_steps - self.warmup_steps:
                errors.append(f"wsd cooldown of {self.wsd_decay_steps} steps must be between 1 and the "
                              f"{self.decay_steps - self.warmup_steps} steps after warmup; "
                              "change --lr-wsd-decay-fraction")
            if self.decay_tokens is not None:
                errors.append("--lr-decay-style wsd counts steps: drop --lr-decay-tokens")
        if self.decay_style.startswith("infinite-"):
            start, end = self._window()
            if self.constant_steps is None or self.cooldown_steps is None:
                errors.append(f"--lr-decay-style {self.decay_style} needs its cooldown and constant lengths")
            elif start + self.cooldown_steps + self.constant_steps >= end:
                errors.append(f"--lr-decay-style {self.decay_style}: warmup ({start}) + cooldown "
                              f"({self.cooldown_steps}) + constant ({self.constant_steps}) must be shorter than the "
                              f"decay length ({end}); lower --lr-cooldown-fraction/--lr-constant-fraction (or "
                              "their -tokens)")
            if not 0.0 < self.min_lr < self.constant_lr <= self.max_lr:
                errors.append(f"--lr-decay-style {self.decay_style} needs 0 < --min-lr ({self.min_lr}) < "
                              f"--constant-lr ({self.constant_lr}) <= --lr ({self.max_lr})")
        if self.constant_plus_cooldown_steps is not None and self.constant_plus_cooldown_steps <= 0:
            errors.append("--lr_constant_plus_cooldown_frac gives an empty cooldown; raise it")
        if self.wd_incr_style != "constant" and (self.start_wd is None or self.end_wd is None):
            errors.append(f"--weight-decay-incr-style {self.wd_incr_style} needs --start-weight-decay and "
                          "--end-weight-decay")
        if self.increment < 1:
            errors.append(f"the schedule increment must be >= 1 (got {self.increment})")
        if errors:
            raise ConfigError("invalid LR schedule:\n  - " + "\n  - ".join(errors))

    # ---- the formulas --------------------------------------------------------------------------
    def _window(self) -> tuple:
        """(warmup end, decay end) on the schedule's axis (steps, or tokens with --lr-decay-tokens)."""
        if self.decay_tokens is None:
            return self.warmup_steps, self.decay_steps
        warmup = self.warmup_tokens if self.warmup_tokens is not None else (self.warmup_end_tokens or 0)
        return warmup, self.decay_tokens

    def lr_at(self, num_steps: int, num_tokens: int = 0) -> float:
        W, D, n = self.warmup_steps, self.decay_steps, num_steps
        if self.warmup_tokens is not None:
            if self.warmup_tokens > 0 and num_tokens <= self.warmup_tokens:
                return self.max_lr * num_tokens / self.warmup_tokens
        elif W > 0 and n <= W:
            return self.max_lr * n / W
        start, end = self._window()
        pos = n if self.decay_tokens is None else num_tokens
        if self.decay_style == "constant":
            if self.constant_plus_cooldown_steps is None:
                return self.max_lr
            done, total = pos - start, end - start
            if done >= total:
                return self.min_lr
            cooldown = self.constant_plus_cooldown_steps
            if done < total - cooldown:
                return self.max_lr
            ratio = min(1.0, max(0.0, (done - (total - cooldown)) / cooldown))
            return self.min_lr + (self.max_lr - self.min_lr) * (1.0 - math.sqrt(ratio))
        if pos > end:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(start, 1) / max(pos, 1)))
        if self.decay_style.startswith("infinite-"):
            return max(self.min_lr, self._infinite(pos - start, end - start))
        ratio = (pos - start) / (end - start)
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

    def _infinite(self, done: float, total: float) -> float:
        delta = self.max_lr - self.constant_lr
        cooldown, constant = self.cooldown_steps, self.constant_steps
        if done <= cooldown:
            r = done / cooldown
            if self.decay_style == "infinite-cosine":
                return self.constant_lr + delta * 0.5 * (math.cos(math.pi * r) + 1.0)

            def f(t):
                return 1.0 / math.sqrt(1.0 + self.timescale * t) - 1.0

            return self.max_lr - delta * f(r) / f(1.0)
        done -= cooldown
        if done <= constant:
            return self.constant_lr
        tail = total - cooldown - constant  # exponential from constant_lr to min_lr over the rest
        return self.constant_lr * math.exp(math.log(self.min_lr / self.constant_lr) * (done - constant) / tail)

    def wd_at(self, num_steps: int) -> Optional[float]:
        """The weight decay at `num_steps`, or None when it is constant (the groups keep theirs)."""
        if self.wd_incr_style == "constant":
            return None
        if num_steps > self.wd_incr_steps:
            return self.end_wd
        ratio = num_steps / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    # ---- the scheduler interface (what DeepSpeed and checkpoints call) -----------------------
    def get_lr(self) -> float:
        return self.lr_at(self.num_steps, self.num_tokens)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, increment: Optional[int] = None) -> None:
        """Advance by `increment` steps (default self.increment: 1, or the global batch in samples)."""
        self.num_steps += self.increment if increment is None else int(increment)
        self.num_tokens += self.tokens_per_step
        if (self.decay_tokens is not None and self.warmup_tokens is None and self.warmup_end_tokens is None
                and self.num_steps >= self.warmup_steps):
            self.warmup_end_tokens = self.num_tokens  # upstream: step warmup, then token decay from here
        self._apply()

    def _apply(self) -> None:
        lr = self.get_lr()
        wd = self.wd_at(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            if wd is not None:
                group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def apply(self) -> None:
        """Set every param group's lr (and weight decay) for the current position again: after a checkpoint
        load put back the param groups of the step it was saved at."""
        self._apply()

    def differences(self, state: dict) -> list[str]:
        """How the checkpoint's schedule `state` differs from this one's shape, one line per setting; a state whose
        warmup was rounded down is compared with this shape rounded the same way (module doc)."""
        mine = {key: getattr(self, key) for key in _SHAPE}
        if saved_warmup_rounding(state) == "floor" and self.warmup_rounding == "none":
            mine.update(self.floor_shape)
        return [f"{_SHAPE[k]}: the flags give {mine[k]!r}, the checkpoint has {state[k]!r}"
                for k in _SHAPE if k in state and not _same(mine[k], state[k])]

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in (*_PROGRESS, *_SHAPE, "warmup_rounding")}

    def load_state_dict(self, state: dict) -> None:
        """Continue the checkpoint's step; take its shape, keep the flags', or check they agree (see module doc)."""
        missing = [k for k in _REQUIRED if k not in state]
        if missing:
            raise ConfigError(f"LR scheduler state from the checkpoint lacks {missing}; "
                              "was it saved by this framework?")
        if self.on_resume == "check":
            differ = self.differences(state)
            if differ:
                raise ConfigError(
                    "the LR schedule of the flags differs from the checkpoint's:\n  - " + "\n  - ".join(differ)
                    + "\ngive --override-opt_param-scheduler to use the flags' schedule, or "
                    "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
        keys = _PROGRESS if self.on_resume == "override" else (*_PROGRESS, *_SHAPE)
        for key in keys:
            if key in state and not (key == "increment" and self.on_resume == "override"):
                setattr(self, key, state[key])
        if self.on_resume != "override":  # the checkpoint's warmup, and how it was rounded, continue
            self.warmup_rounding = saved_warmup_rounding(state)
        self._check()
        self._apply()


def saved_warmup_rounding(state: dict) -> str:
    """How a saved schedule's warmup was rounded: as it records, or, in a state from before the record, "floor"
    when the warmup is a whole number (the older versions' int(f × decay)) and "none" when it is not (upstream's
    scheduler, read through megatron/checkpoint/argonne.py)."""
    if "warmup_rounding" in state:
        return state["warmup_rounding"]
    warmup = state.get("warmup_steps")
    return "floor" if warmup is not None and float(warmup).is_integer() else "none"


def _whole_or_float(value):
    value = float(value)
    return int(value) if value.is_integer() else value


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def build_lr_scheduler(optimizer, run: RunConfig, dp_size: Optional[int] = None) -> LRSchedule:
    """The schedule the flags describe. Counts iterations, or samples with --rampup-batch-size (then the loop
    sets `schedule.increment = global_batch_size_at(...)` whenever the batch grows). `dp_size` is needed
    only when the length comes from --train-samples/--train-tokens without --global-batch-size."""
    opt = run.training.optimizer
    in_samples = opt.lr_decay_samples is not None or bool(opt.lr_warmup_samples)
    if dp_size is None:
        if run.training.rampup_batch_size or (run.training.global_batch_size is None
                                              and (run.training.train_iters is None or in_samples)):
            raise ConfigError("build_lr_scheduler needs dp_size: the batch ramps up, or the run length is in "
                              "samples/tokens without --global-batch-size")
        dp_size = 1  # unused: every size below comes from --global-batch-size or --train-iters
    if run.training.rampup_batch_size or in_samples:  # the schedule counts samples (Megatron's sample-based runs)
        decay = opt.lr_decay_samples or train_samples(run, dp_size)
        warmup = opt.lr_warmup_samples or 0
        increment = global_batch_size_at(run, 0, dp_size)
        run_length = train_samples(run, dp_size)
    else:
        decay = opt.lr_decay_iters or train_iters(run, dp_size)
        warmup = opt.lr_warmup_iters
        increment = 1
        run_length = train_iters(run, dp_size)
    if opt.lr_warmup_fraction is not None:
        warmup = opt.lr_warmup_fraction * decay  # upstream's: not rounded to whole iterations or samples
    wsd_steps = floor_wsd_steps = None
    if opt.lr_decay_style == "wsd":  # the cooldown never reaches back into the warmup
        wanted = max(1, round(opt.lr_wsd_decay_fraction * decay))
        wsd_steps = min(wanted, math.floor(decay - warmup))
        floor_wsd_steps = min(wanted, decay - math.floor(warmup))  # as versions that rounded the warmup had it
    decay_length = opt.lr_decay_tokens if opt.lr_decay_tokens is not None else decay
    constant_plus_cooldown = opt.lr_constant_plus_cooldown_frac * decay_length if opt.lr_constant_plus_cooldown \
        else None
    constant = cooldown = None
    if opt.lr_decay_style.startswith("infinite-"):
        tokens = opt.lr_decay_tokens is not None
        constant = opt.lr_constant_tokens if tokens and opt.lr_constant_tokens is not None \
            else opt.lr_constant_fraction * decay_length
        cooldown = opt.lr_cooldown_tokens if tokens and opt.lr_cooldown_tokens is not None \
            else opt.lr_cooldown_fraction * decay_length
    policy = "override" if opt.override_opt_param_scheduler else \
        "checkpoint" if opt.use_checkpoint_opt_param_scheduler else "check"
    return LRSchedule(optimizer, max_lr=opt.lr, min_lr=opt.min_lr, decay_style=opt.lr_decay_style,
                      decay_steps=decay, warmup_steps=warmup, wsd_decay_steps=wsd_steps,
                      wsd_decay_style=opt.lr_wsd_decay_style, increment=increment,
                      tokens_per_step=global_batch_size_at(run, 0, dp_size) * run.model.seq_length,
                      decay_tokens=opt.lr_decay_tokens, warmup_tokens=opt.lr_warmup_tokens,
                      constant_plus_cooldown_steps=constant_plus_cooldown, constant_lr=opt.constant_lr,
                      constant_steps=constant, cooldown_steps=cooldown, timescale=opt.timescale,
                      start_wd=opt.start_weight_decay, end_wd=opt.end_weight_decay,
                      wd_incr_style=opt.weight_decay_incr_style, wd_incr_steps=run_length, on_resume=policy,
                      floor_shape={"wsd_decay_steps": floor_wsd_steps} if floor_wsd_steps is not None else None)


class _NoParams:
    """Stands in for the optimizer when only the schedule's settings are checked."""

    param_groups: list = []


def check_lr_schedule(run: RunConfig, dp_size: Optional[int] = None) -> None:
    """Raise the ConfigError `build_lr_scheduler` would raise, without an optimizer: lets the loop refuse a bad
    schedule (e.g. warmup >= decay) before it builds the model."""
    build_lr_scheduler(_NoParams(), run, dp_size)


def schedule_differences(run: RunConfig, state: dict, dp_size: Optional[int] = None) -> list[str]:
    """How the schedule the flags describe differs from a checkpoint's saved schedule `state` (empty: the same)."""
    return build_lr_scheduler(_NoParams(), run, dp_size).differences(state)
