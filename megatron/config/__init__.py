"""Typed configuration: one dataclass per concern, and the Megatron-compatible command line.

Below this layer nothing reads global arguments: objects receive the config they need.
"""

from megatron.config.checkpoint import CheckpointConfig
from megatron.config.data import DataConfig
from megatron.config.logging import LoggingConfig, ProfilingConfig
from megatron.config.model import TransformerConfig
from megatron.config.parallel import ParallelConfig, layout_errors, validate_layout
from megatron.config.presets import PRESETS, preset
from megatron.config.training import OptimizerConfig, PrecisionConfig, TrainingConfig, ZeroConfig

__all__ = [
    "CheckpointConfig", "DataConfig", "LoggingConfig", "ProfilingConfig", "TransformerConfig", "ParallelConfig",
    "layout_errors", "validate_layout", "PRESETS", "preset", "OptimizerConfig", "PrecisionConfig",
    "TrainingConfig", "ZeroConfig",
]
