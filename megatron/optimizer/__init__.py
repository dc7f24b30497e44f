"""What each `--optimizer` name runs, on which layouts, and the one function that builds it.

Upstream (argonne-lcf/Megatron-DeepSpeed) offers 19 names. Each maps here to a well-kept implementation
where one is right, or to a module of this package where none is (the module says why):

    adam                   torch.optim.Adam, L2 weight decay (as upstream)        elementwise
    adamw, apex.adam       torch.optim.AdamW (apex FusedAdam is AdamW-mode)      elementwise
    sgd, apex.sgd          torch.optim.SGD                                        elementwise
    adamwschedulefree      schedulefree.AdamWScheduleFree                         elementwise, eval weights
    sgdschedulefree        schedulefree.SGDScheduleFree                           elementwise, eval weights
    adopt                  pytorch_optimizer.ADOPT                                elementwise
    sophiag                sophia.SophiaG (upstream's update rule)                elementwise
    ds.fusedlamb           lamb.Lamb, DeepSpeed FusedLamb's trust-ratio bounds    per-tensor norms (tp all-reduce)
    ipex.lamb/fusedlamb    lamb.Lamb (IPEX's LAMB without bounds)                 per-tensor norms (tp all-reduce)
    muon                   torch.optim.Muon on hidden matrices + AdamW on the rest, full matrices (tp gather)
    galoreadamw            galore_torch.GaLoreAdamW on hidden matrices             full matrices (tp gather)
    dshampooadamw          pytorch_optimizer.ScalableShampoo, Adam grafting        full matrices (tp gather)

Elementwise optimizers are layout-free: any tp / pp / dp / ZeRO stage gives the single-rank step. The
others need whole tensors: they run with the parameters themselves (fp32, ZeRO stage 0; DeepSpeed's ZeRO
and bf16/fp16 optimizers hand the optimizer flat buffers cut at arbitrary offsets), and tensor-parallel
shards are gathered (full_matrix.py) or their norms all-reduced (lamb.py). What cannot be made exact is
refused by `optimizer_errors`, naming the flags.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.config.optimizer_args import OPTIMIZER_CHOICES

ELEMENTWISE = ("adam", "adamw", "apex.adam", "sgd", "apex.sgd", "adamwschedulefree", "sgdschedulefree",
               "adopt", "sophiag")
WHOLE_TENSOR = ("ds.fusedlamb", "ipex.lamb", "ipex.fusedlamb", "muon", "galoreadamw", "dshampooadamw")
SCHEDULE_FREE = ("adamwschedulefree", "sgdschedulefree")

# Names that cannot run here, with the reason and what to use instead.
UNAVAILABLE = {
    "adam8bit": "8-bit Adam (bitsandbytes) keeps blockwise-quantised state of flat buffers, which differs per "
                "layout, and needs a CUDA device; use --optimizer adam or adamw",
    "galoreadamw8bit": "GaLore's 8-bit AdamW needs bitsandbytes on a CUDA device; use --optimizer galoreadamw",
    "galoreadamw8bitperlayer": "GaLore's per-layer 8-bit AdamW steps inside backward hooks, which DeepSpeed's "
                               "engine does not allow, and needs bitsandbytes on CUDA; use --optimizer galoreadamw",
    "ds.onebitlamb": "DeepSpeed's OnebitLamb compresses the gradient all-reduce itself (a communication backend "
                     "of its own, NCCL/MPI with CUDA) and replaces the engine's data-parallel reduction; it cannot "
                     "be combined with tensor/pipeline parallelism here. Use --optimizer ds.fusedlamb (exact LAMB)",
    "muonclip": "MuonClip's QK-clip rescales Wq/Wk from the attention logits of the forward pass, which the "
                "model does not report; use --optimizer muon",
}

PENDING = set(ELEMENTWISE[5:]) | set(WHOLE_TENSOR)  # landing one by one

_logged: set = set()


def log_once(message: str) -> None:
    """Print `message` once per process (on rank 0 of the world when torch.distributed is up)."""
    if message in _logged:
        return
    _logged.add(message)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, flush=True)


def optimizer_errors(run, device_type: str = "cpu") -> list[str]:
    """Why `--optimizer` cannot run with this run's layout and precision on `device_type`; empty when it can."""
    opt = run.training.optimizer
    name = opt.optimizer
    zero = run.training.zero
    prec = run.training.precision
    errors = []
    if name not in OPTIMIZER_CHOICES:
        return [f"--optimizer {name!r} is not one of {', '.join(OPTIMIZER_CHOICES)}"]
    if name in UNAVAILABLE:
        return [f"--optimizer {name}: {UNAVAILABLE[name]}"]
    if name in PENDING:
        return [f"--optimizer {name} is not available yet in this version; use adam, adamw or sgd"]
    pending = [flag for flag, on in (
        ("--lr-decay-style " + opt.lr_decay_style, opt.lr_decay_style.startswith("infinite-")),
        ("--lr-decay-tokens/--lr-warmup-tokens", opt.lr_decay_tokens is not None or opt.lr_warmup_tokens is not None),
        ("--lr_constant_plus_cooldown", opt.lr_constant_plus_cooldown),
        ("--weight-decay-incr-style " + opt.weight_decay_incr_style, opt.weight_decay_incr_style != "constant"),
        ("--lr-finder", opt.lr_finder),
        ("--override-opt_param-scheduler", opt.override_opt_param_scheduler),
        ("--use-checkpoint-opt_param-scheduler", opt.use_checkpoint_opt_param_scheduler)) if on]
    errors += [f"{flag} is not available yet in this version" for flag in pending]
    if zero.cpu_optimizer and name not in ("adam", "adamw", "apex.adam"):
        errors.append(f"--cpu-optimizer steps with DeepSpeedCPUAdam; it cannot run --optimizer {name} "
                      "(use adam or adamw, or drop --cpu-optimizer)")
    if name in WHOLE_TENSOR or name in SCHEDULE_FREE:
        why = ("needs whole tensors" if name in WHOLE_TENSOR
               else "switches the model between its train and eval weights")
        if zero.zero_stage > 0:
            errors.append(f"--optimizer {name} {why}, but --zero-stage {zero.zero_stage} hands the optimizer flat "
                          "partitions of all parameters cut at arbitrary offsets; use --zero-stage 0 "
                          "(or an elementwise optimizer: adam, adamw, sgd, adopt, sophiag)")
        if prec.bf16 or prec.fp16:
            errors.append(f"--optimizer {name} {why}, but DeepSpeed's {'bf16' if prec.bf16 else 'fp16'} optimizer "
                          "hands it flat fp32 copies of all parameters; train in fp32 (drop --bf16/--fp16) or "
                          "use an elementwise optimizer (adam, adamw, sgd, adopt, sophiag)")
    if name in SCHEDULE_FREE and opt.lr_decay_style != "constant":
        errors.append(f"--optimizer {name} replaces the LR decay by iterate averaging: use --lr-decay-style "
                      f"constant (got {opt.lr_decay_style}); warmup comes from --lr-warmup-*")
    if name == "dshampooadamw" and run.parallel.tp > 1:
        dims = _largest_partitioned_dim(run)
        if dims > opt.dshampooadamw_max_preconditioner_dim:
            errors.append(f"--optimizer dshampooadamw blocks matrices larger than "
                          f"--dshampooadamw-max-preconditioner-dim {opt.dshampooadamw_max_preconditioner_dim}, "
                          f"and at --tensor-model-parallel-size {run.parallel.tp} the gathered matrix (largest "
                          f"dim {dims}) has its rows in another order than on one rank, so the blocks differ; "
                          f"raise --dshampooadamw-max-preconditioner-dim to >= {dims} or use tp 1")
    if opt.weight_decay_incr_style != "constant" and name in ("galoreadamw", "dshampooadamw"):
        errors.append(f"--weight-decay-incr-style {opt.weight_decay_incr_style} is not supported with "
                      f"--optimizer {name}; use constant")
    return errors


def _largest_partitioned_dim(run) -> int:
    m = run.model
    kv = m.num_key_value_heads or m.num_attention_heads
    head = m.hidden_size // m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * kv) * head
    ffn = m.ffn_hidden_size * (2 if m.swiglu else 1)
    return max(qkv, ffn, m.hidden_size)


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
    errors = optimizer_errors(run, device_type)
    if errors:
        raise ValueError("cannot build the optimizer:\n  - " + "\n  - ".join(errors))
    opt = run.training.optimizer
    name = opt.optimizer
    groups = optimizer_param_groups(model, opt.weight_decay)
    betas = (opt.adam_beta1, opt.adam_beta2)
    if run.training.zero.cpu_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=betas, eps=opt.adam_eps, weight_decay=opt.weight_decay,
                                adamw_mode=name != "adam")
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
    raise ValueError(f"--optimizer {name}: not implemented yet")


def _vendor_fallback(package: str, name: str, instead: str) -> bool:
    """True when the vendor package is importable; otherwise log once that `instead` runs."""
    try:
        __import__(package)
        return True
    except ImportError:
        log_once(f"--optimizer {name}: {package} is not installed; running the equivalent {instead}")
        return False
