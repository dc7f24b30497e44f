"""SophiaG as upstream (argonne-lcf/Megatron-DeepSpeed) runs it: Liu et al.'s clipped update, hessian never refreshed.

Why our own: no package on PyPI ships SophiaG (pytorch_optimizer has SophiaH, the Hutchinson variant, which
needs a second backward pass with create_graph that DeepSpeed's engine does not offer). Upstream copies
Liu et al.'s class, whose step is

    m = b1 m + (1 - b1) g
    w = w (1 - lr · wd)
    w = w - lr · sign(m) · min(|m| / (rho · bs · h + 1e-15), 1)

with h an EMA of Gauss-Newton-Bartlett hessian estimates that only `update_hessian()` refreshes, from a
backward pass on labels sampled from the model. Upstream's training loop never calls it, so h stays 0 and
the step is w -= lr · sign(m) · min(|m| · 1e15, 1) with decoupled weight decay (a clipped sign-momentum
step). That is what `--optimizer sophiag` means to upstream runs, so it is what runs here, with
--sophiag-beta1 as b1 (--sophiag-beta2 and --sophiag-rho act only through h; they are recorded in the state
so a resume under other values is visible). It is elementwise, hence exact under any tp / pp / dp / ZeRO
layout.
"""

from __future__ import annotations

import torch


class SophiaG(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04, weight_decay: float = 0.1):
        if lr < 0 or rho < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid SophiaG settings: lr={lr}, betas={betas}, rho={rho}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SophiaG.step takes no closure")
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.mul_(1 - lr * group["weight_decay"])
                ratio = (state["exp_avg"].abs() / 1e-15).clamp_(max=1.0)
                p.addcmul_(state["exp_avg"].sign(), ratio, value=-lr)
        return None
