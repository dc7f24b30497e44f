"""FullMatrixOptimizer's dp collectives at ZeRO-1 (megatron/optimizer/full_matrix.py, mixed_precision.py): one
all-reduce of every gradient, and one all-gather per dtype of the owners' parameters, padded to the largest
owner; every replica ends with the update a single rank computes from the mean gradient."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multirank import run_ranks  # noqa: E402

SIZES = [(30, torch.bfloat16), (7, torch.float32), (12, torch.bfloat16), (20, torch.float32), (5, torch.bfloat16)]
LR = 0.5


def _values(rank: int, index: int, numel: int, kind: float) -> torch.Tensor:
    """Distinct, exactly representable values for each (rank, parameter, kind)."""
    return torch.arange(numel, dtype=torch.float32) / 8 + kind * (index + 1) + 0.25 * rank


def _step_on_ranks(rank: int, world_size: int) -> list:
    import torch.distributed as dist

    from megatron.optimizer.full_matrix import FullMatrixOptimizer
    from megatron.optimizer.mixed_precision import GradientPlan

    params = [torch.nn.Parameter(_values(0, i, n, 1.0).to(dtype)) for i, (n, dtype) in enumerate(SIZES)]
    plan = GradientPlan(group=dist.group.WORLD, size=world_size, divisor=world_size, reduce_dtype=torch.float32,
                        half=torch.bfloat16)

    def sgd(groups):
        return torch.optim.SGD(groups, lr=LR)

    optimizer = FullMatrixOptimizer([{"params": params, "lr": LR, "weight_decay": 0.0}], lambda p: p.ndim == 2,
                                    sgd, sgd, dp_group=dist.group.WORLD, dp_size=world_size, dp_rank=rank,
                                    gradients=plan)
    for i, p in enumerate(params):
        p.grad = _values(rank, i, p.numel(), 2.0).to(p.dtype)
    calls = {}

    def counted(name):
        original = getattr(dist, name)

        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)
        return call

    names = ("all_reduce", "all_gather", "broadcast", "reduce")
    saved = {name: getattr(dist, name) for name in names}
    for name in names:
        setattr(dist, name, counted(name))
    try:
        optimizer.step()
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
    return calls, [(str(p.dtype), p.detach().float().tolist()) for p in params]  # plain values cross processes


def test_zero1_step_all_reduces_once_and_all_gathers_each_dtype_padded_to_the_largest_owner():
    from megatron.optimizer.full_matrix import owners

    owner = owners([n for n, _ in SIZES], 2)
    load = {(r, dtype): sum(n for (n, d), o in zip(SIZES, owner) if o == r and d == dtype)
            for r in range(2) for dtype in (torch.bfloat16, torch.float32)}
    # each dtype has parameters on both owners, in unequal amounts: the all-gather pads
    assert all(load.values()) and load[0, torch.bfloat16] != load[1, torch.bfloat16]
    assert load[0, torch.float32] != load[1, torch.float32]
    ranks = run_ranks(2, _step_on_ranks)
    for calls, _ in ranks:  # the gradients, the norm's squares; one all-gather per dtype
        assert calls == {"all_reduce": 2, "all_gather": 2}
    for i, (n, dtype) in enumerate(SIZES):
        start = _values(0, i, n, 1.0).to(dtype).float()
        mean = (_values(0, i, n, 2.0).to(dtype).float() + _values(1, i, n, 2.0).to(dtype).float()) / 2
        expected = (start - LR * mean).to(dtype)  # the fp32 master's SGD step, rounded to the parameter's dtype
        for _, values in ranks:
            assert values[i] == (str(dtype), expected.float().tolist()), i
