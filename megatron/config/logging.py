"""What the run reports and where: console interval, TensorBoard, wandb, the peak for MFU, and the profiler;
their flags (`add_tracking_arguments`, `add_profiling_arguments`) and builders (`*_from_args`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from megatron.config.argtypes import pos_float, pos_int


@dataclass
class LoggingConfig:
    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    log_timers_to_tensorboard: bool = False
    tensorboard_queue_size: int = 1000  # SummaryWriter's max_queue
    tensorboard_log_interval: int = 1  # per-iteration scalars every N iterations
    log_learning_rate_to_tensorboard: bool = True
    log_loss_scale_to_tensorboard: bool = True
    log_world_size_to_tensorboard: bool = False
    log_optimizer_states_to_tensorboard: bool = False  # optimizer/* norms of Adam's moments and the weights
    timing_log_level: int = 0  # 0: iteration time; 1: + once-per-step phases; 2: + per-micro-batch phases
    timing_log_option: str = "minmax"  # max, minmax or all (ranks)
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None  # None: ${save}/wandb, else the working directory (training/tracking.py)
    wandb_optional: bool = False  # a wandb that cannot start is reported, not fatal (pretrain_gpt_alcf.py's default)
    log_params_norm: bool = False  # the L2 norm of all parameters in each log line and as training/params-norm
    # Peak dense bf16 TFLOPS of one device, for MFU. None: MFU is not reported.
    peak_tflops: Optional[float] = None


@dataclass
class ProfilingConfig:
    """--profile: a torch.profiler trace of some steps of this launch (training/run_control.StepProfiler)."""
    profile: Optional[str] = None  # None: no trace; "pt", or "pt-full" with stacks and shapes
    profile_steps: str = "2,3"  # START,END: steps of this launch, 1-based, inclusive
    profile_ranks: Optional[list[int]] = None  # None: every rank
    trace_dir: str = "./trace/"  # where the Chrome traces go


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tracking")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the --timing-log-level timers (max over ranks) to TensorBoard/wandb")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir", help="wandb's directory; default: SAVE/wandb (--save), else the working "
                                            "directory")
    g.add_argument("--tensorboard-queue-size", type=pos_int, default=1000,
                   help="events TensorBoard queues before writing to disk")
    g.add_argument("--tensorboard-log-interval", type=pos_int, default=1,
                   help="write the per-iteration scalars every N iterations (default 1)")
    g.add_argument("--no-log-learnig-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard",
                   action="store_false", help="do not log the learning rate (upstream's spelling)")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false", help="do not log the fp16 loss scale")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true", help="log the number of ranks")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="log L2/L1 norms and max of Adam's moments and of the weights (optimizer/*), every "
                        "--tensorboard-log-interval iterations")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="0: iteration time only; 1: + forward-backward, optimizer, batch-generator, "
                        "grads-all-reduce; 2: + per-micro-batch forward-compute, backward-compute")
    g.add_argument("--timing-log-option", choices=("max", "minmax", "all"), default="minmax",
                   help="report each timer's max, (min, max) or every rank's value across ranks")
    g.add_argument("--log-params-norm", action="store_true",
                   help="compute the L2 norm of all parameters (each counted once over tp/pp/ZeRO) every "
                        "--log-interval iterations: ' params_norm=X |' in the log line, training/params-norm in "
                        "TensorBoard/wandb")
    g.add_argument("--peak-tflops", type=pos_float, help="one device's peak dense TFLOPS, for MFU")


def add_profiling_arguments(g) -> None:
    """--profile ... --trace-dir, in the "run control, evaluation and checkpoints" group (config/training.py)."""
    g.add_argument("--profile", choices=("pt", "pt-full"),
                   help="torch.profiler trace of --profile_steps (pt-full: with stacks and shapes)")
    g.add_argument("--profile-steps", default="2,3", metavar="START,END",
                   help="steps of this launch to profile (1-based, inclusive; default 2,3)")
    g.add_argument("--profile-ranks", type=int, nargs="+", help="ranks to profile (default all)")
    g.add_argument("--trace-dir", default="./trace/", help="where --profile writes its Chrome traces")


def logging_from_args(ns: argparse.Namespace) -> LoggingConfig:
    return LoggingConfig(log_interval=ns.log_interval, tensorboard_dir=ns.tensorboard_dir,
                         log_timers_to_tensorboard=ns.log_timers_to_tensorboard,
                         wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name,
                         wandb_save_dir=ns.wandb_save_dir, peak_tflops=ns.peak_tflops,
                         log_params_norm=ns.log_params_norm,
                         tensorboard_queue_size=ns.tensorboard_queue_size,
                         tensorboard_log_interval=ns.tensorboard_log_interval,
                         log_learning_rate_to_tensorboard=ns.log_learning_rate_to_tensorboard,
                         log_loss_scale_to_tensorboard=ns.log_loss_scale_to_tensorboard,
                         log_world_size_to_tensorboard=ns.log_world_size_to_tensorboard,
                         log_optimizer_states_to_tensorboard=ns.log_optimizer_states_to_tensorboard,
                         timing_log_level=ns.timing_log_level, timing_log_option=ns.timing_log_option)


def profiling_from_args(ns: argparse.Namespace) -> ProfilingConfig:
    return ProfilingConfig(profile=ns.profile, profile_steps=ns.profile_steps, profile_ranks=ns.profile_ranks,
                           trace_dir=ns.trace_dir)
