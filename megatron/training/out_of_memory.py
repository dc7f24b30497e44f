"""A training step that runs out of memory: say which of the memory options this run could still turn on.

The allocator's error is caught where it can be: torch.OutOfMemoryError on cuda/xpu, and on the CPU Python's
MemoryError or a RuntimeError whose message says that memory could not be allocated ("can't allocate memory",
"not enough memory", "out of memory"). What each option saves is in docs/LONG_SEQUENCES.md.
"""

from __future__ import annotations

import re

import torch

from megatron.config.arguments import RunConfig
from megatron.distributed.parallel_state import ParallelState
from megatron.errors import MegatronError

_ALLOCATOR_MESSAGES = re.compile(r"can't allocate memory|cannot allocate memory|not enough memory|out of memory",
                                 re.IGNORECASE)


class StepOutOfMemory(MegatronError, RuntimeError):
    """A training step that did not fit in this rank's memory; the message lists what would help."""


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and bool(_ALLOCATOR_MESSAGES.search(str(error)))


def memory_options(run: RunConfig, ps: ParallelState) -> list[str]:
    """The activation-memory options this run does not use yet, each with what it saves."""
    m, p = run.model, run.parallel
    options = []
    if not m.checkpoint_activations:
        options.append("--checkpoint-activations (or --recompute-granularity full): keep only each layer's input, "
                       "recompute the layer in backward")
    elif not m.checkpoint_in_cpu:
        options.append("--checkpoint-in-cpu: keep those recomputed layers' inputs on the CPU")
    if m.checkpoint_activations and ps.tp_size > 1 and not m.partition_activations and not m.sequence_parallel:
        options.append("--partition-activations: split the recomputed layers' inputs over the tp ranks")
    if not m.tiled_mlp:
        options.append("--tiled-mlp: no [sequence, ffn-hidden] tensor whole (the MLP runs in sequence tiles)")
    if not m.tiled_logits_loss:
        options.append("--tiled-logits-loss: no [sequence, vocabulary] logits whole (projection + loss in tiles)")
    if ps.tp_size > 1 and not m.sequence_parallel:
        options.append("--sequence-parallel: split norms, dropout and residuals along the sequence over tp")
    if p.ds_sequence_parallel_size == 1:
        options.append("--ds-sequence-parallel-size N (Ulysses): each rank holds 1/N of the sequence")
    if run.training.micro_batch_size > 1:
        options.append(f"a smaller --micro-batch-size (now {run.training.micro_batch_size})")
    if run.training.zero.zero_stage < 3 and ps.pp_size == 1:
        options.append(f"--zero-stage 3 (now {run.training.zero.zero_stage}): partition parameters, gradients "
                       "and optimizer state over data-parallel ranks")
    return options


def out_of_memory_error(error: BaseException, run: RunConfig, ps: ParallelState, iteration: int) -> StepOutOfMemory:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    options = memory_options(run, ps)
    advice = ("options that would lower its memory, not used by this run:\n  - " + "\n  - ".join(options)
              if options else "every activation-memory option is already on: use more ranks "
              "(--ds-sequence-parallel-size, --tensor-model-parallel-size) or a shorter --seq-length")
    return StepOutOfMemory(f"iteration {iteration} ran out of memory on rank {ps.rank} at --seq-length "
                           f"{run.model.seq_length} ({type(error).__name__}: {first_line}); {advice}")
