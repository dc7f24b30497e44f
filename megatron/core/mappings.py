"""Autograd-aware collectives for tensor-, sequence- and Ulysses-parallel regions.

Each collective is a small autograd Function behind a one-line function whose backward is
the collective's transpose (copy <-> all-reduce, split <-> gather, reduce-scatter <-> all-gather).
Every function takes the process group explicitly and is the identity when the group has one
rank (or is None), so single-process models run without torch.distributed.
Layout convention: activations are batch-first [b, s, h]; "sequence" collectives act on dim 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden]


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} evenly over a group of {size} ranks; "
            "make that size (sequence length, heads or vocabulary) divisible by the parallel size"
        )
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    x = x.contiguous()
    if _is_gloo(group):
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0],) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"reduce-scatter: dim {dim} of size {x.shape[dim]} is not divisible by {size} ranks")
    if _is_gloo(group):  # gloo has no reduce-scatter: all-reduce, then keep this rank's chunk
        return _split(_all_reduce(x.clone(), group), dim, group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split `scatter_dim` into one chunk per rank, send chunk j to rank j, concatenate received on `gather_dim`."""
    size = group_size(group)
    if x.shape[scatter_dim] % size:
        raise ValueError(
            f"all-to-all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {size} ranks "
            "(Ulysses needs heads per tensor-parallel rank divisible by --ds-sequence-parallel-size)"
        )
    send = torch.stack(x.chunk(size, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along `dim`; backward either splits (output used redundantly) or reduce-scatters."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


# ---- tensor-parallel region (hidden dimension) ---------------------------------------------
def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward (output of a row-parallel layer); identity backward."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, -1, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, -1, group, False)


# ---- Megatron sequence-parallel region (sequence dimension, over the tp group) --------------
def gather_from_sequence_parallel_region(x: torch.Tensor, group, dim: int = SEQUENCE_DIM,
                                         reduce_grad: bool = True) -> torch.Tensor:
    """All-gather sequence shards; backward reduce-scatters (each rank used the full sequence
    for its part of a tensor-parallel op) or, with reduce_grad=False, just splits."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, dim, group, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Sum partial results over tp and keep this rank's sequence shard; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToRegion.apply(x, dim, group)


# ---- Ulysses (all-to-all over the sp group) --------------------------------------------------
def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Scatter `scatter_dim` over the group and gather `gather_dim` from it; backward is the inverse."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group)
