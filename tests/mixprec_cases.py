"""Run targets for tests/test_mixed_precision.py: the whole-matrix optimizers in bf16 (megatron/optimizer/
mixed_precision.py) trained inside spawned gloo ranks, plus, on one rank, the optimizer's own overflow skip, loss
scaling and clipping driven directly (fp16 does not train on CPU, so its scaler is checked here)."""

from __future__ import annotations

import optimizer_cases as oc

NAMES = ["muon", "muonclip", "dshampooadamw", "galoreadamw", "adam8bit"]


def train_with_units(rank: int, world_size: int, cases: list, units: bool = False) -> dict:
    """oc.train_logged's results; with units, also {"units": overflow_and_scaling()} (after the trainings, which
    set up DeepSpeed's communication that its loss scaler logs through)."""
    out = oc.train_logged(rank, world_size, cases)
    if units:
        out["units"] = overflow_and_scaling()
    return out


def _step(optimizer, weight, grad) -> dict:
    """One optimizer step with `grad` as the backward of the scaled loss would leave it; what happened."""
    import torch

    before = weight.detach().clone()
    scale = optimizer.cur_scale
    weight.grad = (grad * scale).to(weight.dtype)
    optimizer.step()
    return {"before": before.float(), "scale_used": scale, "scale_after": optimizer.cur_scale,
            "overflow": optimizer.overflow, "changed": bool((weight.detach() != before).any()), "norm": optimizer.last_grad_norm,
            "master": optimizer._copies[id(weight)].clone(), "weight": weight.detach().clone(),
            "grad16": (grad * scale).to(weight.dtype).float() / scale if torch.isfinite(grad).all() else None}


def overflow_and_scaling() -> dict:
    """fp16 (on CPU only copies and adds touch the fp16 tensor) with upstream's scaler flags, SGD on the fp32
    master: good, inf, inf, good, good, good gradients; bf16 with a NaN gradient; clipping by --clip-grad."""
    import torch

    from megatron.config.training import PrecisionConfig
    from megatron.optimizer.full_matrix import FullMatrixOptimizer
    from megatron.optimizer.mixed_precision import GradientPlan, loss_scaler

    def sgd(groups):
        return torch.optim.SGD(groups, lr=0.1)

    def build(dtype, scaler=None, clip=0.0):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(8, 8).to(dtype))
        plan = GradientPlan(scaler=scaler, half=dtype, clip_grad=clip)
        return weight, FullMatrixOptimizer([{"params": [weight]}], lambda p: True, sgd, sgd, gradients=plan)

    good, inf = torch.full((8, 8), 0.01), torch.full((8, 8), 0.01)
    inf[3, 4] = float("inf")
    precision = PrecisionConfig(fp16=True, initial_loss_scale=256.0, loss_scale_window=2, hysteresis=2,
                                min_loss_scale=1.0)
    weight, optimizer = build(torch.float16, loss_scaler(precision))
    fp16 = [_step(optimizer, weight, g) for g in (good, inf, inf, good, good, good)]
    nan = good.clone()
    nan[0, 0] = float("nan")
    weight, optimizer = build(torch.bfloat16)
    bf16 = [_step(optimizer, weight, g) for g in (nan, good)]
    big = torch.full((8, 8), 1.0)  # norm 8: clipped to 1 by --clip-grad 1
    weight, optimizer = build(torch.bfloat16, clip=1.0)
    return _plain({"fp16": fp16, "bf16": bf16, "clipped": _step(optimizer, weight, big)})


def _plain(value):
    """Tensors as nested lists (the result crosses a process boundary after the rank exits)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value
