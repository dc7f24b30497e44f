"""Training: the DeepSpeed config from flags, the engine wiring, the loop, checkpoints, LR schedules and metrics.

Each module does one job; the loop reads top to bottom in one file and calls the others.
"""

from megatron.training.ds_config import build_deepspeed_config, precision_errors
from megatron.optimizer.lr_schedule import LRSchedule, build_lr_scheduler
from megatron.training.metrics import forward_flops_per_token, throughput, training_flops_per_token
from megatron.training.tracking import Tracker
from megatron.training.engine import EngineConfigError, TrainingEngine, build_engine, check_engine_config
from megatron.training.loop import TrainResult, train
from megatron.training.signals import ExitConditions
