"""--log-optimizer-states-to-tensorboard: norms and extremes of Adam's moments and of the weights, whole model.

Upstream's names (training_log.py): optimizer/{variance,variance_sqrt,momentum,weight}_{l2,l1,abs_max}, where
variance is Adam's exp_avg_sq, momentum its exp_avg and weight the parameters the optimizer updates (the fp32
master copy under bf16/fp16). Each rank adds up what its optimizer holds: a ZeRO partition (summed over the
data-parallel × Ulysses group), a tensor-parallel shard (summed over tp) and a pipeline stage (summed over pp).
As upstream, parameters replicated over tp (norms, some biases) are counted once per tp rank. Optimizers without
Adam moments (SGD, Lion...) report the weights only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_KINDS = ("variance", "variance_sqrt", "momentum", "weight")


def base_optimizer(optimizer):
    """The torch optimizer holding the state: DeepSpeed's ZeRO / BF16 / FP16 wrappers keep it as `.optimizer`."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 4:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def optimizer_state_stats(engine, ps, device: torch.device) -> dict[str, float]:
    """The scalars (collective over the model's groups: every rank calls it)."""
    opt = base_optimizer(engine.optimizer)
    sums = torch.zeros(2 * len(_KINDS), dtype=torch.float64, device=device)  # l2 squared, l1 per kind
    maxima = torch.zeros(len(_KINDS), dtype=torch.float64, device=device)
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state.get(param, {})
            tensors = {"weight": param.detach()}
            if "exp_avg_sq" in state:
                tensors["variance"] = state["exp_avg_sq"]
                tensors["variance_sqrt"] = state["exp_avg_sq"].sqrt()
            if "exp_avg" in state:
                tensors["momentum"] = state["exp_avg"]
            for i, kind in enumerate(_KINDS):
                t = tensors.get(kind)
                if t is None or t.numel() == 0:
                    continue
                t = t.detach().double()
                sums[2 * i] += t.pow(2).sum()
                sums[2 * i + 1] += t.abs().sum()
                maxima[i] = torch.maximum(maxima[i], t.abs().max())
    if dist.is_initialized():
        partitioned = engine.zero_optimization_stage() >= 1 or type(engine.optimizer).__name__ == "BF16_Optimizer"
        groups = ([ps.groups["sdp"]] if partitioned and ps.dp_size * ps.sp_size > 1 else []) \
            + ([ps.tp_group] if ps.tp_size > 1 else []) + ([ps.pp_group] if ps.pp_size > 1 else [])
        for g in groups:
            dist.all_reduce(sums, group=g)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=g)
    out = {}
    for i, kind in enumerate(_KINDS):
        out[f"optimizer/{kind}_l2"] = float(sums[2 * i].sqrt())
        out[f"optimizer/{kind}_l1"] = float(sums[2 * i + 1])
        out[f"optimizer/{kind}_abs_max"] = float(maxima[i])
    return out
