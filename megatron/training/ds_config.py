"""The DeepSpeed config of a run: generated from the flags, or a user's --deepspeed_config checked against them.

The optimizer and LR schedule are built in Python by the loop and handed to `deepspeed.initialize`, so a
generated config has no "optimizer"/"scheduler" section, and a user file that has one is refused (its
settings would silently fight the --optimizer/--lr flags). `precision_errors` says which precisions a device runs.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

from megatron.config.arguments import (
    DEEPSPEED_AGREEMENT, ConfigError, RunConfig, deepspeed_file_values, global_batch_size,
    gradient_accumulation_steps, read_deepspeed_config,
)

STEPS_PER_PRINT = 1_000_000_000  # our loop logs; DeepSpeed's own step prints stay quiet
DEFAULT_BUCKET_SIZE = 500_000_000

def precision_errors(run: RunConfig, device_type: str) -> list[str]:
    """Why the run's precision cannot train on `device_type` ('cpu', 'cuda', 'xpu', 'mps'); empty when it can."""
    p = run.training.precision
    errors = []
    if p.fp16 and device_type == "cpu":
        errors.append("--fp16 does not run on CPU (DeepSpeed's fp16 optimizer needs an accelerator); "
                      "use --bf16 or drop the flag for fp32")
    if p.bf16 and device_type == "mps":
        errors.append("--bf16 is not supported by DeepSpeed on MPS; drop the flag for fp32")
    if p.bf16 and p.fp16:
        errors.append("--bf16 and --fp16 both set; pick one")
    zero = run.training.zero
    from megatron.optimizer import owns_gradients

    if owns_gradients(run):  # a whole-matrix optimizer reduces in fp32 itself at any stage (mixed_precision.py)
        return errors
    if p.bf16 and p.accumulate_allreduce_grads_in_fp32 and zero.zero_stage == 0:
        from megatron.config.arguments import ZERO0_FP32_ACCUMULATION

        errors.append(ZERO0_FP32_ACCUMULATION)
    elif p.bf16 and p.accumulate_allreduce_grads_in_fp32 and (zero.zero_stage != 1 or zero.cpu_optimizer):
        errors.append(
            f"--accumulate-allreduce-grads-in-fp32 with --bf16 needs --zero-stage 1 without --cpu-optimizer (got "
            f"--zero-stage {zero.zero_stage}{' --cpu-optimizer' if zero.cpu_optimizer else ''}): DeepSpeed "
            "accumulates bf16 gradients in fp32 only in its BF16 optimizer (ZeRO-1); ZeRO-2/3 and CPU offload would "
            "accumulate in bf16. Use --zero-stage 1, or drop the flag")
    return errors


def generate_deepspeed_config(run: RunConfig, dp_size: int, device_type: Optional[str] = None,
                              hand_over: bool = True) -> dict:
    """The config the flags describe. `device_type` None or 'cpu' turns off comm overlap and pinned memory.
    hand_over=False: as if DeepSpeed ran the precision and ZeRO stage the flags name (what a user's file is
    checked against) even where a whole-matrix optimizer does that work itself."""
    t, zero, prec = run.training, run.training.zero, run.training.precision
    accelerator = device_type not in (None, "cpu")
    batch = global_batch_size(run, dp_size)
    cfg = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(run, dp_size, batch),
        "gradient_clipping": t.optimizer.clip_grad,
        "steps_per_print": STEPS_PER_PRINT,
        # DeepSpeed's own timers measure the dp gradient reduction for --timing-log-level >= 1 (training/timers.py)
        "wall_clock_breakdown": run.logging.timing_log_level >= 1,
        "zero_allow_untested_optimizer": True,  # the loop hands in torch SGD as well as AdamW
        "zero_optimization": _zero_section(run, accelerator, hand_over),
    }
    if zero.cpu_optimizer and t.optimizer.cpu_torch_adam:
        cfg["zero_force_ds_cpu_optimizer"] = False  # --cpu_torch_adam: torch's AdamW steps the offloaded state
    if zero.universal_checkpoint:  # --universal-checkpoint: --load names a universal folder (convert/universal.py)
        cfg["checkpoint"] = {"load_universal": True}
    from megatron.optimizer import owns_gradients

    if hand_over and owns_gradients(run):
        # a whole-matrix optimizer keeps fp32 masters of the 16-bit model itself (megatron/optimizer/
        # mixed_precision.py): DeepSpeed's bf16/fp16 optimizers would hand it flat fp32 copies instead
        return cfg
    if prec.bf16:
        cfg["bf16"] = {"enabled": True}
    if prec.fp16:
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": prec.loss_scale or 0,  # 0: dynamic
            "initial_scale_power": int(math.log2(prec.initial_loss_scale)),
            "loss_scale_window": prec.loss_scale_window,
            "hysteresis": prec.hysteresis,
            "min_loss_scale": prec.min_loss_scale,
        }
    if prec.bf16 and prec.accumulate_allreduce_grads_in_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's BF16 optimizer (ZeRO-1)
    return cfg


def _zero_section(run: RunConfig, accelerator: bool, hand_over: bool = True) -> dict:
    from megatron.optimizer import deepspeed_zero_stage

    zero = run.training.zero
    # 0 when the optimizer partitions its state itself
    section = {"stage": deepspeed_zero_stage(run) if hand_over else zero.zero_stage}
    if section["stage"] == 0:
        return section
    bucket = zero.reduce_bucket_size or DEFAULT_BUCKET_SIZE
    section.update({"contiguous_gradients": True, "overlap_comm": accelerator, "reduce_scatter": True,
                    "reduce_bucket_size": bucket})
    if zero.zero_stage < 3:
        section["allgather_bucket_size"] = zero.allgather_bucket_size or DEFAULT_BUCKET_SIZE
    if zero.cpu_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": accelerator}
    if zero.offload_param:
        if zero.zero_stage != 3:
            raise ConfigError("--remote-device cpu (ZeRO parameter offload) needs --zero-stage 3")
        section["offload_param"] = {"device": "cpu", "pin_memory": accelerator}
    return section


def merge_user_config(user: dict, generated: dict, path: str = "--deepspeed_config") -> dict:
    """The user's file on top of the generated config, after checking that the two agree."""
    refused = [k for k in ("optimizer", "scheduler") if k in user]
    if refused:
        raise ConfigError(
            f"{path} has a {' and a '.join(repr(k) for k in refused)} section; this framework builds the optimizer "
            "and LR schedule from --optimizer/--lr/--lr-decay-style/--adam-*/--weight-decay, so remove the "
            "section and give those flags instead")
    user = copy.deepcopy(user)
    if "bfloat16" in user:  # DeepSpeed's old spelling; keep one key so the two cannot disagree
        user.setdefault("bf16", user.pop("bfloat16"))
        user.pop("bfloat16", None)
    mine, theirs = deepspeed_file_values(generated), deepspeed_file_values(user)
    errors = []
    for dest, (flag, key) in DEEPSPEED_AGREEMENT.items():
        if dest in theirs and theirs[dest] != mine.get(dest, False):
            errors.append(f"{flag} gives {key} = {mine.get(dest, False)} but {path} has {theirs[dest]}")
    gas = user.get("gradient_accumulation_steps")
    if isinstance(gas, int) and gas != generated["gradient_accumulation_steps"]:
        errors.append(f"the flags give gradient_accumulation_steps = {generated['gradient_accumulation_steps']} "
                      f"(global batch / (micro batch × dp)) but {path} has {gas}")
    if errors:
        raise ConfigError("the flags and the DeepSpeed config file disagree; make them match:\n  - "
                          + "\n  - ".join(errors))
    return _deep_merge(generated, user)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(run: RunConfig, dp_size: int, device_type: Optional[str] = None) -> dict:
    """The dict to pass as `deepspeed.initialize(config=...)`: generated, or the user's file merged and checked."""
    generated = generate_deepspeed_config(run, dp_size, device_type)
    path = run.training.zero.deepspeed_config
    if path is None:
        return generated
    from megatron.optimizer import deepspeed_zero_stage, owns_gradients

    if not owns_gradients(run) and deepspeed_zero_stage(run) == run.training.zero.zero_stage:
        return merge_user_config(read_deepspeed_config(path), generated, path)
    # a whole-matrix optimizer partitions (and keeps the fp32 masters) itself: the file is checked against what the
    # flags name, then DeepSpeed gets stage 0 and, where the optimizer owns the precision, no precision section
    merged = merge_user_config(read_deepspeed_config(path),
                               generate_deepspeed_config(run, dp_size, device_type, hand_over=False), path)
    merged["zero_optimization"] = generated["zero_optimization"]
    if owns_gradients(run):
        for key in ("bf16", "bfloat16", "fp16", "data_types"):
            merged.pop(key, None)
    return merged
