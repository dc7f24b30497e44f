"""Run targets for tests/test_optimizers.py: trainings inside spawned gloo ranks that also report, per
iteration, the learning rate, global batch and consumed samples the loop logged (--log-interval 1)."""

from __future__ import annotations

import re

import engine_cases as ec

OPTIMIZERS = ["adam", "adamw", "sgd", "apex.adam", "adamwschedulefree", "sgdschedulefree", "adopt", "sophiag",
              "ds.fusedlamb", "ipex.lamb", "muon", "muonclip", "galoreadamw", "dshampooadamw", "adam8bit"]
# multi-rank checks skip names that run the same class as another (apex.adam = adamw, ipex.lamb = ds.fusedlamb
# without the trust-ratio bounds)
MULTI_RANK = [name for name in OPTIMIZERS if name not in ("apex.adam", "ipex.lamb")]
# at tp=2 × pp=2 × dp=2 (8 ranks, the costliest launch: one launch for all, 2 iterations each): every
# optimizer class (apex.adam and ipex.lamb run the adamw and ds.fusedlamb classes)
EIGHT_RANK = ["adam", "adamw", "sgd", "adopt", "sophiag", "ds.fusedlamb", "adamwschedulefree", "sgdschedulefree",
              "muon", "muonclip", "galoreadamw", "dshampooadamw", "adam8bit"]
# whole-matrix optimizers: ZeRO-1/2 partition their state by whole parameters, bf16 keeps fp32 masters; ZeRO-3 is refused
WHOLE_MATRIX = {"muon", "muonclip", "galoreadamw", "dshampooadamw"}
# per-optimizer learning rates that learn the tiny model in a few steps (ScheduleFree-SGD and LAMB need more)
LR = {"sgd": "0.3", "sgdschedulefree": "0.5", "ds.fusedlamb": "0.05", "ipex.lamb": "0.05", "dshampooadamw": "3e-3",
      "sophiag": "3e-3", "ds.onebitlamb": "0.05"}
# the tiny model's largest attention logits are ~0.05 at the start: a threshold that clips some heads at once;
# Shampoo preconditioning at every step in blocks of 16: the fused qkv [64, 32] and SwiGLU fc1 [128, 32] are cut
# into blocks whose rows are the single-rank ones only if tp shards are gathered in the single-rank order
# (q | k | v, gate | up)
EXTRA = {"muonclip": ("--muonclip-t", "0.05"),
         "dshampooadamw": ("--dshampooadamw-max-preconditioner-dim", "16", "--dshampooadamw-precondition-freq", "1")}

# upstream's log line: " iteration=       3/       7 | consumed_samples=          12 | ... | learning_rate=0.01 |
# global_batch_size=    4 | ..." (the LR after the iteration's step)
_LINE = re.compile(r"iteration=\s*(\d+)/\s*\d+ \| consumed_samples=\s*(\d+) \|.*?\| learning_rate=(\S+) \| "
                   r"global_batch_size=\s*(\d+) \|")
_GRAD_NORM = re.compile(r"\| grad_norm=(\S+) \|")


def optimizer_flags(name: str, *extra: str) -> list[str]:
    return ec.flags("--optimizer", name, "--lr", LR.get(name, "1e-2"), "--log-interval", "1", *EXTRA.get(name, ()),
                    *extra)


def train_logged(rank: int, world_size: int, cases: list) -> dict:
    """ec.train_cases, plus {"log": [(iteration, consumed samples, lr, global batch)]} from rank 0's lines."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ec.make_mock_data_learnable()
    from megatron.config.arguments import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    ec.record_process_groups()
    out = {}
    for name, argv in cases:
        ec.destroy_previous_case_groups()
        lines = []
        try:
            run = parse_args(argv)
            ps = ParallelState.build(run.parallel, run.model)
            result = train(run, ps, torch.device("cpu"), printer=lines.append)
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the case
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        log = [(int(m[1]), int(m[2]), float(m[3]), int(m[4])) for m in map(_LINE.search, lines) if m]
        grad_norms = [float(m[1]) for m in map(_GRAD_NORM.search, lines) if m]  # rank 0's lines (3 decimals)
        out[name] = {"losses": [result.losses[i] for i in sorted(result.losses)],
                     "iterations": sorted(result.losses), "start_iteration": result.start_iteration,
                     "consumed_samples": result.consumed_samples, "log": log, "grad_norms": grad_norms, "eval": dict(result.eval_losses),
                     "saved": list(result.saved), "exit_reason": result.exit_reason}
    return out


def train_logged_per_layer_fp32(rank: int, world_size: int, cases: list) -> dict:
    """train_logged with galoreadamw8bitperlayer's 8-bit GaLore (CUDA only) replaced by fp32 GaLoreAdamW: the
    optimizer-in-backward machinery through DeepSpeed's engine on CPU."""
    import megatron.optimizer as mo

    real = mo._per_layer_errors
    mo._per_layer_errors = lambda run, device, world: [e for e in real(run, device, world) if "CUDA only" not in e]
    mo.PER_LAYER_EIGHT_BIT = False
    return train_logged(rank, world_size, cases)


# a fused [40, 160] weight split over tp=2 in two segments (rows 24 | 16), rows of growing scale: a rank's shard
# (3,200 elements) is under bitsandbytes' 4,096-element threshold for 8-bit state, and the 256-element blocks of
# the whole tensor cut across rows, so only the single-rank tensor (segments merged in order) gives its step
FUSED_SHAPE, FUSED_SEGMENTS = (40, 160), (24, 16)


def _fused_tensors(step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    scale = torch.arange(1, FUSED_SHAPE[0] + 1, dtype=torch.float32).unsqueeze(1)
    return torch.randn(FUSED_SHAPE, generator=g) * scale, torch.randn(7, generator=g)


def adam8bit_tp2_fixed_tensors(rank: int, steps: int = 3) -> dict:
    """adam8bit through FullMatrixOptimizer at tp=2 (the world of 2 ranks) on the fused weight and a replicated
    vector, against bitsandbytes' Adam8bit on the whole tensors in this process: the largest differences of this
    rank's shard and of the vector after `steps` steps (0.0: bit-exact)."""
    import bitsandbytes as bnb
    import torch

    from megatron.core.layers import mark_partition, shard_tensor
    from megatron.optimizer.full_matrix import FullMatrixOptimizer

    def make(groups):
        return bnb.optim.Adam8bit(groups, lr=1e-2, weight_decay=0.1)

    whole = [torch.nn.Parameter(t) for t in _fused_tensors(0)]
    reference = make([{"params": whole}])
    mine = [torch.nn.Parameter(shard_tensor(whole[0].detach(), 0, 2, rank, FUSED_SEGMENTS)),
            torch.nn.Parameter(whole[1].detach().clone())]
    mark_partition(mine[0], 0, segments=FUSED_SEGMENTS)
    ours = FullMatrixOptimizer([{"params": mine, "weight_decay": 0.1}], lambda p: True, make, make,
                               tp_group=None, tp_size=2, tp_rank=rank)
    for step in range(1, steps + 1):
        grads = _fused_tensors(step)
        whole[0].grad, whole[1].grad = grads[0].clone(), grads[1].clone()
        mine[0].grad = shard_tensor(grads[0], 0, 2, rank, FUSED_SEGMENTS)
        mine[1].grad = grads[1].clone()
        reference.step()
        ours.step()
    expected = shard_tensor(whole[0].detach(), 0, 2, rank, FUSED_SEGMENTS)
    return {"shard": float((mine[0].detach() - expected).abs().max()),
            "vector": float((mine[1].detach() - whole[1].detach()).abs().max()),
            "eight_bit_state": ours.matrix.state[ours._copies[id(mine[0])]]["state1"].dtype == torch.uint8}


def train_logged_and_fixed(rank: int, world_size: int, cases: list) -> dict:
    """train_logged, plus {"adam8bit_tp2_fixed": adam8bit_tp2_fixed_tensors(rank)} (one launch for both)."""
    out = train_logged(rank, world_size, cases)
    out["adam8bit_tp2_fixed"] = adam8bit_tp2_fixed_tensors(rank)
    return out
