"""--accumulate-allreduce-grads-in-fp32 for the whole-matrix optimizers (megatron/optimizer/mixed_precision.py).

With --tiled-mlp, whose backward delivers the MLP weights' gradients tile by tile inside one backward:
the fp32 accumulation hook fires once per tile and must add each tile's gradient, not keep the last one.

bf16 muon, one rank, 2 micro-batches a step, 4 steps: the tiled run's losses equal the plain run's within 1e-3
relative and its logged gradient norms within 1%. Tiling rounds each tile's gradient to bf16 before the fp32 sum
where the plain run rounds the micro-batch's whole gradient once, so the two differ by bf16 rounding only
(measured: losses 6.5e-5 apart, norms 0.2%). A hook that overwrote main_grad instead of adding (checked by
breaking it) moves the losses 3.4e-3 apart and the first step's gradient norm by 14%.
"""

from __future__ import annotations

import torch

import fp32_accumulation_cases as fc
import optimizer_cases as oc
from multirank import run_ranks

BF16_FP32_SUMS = ("--bf16", "--accumulate-allreduce-grads-in-fp32")
# micro-batch 2 (engine_cases.TINY), global batch 4 at dp 1: 2 micro-batches a step
FP32_ACCUMULATION = (*BF16_FP32_SUMS, "--train-iters", "4", "--global-batch-size", "4")
TILED = ("--tiled-mlp", "--sequence-tile-size", "16")  # 8 positions a tile at micro-batch 2: 4 tiles of 32


def test_bf16_muon_with_fp32_accumulation_takes_the_same_steps_with_the_tiled_mlp():
    cases = [("plain", oc.optimizer_flags("muon", *FP32_ACCUMULATION)),
             ("tiled", oc.optimizer_flags("muon", *FP32_ACCUMULATION, *TILED))]
    out = run_ranks(1, oc.train_logged, cases, timeout=600)[0]
    for name in ("plain", "tiled"):
        assert "error" not in out[name], f"{name}: {out[name].get('error')}"
    plain, tiled = out["plain"]["losses"], out["tiled"]["losses"]
    assert len(plain) == len(tiled) == 4
    assert plain[-1] < plain[0]  # it trains
    worst = max(abs(t - p) / p for p, t in zip(plain, tiled))
    norms = out["plain"]["grad_norms"], out["tiled"]["grad_norms"]
    assert worst <= 1e-3, (plain, tiled)
    # the gradient norm each step (logged to 3 decimals): the sum over every tile, not the last tile's share
    assert len(norms[0]) == len(norms[1]) == 4
    assert all(abs(t - p) <= 0.01 * p + 1e-3 for p, t in zip(*norms)), norms


def test_at_pp2_the_tied_embedding_accumulates_and_is_summed_over_the_stages_in_fp32():
    """bf16 muon at pp 2, 2 micro-batches a step: the word embedding, tied between the first and the last stage,
    enters the optimizer's reduction as each stage's fp32 micro-batch sum (main_grad, no bf16 .grad left for
    DeepSpeed's own bf16 sum over the stages) and leaves it as the fp32 sum of the two stages' sums, on both."""
    flags = oc.optimizer_flags("muon", *BF16_FP32_SUMS, "--train-iters", "2", "--global-batch-size", "4",
                               "--pipeline-model-parallel-size", "2")
    ranks = run_ranks(2, fc.train_recording_tied, [("pp2", flags)], timeout=600)
    for r in ranks:
        assert "error" not in r["pp2"], r["pp2"].get("error")
    steps = [r["pp2"]["tied"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 2
    for first, last in zip(*steps):
        assert len(first["before"]) == len(last["before"]) == 1  # one tied weight on each stage
        assert first["grad"] == last["grad"] == [False]
        (dtype_a, a), (dtype_b, b) = first["before"][0], last["before"][0]
        assert dtype_a == dtype_b == "torch.float32"
        total = (torch.tensor(a) + torch.tensor(b)).tolist()  # fp32 + fp32: the same sum in either order
        for stage in (first, last):
            dtype, reduced = stage["after"][0]
            assert dtype == "torch.float32" and reduced == total
        # the sum is not one bf16 would hold: an fp32 sum of bf16 values, and a bf16 sum would round it
        assert torch.tensor(total).bfloat16().float().tolist() != total
