"""Pretrain a GPT / Llama-style model: parse Megatron-DeepSpeed flags, set up ranks and groups, train.

    torchrun --nproc-per-node 4 pretrain_gpt.py --model-preset tiny --mock-data --vocab-size 256 ...
    mpiexec -n 24 python pretrain_gpt.py ...        (Aurora / Polaris; ranks come from the launcher)

Everything happens in megatron/: config/arguments.py (flags), dist/ (launcher, groups), training/loop.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron.config.arguments import ConfigError, parse_args

    try:
        run = parse_args(argv)
    except ConfigError as error:
        print(f"pretrain_gpt.py: {error}", file=sys.stderr)
        return 2

    from megatron.dist import destroy_distributed, initialize_distributed
    from megatron.dist.parallel_state import ParallelState
    from megatron.training.loop import train

    from megatron.training.checkpointing import CheckpointError
    from megatron.training.engine import EngineConfigError

    env = initialize_distributed(run.parallel.distributed_backend)
    try:
        ps = ParallelState.build(run.parallel, run.model)
        if env.rank == 0:
            print(f"pretrain_gpt.py: {ps.describe()} on {env.device} ({env.backend}, {env.launcher})", flush=True)
        result = train(run, ps, env.device)
        if env.rank == 0:
            print(f"pretrain_gpt.py: done at iteration {result.iteration}: {result.exit_reason}", flush=True)
    except (ConfigError, EngineConfigError, CheckpointError) as error:
        # Bad flags or inputs: the same on every rank, so a message without a traceback is enough.
        print(f"pretrain_gpt.py (rank {env.rank}): {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()  # train() has already destroyed the DeepSpeed engine (its threads and buffers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
