"""Pretrain a GPT / Llama-style model: parse Megatron-DeepSpeed flags, set up ranks and groups, train.

    torchrun --nproc-per-node 4 pretrain_gpt.py --model-preset tiny --mock-data --vocab-size 256 ...
    mpiexec -n 24 python pretrain_gpt.py ...        (Aurora / Polaris; ranks come from the launcher)

Everything happens in megatron/: config/arguments.py (flags), dist/ (launcher, groups), training/loop.py.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings


def launch_rank() -> int:
    """This process's rank as the launcher tells it (before any process group exists); 0 when unknown."""
    from megatron.distributed.launcher import LauncherError, discover

    try:
        return discover().rank
    except (LauncherError, ValueError, RuntimeError):
        return 0


def warn_once_per_run(rank: int) -> None:
    """Every rank runs the same code and would print the same Python warnings (torch's and DeepSpeed's
    deprecation notices): rank 0 prints them, the other ranks stay quiet."""
    if rank != 0:
        warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when the run finished or exited early on purpose (signal, --exit-*), 2 on bad flags/inputs
    (flags, data, checkpoints, the save directory), 3 when a rank stopped answering (watchdog, collective
    timeout), 4 after --max-consecutive-nan-steps NaN/Inf steps (see docs/RELIABILITY.md).

    Errors that are the same on every rank (flags, layout, LR schedule) are printed by rank 0 only.
    """
    from megatron.cli import parse_args
    from megatron.errors import ConfigError

    from megatron.data.data_list import DataListError
    from megatron.training.preflight import check_data_lists

    warn_once_per_run(launch_rank())
    try:
        run = parse_args(argv)
        check_data_lists(run.data)  # before any other work: the same verdict on every rank
    except (ConfigError, DataListError) as error:
        if launch_rank() == 0:
            print(f"pretrain_gpt.py: {error}", file=sys.stderr, flush=True)
        return 2

    if run.training.dry_run is not None:
        return dry_run(run)

    from megatron.distributed import destroy_distributed, initialize_distributed
    from megatron.distributed.parallel_state import ParallelState
    from megatron.checkpoint.layout import ConversionError
    from megatron.data.indexed_dataset import IndexedDatasetError
    from megatron.data.tokenizers import TokenizerError
    from megatron.checkpoint.deepspeed_io import CheckpointError
    from megatron.training.engine import EngineConfigError
    from megatron.training.loop import train
    from megatron.training.watchdog import EXIT_HANG, CollectiveFailure

    env = initialize_distributed(run.parallel.distributed_backend,
                                 timeout_minutes=run.reliability.distributed_timeout_minutes)
    try:
        ps = ParallelState.build(run.parallel, run.model)
        if env.rank == 0:
            print(f"pretrain_gpt.py: {ps.describe()} on {env.device} ({env.backend}, {env.launcher})", flush=True)
            for notice in run.notices:
                print(f"pretrain_gpt.py: note: {notice}", flush=True)
        result = train(run, ps, env.device)
        if env.rank == 0:
            print(f"pretrain_gpt.py: done at iteration {result.iteration}: {result.exit_reason}", flush=True)
        if result.exit_code:
            return result.exit_code
    except (ConfigError, EngineConfigError) as error:
        # Bad flags: the same verdict on every rank, so rank 0 says it once, without a traceback.
        if env.rank == 0:
            print(f"pretrain_gpt.py: {error}", file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, ConversionError, DataListError, IndexedDatasetError, TokenizerError) as error:
        # bad input that may concern one rank's files: every rank that sees it says so
        print(f"pretrain_gpt.py (rank {env.rank}): {error}", file=sys.stderr, flush=True)
        return 2
    except CollectiveFailure as error:  # a rank stopped answering: tearing the groups down could hang too
        print(f"pretrain_gpt.py: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        error.after_report()  # stopped ranks on this node are ended (SIGKILL) once the message is out
        os._exit(EXIT_HANG)
    finally:
        destroy_distributed()  # train() has already destroyed the DeepSpeed engine (its threads and buffers)
    return 0


def dry_run(run) -> int:
    """--dry-run [WORLD_SIZE]: print the resolved run on rank 0 and exit; no process group, no model."""
    from megatron.config.arguments import ConfigError
    from megatron.distributed.launcher import LauncherError, discover
    from megatron.training.dry_run import dry_run_report

    world_size = run.training.dry_run
    rank = 0
    if not world_size:
        try:
            info = discover()
            world_size, rank = info.world_size, info.rank
        except (LauncherError, ValueError, RuntimeError):
            world_size = 1
    if rank != 0:
        return 0
    try:
        print(dry_run_report(run, world_size), flush=True)
    except ConfigError as error:
        print(f"pretrain_gpt.py: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


def exit_with(code: int) -> None:
    """End the process with `code`. A run refused with exit 2 after a collective (a failing start-up check, a
    save error) can hold gloo work whose tensors are freed during interpreter finalisation, which aborts
    with SIGABRT ("terminate called without an active exception") and would replace the promised 2. So for 2:
    Python's exit handlers run (trackers, shared index files), the streams are flushed, and the process ends
    without finalisation."""
    if code != 2:
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own entry point for what sys.exit would run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_with(main())
