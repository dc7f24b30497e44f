"""Tensor-parallel layers: VocabParallelEmbedding, ColumnParallelLinear, RowParallelLinear.

Each layer holds this rank's shard of a weight and hides the communication (mappings.py).
Weights are initialised by drawing the FULL tensor from a CPU generator seeded with `init_seed`
and keeping this rank's shard, so a model is identical whatever the tensor-parallel size: normal(0,
init_std), or with init_method="xavier_uniform" Xavier-uniform of the full shape (upstream's
--init-method-xavier-uniform on its CPU-initialisation path).
`shard_tensor` / `merge_shards` are the one definition of how a dimension is split (including
"segmented" splits such as fused q|k|v or gate|up, where each segment is split separately).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import mappings, packed_linear


# ---- how a dimension is split over tensor-parallel ranks ------------------------------------
def _check_segments(size: int, segments: Optional[Sequence[int]], tp_size: int, what: str) -> list[int]:
    segments = [size] if segments is None else list(segments)
    if sum(segments) != size:
        raise ValueError(f"{what}: segments {segments} do not add up to the dimension's size {size}")
    for seg in segments:
        if seg % tp_size:
            raise ValueError(
                f"{what}: a segment of size {seg} (of {segments}) is not divisible by tensor-parallel size "
                f"{tp_size}; choose sizes (heads, ffn, vocabulary padding) that tp divides"
            )
    return segments


def shard_tensor(full: torch.Tensor, dim: int, tp_size: int, tp_rank: int,
                 segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's shard of `full` along `dim`: each segment is split into tp chunks, chunks concatenated."""
    segments = _check_segments(full.shape[dim], segments, tp_size, "shard_tensor")
    pieces = [seg.chunk(tp_size, dim=dim)[tp_rank] for seg in full.split(segments, dim=dim)]
    return torch.cat(pieces, dim=dim).clone()


def merge_shards(shards: Sequence[torch.Tensor], dim: int,
                 segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of shard_tensor: `segments` are the FULL segment sizes (None: one segment)."""
    tp_size = len(shards)
    full_size = sum(s.shape[dim] for s in shards)
    segments = _check_segments(full_size, segments, tp_size, "merge_shards")
    per_rank = [seg // tp_size for seg in segments]
    split = [s.split(per_rank, dim=dim) for s in shards]
    return torch.cat([split[r][i] for i in range(len(segments)) for r in range(tp_size)], dim=dim)


def full_normal(shape: Sequence[int], std: float, seed: Optional[int]) -> torch.Tensor:
    """normal(0, std) drawn on the CPU from a generator seeded with `seed` (None: torch's default)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=generator)


def full_init(shape: Sequence[int], std: float, seed: Optional[int], method: str = "normal") -> torch.Tensor:
    """The full weight tensor: full_normal(shape, std, seed), or with method "xavier_uniform" uniform in
    ±sqrt(6 / (fan_in + fan_out)) of `shape` ([out, in]: fan_out = shape[0], fan_in = shape[1]; std unused)."""
    if method == "normal":
        return full_normal(shape, std, seed)
    if method != "xavier_uniform":
        raise ValueError(f"unknown init method {method!r} (normal or xavier_uniform)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
    return nn.init.xavier_uniform_(torch.empty(tuple(shape), dtype=torch.float32), generator=generator)


def mark_partition(param: nn.Parameter, partition_dim: Optional[int], sequence_parallel: bool = False,
                   segments: Optional[Sequence[int]] = None) -> None:
    """Record how `param` is split over tp ranks: `partition_dim` (None: replicated) and `partition_segments`,
    the full segment sizes it was split with (shard_tensor's `segments`; None: one segment), so that
    merge_shards(shards, param.partition_dim, param.partition_segments) rebuilds the single-rank tensor."""
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim
    param.partition_segments = None if segments is None or len(segments) == 1 else tuple(segments)
    param.sequence_parallel = sequence_parallel  # grads need an all-reduce over tp (see model code)


# ---- layers ---------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split over tp ranks.

    Rows >= num_embeddings (vocabulary padding) start at zero. The output is the sum over tp of
    each rank's partial lookup: all-reduced, or reduce-scattered along the sequence when
    `sequence_parallel` (the output is then this rank's sequence shard).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None,
                 padded_num_embeddings: Optional[int] = None, sequence_parallel: bool = False,
                 init_std: float = 0.02, init_seed: Optional[int] = None, init_method: str = "normal"):
        super().__init__()
        padded = padded_num_embeddings or num_embeddings
        self.tp_group = tp_group
        self.tp_size, tp_rank = mappings.group_size(tp_group), mappings.group_rank(tp_group)
        if padded < num_embeddings or padded % self.tp_size:
            raise ValueError(
                f"VocabParallelEmbedding: padded vocabulary {padded} must be >= the vocabulary {num_embeddings} "
                f"and divisible by tensor-parallel size {self.tp_size}"
            )
        self.num_embeddings, self.padded_num_embeddings = num_embeddings, padded
        self.rows_per_rank = padded // self.tp_size
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = self.vocab_start + self.rows_per_rank
        self.sequence_parallel = sequence_parallel
        full = torch.zeros(padded, embedding_dim)
        full[:num_embeddings] = full_init((num_embeddings, embedding_dim), init_std, init_seed, init_method)
        self.weight = nn.Parameter(shard_tensor(full, 0, self.tp_size, tp_rank))
        mark_partition(self.weight, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
            local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return mappings.reduce_from_tensor_parallel_region(out, self.tp_group)


class ColumnParallelLinear(nn.Module):
    """Y = X Aᵀ + b with A's rows (the output features) split over tp ranks.

    `segments` (full output sizes, e.g. [q, k, v]) split each part separately so a rank holds
    [its q | its k | its v]. Input: full activations, or this rank's sequence shard when
    `sequence_parallel` (all-gathered here). Output: this rank's features, or all of them with
    `gather_output`.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = True,
                 segments: Optional[Sequence[int]] = None, gather_output: bool = False,
                 sequence_parallel: bool = False, init_std: float = 0.02, init_seed: Optional[int] = None,
                 init_method: str = "normal"):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size, tp_rank = mappings.group_size(tp_group), mappings.group_rank(tp_group)
        self.segments = _check_segments(output_size, segments, self.tp_size, "ColumnParallelLinear")
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        full = full_init((output_size, input_size), init_std, init_seed, init_method)
        self.weight = nn.Parameter(shard_tensor(full, 0, self.tp_size, tp_rank, self.segments))
        mark_partition(self.weight, 0, segments=self.segments)
        if bias:  # its rows are the weight's rows: [this rank's part of each segment]
            self.bias = nn.Parameter(torch.zeros(output_size // self.tp_size))
            mark_partition(self.bias, 0, segments=self.segments)
        else:
            self.register_parameter("bias", None)
        self.packed_weight: Optional[torch.Tensor] = None  # packed_linear.pack's copy (frozen inference only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = mappings.copy_to_tensor_parallel_region(x, self.tp_group)
        y = packed_linear.linear(x, self.weight, self.bias, self.packed_weight)
        if self.gather_output:
            if len(self.segments) > 1:
                raise ValueError("ColumnParallelLinear: gather_output with segments would interleave them; "
                                 "gather each segment separately")
            y = mappings.gather_from_tensor_parallel_region(y, self.tp_group)
        return y


class RowParallelLinear(nn.Module):
    """Y = X Aᵀ + b with A's columns (the input features) split over tp ranks.

    Input: this rank's features. The partial products are all-reduced, or reduce-scattered along
    the sequence when `sequence_parallel`; the (replicated) bias is added after the reduction,
    so under sequence parallelism its gradient is partial and marked `sequence_parallel`.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_std: float = 0.02, init_seed: Optional[int] = None, init_method: str = "normal"):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size, tp_rank = mappings.group_size(tp_group), mappings.group_rank(tp_group)
        _check_segments(input_size, None, self.tp_size, "RowParallelLinear")
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        full = full_init((output_size, input_size), init_std, init_seed, init_method)
        self.weight = nn.Parameter(shard_tensor(full, 1, self.tp_size, tp_rank))
        mark_partition(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
            mark_partition(self.bias, None, sequence_parallel=sequence_parallel)
        else:
            self.register_parameter("bias", None)
        self.packed_weight: Optional[torch.Tensor] = None  # packed_linear.pack's copy (frozen inference only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_parallel_region(x, self.tp_group)
        y = packed_linear.linear(x, self.weight, None, self.packed_weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = mappings.reduce_from_tensor_parallel_region(y, self.tp_group)
        return y if self.bias is None else y + self.bias
