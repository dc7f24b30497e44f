"""The optimizer and LR/weight-decay schedule flags of Megatron-DeepSpeed (argonne-lcf), and their checks.

`add_optimizer_arguments(group)` adds them to the "schedule and optimizer" group of arguments.py;
`optimizer_flag_errors(ns)` lists what is wrong with them (each naming the flag), and
`optimizer_config_values(ns)` gives the OptimizerConfig fields they set. Which optimizer each
`--optimizer` name runs, and on which layouts, is decided in megatron/optimizer/.
"""

from __future__ import annotations

import argparse

# Upstream's 19 names (argonne-lcf/Megatron-DeepSpeed megatron/arguments.py), in its order, and sgd (which its
# optimizer builder runs, and which this framework had before).
OPTIMIZER_CHOICES = (
    "adam", "sgd", "adam8bit", "adamw", "adamwschedulefree", "apex.adam", "apex.sgd", "ds.fusedlamb", "ds.onebitlamb",
    "galoreadamw", "galoreadamw8bit", "galoreadamw8bitperlayer", "ipex.fusedlamb", "ipex.lamb", "dshampooadamw",
    "sgdschedulefree", "sophiag", "adopt", "muon", "muonclip",
)
WEIGHT_DECAY_INCR_STYLES = ("constant", "linear", "cosine")


def _bool(text: str) -> bool:
    """Upstream declares some switches `type=bool` (so any text is True); we read the words people mean."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_optimizer_arguments(g) -> None:
    """The optimizer choice, its hyperparameters and the schedule flags beyond the basic LR ones."""
    g.add_argument("--optimizer", type=str.lower, choices=OPTIMIZER_CHOICES, default="adam",
                   help="adam: torch Adam with L2 weight decay (upstream's); adamw: decoupled weight decay; "
                        "see docs/OPTIMIZERS.md for what each name runs here (ds.onebitlamb: 1-bit LAMB with "
                        "upstream's settings, freeze_step 1000, max/min coeff 0.3/0.01; fp32, ZeRO-0, --clip-grad 0). "
                        "muon, muonclip, dshampooadamw, galoreadamw and adam8bit step whole matrices in fp32 under "
                        "--bf16/--fp16 too (fp32 masters per whole matrix, ZeRO-1/2 by whole parameters)")
    g.add_argument("--cpu-torch-adam", "--cpu_torch_adam", dest="cpu_torch_adam", action="store_true",
                   help="with --cpu-optimizer: step with torch.optim.AdamW on the CPU instead of DeepSpeedCPUAdam "
                        "(upstream's meaning; needs --cpu-optimizer)")
    g.add_argument("--ds-fused-adam", "--ds_fused_adam", dest="ds_fused_adam", action="store_true",
                   help="with --optimizer adam: step with DeepSpeed's FusedAdam (decoupled weight decay, its default, "
                        "as upstream runs it; JIT-built for CPU or GPU)")
    g.add_argument("--schedulefree-for-each", action="store_true",
                   help="schedulefree optimizers: use the foreach implementation (faster, more peak memory)")
    g.add_argument("--start-weight-decay", type=float, help="with --weight-decay-incr-style linear/cosine")
    g.add_argument("--end-weight-decay", type=float, help="with --weight-decay-incr-style linear/cosine")
    g.add_argument("--weight-decay-incr-style", choices=WEIGHT_DECAY_INCR_STYLES, default="constant",
                   help="weight decay from --start-weight-decay to --end-weight-decay over the run")
    g.add_argument("--sophiag-beta1", type=float, default=0.9)
    g.add_argument("--sophiag-beta2", type=float, default=0.95)
    g.add_argument("--sophiag-rho", type=float, default=0.01, help="SophiaG clipping threshold")
    g.add_argument("--dshampooadamw-max-preconditioner-dim", type=int, default=8192)
    g.add_argument("--dshampooadamw-precondition-freq", type=int, default=100)
    g.add_argument("--dshampooadamw-use-decoupled-weight-decay", type=_bool, default=True)
    g.add_argument("--dshampooadamw-eps", type=float, default=1e-12)
    g.add_argument("--muon-momentum", type=float, default=0.95)
    g.add_argument("--muon-nesterov", type=_bool, default=True, help="true/false")
    g.add_argument("--muon-ns-steps", type=int, default=6, help="Newton-Schulz iterations")
    g.add_argument("--muonadamw-beta1", type=float, default=0.9, help="AdamW for the non-matrix parameters")
    g.add_argument("--muonadamw-beta2", type=float, default=0.999)
    g.add_argument("--muonadamw-eps", type=float, default=1e-12)
    g.add_argument("--muonclip-t", type=float, default=100.0, help="MuonClip: max attention logit (QK-clip)")
    g.add_argument("--muonclip-alpha", type=float, default=0.5, help="MuonClip: split exponent for (Wq, Wk)")

    # LR schedule beyond constant/linear/cosine/inverse-square-root/wsd (upstream's names)
    g.add_argument("--lr-decay-tokens", type=int, help="decay length in tokens (wins over iters/samples)")
    g.add_argument("--lr-warmup-tokens", type=int, help="warmup length in tokens")
    g.add_argument("--lr-constant-tokens", type=int, help="infinite-*: tokens at --constant-lr")
    g.add_argument("--lr-constant-fraction", type=float, default=0.001,
                   help="infinite-*: fraction of the decay length at --constant-lr")
    g.add_argument("--lr-cooldown-tokens", type=int, help="infinite-*: tokens of the cooldown to --constant-lr")
    g.add_argument("--lr-cooldown-fraction", type=float, default=0.65,
                   help="infinite-*: fraction of the decay length cooling down to --constant-lr")
    g.add_argument("--lr-constant-plus-cooldown", action="store_true",
                   help="constant style: keep --lr, then cool down to --min-lr over the last "
                        "--lr_constant_plus_cooldown_frac of the decay length (1 - sqrt shape)")
    g.add_argument("--lr-constant-plus-cooldown-frac", type=float, default=0.05)
    g.add_argument("--constant-lr", type=float, default=0.00011, help="infinite-*: the plateau LR")
    g.add_argument("--timescale", type=float, default=10.0, help="infinite-inv-square-root: cooldown steepness")
    g.add_argument("--lr-finder", action="store_true",
                   help="refused: upstream's LR range test is not supported (see the error for what to do)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR schedule from the flags, not from the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR schedule from the checkpoint, not from the flags")


# Optimizer names and what stops them here; megatron/optimizer fills in the ones it runs.
def optimizer_flag_errors(ns) -> list[str]:
    """Every problem with the optimizer/schedule flags, each naming the flag."""
    errors = []
    if ns.weight_decay_incr_style == "constant":
        given = [f for f in ("start_weight_decay", "end_weight_decay") if getattr(ns, f) is not None]
        if given:
            errors.append(f"{', '.join('--' + f.replace('_', '-') for f in given)} need --weight-decay-incr-style "
                          "linear or cosine (with constant, --weight-decay is used throughout)")
    else:
        if ns.start_weight_decay is None or ns.end_weight_decay is None:
            errors.append(f"--weight-decay-incr-style {ns.weight_decay_incr_style} needs both "
                          "--start-weight-decay and --end-weight-decay")
        elif not 0 <= ns.start_weight_decay <= ns.end_weight_decay:
            errors.append(f"need 0 <= --start-weight-decay ({ns.start_weight_decay}) <= --end-weight-decay "
                          f"({ns.end_weight_decay})")
    for flag in ("sophiag_beta1", "sophiag_beta2", "muonadamw_beta1", "muonadamw_beta2"):
        if not 0.0 <= getattr(ns, flag) < 1.0:
            errors.append(f"--{flag.replace('_', '-')} must be in [0, 1) (got {getattr(ns, flag)})")
    if not 0.0 <= ns.muon_momentum < 1.0:
        errors.append(f"--muon-momentum must be in [0, 1) (got {ns.muon_momentum})")
    if ns.muon_ns_steps < 1:
        errors.append(f"--muon-ns-steps must be >= 1 (got {ns.muon_ns_steps})")
    if ns.muonclip_t <= 0:
        errors.append(f"--muonclip-t is the largest attention logit QK-clip allows: it must be > 0 "
                      f"(got {ns.muonclip_t})")
    if not 0.0 <= ns.muonclip_alpha <= 1.0:
        errors.append(f"--muonclip-alpha splits the clip between W_q (eta^alpha) and W_k (eta^(1-alpha)): it must "
                      f"be in [0, 1] (got {ns.muonclip_alpha})")
    if ns.sophiag_rho <= 0:
        errors.append(f"--sophiag-rho must be > 0 (got {ns.sophiag_rho})")
    if ns.cpu_torch_adam and not ns.cpu_optimizer:
        errors.append("--cpu_torch_adam chooses the optimizer that --cpu-optimizer runs on the CPU: give "
                      "--cpu-optimizer too, or drop --cpu_torch_adam")
    if ns.ds_fused_adam and (ns.optimizer != "adam" or ns.cpu_optimizer):
        errors.append(f"--ds_fused_adam replaces the optimizer of --optimizer adam without --cpu-optimizer (got "
                      f"--optimizer {ns.optimizer}{' --cpu-optimizer' if ns.cpu_optimizer else ''}); drop one")
    if ns.lr_finder:
        errors.append("--lr-finder is not supported: upstream's LR range test replaces the run by an exponential LR "
                      "sweep; run a few short trainings with different --lr values (e.g. --train-iters 200) instead")
    if ns.override_opt_param_scheduler and ns.use_checkpoint_opt_param_scheduler:
        errors.append("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler both given; "
                      "pick one (flags win, or the checkpoint wins)")
    if ns.lr_constant_plus_cooldown:
        if ns.lr_decay_style != "constant":
            errors.append(f"--lr_constant_plus_cooldown needs --lr-decay-style constant "
                          f"(got {ns.lr_decay_style})")
        if not 0.0 < ns.lr_constant_plus_cooldown_frac <= 1.0:
            errors.append(f"--lr_constant_plus_cooldown_frac must be in (0, 1] "
                          f"(got {ns.lr_constant_plus_cooldown_frac})")
    if ns.lr_decay_style.startswith("infinite-"):
        if not ns.min_lr < ns.constant_lr <= ns.lr:
            errors.append(f"--lr-decay-style {ns.lr_decay_style} needs --min-lr ({ns.min_lr}) < --constant-lr "
                          f"({ns.constant_lr}) <= --lr ({ns.lr})")
        if ns.min_lr <= 0:
            errors.append(f"--lr-decay-style {ns.lr_decay_style} decays exponentially to --min-lr: it must be > 0")
        if ns.lr_constant_tokens is None and not 0.0 < ns.lr_constant_fraction < 1.0:
            errors.append(f"--lr-constant-fraction must be in (0, 1) (got {ns.lr_constant_fraction})")
        if ns.lr_cooldown_tokens is None and not 0.0 < ns.lr_cooldown_fraction < 1.0:
            errors.append(f"--lr-cooldown-fraction must be in (0, 1) (got {ns.lr_cooldown_fraction})")
        if ns.timescale <= 0:
            errors.append(f"--timescale must be > 0 (got {ns.timescale})")
    token_flags = [f for f in ("lr_decay_tokens", "lr_warmup_tokens", "lr_constant_tokens", "lr_cooldown_tokens")
                   if getattr(ns, f) is not None]
    for f in token_flags:
        if getattr(ns, f) < 0 or (f == "lr_decay_tokens" and getattr(ns, f) == 0):
            errors.append(f"--{f.replace('_', '-')} must be > 0 (got {getattr(ns, f)})")
    if ns.lr_warmup_tokens is not None and (ns.lr_warmup_iters or ns.lr_warmup_samples
                                            or ns.lr_warmup_fraction is not None):
        errors.append("give only one of --lr-warmup-tokens and --lr-warmup-iters/-samples/-fraction")
    if ns.lr_decay_tokens is None and (ns.lr_constant_tokens is not None or ns.lr_cooldown_tokens is not None):
        errors.append("--lr-constant-tokens/--lr-cooldown-tokens count tokens: give --lr-decay-tokens too")
    return errors


OPTIMIZER_FIELDS = (
    "cpu_torch_adam", "ds_fused_adam", "schedulefree_for_each", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style",
    "sophiag_beta1", "sophiag_beta2", "sophiag_rho", "dshampooadamw_max_preconditioner_dim",
    "dshampooadamw_precondition_freq", "dshampooadamw_use_decoupled_weight_decay", "dshampooadamw_eps",
    "muon_momentum", "muon_nesterov", "muon_ns_steps", "muonadamw_beta1", "muonadamw_beta2", "muonadamw_eps",
    "muonclip_t", "muonclip_alpha", "lr_decay_tokens", "lr_warmup_tokens", "lr_constant_tokens",
    "lr_constant_fraction", "lr_cooldown_tokens", "lr_cooldown_fraction", "lr_constant_plus_cooldown",
    "lr_constant_plus_cooldown_frac", "constant_lr", "timescale", "lr_finder", "override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler",
)


def optimizer_config_values(ns) -> dict:
    """The OptimizerConfig fields these flags fill (besides the basic ones arguments.py passes)."""
    return {f: getattr(ns, f) for f in OPTIMIZER_FIELDS}
