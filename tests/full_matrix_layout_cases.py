"""Rank functions for tests/test_full_matrix_layouts.py: whole-matrix optimizer checkpoints resumed at another
tp × pp × dp through the reshard and universal paths (megatron/checkpoint/full_matrix_state.py)."""

from __future__ import annotations

import convert_ranks as cr

# the Llama shape of the converter tests (GQA qkv segments, SwiGLU fc1, untied vocabulary 99 padded to 112 at
# tp 1 and 128 at tp 2: adam8bit's gathered embedding holds 8-bit state at both, its 256-element blocks cut a row)
BASE = cr.LLAMA_FLAGS + cr.COMMON + ["--bf16", "--zero-stage", "1"]
EXTRA = {"dshampooadamw": ["--dshampooadamw-max-preconditioner-dim", "16", "--dshampooadamw-precondition-freq", "1"]}


def flags(optimizer: str, *layout: str) -> list[str]:
    return BASE + ["--optimizer", optimizer, *EXTRA.get(optimizer, []), *layout]


def resume_save_continue(rank, world, argv, load_dir, save_dir, steps):
    """Build at this layout, resume `load_dir` through checkpoint.resume (reshard or universal, as planned), save
    at once under `save_dir` (the state as loaded, at this layout), then train on to `steps`."""
    from megatron.checkpoint.resume import load_checkpoint

    run, ps, engine = cr.build(argv + ["--load", load_dir])
    progress = load_checkpoint(engine, run, log=lambda line: None)
    if save_dir:
        cr.save(engine, run, save_dir, progress.iteration)
    losses = cr.train(engine, ps, run, progress.iteration, steps)
    engine.destroy()
    return {"iteration": progress.iteration, "losses": losses}


def refused(rank, world, argv, load_dir):
    """The error message of resuming `load_dir` at this layout (None when it loads)."""
    from megatron.checkpoint.resume import load_checkpoint
    from megatron.errors import MegatronError

    run, ps, engine = cr.build(argv + ["--load", load_dir])
    try:
        load_checkpoint(engine, run, log=lambda line: None)
        message = None
    except MegatronError as error:
        message = str(error)
    engine.destroy()
    return message


def run_sequence(rank, world, jobs):
    import torch.distributed as dist

    out = []
    for name, *args in jobs:
        function = globals().get(name) or getattr(cr, name)
        out.append(function(rank, world, *args))
        dist.barrier()
    return out
