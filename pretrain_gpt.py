"""Pretrain a GPT / Llama-style model: parse Megatron-DeepSpeed flags, set up ranks and groups, train.

    torchrun --nproc-per-node 4 pretrain_gpt.py --model-preset tiny --mock-data --vocab-size 256 ...
    mpiexec -n 24 python pretrain_gpt.py ...        (Aurora / Polaris; ranks come from the launcher)

Everything happens in megatron/: config/arguments.py (flags), distributed/ (launcher, groups), training/loop.py.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings


def launch_info():
    """This process's place in the job as the launcher tells it (before any process group exists); None when
    unknown (it then counts as rank 0 of 1)."""
    from megatron.distributed.launcher import LauncherError, discover

    try:
        return discover()
    except (LauncherError, ValueError, RuntimeError):
        return None


def warn_once_per_run(rank: int) -> None:
    """Every rank runs the same code and would print the same Python warnings (torch's and DeepSpeed's
    deprecation notices): rank 0 prints them, the other ranks stay quiet."""
    if rank != 0:
        warnings.simplefilter("ignore")


def data_path_directory(run) -> None:
    """Upstream's ALCF entry (pretrain_gpt_alcf.py): a --data-path that is one directory blends every file in it
    whose name contains ".bin", each with weight 1 (prefix: the name up to ".bin"), in os.listdir's order, as
    upstream builds it. A notice says so."""
    data = run.data
    if len(data.data_path) != 1 or not os.path.isdir(data.data_path[0]):
        return
    directory = data.data_path[0]
    path = directory + "/"
    prefixes = [path + f.split(".bin")[0] for f in os.listdir(path) if os.path.isfile(path + f) and ".bin" in f]
    if not prefixes:
        from megatron.errors import ConfigError

        raise ConfigError(f"--data-path {directory} is a directory without .bin files (pretrain_gpt_alcf.py blends "
                          "every .bin file of a directory given as --data-path)")
    data.data_path = [item for prefix in prefixes for item in ("1", prefix)]
    run.notices.append(f"--data-path {directory}: a directory, so its {len(prefixes)} .bin files are blended with "
                       "weight 1 each (upstream's pretrain_gpt_alcf.py)")


def main(argv: list[str] | None = None, alcf: bool = False, prog: str = "pretrain_gpt.py", task=None,
         check_run=None) -> int:
    """Exit code 0 when the run finished or exited early on purpose (signal, --exit-*), 2 on bad flags/inputs
    (flags, data, checkpoints, the save directory), 3 when a rank stopped answering (watchdog, collective
    timeout), 4 after --max-consecutive-nan-steps NaN/Inf steps (see docs/RELIABILITY.md).

    Errors that are the same on every rank (flags, layout, LR schedule) are printed once, by rank 0, or by
    another rank when rank 0 does not confirm it did (megatron/distributed/refusal.py).

    alcf: pretrain_gpt_alcf.py's run, which starts wandb by default as upstream's ALCF entry does
    (megatron/training/tracking.py); here wandb is opt-in (--wandb-project), as in upstream's pretrain_gpt.py.
    prog, task, check_run: another entry point on the same path (finetune_gpt.py: its name in messages, the
    training task of megatron/training/task.py, and a check of the parsed run that raises MegatronError).
    """
    from megatron.deepspeed_compat import quiet_cpu_accelerator_probe

    quiet_cpu_accelerator_probe()  # before DeepSpeed is imported: no "Setting accelerator to CPU" per rank
    from megatron.cli import parse_args
    from megatron.distributed.refusal import say_refusal
    from megatron.errors import ConfigError, MegatronError
    from megatron.training.preflight import preflight, with_data_list_problems

    launch = launch_info()
    warn_once_per_run(launch.rank if launch is not None else 0)
    try:
        try:
            run = parse_args(argv)
        except ConfigError as refused:  # the data lists too, so a flag error does not hide a missing file
            raise with_data_list_problems(refused, sys.argv[1:] if argv is None else argv) from None
        if alcf:
            data_path_directory(run)  # upstream's ALCF entry: a --data-path directory blends its .bin files
        if check_run is not None:
            check_run(run)
        if run.training.dry_run is None:
            # before any process group or engine, on every launch path: the layout against the launcher's world
            # size (1 under plain python), batch sizes, data lists, tokenizer, LR schedule, engine, all reported
            # together
            from megatron.distributed.device import detect_device_type

            preflight(run, launch.world_size if launch is not None else 1, detect_device_type())
    except MegatronError as error:
        # every rank reads the same flags and data lists: the same verdict on every rank, said once
        if launch is None:
            say_refusal(error, 0, 1, True, prog=prog)
        else:
            say_refusal(error, launch.rank, launch.world_size, True, launch.master_addr, launch.master_port,
                        prog=prog)
        return error.exit_code

    if alcf:
        import dataclasses

        from megatron.training.tracking import alcf_wandb_defaults

        run = dataclasses.replace(run, logging=alcf_wandb_defaults(run.logging))
    if run.training.dry_run is not None:
        return dry_run(run, prog, [] if task is None else task.describe())

    from megatron.distributed import destroy_distributed, initialize_distributed
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train
    from megatron.training.watchdog import EXIT_HANG, CollectiveFailure

    env = initialize_distributed(run.parallel.distributed_backend,
                                 timeout_minutes=run.reliability.distributed_timeout_minutes)
    try:
        ps = ParallelState.build(run.parallel, run.model)
        if env.rank == 0:
            print(f"{prog}: {ps.describe()} on {env.device} ({env.backend}, {env.launcher})", flush=True)
            for notice in run.notices:
                print(f"{prog}: note: {notice}", flush=True)
        import megatron

        result = train(run, ps, env.device, start_time=megatron.START_TIME,  # upstream's clock: from the start
                       task=task)
        if env.rank == 0:
            print(f"{prog}: done at iteration {result.iteration}: {result.exit_reason}", flush=True)
        if result.exit_code:
            return result.exit_code
    except CollectiveFailure as error:  # a rank stopped answering: tearing the groups down could hang too
        print(f"{prog}: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        error.after_report()  # stopped ranks on this node are ended (SIGKILL) once the message is out
        os._exit(EXIT_HANG)
    except MegatronError as error:
        # bad flags (the same verdict on every rank: said once, without a traceback), or bad input that may
        # concern one rank's files (every rank that sees it says so)
        say_refusal(error, env.rank, env.world_size, error.same_on_every_rank, prog=prog)
        return error.exit_code
    finally:
        destroy_distributed()  # train() has already destroyed the DeepSpeed engine (its threads and buffers)
    return 0


def dry_run(run, prog: str = "pretrain_gpt.py", task_lines: list | None = None) -> int:
    """--dry-run [WORLD_SIZE]: print the resolved run on rank 0 and exit; no process group, no model.
    task_lines: what another entry point's task will do (finetune_gpt.py's post-training flags)."""
    from megatron.distributed.launcher import LauncherError, discover
    from megatron.errors import MegatronError
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
        print(dry_run_report(run, world_size, task_lines=task_lines), flush=True)
    except MegatronError as error:
        print(f"{prog}: {error}", file=sys.stderr, flush=True)
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
