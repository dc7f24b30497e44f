"""What the run reports and where: console interval, TensorBoard, wandb, and the peak for MFU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    log_timers_to_tensorboard: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    # Peak dense bf16 TFLOPS of one device, for MFU. None: MFU is not reported.
    peak_tflops: Optional[float] = None
