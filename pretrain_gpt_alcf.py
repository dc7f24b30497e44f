"""Upstream's ALCF entry point (argonne-lcf/Megatron-DeepSpeed's ALCF/helpers.sh launches this file): the same
run as pretrain_gpt.py, flag for flag, so recipes that name it work unchanged."""

from __future__ import annotations

import sys

from pretrain_gpt import main

if __name__ == "__main__":
    sys.exit(main())
