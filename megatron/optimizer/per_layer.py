"""Optimizer-in-backward: each parameter is stepped by its own optimizer as soon as its gradient is complete
(GaLore's "per-layer" mode, `--optimizer galoreadamw8bitperlayer`), and its gradient is freed at once.

What it saves: the model's gradients never all exist at the same time (each is dropped after its step), which
is GaLore's point on one memory-bound GPU. What it costs is everything that needs all gradients before any
update, so `optimizer_errors` refuses it with:
- data / tensor / pipeline / sequence parallelism (the step would run before DeepSpeed's gradient all-reduce,
  on this rank's gradient alone, and on tp shards instead of whole matrices);
- gradient accumulation and batch ramp-up (a hook fires at every micro-batch's backward);
- --clip-grad > 0 (clipping needs the global norm of all gradients before the first update);
- ZeRO and bf16/fp16 (DeepSpeed's optimizers own the gradients and the step there).

Each parameter's optimizer is the one `--optimizer galoreadamw8bit` uses for it (GaLoreAdamW8bit on the hidden
matrices, AdamW elsewhere), built over one parameter: GaLore's state (projector, step count, moments) is per
parameter, so stepping in backward gives the same update as stepping all parameters after backward. The LR and
weight-decay schedules act on this optimizer's groups as usual; each hook copies its group's lr and
weight_decay to the parameter's optimizer before stepping. `step()` (called by the engine after backward)
only closes the step: the updates have already happened.

A parameter whose gradient is not finite is not updated, and the step is reported as skipped (`overflow`),
but the parameters stepped before it in this backward keep their update: there is no atomic skip when the
updates run during backward. The gradient norm of the step (for the log) is summed in the hooks.
"""

from __future__ import annotations

from typing import Callable

import torch

SYNCED_KEYS = ("lr", "weight_decay")


class PerLayerOptimizer(torch.optim.Optimizer):
    """make_inner(param, group_hyper) -> the optimizer that steps `param` alone, from post-accumulate-grad hooks."""

    def __init__(self, param_groups: list[dict],
                 make_inner: Callable[[torch.nn.Parameter, dict], torch.optim.Optimizer]):
        super().__init__(param_groups, {})
        self.inner: list[torch.optim.Optimizer] = []
        self._group_of: dict[int, int] = {}
        self._handles = []
        self.overflow = False  # DeepSpeed's engine reads it after step(): this step is counted as skipped
        self._squares = None  # sum of squared gradient entries consumed by the hooks since the last step()
        self._closed = True  # step() ran: the next hook opens a new step
        for index, group in enumerate(self.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                self._group_of[id(param)] = index
                optimizer = make_inner(param, dict(hyper))
                self.inner.append(optimizer)
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(optimizer, index)))

    def _hook(self, optimizer: torch.optim.Optimizer, group_index: int):
        @torch.no_grad()
        def step_this_parameter(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if self._closed:
                self._closed, self.overflow, self._squares = False, False, None
            squares = param.grad.detach().float().pow(2).sum()
            self._squares = squares if self._squares is None else self._squares + squares
            if not torch.isfinite(squares):
                self.overflow = True
            else:
                outer = self.param_groups[group_index]
                for inner_group in optimizer.param_groups:
                    for key in SYNCED_KEYS:
                        if key in outer:
                            inner_group[key] = outer[key]
                optimizer.step()
            param.grad = None
        return step_this_parameter

    @property
    def consumed_grad_norm(self):
        """L2 norm of the gradients the hooks consumed since the last step() (None before any)."""
        return None if self._squares is None else float(self._squares.sqrt())

    @torch.no_grad()
    def step(self, closure=None):
        """Closes the step: every parameter was updated in backward."""
        if closure is not None:
            raise ValueError("PerLayerOptimizer.step takes no closure")
        self._closed = True
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.inner],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        if "per_parameter" not in state or len(state["per_parameter"]) != len(self.inner):
            raise ValueError("optimizer state was not written by the per-layer optimizer of this model "
                             f"({len(self.inner)} parameters)")
        for optimizer, saved in zip(self.inner, state["per_parameter"]):
            optimizer.load_state_dict(saved)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
