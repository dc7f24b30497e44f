"""The command line of the entry points: config's parser plus the one flag that needs a checkpoint read
(--use-checkpoint-args takes the model shape from the --load checkpoint's saved arguments).

    from megatron.cli import parse_args
    run = parse_args(sys.argv[1:])

config/ is the bottom layer (every package reads it) and imports nothing above it, so it cannot open a
checkpoint itself; this module hands it the checkpoint package's reader.
"""

from __future__ import annotations

from typing import Optional

from megatron.checkpoint.saved_args import saved_args_of
from megatron.config.arguments import RunConfig
from megatron.config.arguments import parse_args as parse_flags


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
    """Parse Megatron-DeepSpeed flags into a RunConfig (ConfigError naming the flag and the fix)."""
    return parse_flags(argv, read_saved_args=saved_args_of)
