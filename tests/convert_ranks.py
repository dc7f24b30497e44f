"""Rank functions for the converter tests: train a tiny model a few steps with the real engine, save, resume.

Run inside tests/multirank.run_ranks. Batches are deterministic functions of (step, sample index), so any
layout sees the same global batch; every rank returns its losses.
"""

from __future__ import annotations

import torch

# --vocab-size 99: NullTokenizer's 100 tokens (V + 1, EOD 99, as upstream's), the size the tests below slice to
LLAMA_FLAGS = ["--num-layers", "4", "--hidden-size", "48", "--num-attention-heads", "6", "--num-key-value-heads", "2",
               "--ffn-hidden-size", "64", "--seq-length", "16", "--max-position-embeddings", "16",
               "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings", "--rope-theta", "5000",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--attention-dropout", "0",
               "--hidden-dropout", "0", "--vocab-size", "99", "--make-vocab-size-divisible-by", "16"]
GPT_FLAGS = ["--num-layers", "4", "--hidden-size", "48", "--num-attention-heads", "4", "--seq-length", "16",
             "--max-position-embeddings", "16", "--attention-dropout", "0", "--hidden-dropout", "0",
             "--vocab-size", "99", "--make-vocab-size-divisible-by", "16"]
COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--train-iters",
          "8", "--seed", "7", "--clip-grad", "1.0"]


def global_batch(step: int, size: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (size, seq + 1), generator=g)


def batches_for(step: int, engine, ps, run):
    """This dp rank's micro-batches of global step `step` (sample i goes to dp rank i // (n / dp))."""
    gbs, mbs = engine.global_batch_size, engine.engine.train_micro_batch_size_per_gpu()
    data = global_batch(step, gbs, run.model.seq_length, run.model.vocab_size)
    per_rank = gbs // ps.dp_size
    mine = data[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
    return iter([{"tokens": mine[i:i + mbs]} for i in range(0, per_rank, mbs)])


def build(argv):
    import deepspeed

    from megatron.config.arguments import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.engine import build_engine

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    run = parse_args(argv)
    ps = ParallelState.build(run.parallel, run.model)
    engine = build_engine(run, ps, torch.device("cpu"))
    return run, ps, engine


def train(engine, ps, run, first_step: int, last_step: int) -> list[float]:
    return [engine.train_step(batches_for(step, engine, ps, run)).loss for step in range(first_step, last_step)]


def save(engine, run, save_dir: str, iteration: int) -> None:
    from megatron.checkpoint.deepspeed_io import TrainingProgress, save_checkpoint

    progress = TrainingProgress(iteration=iteration, consumed_samples=iteration * engine.global_batch_size,
                                args=dict(run.args))
    save_checkpoint(engine.engine, save_dir, progress, torch.device("cpu"),
                    extra_state={"model_config": run.model.to_dict()})


PROBE_TOKENS = torch.arange(32).reshape(2, 16) * 7 % 100  # fixed tokens whose logits the tests compare


@torch.no_grad()
def local_logits(engine, ps):
    """This rank's vocab-parallel logits [2, 16, padded_vocab / tp] of PROBE_TOKENS at the engine's layout
    (None on ranks that hold none: not the last pipeline stage, or dp rank > 0)."""
    tokens = PROBE_TOKENS
    positions = torch.arange(16).unsqueeze(0).expand(2, 16)
    if engine.is_pipeline:
        batch = ((tokens, positions), (tokens, torch.ones(2, 16)))
        _, logits = engine.engine.eval_batch(iter([batch]), return_logits=True, num_micro_batches=1)
        keep = ps.is_pipeline_last_stage and ps.dp_rank == 0
    else:
        engine.engine.eval()
        logits = engine.engine(tokens, position_ids=positions)
        engine.engine.train()
        keep = ps.dp_rank == 0
    return logits.detach().clone() if keep else None


def train_save(rank, world, argv, save_dir, steps):
    """Train `steps` steps and save; returns the losses and this rank's logits of PROBE_TOKENS."""
    run, ps, engine = build(argv)
    losses = train(engine, ps, run, 0, steps)
    save(engine, run, save_dir, steps)
    logits = local_logits(engine, ps)
    engine.destroy()
    return {"losses": losses, "logits": logits}


def train_save_continue(rank, world, argv, save_dir, save_at, steps):
    """Uninterrupted reference run: save at `save_at`, keep going to `steps`; returns all losses."""
    run, ps, engine = build(argv)
    losses = train(engine, ps, run, 0, save_at)
    save(engine, run, save_dir, save_at)
    logits = local_logits(engine, ps)
    losses += train(engine, ps, run, save_at, steps)
    engine.destroy()
    return {"losses": losses, "logits": logits}


def resume_other_layout(rank, world, argv, load_dir, steps):
    """Build at this (different) layout, load with reshard.load_checkpoint_any_layout, train on to `steps`."""
    from megatron.checkpoint.reshard import load_checkpoint_any_layout

    run, ps, engine = build(argv)
    progress = load_checkpoint_any_layout(engine, load_dir)
    losses = train(engine, ps, run, progress.iteration, steps)
    engine.destroy()
    return {"iteration": progress.iteration, "consumed_samples": progress.consumed_samples, "losses": losses}


def run_sequence(rank, world, jobs):
    """Several of the functions above in one launch: jobs = [(function name, args...)]."""
    import torch.distributed as dist

    out = []
    for name, *args in jobs:
        out.append(globals()[name](rank, world, *args))
        dist.barrier()
    return out


def to_universal(rank, world, load_dir):
    """Rank 0 converts `load_dir` with DeepSpeed's ds_to_universal (convert/universal.py); the others wait."""
    if rank == 0:
        from megatron.convert.to_universal import convert_to_universal

        convert_to_universal(load_dir)
    return None


def resume_universal(rank, world, argv, load_dir, steps):
    """Build at this layout with --universal-checkpoint, load through checkpoint.resume, train on."""
    from megatron.checkpoint.resume import load_checkpoint

    run, ps, engine = build(argv + ["--universal-checkpoint", "--load", load_dir])
    progress = load_checkpoint(engine, run)
    losses = train(engine, ps, run, progress.iteration, steps)
    engine.destroy()
    return {"iteration": progress.iteration, "consumed_samples": progress.consumed_samples, "losses": losses}


def train_save_continue_losses(rank, world, argv, save_dir, save_at, steps):
    """train_save_continue without the logits (nothing shared through file descriptors with the parent)."""
    out = train_save_continue(rank, world, argv, save_dir, save_at, steps)
    out.pop("logits")
    return out


def resume_pair(rank, world, argv, argonne_dir, truth_path, steps):
    """Train on from the argonne files through checkpoint.resume, and from the states they were built
    from (the LR schedule stepped to where the saved run was); returns both runs' losses and progress."""
    from argonne_files import TruthSource

    from megatron.checkpoint.reshard import load_checkpoint_any_layout
    from megatron.checkpoint.resume import load_checkpoint

    out = {}
    run, ps, engine = build(argv + ["--load", argonne_dir])
    progress = load_checkpoint(engine, run)
    out["argonne"] = {"iteration": progress.iteration, "consumed_samples": progress.consumed_samples,
                      "losses": train(engine, ps, run, progress.iteration, steps)}
    engine.destroy()
    run, ps, engine = build(argv)
    progress = load_checkpoint_any_layout(engine, "", source=TruthSource(truth_path, run.model))
    for _ in range(progress.iteration):
        engine.engine.lr_scheduler.step()
    out["truth"] = {"losses": train(engine, ps, run, progress.iteration, steps)}
    engine.destroy()
    return out


def train_through_loop(rank, world, argv):
    """pretrain_gpt's loop (megatron.training.loop.train) on mock data; returns losses, start, 'loaded' lines."""
    import deepspeed

    from megatron.config.arguments import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train as train_loop

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    run = parse_args(argv)
    ps = ParallelState.build(run.parallel, run.model)
    lines = []
    result = train_loop(run, ps, torch.device("cpu"), printer=lines.append)
    return {"losses": dict(result.losses), "start": result.start_iteration,
            "loaded": [line for line in lines if line.startswith("loaded")],
            "sample_order": [line for line in lines if line.startswith("sample order")]}
