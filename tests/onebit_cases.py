"""Run targets for tests/test_onebit_lamb.py (spawned gloo ranks): OnebitLamb stepped on fixed tensors, and
trainings through the engine with a small freeze_step that count DeepSpeed's gradient all-reduces."""

from __future__ import annotations

import io

import torch

SHAPES = [(5, 3), (7,)]  # 22 elements: the flat momentum is padded to 32 at dp=2
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, freeze_step=2, max_coeff=0.3,
             min_coeff=0.01, coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)


def initial_weights() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def local_grads(step: int, rank: int) -> list:
    """The gradients rank `rank` computes at step `step` (1-based): different on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _optimizer(weights):
    from megatron.optimizer.onebit_lamb import OnebitLamb

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    return params, OnebitLamb([{"params": params}], **HYPER)


def _step(opt, params, step: int, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    for p, g in zip(params, local_grads(step, rank)):
        p.grad = g.clone()
    if opt.needs_gradient_allreduce():  # what the engine's backward all-reduce does in the warmup stage
        for p in params:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
    opt.step()


def step_fixed_tensors(rank: int, world_size: int, steps: int, save_after: list) -> dict:
    """`steps` steps from initial_weights(); the weights after each; and for each k in save_after the final
    weights of a run that saved after step k, rebuilt a fresh optimizer from the saved state and continued."""
    params, opt = _optimizer(initial_weights())
    history, saved = [], {}
    for step in range(1, steps + 1):
        _step(opt, params, step, rank, world_size)
        history.append([p.detach().clone() for p in params])
        if step in save_after:
            buffer = io.BytesIO()
            torch.save({"weights": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}, buffer)
            saved[step] = buffer.getvalue()
    resumed = {}
    for step, blob in saved.items():
        state = torch.load(io.BytesIO(blob), weights_only=False)
        params2, opt2 = _optimizer(state["weights"])
        opt2.load_state_dict(state["optimizer"])
        for later in range(step + 1, steps + 1):
            _step(opt2, params2, later, rank, world_size)
        resumed[step] = [p.detach().clone() for p in params2]
    # tensors travel back as torch.save bytes (shared-memory tensors would not outlive the rank's process)
    buffer = io.BytesIO()
    torch.save({"history": history, "resumed": resumed, "worker_error": opt.worker_error}, buffer)
    return buffer.getvalue()


def train_counting_allreduces(rank: int, world_size: int, cases: list, freeze_step: int) -> dict:
    """optimizer_cases.train_logged with 1-bit LAMB's freeze_step set, plus when DeepSpeed's engine
    all-reduced the gradients in each case
    ("allreduce_steps": the optimizer steps, counted from 0, whose gradients DeepSpeed all-reduced)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import megatron.optimizer as mo
    import optimizer_cases as oc

    mo.ONEBIT_LAMB_DEFAULTS = {**mo.ONEBIT_LAMB_DEFAULTS, "freeze_step": freeze_step}
    steps = []
    real = DeepSpeedEngine.allreduce_gradients

    def counting(self, *args, **kwargs):
        steps.append(self.global_steps)  # optimizer steps completed before this all-reduce
        return real(self, *args, **kwargs)

    DeepSpeedEngine.allreduce_gradients = counting
    out = {}
    for name, argv in cases:
        steps.clear()
        out[name] = oc.train_logged(rank, world_size, [(name, argv)])[name]
        out[name]["allreduce_steps"] = sorted(set(steps))
    return out


def dp2_checks(rank: int, world_size: int, steps: int, save_after: list, cases: list, freeze_step: int) -> dict:
    """step_fixed_tensors and train_counting_allreduces in one launch (spawning ranks costs more than both)."""
    return {"fixed": step_fixed_tensors(rank, world_size, steps, save_after),
            "trainings": train_counting_allreduces(rank, world_size, cases, freeze_step)}
