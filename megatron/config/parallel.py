"""How the job is split: tensor-, pipeline-, data- and sequence-parallel sizes and the comm backend.

`validate_layout` checks a layout against the world size and the model before any
process group is made, naming the flags to change. `add_parallel_arguments` declares the flags,
`parallel_from_args` builds the ParallelConfig from them.

The rules (world size = dp × tp × pp × sp, as upstream's megatron/arguments.py states it) and what Ulysses
needs on top of them, per tensor-parallel rank (heads are split by tp first, then by sp):
- the query heads per tp rank divisible by sp (each sp rank attends over whole heads);
- the key/value heads per tp rank divisible by sp, or sp divisible by them: then each kv head is replicated
  sp / (kv heads per tp rank) times before the all-to-all, as DeepSpeed's Ulysses does
  (deepspeed/runtime/sequence_parallel/ulysses_sp.py, `kv_replication_factor`);
- the sequence divisible by sp (and by tp × sp with Megatron's --sequence-parallel as well).
Upstream asserts sp with tp or pp away ("DeepSpeed's sequence parallel does not work with tensor parallel or
pipeline parallel"); here every axis composes with Ulysses.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from megatron.config.argtypes import pos_int
from megatron.config.model import TransformerConfig
from megatron.errors import ConfigError


class LayoutError(ConfigError):
    """A layout that cannot run (world size, sizes against the model); the message names every problem's flags."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron sequence parallelism: shards norms/dropout activations over the tp group (needs tp > 1).
    sequence_parallel: bool = False
    # DeepSpeed-Ulysses sequence parallelism: all-to-all around attention over its own group.
    ds_sequence_parallel_size: int = 1
    # True: train without DeepSpeed's pipeline engine (needs pp == 1; what ZeRO-2/3 require).
    no_pipeline_parallel: bool = False
    distributed_backend: Optional[str] = None  # None: picked from the device (nccl/xccl/ccl/gloo)

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def sp(self) -> int:
        return self.ds_sequence_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.sp)


def layout_errors(world_size: int, parallel: ParallelConfig, model: Optional[TransformerConfig] = None) -> list[str]:
    """Every problem with a layout, each naming the flags involved; empty when it is valid."""
    tp, pp, sp = parallel.tp, parallel.pp, parallel.sp
    errors = []
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--ds-sequence-parallel-size", sp)):
        if value < 1:
            errors.append(f"{flag} must be >= 1 (got {value})")
    if errors:
        return errors
    if world_size % (tp * pp * sp):
        errors.append(  # upstream's rule (megatron/arguments.py validate_args), with the flags named
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
            f"--pipeline-model-parallel-size {pp} × --ds-sequence-parallel-size {sp} = {tp * pp * sp}; "
            f"launch a multiple of {tp * pp * sp} ranks or change these sizes"
        )
    if parallel.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards over the tp group)")
    if parallel.no_pipeline_parallel and pp > 1:
        errors.append(f"--no-pipeline-parallel contradicts --pipeline-model-parallel-size {pp}")
    if model is not None:
        if model.num_attention_heads % tp:
            errors.append(
                f"--num-attention-heads {model.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        if model.num_key_value_heads % tp:
            errors.append(
                f"--num-key-value-heads {model.num_key_value_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        if model.ffn_hidden_size % tp:
            errors.append(
                f"--ffn-hidden-size {model.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
            )
        if model.num_layers % pp:
            errors.append(
                f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
            )
        if model.seq_length % sp:
            errors.append(
                f"--seq-length {model.seq_length} is not divisible by --ds-sequence-parallel-size {sp}"
            )
        if sp > 1 and (model.num_attention_heads // tp) % sp:
            errors.append(
                f"Ulysses needs the attention heads per tp rank (--num-attention-heads {model.num_attention_heads}"
                f" / --tensor-model-parallel-size {tp} = {model.num_attention_heads // tp}) to be divisible by "
                f"--ds-sequence-parallel-size {sp} (each sp rank attends over whole heads)"
            )
        kv_per_rank = model.num_key_value_heads // tp
        if sp > 1 and kv_per_rank and kv_per_rank % sp and sp % kv_per_rank:
            errors.append(
                f"Ulysses needs the kv heads per tp rank (--num-key-value-heads {model.num_key_value_heads} / "
                f"--tensor-model-parallel-size {tp} = {kv_per_rank}) to be divisible by "
                f"--ds-sequence-parallel-size {sp}, or {sp} divisible by them (each kv head is then replicated, as "
                "DeepSpeed's Ulysses does); change --ds-sequence-parallel-size or --tensor-model-parallel-size"
            )
        if parallel.sequence_parallel and model.seq_length % (tp * sp):
            errors.append(
                f"--sequence-parallel needs --seq-length {model.seq_length} divisible by "
                f"tp {tp} × sp {sp}"
            )
    return errors


def validate_layout(world_size: int, parallel: ParallelConfig, model: Optional[TransformerConfig] = None) -> None:
    errors = layout_errors(world_size, parallel, model)
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=pos_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=pos_int, default=1)
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="train without DeepSpeed's pipeline engine (set for you with --zero-stage 2/3)")
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs tp > 1)")
    g.add_argument("--ds-sequence-parallel-size", type=pos_int, default=1, help="DeepSpeed-Ulysses group size")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo", "ccl", "xccl", "mpi", "hccl"),
                   help="default: picked from the device")


def parallel_from_args(ns: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size, sequence_parallel=ns.sequence_parallel,
        ds_sequence_parallel_size=ns.ds_sequence_parallel_size, no_pipeline_parallel=ns.no_pipeline_parallel,
        distributed_backend=ns.distributed_backend)
