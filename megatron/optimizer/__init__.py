"""What each `--optimizer` name runs, on which layouts, and the one function that builds it.

Upstream (argonne-lcf/Megatron-DeepSpeed) offers 19 names. Each maps here to a well-kept implementation
where one is right, or to a module of this package where none is (the module says why):

    adam                   torch.optim.Adam, L2 weight decay (as upstream)        elementwise
    adamw, apex.adam       torch.optim.AdamW (apex FusedAdam is AdamW-mode)      elementwise
    sgd, apex.sgd          torch.optim.SGD                                        elementwise
    adamwschedulefree      schedulefree.AdamWScheduleFree                         elementwise, eval weights (ZeRO 0-2)
    sgdschedulefree        schedulefree.SGDScheduleFree                           elementwise, eval weights (ZeRO 0-2)
    adopt                  pytorch_optimizer.ADOPT                                elementwise
    sophiag                sophia.SophiaG (upstream's update rule)                elementwise
    ds.fusedlamb           lamb.Lamb, DeepSpeed FusedLamb's trust-ratio bounds    per-tensor norms (tp, dp all-reduce)
    ipex.lamb/fusedlamb    lamb.Lamb (IPEX's LAMB without bounds)                 per-tensor norms (tp, dp all-reduce)
    muon                   torch.optim.Muon on hidden matrices + AdamW on the rest, full matrices (tp gather,
                                                                                  ZeRO-1/2 by whole parameters,
                                                                                  bf16/fp16 with fp32 masters)
    muonclip               muon + per-head QK-clip (muon_clip.py)                 as muon
    galoreadamw            galore_torch.GaLoreAdamW on hidden matrices             as muon
    adam8bit               bitsandbytes Adam8bit (CPU and CUDA) on every          whole tensors (as muon)
                           parameter
    galoreadamw8bit        galore_torch.GaLoreAdamW8bit on hidden matrices        as muon
                           (CUDA only)
    galoreadamw8bitperlayer  galoreadamw8bit stepped per parameter in backward   one rank, no accumulation,
                           (per_layer.py; CUDA only)                              no clipping, fp32
    dshampooadamw          pytorch_optimizer.ScalableShampoo, RMSProp grafting     as muon
    ds.onebitlamb          onebit_lamb.OnebitLamb (DeepSpeed's is gone from the   whole tensors: fp32, ZeRO-0, any tp
                           pinned DeepSpeed): LAMB, then 1-bit compressed         / pp, no Ulysses, no clipping;
                           momentum averaging with error feedback                 averages the dp momentum itself

Elementwise optimizers are layout-free: any tp / pp / dp / ZeRO stage gives the single-rank step (the
schedule-free ones at ZeRO 0-2: their eval/train switch refreshes the model from ZeRO's partitions). The
others need whole tensors: they run with the parameters themselves (fp32; DeepSpeed's ZeRO and bf16/fp16
optimizers hand the optimizer flat buffers cut at arbitrary offsets, and full_matrix.py says why DeepSpeed's
own ZeRO Muon is no substitute), tensor-parallel shards are gathered into the single-rank tensors, and
--zero-stage 1/2 partition their state by whole parameters over DeepSpeed's stage 0 (full_matrix.py,
`deepspeed_zero_stage`); in bf16/fp16 (and at ZeRO-2) they keep fp32 masters and reduce, scale and clip the
gradients themselves (mixed_precision.py, `owns_gradients`); ZeRO-3 is refused (ZERO3_REASON). The 8-bit ones are among them: blockwise quantisation depends on the whole flat
tensor. LAMB only needs per-tensor norms: it sums them over its fragments of ZeRO-1/2 / bf16 partitions and
over tp (lamb.py), so it runs at any stage but 3. What cannot be made exact is refused by `optimizer_errors`,
naming the flags.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.config.optimizer_args import OPTIMIZER_CHOICES

ELEMENTWISE = ("adam", "adamw", "apex.adam", "sgd", "apex.sgd", "adamwschedulefree", "sgdschedulefree",
               "adopt", "sophiag")
# 8-bit state (bitsandbytes) is quantised in blocks of each tensor's flat elements: a tp shard or a ZeRO
# partition has other blocks than the whole tensor, so these run on the single-rank tensors (full_matrix.py)
EIGHT_BIT = ("adam8bit", "galoreadamw8bit")
# whole matrices (or whole tensors): tp shards gathered, ZeRO-1/2 partition them by whole parameters, bf16/fp16 keep
# fp32 masters (full_matrix.py, mixed_precision.py), DeepSpeed runs stage 0
WHOLE_MATRIX = ("muon", "muonclip", "galoreadamw", "dshampooadamw") + EIGHT_BIT
WHOLE_TENSOR = ("ds.fusedlamb", "ipex.lamb", "ipex.fusedlamb") + WHOLE_MATRIX
SCHEDULE_FREE = ("adamwschedulefree", "sgdschedulefree")
LAMB = ("ds.fusedlamb", "ipex.lamb", "ipex.fusedlamb")  # whole-tensor norms, also over ZeRO-1/2 / bf16 partitions


_logged: set = set()


def log_once(message: str) -> None:
    """Print `message` once per process (on rank 0 of the world when torch.distributed is up)."""
    if message in _logged:
        return
    _logged.add(message)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, flush=True)


def optimizer_errors(run, device_type: str = "cpu", world_size: Optional[int] = None) -> list[str]:
    """Why `--optimizer` cannot run with this run's layout and precision on `device_type`; empty when it can.
    world_size: the number of ranks (default: torch.distributed's world, or 1)."""
    opt = run.training.optimizer
    name = opt.optimizer
    zero = run.training.zero
    prec = run.training.precision
    errors = []
    if name not in OPTIMIZER_CHOICES:
        return [f"--optimizer {name!r} is not one of {', '.join(OPTIMIZER_CHOICES)}"]
    if name == "ds.onebitlamb":
        return _onebitlamb_errors(run)
    if zero.cpu_optimizer and name not in ("adam", "adamw", "apex.adam"):
        errors.append(f"--cpu-optimizer steps with DeepSpeedCPUAdam; it cannot run --optimizer {name} "
                      "(use adam or adamw, or drop --cpu-optimizer)")
    if name == "galoreadamw8bitperlayer":
        errors += _per_layer_errors(run, device_type, world_size)
    elif name in EIGHT_BIT:
        if name == "galoreadamw8bit" and device_type != "cuda":
            errors.append("--optimizer galoreadamw8bit: galore_torch's 8-bit AdamW runs on CUDA only (it synchronises "
                          f"the CUDA device), not on {device_type}; use --optimizer galoreadamw")
        errors += _whole_matrix_errors(run)
    elif name in LAMB:
        if zero.zero_stage == 3:
            errors.append(f"--optimizer {name} needs whole-tensor norms, which it reads from ZeRO-1/2 and bf16 "
                          "partitions but not from ZeRO-3's; use --zero-stage 0, 1 or 2")
        if (prec.fp16 or prec.bf16) and zero.zero_stage == 0:
            errors.append(f"--optimizer {name} with --{'fp16' if prec.fp16 else 'bf16'} needs --zero-stage 1 or 2 "
                          "(it reads each tensor's place in the flat buffers from ZeRO's partitions), or fp32")
    elif name in SCHEDULE_FREE:
        if zero.zero_stage == 3:
            errors.append(f"--optimizer {name} switches the model between its train and eval weights, which at "
                          "ZeRO-1/2 is refreshed from the optimizer's fp32 partitions; ZeRO-3 partitions the "
                          "parameters themselves and has no such refresh: use --zero-stage 0, 1 or 2")
        if (prec.fp16 or prec.bf16) and zero.zero_stage == 0:
            errors.append(f"--optimizer {name} with --{'fp16' if prec.fp16 else 'bf16'} needs --zero-stage 1 or 2 "
                          "(the eval/train switch refreshes the model from ZeRO's fp32 partitions), or fp32")
    elif name in WHOLE_MATRIX:
        errors += _whole_matrix_errors(run)
    if name in SCHEDULE_FREE and opt.lr_decay_style != "constant":
        errors.append(f"--optimizer {name} replaces the LR decay by iterate averaging: use --lr-decay-style "
                      f"constant (got {opt.lr_decay_style}); warmup comes from --lr-warmup-*")
    if opt.weight_decay_incr_style != "constant" and name in ("galoreadamw", "dshampooadamw"):
        errors.append(f"--weight-decay-incr-style {opt.weight_decay_incr_style} is not supported with "
                      f"--optimizer {name}; use constant")
    return errors


# Why --zero-stage 3 is refused for the whole-matrix optimizers, with what gathering each whole parameter for its
# update costs, measured by benchmarks/bench_zero3_gather.py (docs/OPTIMIZERS.md, benchmarks/RESULTS.md).
ZERO3_REASON = (
    "an exact update would gather each matrix's gradient and fp32-master slices to one owner and scatter the result "
    "back; measured (benchmarks/bench_zero3_gather.py, 2 gloo ranks, 16 Llama-shaped matrices of 16.8 M elements) "
    "those gathers cost about as much as ZeRO-2's reduce-to-owner (0.17 s against 0.16 s, 3% of Muon's update) and "
    "a transient 6 bytes per element of the largest matrix, so the cost is not the obstacle: the step would have to "
    "replace DeepSpeed's stage-3 optimizer, which owns the partitioned gradients and fp32 partitions, and that is "
    "not built. ZeRO-2 already keeps the fp32 masters, optimizer state and reduced gradients at 1/dp; ZeRO-3 would "
    "add only the 16-bit parameters' 2 bytes per element")


def _whole_matrix_errors(run) -> list[str]:
    """What a whole-matrix (or whole-tensor 8-bit) optimizer cannot run exactly, naming the flags."""
    name, zero, prec, par = run.training.optimizer.optimizer, run.training.zero, run.training.precision, run.parallel
    errors = []
    if zero.zero_stage == 3:
        errors.append(f"--optimizer {name} needs whole matrices, which --zero-stage 3 never holds: {ZERO3_REASON}. "
                      "Use --zero-stage 1 or 2 (optimizer state, fp32 masters and at 2 the reduced gradients "
                      "partitioned by whole parameters, megatron/optimizer/full_matrix.py), or an elementwise "
                      "optimizer (adam, adamw, sgd, adopt, sophiag, adamwschedulefree)")
    if prec.fp16 and par.pp > 1:
        errors.append(f"--optimizer {name} with --fp16 scales the loss itself before backward, which DeepSpeed's "
                      f"pipeline engine (--pipeline-model-parallel-size {par.pp}) runs inside its schedule; use "
                      "--bf16, or --pipeline-model-parallel-size 1")
    return errors


def deepspeed_zero_stage(run) -> int:
    """The ZeRO stage DeepSpeed's engine runs: --zero-stage, except that a whole-matrix optimizer at
    --zero-stage 1 or 2 partitions its state (and gradients) by whole parameters itself (full_matrix.py) over
    DeepSpeed's stage 0."""
    stage = run.training.zero.zero_stage
    return 0 if stage in (1, 2) and run.training.optimizer.optimizer in WHOLE_MATRIX else stage


def owns_gradients(run) -> bool:
    """True when the optimizer reduces, scales and clips the gradients and keeps the fp32 masters itself
    (mixed_precision.py): a whole-matrix optimizer in bf16 / fp16 or at --zero-stage 2. DeepSpeed then runs
    an fp32 stage-0 engine over the 16-bit model, with its gradient all-reduce off."""
    t = run.training
    return t.optimizer.optimizer in WHOLE_MATRIX and (t.precision.bf16 or t.precision.fp16 or t.zero.zero_stage == 2)


def model_dtype(run) -> torch.dtype:
    return torch.bfloat16 if run.training.precision.bf16 else torch.float16 if run.training.precision.fp16 \
        else torch.float32


# upstream's 1-bit LAMB settings: ALCF/helpers.sh (generateDSconfig, OPT=ds.onebitlamb) writes these into DeepSpeed's
# config; upstream has no flags for them. Its hard-coded lr 11e-3 is not taken: --lr and the LR schedule set the lr.
ONEBIT_LAMB_DEFAULTS = {"freeze_step": 1000, "max_coeff": 0.3, "min_coeff": 0.01, "coeff_beta": 0.9,
                        "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1}


def _onebitlamb_errors(run) -> list[str]:
    """What 1-bit LAMB (megatron/optimizer/onebit_lamb.py) cannot run, naming the flags."""
    zero, prec, par = run.training.zero, run.training.precision, run.parallel
    where = [f for f, bad in (
        (f"--zero-stage {zero.zero_stage} (it averages whole momentum tensors; ZeRO partitions them; DeepSpeed's "
         "own OnebitLamb refused ZeRO too: '1bit-Lamb is not compatible with ZeRO')",
         zero.zero_stage > 0),
        ("--bf16/--fp16 (DeepSpeed's mixed-precision optimizers hand it flat fp32 copies)", prec.bf16 or prec.fp16),
        ("--cpu-optimizer", zero.cpu_optimizer),
        (f"--ds-sequence-parallel-size {par.sp} (Ulysses sums gradients over its group too)", par.sp > 1),
        (f"--clip-grad {run.training.optimizer.clip_grad} (after freeze_step no rank holds the averaged gradient "
         "to clip by; pass --clip-grad 0)", bool(run.training.optimizer.clip_grad)),
    ) if bad]
    if not where:
        return []
    return [f"--optimizer ds.onebitlamb (1-bit LAMB, megatron/optimizer/onebit_lamb.py) runs in fp32 at ZeRO-0 "
            f"without Ulysses and without gradient clipping; it cannot run with " + "; ".join(where)]


def _per_layer_errors(run, device_type: str, world_size: Optional[int]) -> list[str]:
    """galoreadamw8bitperlayer steps each parameter inside backward (per_layer.py): what that rules out."""
    import torch.distributed as dist

    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    name, zero, prec, t = "--optimizer galoreadamw8bitperlayer", run.training.zero, run.training.precision, run.training
    errors = []
    if device_type != "cuda":
        errors.append(f"{name}: galore_torch's 8-bit AdamW (bitsandbytes) runs on CUDA only, not on {device_type}; "
                      "use --optimizer galoreadamw (the same GaLore update with fp32 state)")
    if world_size > 1:
        errors.append(f"{name} steps each parameter inside backward, before DeepSpeed's gradient all-reduce and on "
                      f"tensor-parallel shards: it runs on one rank only (this run has {world_size}); use "
                      "--optimizer galoreadamw8bit for several ranks")
    micro, batch = t.micro_batch_size, t.global_batch_size
    if t.rampup_batch_size or (batch is not None and batch != micro * max(1, world_size)):
        errors.append(f"{name} steps at every backward, so it cannot accumulate gradients: give --global-batch-size "
                      f"equal to --micro-batch-size ({micro}) and no --rampup-batch-size")
    if run.training.optimizer.clip_grad > 0:
        errors.append(f"{name} updates each parameter before the other gradients exist, so it cannot clip by the "
                      f"global gradient norm: give --clip-grad 0 (got {run.training.optimizer.clip_grad})")
    if zero.zero_stage > 0 or prec.bf16 or prec.fp16:
        errors.append(f"{name} needs the plain fp32 engine (DeepSpeed's ZeRO and bf16/fp16 optimizers own the "
                      "gradients and the step): use --zero-stage 0 without --bf16/--fp16")
    return errors


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's split: no weight decay on biases and norm weights (every parameter with fewer than 2 dims).

    `wd_mult` lets the weight-decay schedule (--weight-decay-incr-style) scale each group's decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(run, model: torch.nn.Module, ps=None, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `--optimizer` names, over `model`'s parameters on this rank (`ps`: the process groups,
    needed by the whole-tensor optimizers under tensor parallelism)."""
    errors = optimizer_errors(run, device_type, None if ps is None else ps.world_size)
    if errors:
        raise ValueError("cannot build the optimizer:\n  - " + "\n  - ".join(errors))
    opt = run.training.optimizer
    name = opt.optimizer
    groups = optimizer_param_groups(model, opt.weight_decay)
    betas = (opt.adam_beta1, opt.adam_beta2)
    if run.training.zero.cpu_optimizer and opt.cpu_torch_adam:  # upstream: torch's AdamW on the CPU
        return torch.optim.AdamW(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
    if opt.ds_fused_adam:
        from deepspeed.ops.adam import FusedAdam

        log_once("--ds_fused_adam: DeepSpeed's FusedAdam with decoupled weight decay (its default, as upstream "
                 "runs it), not Adam's L2 decay")
        return FusedAdam(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
    if run.training.zero.cpu_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # adamw_mode=True (DeepSpeedCPUAdam's default, as upstream builds it for --optimizer adam): decoupled
        # weight decay for adam, adamw and apex.adam alike, as --cpu_torch_adam's torch.optim.AdamW
        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay,
                                adamw_mode=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
    if name in ("adamw", "apex.adam"):
        if name == "apex.adam" and _vendor_fallback("apex", name, "torch.optim.AdamW (FusedAdam's adam_w_mode)") \
                and device_type == "cuda":
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
        return torch.optim.AdamW(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
    if name in ("sgd", "apex.sgd"):
        if name == "apex.sgd" and _vendor_fallback("apex", name, "torch.optim.SGD") and device_type == "cuda":
            from apex.optimizers import FusedSGD

            return FusedSGD(groups, lr=opt.lr, momentum=opt.sgd_momentum, weight_decay=opt.weight_decay)
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.sgd_momentum, weight_decay=opt.weight_decay)
    if name in SCHEDULE_FREE:
        from megatron.optimizer import schedule_free

        # warmup_steps=0: the LR schedule (constant style, --lr-warmup-*) does the warmup
        if name == "adamwschedulefree":
            optimizer = schedule_free.AdamWScheduleFree(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps,
                                                        weight_decay=opt.weight_decay, warmup_steps=0,
                                                        foreach=opt.schedulefree_for_each)
        else:
            optimizer = schedule_free.SGDScheduleFree(groups, lr=opt.lr, momentum=opt.sgd_momentum,
                                                      weight_decay=opt.weight_decay, warmup_steps=0,
                                                      foreach=opt.schedulefree_for_each)
        optimizer.train()
        return optimizer
    if name == "adopt":
        from pytorch_optimizer import ADOPT

        # upstream's ADOPT (the authors' code) adds the decay to the gradient (weight_decouple=False)
        return ADOPT(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay,
                     weight_decouple=False, foreach=False)
    if name == "sophiag":
        from megatron.optimizer.sophia import SophiaG

        log_once("--optimizer sophiag: upstream's update (hessian estimate never refreshed: clipped "
                 "sign-momentum steps); see megatron/optimizer/sophia.py")
        return SophiaG(groups, lr=opt.lr, betas=(opt.sophiag_beta1, opt.sophiag_beta2), rho=opt.sophiag_rho,
                       weight_decay=opt.weight_decay)
    if name == "galoreadamw8bitperlayer":
        from megatron.optimizer.per_layer import PerLayerOptimizer

        log_once("--optimizer galoreadamw8bitperlayer: each parameter steps inside backward "
                 "(megatron/optimizer/per_layer.py)")
        return PerLayerOptimizer(groups, per_layer_galore(opt, model, eight_bit=PER_LAYER_EIGHT_BIT))
    from megatron.optimizer.full_matrix import tp_arguments

    if name == "ds.onebitlamb":
        from megatron.optimizer.onebit_lamb import OnebitLamb

        hyper = ONEBIT_LAMB_DEFAULTS
        log_once(f"--optimizer ds.onebitlamb: megatron.optimizer.onebit_lamb.OnebitLamb (DeepSpeed's OnebitLamb "
                 f"is not in the pinned DeepSpeed), compressed momentum averaging after {hyper['freeze_step']} steps")
        return OnebitLamb(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay,
                          dp_group=None if ps is None else ps.dp_group,
                          **{k: v for k, v in tp_arguments(ps).items() if k != "tp_rank"},
                          own_buffer=[p for module in getattr(model, "tied_modules", {}).values()
                                      for p in module.parameters()], **hyper)
    tp = tp_arguments(ps)
    if name in ("ds.fusedlamb", "ipex.lamb", "ipex.fusedlamb"):
        from megatron.optimizer.lamb import Lamb

        bounds = {"min_coeff": 0.01, "max_coeff": 10.0} if name == "ds.fusedlamb" else {}
        vendor = "DeepSpeed FusedLamb (its CUDA kernel)" if name == "ds.fusedlamb" else "intel_extension_for_pytorch"
        log_once(f"--optimizer {name}: running megatron.optimizer.lamb.Lamb (tp-aware trust ratio) with "
                 f"{vendor}'s formula")
        return Lamb(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay,
                    tp_group=tp.get("tp_group"), tp_size=tp.get("tp_size", 1), **bounds)
    stage = run.training.zero.zero_stage
    if stage in (1, 2) and ps is not None and ps.dp_size * ps.sp_size > 1:
        import torch.distributed as dist

        what = "optimizer state" + (", fp32 masters" if owns_gradients(run) else "") + \
            (" and reduced gradients" if stage == 2 else "")
        log_once(f"--optimizer {name} --zero-stage {stage}: {what} partitioned by whole parameters over the "
                 f"{ps.dp_size * ps.sp_size} data-parallel ranks (megatron/optimizer/full_matrix.py; DeepSpeed "
                 "runs ZeRO stage 0)")
        tp = {**tp, "dp_group": ps.sdp_group, "dp_size": ps.dp_size * ps.sp_size,
              "dp_rank": dist.get_rank(ps.sdp_group)}
    if owns_gradients(run):
        tp["gradients"] = gradient_plan(run, ps)
    optimizer = _build_full_matrix(name, opt, groups, model, tp, ps)
    if optimizer.owns_gradients and optimizer.gradients.accumulate_fp32:
        from megatron.deepspeed_compat import tied_weights_and_groups
        from megatron.optimizer.mixed_precision import accumulate_in_fp32

        optimizer.gradients.tied = tied_weights_and_groups(model)  # pp > 1: summed over the stages in fp32
        optimizer.hook_handles = accumulate_in_fp32(list(model.parameters()))
    return optimizer


def gradient_plan(run, ps):
    """How the optimizer reduces, scales and clips the gradients itself (mixed_precision.py)."""
    from megatron.optimizer.mixed_precision import GradientPlan, loss_scaler

    prec, half = run.training.precision, model_dtype(run)
    fp32 = prec.accumulate_allreduce_grads_in_fp32 or half == torch.float32
    sdp = 1 if ps is None else ps.dp_size * ps.sp_size
    # The sum over sp x dp is divided by dp: each Ulysses rank's loss is its share of the sequence's token mean.
    # Under DeepSpeed's pipeline engine (pp > 1) that loss is multiplied by sp instead (model/pipeline.py, for
    # DeepSpeed's average over sp x dp), so the sum is divided by sp x dp there.
    divisor = 1 if ps is None else (sdp if ps.pp_size > 1 else ps.dp_size)
    return GradientPlan(
        group=None if sdp == 1 else ps.sdp_group, size=sdp, divisor=divisor,
        partition=run.training.zero.zero_stage == 2 and sdp > 1,
        reduce_dtype=torch.float32 if fp32 else half,
        norm_group=None if ps is None or ps.tp_size * ps.pp_size == 1 else ps.groups["mp"],
        clip_grad=float(run.training.optimizer.clip_grad or 0.0),
        scaler=loss_scaler(prec) if prec.fp16 else None, half=half,
        accumulate_fp32=bool(prec.accumulate_allreduce_grads_in_fp32) and half != torch.float32)


def _build_full_matrix(name: str, opt, groups: list[dict], model: torch.nn.Module, tp: dict, ps=None):
    """Muon / GaLore / Shampoo on the hidden matrices (gathered whole under tp), AdamW on the rest; 8-bit Adam
    on every parameter (tp-split ones gathered whole)."""
    from megatron.optimizer.full_matrix import FullMatrixOptimizer, embedding_parameter_ids, is_hidden_matrix

    if name == "adam8bit":
        import bitsandbytes as bnb

        def make_all(all_groups):
            return bnb.optim.Adam8bit(all_groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                      eps=opt.adam_eps, weight_decay=opt.weight_decay)
        return FullMatrixOptimizer(groups, lambda p: True, make_all, make_all, **tp)
    embeddings = embedding_parameter_ids(model)
    if name in ("muon", "muonclip"):
        def make_matrix(matrix_groups):
            # upstream's Muon scales the lr by 0.2 sqrt(max(A, B)) (Moonlight's "match_rms_adamw")
            return torch.optim.Muon(matrix_groups, lr=opt.lr, weight_decay=opt.weight_decay,
                                    momentum=opt.muon_momentum, nesterov=opt.muon_nesterov,
                                    ns_steps=opt.muon_ns_steps, adjust_lr_fn="match_rms_adamw")
        other_betas, other_eps = (opt.muonadamw_beta1, opt.muonadamw_beta2), opt.muonadamw_eps
    elif name in ("galoreadamw", "galoreadamw8bit"):
        def make_matrix(matrix_groups):
            import galore_torch

            for g in matrix_groups:
                g.update(GALORE_DEFAULTS)
            if name == "galoreadamw8bit":
                return galore_torch.GaLoreAdamW8bit(matrix_groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                                    eps=opt.adam_eps, weight_decay=opt.weight_decay)
            return galore_torch.GaLoreAdamW(matrix_groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                            eps=opt.adam_eps, weight_decay=opt.weight_decay,
                                            no_deprecation_warning=True)
        other_betas, other_eps = (opt.adam_beta1, opt.adam_beta2), opt.adam_eps
    else:  # dshampooadamw
        def make_matrix(matrix_groups):
            from pytorch_optimizer import ScalableShampoo
            from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

            return ScalableShampoo(
                matrix_groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), weight_decay=opt.weight_decay,
                decoupled_weight_decay=opt.dshampooadamw_use_decoupled_weight_decay,
                block_size=opt.dshampooadamw_max_preconditioner_dim,
                no_preconditioning_for_layers_with_dim_gt=max(8192, opt.dshampooadamw_max_preconditioner_dim),
                preconditioning_compute_steps=opt.dshampooadamw_precondition_freq, start_preconditioning_step=1,
                graft_type=LayerWiseGrafting.RMSPROP, matrix_eps=opt.dshampooadamw_eps, diagonal_eps=opt.adam_eps)
        other_betas, other_eps = (opt.adam_beta1, opt.adam_beta2), opt.adam_eps

    def make_other(other_groups):
        return torch.optim.AdamW(other_groups, lr=opt.lr, betas=other_betas, eps=other_eps,
                                 weight_decay=opt.weight_decay)

    if name == "muonclip":
        from megatron.optimizer.muon_clip import MuonClip, attention_modules

        sdp = {} if ps is None or ps.sp_size * ps.dp_size == 1 else {"sdp_group": ps.sdp_group,
                                                                     "sdp_size": ps.sp_size * ps.dp_size}
        return MuonClip(groups, lambda p: is_hidden_matrix(p, embeddings), make_matrix, make_other,
                        attention=attention_modules(model), threshold=opt.muonclip_t, alpha=opt.muonclip_alpha,
                        **sdp, **tp)
    return FullMatrixOptimizer(groups, lambda p: is_hidden_matrix(p, embeddings), make_matrix, make_other, **tp)


PER_LAYER_EIGHT_BIT = True  # galoreadamw8bitperlayer's matrices: GaLoreAdamW8bit (tests on CPU set False)
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}  # GaLore's published


def per_layer_galore(opt, model: torch.nn.Module, eight_bit: bool = True):
    """make_inner for PerLayerOptimizer: galoreadamw8bit's optimizer for each parameter (GaLoreAdamW8bit on
    hidden matrices, AdamW elsewhere); eight_bit=False puts GaLoreAdamW (fp32 state) on the matrices."""
    from megatron.optimizer.full_matrix import embedding_parameter_ids, is_hidden_matrix

    embeddings = embedding_parameter_ids(model)
    betas = (opt.adam_beta1, opt.adam_beta2)

    def make_inner(param: torch.nn.Parameter, hyper: dict) -> torch.optim.Optimizer:
        group = {**hyper, "params": [param]}
        if not is_hidden_matrix(param, embeddings):
            return torch.optim.AdamW([group], lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay)
        import galore_torch

        group.update(GALORE_DEFAULTS)
        if eight_bit:
            return galore_torch.GaLoreAdamW8bit([group], lr=opt.lr, betas=betas, eps=opt.adam_eps,
                                                weight_decay=opt.weight_decay)
        return galore_torch.GaLoreAdamW([group], lr=opt.lr, betas=betas, eps=opt.adam_eps,
                                        weight_decay=opt.weight_decay, no_deprecation_warning=True)
    return make_inner


def _vendor_fallback(package: str, name: str, instead: str) -> bool:
    """True when the vendor package is importable; otherwise log once that `instead` runs."""
    try:
        __import__(package)
        return True
    except ImportError:
        log_once(f"--optimizer {name}: {package} is not installed; running the equivalent {instead}")
        return False


def attach_to_engine(engine, optimizer, ps) -> None:
    """After `deepspeed.initialize`: LAMB stepping ZeRO-1/2 or bf16 flat partitions learns where each tensor's
    fragments are (the engine wrapped our optimizer; DeepSpeed's wrapper steps it on those partitions)."""
    from megatron.optimizer.lamb import Lamb, attach_deepspeed_partitions

    if isinstance(optimizer, Lamb) and engine.optimizer is not optimizer:
        attach_deepspeed_partitions(engine, optimizer, ps)
