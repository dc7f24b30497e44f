"""What the run reports and where: console interval, TensorBoard, wandb, and the peak for MFU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    wandb_save_dir: Optional[str] = None  # None: tensorboard_dir, else the working directory
    log_params_norm: bool = False  # the L2 norm of all parameters in each log line and as train/params_norm
    # Peak dense bf16 TFLOPS of one device, for MFU. None: MFU is not reported.
    peak_tflops: Optional[float] = None


@dataclass
class ProfilingConfig:
    """--profile: a torch.profiler trace of some steps of this launch (training/run_control.StepProfiler)."""
    profile: Optional[str] = None  # None: no trace; "pt", or "pt-full" with stacks and shapes
    profile_steps: str = "2,3"  # START,END: steps of this launch, 1-based, inclusive
    profile_ranks: Optional[list[int]] = None  # None: every rank
    trace_dir: str = "./trace/"  # where the Chrome traces go
