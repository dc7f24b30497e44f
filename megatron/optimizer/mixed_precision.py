"""bf16 / fp16 (and ZeRO-2) for the whole-matrix optimizers: fp32 master weights per whole matrix, gradients
reduced by this package, dynamic loss scaling; used by FullMatrixOptimizer (full_matrix.py).

Which design, and why. DeepSpeed's mixed-precision optimizers cannot be given whole matrices:
  - with ZeRO-0, `--bf16` makes DeepSpeed wrap the optimizer in its FP16_Optimizer (DDP_BFLOAT16) and `--fp16` in
    FP16_Optimizer too: one flat fp32 copy of all parameters per param group, stepped as one tensor;
  - its BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation) and the ZeRO-1/2 optimizers flatten each group
    and cut the flat buffer into dp-equal partitions at arbitrary offsets (`round_robin`/alignment padding
    included); making them cut at parameter boundaries would mean replacing their private partitioning code
    (`_partition_base_optimizer_state`, the flat-buffer views, the checkpoint layout) on every DeepSpeed upgrade,
    and their `step` would still hand our optimizer flat fp32 views, not [rows, cols] matrices gathered over tp.
So this package owns the masters beside DeepSpeed's stage-0 engine: DeepSpeed is told "fp32, ZeRO-0" (its config
gets no bf16/fp16 section: `deepspeed_precision`), the model is cast to bf16 / fp16 before `deepspeed.initialize`,
DeepSpeed's own dp all-reduce is switched off, and at each optimizer step:

  1. the 16-bit gradients are reduced over the sp × dp group by whole parameters, in the parameters' dtype or,
     with --accumulate-allreduce-grads-in-fp32, in fp32: ZeRO-1 (and 0) all-reduce them (one collective over
     all of them, flattened); ZeRO-2 reduces each owner's parameters to that owner only (one reduce per owner)
     and the other ranks free them;
  2. each owner builds its fp32 gradient of the whole matrix (the tp shards all-gathered, full_matrix.py) and
     divides it by the loss scale (fp16);
  3. the global gradient norm is summed (in fp64, `global_norm`) over the owned gradients, each parameter
     counted once: a whole (gathered) tensor on tp rank 0 only, since every tp rank holds the same copy; a
     tp shard that is not gathered (an elementwise optimizer's embedding or split bias) on every tp rank; the
     tied embedding's copy on the last pipeline stage nowhere (FullMatrixOptimizer._counted), then all-reduced
     over sp × dp and tp × pp;
  4. a non-finite norm (fp16 overflow, or a NaN/Inf anywhere) skips the step: nothing is updated, the loss scale
     goes down (DeepSpeed's DynamicLossScaler, upstream's --loss-scale-window / --hysteresis / --min-loss-scale),
     `overflow` tells DeepSpeed's engine, which counts the skip and does not step the LR schedule;
  5. the gradients are clipped by --clip-grad (DeepSpeed's coefficient, clip / (norm + 1e-6)), the library
     optimizer steps the fp32 masters, and each owner writes its shard of the master, cast to the 16-bit dtype,
     into its parameter; the owners' parameters are all-gathered over the dp group (one collective per dtype).
The fp32 masters live on their owners only (1/dp of them at ZeRO-1/2), with the optimizer state.

Gradient accumulation over micro-batches happens in the parameters' .grad (16-bit) as in DeepSpeed's bf16
ZeRO-0 engine; with --accumulate-allreduce-grads-in-fp32 a hook moves each micro-batch's gradient into an fp32
`main_grad` (`accumulate_in_fp32`), the tied embedding's sum over the pipeline stages (pp > 1) runs on those
(`sum_tied`, in place of DeepSpeed's bf16 one), and the dp reduction and everything after it run in fp32.
ZeRO-2 here partitions the reduced gradients and the fp32 master gradients, not the 16-bit gradients during
backward: the reduction runs at the accumulation boundary (no bucketing inside backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class GradientPlan:
    """How FullMatrixOptimizer reduces, checks, scales and clips gradients itself (DeepSpeed's reduction is off).

    group / size: the sp × dp group the gradients are reduced over (None / 1: one replica); divisor: what their
    sum is divided by (dp: DeepSpeed averages over dp, the sp ranks' token-loss shares add up);
    partition: ZeRO-2 (reduce to the owner only); reduce_dtype: the dtype of the reduction;
    norm_group: the tp × pp group the squared norms are summed over (None: one model-parallel rank);
    clip_grad: 0 = no clipping; scaler: DeepSpeed's loss
    scaler (fp16), None otherwise; half: the parameters' dtype (torch.float32 for fp32 ZeRO-2)."""

    group: object = None
    size: int = 1
    divisor: int = 1
    partition: bool = False
    reduce_dtype: torch.dtype = torch.float32
    norm_group: object = None
    clip_grad: float = 0.0
    scaler: object = None
    half: torch.dtype = torch.float32
    accumulate_fp32: bool = False  # --accumulate-allreduce-grads-in-fp32: micro-batch sums in fp32 (main_grad)
    tied: list = field(default_factory=list)  # [(weight, group)] tied over pipeline stages, summed here (fp32)


def accumulate_in_fp32(params: list) -> list:
    """--accumulate-allreduce-grads-in-fp32: after autograd accumulates a micro-batch's 16-bit gradient into
    .grad, add it to an fp32 `main_grad` and free .grad, so the sum over micro-batches is fp32 (Megatron's
    main_grad). With --tiled-mlp the MLP weights' hook fires once per tile inside one backward and adds each
    tile's gradient the same way (tests/test_fp32_grad_accumulation.py). The tied embedding under pp > 1 too:
    DeepSpeed's pipeline engine then finds its .grad None and skips its bf16 sum over the stages
    (deepspeed_compat.tied_weights_and_groups), which `sum_tied` does in fp32. Returns the hook handles."""
    def hook(param):
        if param.grad is None:
            return
        if getattr(param, "main_grad", None) is None:
            param.main_grad = param.grad.detach().float()
        else:
            param.main_grad.add_(param.grad.detach())
        param.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]


def sum_tied(tied: list) -> None:
    """Sum each pipeline-tied weight's fp32 main_grad over the stages that share it (the embedding on the first
    and the last stage), as DeepSpeed's ReduceTiedGrads does with .grad in the weight's dtype; both stages then
    hold the full gradient. A stage without one this step adds zeros."""
    for weight, group in tied:
        if getattr(weight, "main_grad", None) is None:
            weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if weight.grad is not None:  # a gradient that arrived after the hook ran (none in DeepSpeed's schedule)
            weight.main_grad.add_(weight.grad.detach())
            weight.grad = None
        dist.all_reduce(weight.main_grad, group=group)


def loss_scaler(precision):
    """upstream's fp16 scaling as DeepSpeed runs it: --loss-scale fixes the scale; without it the scale starts at
    --initial-loss-scale, halves on an overflow once --hysteresis overflows have been seen, doubles after
    --loss-scale-window steps without one, and never falls below --min-loss-scale (DeepSpeed's
    DynamicLossScaler, which its fp16 config section builds from the same values)."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    dynamic = not precision.loss_scale
    args = dict(init_scale=precision.initial_loss_scale, scale_window=precision.loss_scale_window,
                min_scale=precision.min_loss_scale, delayed_shift=precision.hysteresis, consecutive_hysteresis=False,
                raise_error_at_min_scale=True)
    return CreateLossScaler(torch.half, precision.loss_scale or 1.0, dynamic, args if dynamic else None)


def reduce_by_owner(params: list, owner: list[int], plan: GradientPlan, rank: int) -> dict[int, torch.Tensor]:
    """The dp-reduced gradient of every parameter this rank needs (id(param) -> tensor in plan.reduce_dtype):
    all of them (ZeRO-0/1: one all-reduce of every gradient, flattened into one buffer) or the owned ones
    (ZeRO-2: one reduce to each owner of its parameters' flattened gradients). A parameter without a gradient
    counts as zeros on that rank, so every rank sends the same shapes."""
    sum_tied(plan.tied)
    out: dict[int, torch.Tensor] = {}
    if plan.size == 1:
        for p in params:
            out[id(p)] = _grad(p, plan.reduce_dtype)
        return out
    buckets = [params] if not plan.partition else [[p for p, o in zip(params, owner) if o == who]
                                                   for who in range(plan.size)]
    for who, mine in enumerate(buckets):
        if not mine:
            continue
        flat = torch.cat([_grad(p, plan.reduce_dtype).reshape(-1) for p in mine])
        if plan.partition:
            dist.reduce(flat, dst=dist.get_global_rank(plan.group, who), group=plan.group)
            if who != rank:
                continue
        else:
            dist.all_reduce(flat, group=plan.group)
        if plan.divisor != 1:
            flat.div_(plan.divisor)
        offset = 0
        for p in mine:
            out[id(p)] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return out


def _grad(param, dtype: torch.dtype) -> torch.Tensor:
    main = getattr(param, "main_grad", None)
    if main is not None:
        return main.to(dtype) if param.grad is None else (main + param.grad.detach()).to(dtype)
    if param.grad is None:
        return torch.zeros(param.shape, dtype=dtype, device=param.device)
    return param.grad.detach().to(dtype)


def global_norm(grads: list[torch.Tensor], plan: GradientPlan, device, partitioned: bool) -> float:
    """The L2 norm of the whole model's gradient from the gradients this rank counts (the caller picks them: each
    parameter once over the tp × pp and sp × dp groups, see step 3); partitioned: each rank of plan.group owns
    other parameters (ZeRO-1/2), so the squares add up over it.

    The squares are summed in fp64: each layout adds them in another order (per owner, per tp shard, per
    stage), and an fp32 sum would differ by a few ulps between layouts, enough to change --clip-grad's
    coefficient in its last bit and, through Shampoo's inverse roots or a master rounding to the other side of
    a bf16 step, the training. In fp64 the order changes the sum by ~1e-16 relative, far below the fp32 result's
    resolution, so every layout clips by the same fp32 coefficient (barring a sum within 1e-16 of an fp32
    rounding boundary). MPS has no fp64: there the sum stays fp32."""
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    squares = torch.zeros((), dtype=wide, device=device)
    for g in grads:
        squares += g.to(wide).pow(2).sum()
    if partitioned and plan.size > 1:
        dist.all_reduce(squares, group=plan.group)
    if plan.norm_group is not None:
        dist.all_reduce(squares, group=plan.norm_group)
    return float(squares.sqrt().float().item())
