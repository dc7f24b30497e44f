"""Shared helpers for the training-engine tests: a tiny learnable run and trainings inside spawned gloo ranks.

`train_cases(rank, world_size, cases)` is a run_ranks target that trains each case (a list of flags) in
turn inside one launch, building the ParallelState each time, and returns {name: losses and more};
`run_main_cases` does the same through pretrain_gpt.main (exit code and stderr), `rank_env` sets up
pretrain_gpt.py subprocesses.
"""

from __future__ import annotations

import os

# A tiny Llama-style model (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings) that runs on 1-4 ranks with
# tp, pp and Ulysses sp of 2, no dropout (layouts draw different dropout masks), constant LR.
TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
    "--ffn-hidden-size", "64", "--seq-length", "32", "--max-position-embeddings", "32",
    "--normalization", "rmsnorm", "--swiglu", "--position-embedding-type", "rope",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10",
    "--lr", "1e-2", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--seed", "1234",
    "--mock-data", "--vocab-size", "128", "--num-workers", "0", "--log-interval", "100", "--eval-iters", "0",
    "--zero-stage", "0",
]

# MockGPTDataset strings together phrases from a bank; a bank of 8 phrases is learnt within a few steps,
# so "the loss goes down" is visible in 10 steps (the default bank of 512 needs hundreds).
LEARNABLE_PHRASES = 8


def flags(*extra: str, base=TINY) -> list[str]:
    """TINY with `extra` flags appended (argparse keeps the last value of a repeated flag)."""
    return list(base) + list(extra)


def make_mock_data_learnable() -> None:
    from megatron.data.gpt_dataset import MockGPTDataset

    MockGPTDataset.PHRASES = LEARNABLE_PHRASES


_case_groups: list = []  # process groups created since the last case started (this rank's process)


def record_process_groups() -> None:
    """Record every group torch.distributed.new_group creates from now on (ParallelState's, DeepSpeed's)."""
    import torch.distributed as dist

    if getattr(dist.new_group, "records_case_groups", False):
        return
    real = dist.new_group

    def new_group(*args, **kwargs):
        group = real(*args, **kwargs)
        _case_groups.append(group)
        return group

    new_group.records_case_groups = True
    dist.new_group = new_group


def destroy_previous_case_groups() -> None:
    """Destroy the groups the previous case created (each gloo group keeps its own network threads: a launch of
    15 cases at 8 ranks otherwise ends with ~600 threads per rank, and each case runs slower than the last).
    Done when the next case starts, so a caller may still use the groups of the case it just ran."""
    import deepspeed.comm
    import torch.distributed as dist

    if not _case_groups:
        return
    dist.barrier()  # every rank is done with them
    for group in _case_groups:
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            deepspeed.comm.destroy_process_group(group)  # also drops DeepSpeed's cached references to it
    _case_groups.clear()


def train_cases(rank: int, world_size: int, cases: list[tuple[str, list[str]]]) -> dict:
    """Run each (name, flags) training in turn on these ranks; returns {name: summary} (rank-local)."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    make_mock_data_learnable()
    from megatron.cli import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    record_process_groups()
    out = {}
    for name, argv in cases:
        destroy_previous_case_groups()
        run = parse_args(argv)
        ps = ParallelState.build(run.parallel, run.model)
        result = train(run, ps, torch.device("cpu"), printer=lambda line: None)
        out[name] = {
            "losses": [result.losses[i] for i in sorted(result.losses)],
            "iterations": sorted(result.losses),
            "grad_norms": [result.grad_norms[i] for i in sorted(result.grad_norms)],
            "exit_reason": result.exit_reason,
            "start_iteration": result.start_iteration,
            "iteration": result.iteration,
            "consumed_samples": result.consumed_samples,
            "saved": list(result.saved),
            "rank": rank,
            "coords": (ps.tp_rank, ps.sp_rank, ps.dp_rank, ps.pp_rank),
        }
    return out


def rank_env(rank: int, world_size: int, port: int) -> dict:
    """Environment for one rank of a pretrain_gpt.py subprocess (torchrun's variables)."""
    from multirank import rank_env as launcher_variables

    return {**os.environ, **launcher_variables(rank, world_size, port)}


def run_main_cases(rank: int, world_size: int, cases: list[tuple[str, list[str]]]) -> dict:
    """Call pretrain_gpt.main(argv) for each case on these ranks; returns {name: (exit code, stderr text)}.

    The process group made by run_ranks is kept between cases (main's teardown is skipped here)."""
    import contextlib
    import io
    import sys

    import deepspeed

    import megatron.distributed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import pretrain_gpt

    megatron.distributed.destroy_distributed = lambda: None  # run_ranks tears the group down at the end
    out = {}
    for name, argv in cases:
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            code = pretrain_gpt.main(argv)
        out[name] = (code, err.getvalue())
    return out


class RecordingTracker:
    """A Tracker that keeps every scalar it is given: {name: {step: value}} (rank-local)."""

    def __init__(self):
        self.scalars: dict = {}

    def log(self, scalars: dict, step: int, tensorboard_only: bool = False) -> None:
        for name, value in scalars.items():
            if value is not None:
                self.scalars.setdefault(name, {})[step] = float(value)

    def log_table(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def logged_cases(rank: int, world_size: int, cases: list[tuple[str, list[str]]]) -> dict:
    """train_cases that also returns the lines rank 0 printed and the scalars the tracker received."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from megatron.cli import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    out = {}
    for name, argv in cases:
        run = parse_args(argv)
        ps = ParallelState.build(run.parallel, run.model)
        lines, tracker = [], RecordingTracker()
        result = train(run, ps, torch.device("cpu"), tracker=tracker, printer=lines.append)
        out[name] = {"lines": lines, "scalars": tracker.scalars, "iterations": sorted(result.losses),
                     "eval_losses": dict(result.eval_losses), "test_loss": result.test_loss,
                     "losses": [result.losses[i] for i in sorted(result.losses)], "saved": list(result.saved),
                     "exit_reason": result.exit_reason, "iteration": result.iteration,
                     "consumed_samples": result.consumed_samples}
    return out


def checkpoint_flag_cases(rank: int, world_size: int, cases: list[tuple[str, list[str]]]) -> dict:
    """logged_cases for checkpoint flags: a case whose flags or checkpoint are refused records the error text
    instead of stopping the launch; the notices parse_args produced and megatron.distributed.device.empty_cache's calls
    (--empty-unused-memory-level) are recorded too."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    import megatron.distributed.device as device_module
    from megatron.errors import CheckpointError
    from megatron.cli import parse_args
    from megatron.errors import ConfigError
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    calls = []
    real_empty_cache = device_module.empty_cache

    def counting_empty_cache(device):
        calls.append(device.type)
        return real_empty_cache(device)

    device_module.empty_cache = counting_empty_cache
    out = {}
    for name, argv in cases:
        calls.clear()
        lines, tracker = [], RecordingTracker()
        entry = {"lines": lines, "scalars": tracker.scalars, "error": None}
        try:
            run = parse_args(argv)
            entry["notices"], entry["model"] = list(run.notices), run.model.to_dict()
            ps = ParallelState.build(run.parallel, run.model)
            result = train(run, ps, torch.device("cpu"), tracker=tracker, printer=lines.append)
            entry.update(iterations=sorted(result.losses), start_iteration=result.start_iteration,
                         losses=[result.losses[i] for i in sorted(result.losses)], saved=list(result.saved))
        except (ConfigError, CheckpointError) as error:
            entry["error"] = str(error)
        entry["empty_cache_calls"] = list(calls)
        out[name] = entry
    device_module.empty_cache = real_empty_cache
    return out


def resume_rule_cases(rank: int, world_size: int, cases: list) -> dict:
    """checkpoint_flag_cases for the resume rules (checkpoint/resume.py). Each case is (name, flags) or
    (name, flags, options); for every case it records besides the lines and the scalars:
    - "error": the ConfigError/CheckpointError text of a refused case, "engines_built": how many engines it built;
    - "after_load": this rank's optimizer param groups (lr, weight_decay, betas, eps) and ZeRO's `clip_grad`
      right after Checkpointer.load, before any step;
    - "weight_change": how far the first training step moved this rank's weights (sum of |Δ|);
    - "reads": {path: number of torch.load calls} on this rank during Checkpointer.prepare + load;
    - "pointers": (latest, latest_checkpointed_iteration.txt) under --save right after the case.
    options: {"no_handover": True} makes DeepSpeed's load read every file itself (zero_shards.take_remembered
    finds nothing); {"skip_apply_hyperparameters": True} skips resume._apply_hyperparameters (the values
    DeepSpeed's load restored stay). Both are controls: they show the checks can fail."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    import megatron.checkpoint.resume as resume
    import megatron.checkpoint.zero_shards as zero_shards
    import megatron.training.loop as loop
    from megatron.config.arguments import ConfigError, parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.errors import CheckpointError
    from megatron.training.engine import TrainingEngine

    record_process_groups()
    real = {"prepare": resume.Checkpointer.prepare, "load": resume.Checkpointer.load,
            "build_engine": loop.build_engine, "train_step": TrainingEngine.train_step,
            "torch_load": torch.load, "take_remembered": zero_shards.take_remembered,
            "apply": resume._apply_hyperparameters}
    state: dict = {}

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(f))
            state["reads"][path] = state["reads"].get(path, 0) + 1
        return real["torch_load"](f, *args, **kwargs)

    def prepare(self):
        torch.load = counting_load
        try:
            return real["prepare"](self)
        finally:
            torch.load = real["torch_load"]

    def load(self, te, *args, **kwargs):
        torch.load = counting_load
        try:
            progress = real["load"](self, te, *args, **kwargs)
        finally:
            torch.load = real["torch_load"]
        optimizer = te.engine.optimizer
        state["after_load"] = {
            "groups": [{k: (list(g[k]) if k == "betas" else g[k]) for k in ("lr", "weight_decay", "betas", "eps")
                        if k in g} for g in optimizer.param_groups],
            "clip_grad": getattr(optimizer, "clip_grad", None)}
        return progress

    def build_engine(*args, **kwargs):
        state["engines_built"] += 1
        return real["build_engine"](*args, **kwargs)

    def weights(te):
        return [getattr(p, "ds_tensor", p).detach().float().clone() for p in te.engine.module.parameters()]

    def train_step(self, batches):
        if state["weight_change"] is not None:
            return real["train_step"](self, batches)
        before = weights(self)
        step = real["train_step"](self, batches)
        state["weight_change"] = float(sum((a - b).abs().sum() for a, b in zip(weights(self), before)))
        return step

    resume.Checkpointer.prepare, resume.Checkpointer.load = prepare, load
    loop.build_engine, TrainingEngine.train_step = build_engine, train_step
    out = {}
    try:
        for case in cases:
            name, argv, options = case if len(case) == 3 else (*case, {})
            destroy_previous_case_groups()
            state.update(reads={}, after_load=None, weight_change=None, engines_built=0)
            zero_shards.take_remembered = (lambda path: None) if options.get("no_handover") \
                else real["take_remembered"]
            resume._apply_hyperparameters = (lambda engine, wanted: None) if options.get(
                "skip_apply_hyperparameters") else real["apply"]
            lines, tracker = [], RecordingTracker()
            entry = {"lines": lines, "scalars": tracker.scalars, "error": None}
            try:
                run = parse_args(argv)
                ps = ParallelState.build(run.parallel, run.model)
                result = loop.train(run, ps, torch.device("cpu"), tracker=tracker, printer=lines.append)
                entry.update(iterations=sorted(result.losses), start_iteration=result.start_iteration,
                             losses=[result.losses[i] for i in sorted(result.losses)], saved=list(result.saved))
                save = run.checkpoint.save
                if save and result.saved:
                    entry["pointers"] = tuple(open(os.path.join(save, n)).read().strip()
                                              for n in ("latest", "latest_checkpointed_iteration.txt"))
            except (ConfigError, CheckpointError) as error:
                entry["error"] = str(error)
            entry.update(reads=dict(state["reads"]), after_load=state["after_load"],
                         weight_change=state["weight_change"], engines_built=state["engines_built"])
            out[name] = entry
    finally:
        resume.Checkpointer.prepare, resume.Checkpointer.load = real["prepare"], real["load"]
        loop.build_engine, TrainingEngine.train_step = real["build_engine"], real["train_step"]
        zero_shards.take_remembered, resume._apply_hyperparameters = real["take_remembered"], real["apply"]
        torch.load = real["torch_load"]
    return out
