"""--accumulate-allreduce-grads-in-fp32 for the whole-matrix optimizers (megatron/optimizer/mixed_precision.py)
together with --tiled-mlp, whose backward delivers the MLP weights' gradients tile by tile inside one backward:
the fp32 accumulation hook fires once per tile and must add each tile's gradient, not keep the last one.

bf16 muon, one rank, 2 micro-batches a step, 4 steps: the tiled run's losses equal the plain run's within 1e-3
relative and its logged gradient norms within 1%. Tiling rounds each tile's gradient to bf16 before the fp32 sum
where the plain run rounds the micro-batch's whole gradient once, so the two differ by bf16 rounding only
(measured: losses 6.5e-5 apart, norms 0.2%). A hook that overwrote main_grad instead of adding (checked by
breaking it) moves the losses 3.4e-3 apart and the first step's gradient norm by 14%.
"""

from __future__ import annotations

import optimizer_cases as oc
from multirank import run_ranks

FP32_ACCUMULATION = ("--bf16", "--accumulate-allreduce-grads-in-fp32", "--train-iters", "4",
                     "--global-batch-size", "4")  # micro-batch 2 (engine_cases.TINY): 2 micro-batches a step
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
