"""--optimizer ds.onebitlamb (megatron/optimizer/onebit_lamb.py): the warmup stage is LAMB, the compression
stage equals a brute-force simulation of error-compensated 1-bit momentum averaging, save/resume across the
freeze boundary is bit-exact, the engine stops all-reducing gradients after freeze_step and the model learns,
and what it cannot run is refused naming the flags."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import engine_cases as ec  # noqa: E402
import onebit_cases as obc  # noqa: E402
from multirank import run_ranks  # noqa: E402

from megatron.config.arguments import parse_args  # noqa: E402
from megatron.optimizer import optimizer_errors  # noqa: E402

FREEZE = 4
ONEBIT = ("--optimizer", "ds.onebitlamb", "--lr", "0.05", "--clip-grad", "0", "--log-interval", "1")


# ---- brute-force reference (plain loops, no bit packing) ---------------------------------------------------

def _sign(x):
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _coefficient(w, u, lo, hi):
    wn, un = w.norm().item(), u.norm().item()
    return 1.0 if wn == 0 or un == 0 else min(max(wn / un, lo), hi)


def simulate(world: int, steps: int) -> list:
    """Both ranks' weights after each step (identical on every rank), computed in one process."""
    h = obc.HYPER
    b1, b2 = h["betas"]
    w = [t.clone() for t in obc.initial_weights()]
    m = [[torch.zeros_like(t) for t in w] for _ in range(world)]
    v = [torch.zeros_like(t) for t in w]
    freeze_c = [0.0 for _ in w]
    last_f = [1.0 for _ in w]
    v_fresh, scaling = None, None
    n = sum(t.numel() for t in w)
    padded = -(-n // (8 * world)) * 8 * world
    chunk = padded // world
    worker_err = [torch.zeros(padded) for _ in range(world)]
    server_err = [torch.zeros(chunk) for _ in range(world)]
    history = []
    for step in range(1, steps + 1):
        grads = [obc.local_grads(step, r) for r in range(world)]
        if step <= h["freeze_step"]:
            avg = [sum(grads[r][i] for r in range(world)) / world for i in range(len(w))]
            for i in range(len(w)):
                for r in range(world):
                    m[r][i] = b1 * m[r][i] + (1 - b1) * avg[i]
                v[i] = b2 * v[i] + (1 - b2) * avg[i] * avg[i]
                u = m[0][i] / (v[i].sqrt() + h["eps"]) + h["weight_decay"] * w[i]
                c = _coefficient(w[i], u, h["min_coeff"], h["max_coeff"])
                if c != 1.0:
                    freeze_c[i] = h["coeff_beta"] * freeze_c[i] + (1 - h["coeff_beta"]) * c
                w[i] = w[i] - h["lr"] * c * u
            if step == h["freeze_step"]:
                v_fresh = [t.clone() for t in v]
        else:
            if scaling is None:
                scales = [m[0][i].norm().item() / math.sqrt(w[i].numel()) for i in range(len(w))]
                scaling = [(sum(scales) / len(scales)) / s for s in scales]
            previous = [t.clone() for t in m[0]]
            flats = []
            for r in range(world):
                m[r] = [b1 * m[r][i] + (1 - b1) * grads[r][i] for i in range(len(w))]
                flat = torch.zeros(padded)
                flat[:n] = torch.cat([(m[r][i] * scaling[i]).reshape(-1) for i in range(len(w))])
                flats.append(flat)
            compressed = [flats[0]] if world == 1 else []  # one rank: nothing to average, nothing compressed
            for r in range(world if world > 1 else 0):  # each worker: error-compensated sign with one scale
                x = flats[r] + worker_err[r]
                s = x.norm() / math.sqrt(padded)
                worker_err[r] = x - s * _sign(x)
                compressed.append(s * _sign(x))
            result = flats[0].clone() if world == 1 else torch.zeros(padded)
            for r in range(world if world > 1 else 0):  # each server: its chunk averaged, compressed again
                part = slice(r * chunk, (r + 1) * chunk)
                y = sum(compressed[q][part] for q in range(world)) / world + server_err[r]
                s = y.norm() / math.sqrt(chunk)
                server_err[r] = y - s * _sign(y)
                result[part] = s * _sign(y)
            offset = 0
            for i in range(len(w)):
                k = w[i].numel()
                avg_m = result[offset:offset + k].view_as(w[i]) / scaling[i]
                offset += k
                for r in range(world):
                    m[r][i] = avg_m.clone()
                g = (avg_m - b1 * previous[i]) / (1 - b1)
                v_fresh[i] = b2 * v_fresh[i] + (1 - b2) * g * g
                denom = v[i].sqrt() + h["eps"]
                pre = avg_m / denom
                u = pre + h["weight_decay"] * w[i]
                f = (denom / (v_fresh[i].sqrt() + h["eps"])).max().item()
                ratio = min(1.0, pre.norm().item() / u.norm().item())
                f = f * ratio + (1 - ratio)
                f = min(max(f, h["factor_min"]), h["factor_max"])
                f = min(max(f, last_f[i] * (1 - h["factor_threshold"])), last_f[i] * (1 + h["factor_threshold"]))
                last_f[i] = f
                w[i] = w[i] - h["lr"] * freeze_c[i] * f * u
        history.append([t.clone() for t in w])
    return history


# ---- tests ---------------------------------------------------------------------------------------------------

def test_warmup_stage_at_one_rank_is_lamb_without_bias_correction():
    from megatron.optimizer.lamb import Lamb
    from megatron.optimizer.onebit_lamb import OnebitLamb

    steps = 3
    expected = simulate(1, steps)  # freeze_step 2: two LAMB steps, then one with the frozen variance (dp=1)
    params = [torch.nn.Parameter(t.clone()) for t in obc.initial_weights()]
    opt = OnebitLamb(params, **obc.HYPER)
    for step in range(1, steps + 1):
        for p, g in zip(params, obc.local_grads(step, 0)):
            p.grad = g
        opt.step()
        for p, e in zip(params, expected[step - 1]):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    # with betas 0 bias correction is 1: the warmup step is exactly the project's LAMB with the same bounds
    hyper = {**obc.HYPER, "betas": (0.0, 0.0), "freeze_step": 100}
    a = [torch.nn.Parameter(t.clone()) for t in obc.initial_weights()]
    b = [torch.nn.Parameter(t.clone()) for t in obc.initial_weights()]
    onebit = OnebitLamb(a, **hyper)
    lamb = Lamb(b, lr=hyper["lr"], betas=(0.0, 0.0), eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                min_coeff=hyper["min_coeff"], max_coeff=hyper["max_coeff"])
    for step in range(1, 4):
        for p, q, g in zip(a, b, obc.local_grads(step, 0)):
            p.grad, q.grad = g.clone(), g.clone()
        onebit.step()
        lamb.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_pack_and_unpack_signs_round_trip():
    from megatron.optimizer.onebit_lamb import pack_signs, unpack_signs

    x = torch.tensor([1.0, -2.0, 0.0, -0.5, 3.0, 3.0, -1.0, -1.0, -4.0, 0.1, 0.2, -0.3, 0.0, -9.0, 2.0, 1.0])
    assert pack_signs(x).tolist() == [0b10101100, 0b01101011]
    assert torch.equal(unpack_signs(pack_signs(x)), torch.where(x >= 0, 1.0, -1.0))


TRAIN_ITERS, EXIT_AT = 12, 6


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """One 2-rank launch: OnebitLamb on fixed tensors (6 steps, saved after steps 1 and 3), and trainings
    through the engine with freeze_step FREEZE (uninterrupted; saved at EXIT_AT and resumed)."""
    flags = ec.flags(*ONEBIT, "--train-iters", str(TRAIN_ITERS))
    ckpt = str(tmp_path_factory.mktemp("onebit") / "ckpt")
    cases = [("uninterrupted", flags),
             ("interrupted", flags + ["--save", ckpt, "--save-interval", "100", "--exit-interval", str(EXIT_AT)]),
             ("resumed", flags + ["--load", ckpt]),
             ("tp2", ec.flags(*ONEBIT, "--train-iters", str(LAYOUT_ITERS), *TP2))]
    return run_ranks(2, obc.dp2_checks, 6, [1, 3], cases, FREEZE, timeout=600)


LAYOUT_ITERS = FREEZE + 3  # the loss of iteration k follows k - 1 steps: the last three follow compression steps
TP2 = ("--tensor-model-parallel-size", "2")
PP2 = ("--pipeline-model-parallel-size", "2")


@pytest.fixture(scope="module")
def one_rank():
    flags = ec.flags(*ONEBIT, "--train-iters", str(LAYOUT_ITERS))
    return run_ranks(1, obc.train_counting_allreduces, [("single", flags)], FREEZE, timeout=600)[0]["single"]


@pytest.fixture(scope="module")
def four_ranks():
    """tp=2 × pp=2 at dp=1 (no compression: the single-rank steps), and tp=2 × dp=2 and pp=2 × dp=2, which
    compress each model-parallel rank's momentum over its data-parallel group."""
    cases = [("tp2_pp2", ec.flags(*ONEBIT, "--train-iters", str(LAYOUT_ITERS), *TP2, *PP2)),
             ("tp2_dp2", ec.flags(*ONEBIT, "--train-iters", str(LAYOUT_ITERS), *TP2)),
             ("pp2_dp2", ec.flags(*ONEBIT, "--train-iters", str(LAYOUT_ITERS), *PP2))]
    return run_ranks(4, obc.train_counting_allreduces, cases, FREEZE, timeout=600)


@pytest.fixture(scope="module")
def fixed_dp2(dp2):
    import io

    return [torch.load(io.BytesIO(result["fixed"])) for result in dp2]


def test_compression_stage_at_dp2_equals_a_brute_force_simulation(fixed_dp2):
    expected = simulate(2, 6)
    for rank_result in fixed_dp2:
        for got, want in zip(rank_result["history"], expected):
            for p, e in zip(got, want):
                torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    # the ranks agree bit for bit, yet each keeps its own worker error (their local momenta differ)
    for a, b in zip(fixed_dp2[0]["history"][-1], fixed_dp2[1]["history"][-1]):
        assert torch.equal(a, b)
    assert not torch.equal(fixed_dp2[0]["worker_error"], fixed_dp2[1]["worker_error"])


def test_tp2_shards_step_like_the_whole_tensors_across_the_freeze_boundary(dp2):
    """Trust ratio, factor (a maximum) and the weight-decay rule's norms are the whole tensor's at tp=2."""
    import io

    from megatron.optimizer.onebit_lamb import OnebitLamb

    params = [torch.nn.Parameter(t.clone()) for t in obc.tp_weights()]
    opt = OnebitLamb(params, **obc.HYPER)  # one rank, whole tensors: the reference
    expected = []
    for step in range(1, 7):  # freeze_step 2: two warmup steps, four with the frozen variance
        for p, g in zip(params, obc.tp_grads(step)):
            p.grad = g
        opt.step()
        expected.append([p.detach().clone() for p in params])
    for rank, rank_result in enumerate(dp2):
        for got, want in zip(torch.load(io.BytesIO(rank_result["tp2_fixed"])), expected):
            torch.testing.assert_close(got[0], want[0][2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_save_and_resume_across_the_freeze_boundary_is_bit_exact(fixed_dp2):
    for rank_result in fixed_dp2:
        final = rank_result["history"][-1]
        for step in (1, 3):  # saved in the warmup stage, and in the compression stage (error buffers saved)
            for a, b in zip(rank_result["resumed"][step], final):
                assert torch.equal(a, b), f"resumed after step {step}"


def test_resume_at_another_dp_size_in_the_compression_stage_is_refused():
    from megatron.optimizer.onebit_lamb import OnebitLamb

    params = [torch.nn.Parameter(t.clone()) for t in obc.initial_weights()]
    opt = OnebitLamb(params, **obc.HYPER)
    state = opt.state_dict()
    state["onebit"] = {**state["onebit"], "dp_size": 2, "worker_errors": torch.zeros(2, 32),
                       "server_errors": torch.zeros(2, 16)}
    with pytest.raises(ValueError, match="saved in the compression stage at data-parallel size 2"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError, match="saved by another --optimizer"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())


def test_engine_stops_gradient_allreduce_after_freeze_step_learns_and_resumes_bit_for_bit(dp2):
    for rank_result in dp2:
        trainings = rank_result["trainings"]
        for name, result in trainings.items():
            assert "error" not in result, f"{name}: {result.get('error')}"
        full = trainings["uninterrupted"]
        # DeepSpeed all-reduced the gradients of the warmup steps only; after them the optimizer averages
        assert full["allreduce_steps"] == list(range(FREEZE)), full["allreduce_steps"]
        assert trainings["resumed"]["allreduce_steps"] == [], trainings["resumed"]["allreduce_steps"]
        losses = full["losses"]
        assert len(losses) == TRAIN_ITERS and losses[-1] < losses[0] - 0.3, losses
        assert all(math.isfinite(x) for x in losses)
        assert trainings["interrupted"]["losses"] == losses[:EXIT_AT]
        assert trainings["resumed"]["losses"] == losses[EXIT_AT:]


def _single_rank_losses(one_rank) -> list:
    assert "error" not in one_rank, one_rank.get("error")
    losses = one_rank["losses"]
    assert len(losses) == LAYOUT_ITERS and losses[-1] < losses[0], losses
    return losses


def test_tp2_and_tp2_pp2_at_dp1_step_like_one_rank_across_the_freeze_boundary(one_rank, dp2, four_ranks):
    # the trust ratio, the factor and the norms of the weight-decay rule are those of the whole tensors: sums of
    # squares (and the factor's maximum) over the tp group for tp shards, tp-duplicated tensors counted once
    reference = _single_rank_losses(one_rank)
    for layout, results in (("tp2", dp2), ("tp2_pp2", four_ranks)):
        for rank_result in results:
            result = rank_result["trainings"][layout] if layout == "tp2" else rank_result[layout]
            assert "error" not in result, f"{layout}: {result.get('error')}"
            assert result["losses"] == pytest.approx(reference, abs=5e-5, rel=0), layout
            assert result["allreduce_steps"] == [], layout  # dp = 1: nothing to average, nothing compressed
    # at dp=2 the warmup steps are the single-rank steps too (the engine's full-precision gradient all-reduce)
    for rank_result in dp2:
        assert rank_result["trainings"]["uninterrupted"]["losses"][:FREEZE + 1] == \
            pytest.approx(reference[:FREEZE + 1], abs=5e-5, rel=0)


def test_tp2_and_pp2_at_dp2_warm_up_like_one_rank_then_compress_per_model_parallel_rank(one_rank, four_ranks):
    reference = _single_rank_losses(one_rank)
    for rank_result in four_ranks:
        for layout in ("tp2_dp2", "pp2_dp2"):
            result = rank_result[layout]
            assert "error" not in result, f"{layout}: {result.get('error')}"
            losses = result["losses"]
            assert losses[:FREEZE + 1] == pytest.approx(reference[:FREEZE + 1], abs=5e-5, rel=0), layout
            # DeepSpeed's gradient all-reduce (the pipeline engine's too) only in the warmup stage
            assert result["allreduce_steps"] == list(range(FREEZE)), (layout, result["allreduce_steps"])
            assert len(losses) == LAYOUT_ITERS and losses[-1] < losses[FREEZE] < losses[0], (layout, losses)
            assert all(math.isfinite(x) for x in losses), layout
            # the dp ranks agree on every weight; tp-duplicated tensors and the pipeline-tied embedding are
            # compressed in buffers of their own, so every copy of them stays identical (after the last step)
            assert result["copies_agree"], layout


@pytest.mark.parametrize("extra, named", [
    (("--zero-stage", "1"), "--zero-stage 1"), (("--bf16",), "--bf16/--fp16"),
    (("--ds-sequence-parallel-size", "2"), "--ds-sequence-parallel-size 2"),
    (("--clip-grad", "1.0"), "--clip-grad 1.0"),
])
def test_refused_combinations_name_their_flags(extra, named):
    errors = optimizer_errors(parse_args(ec.flags(*ONEBIT, *extra)), "cpu", 8)
    assert len(errors) == 1 and "--optimizer ds.onebitlamb" in errors[0] and named in errors[0], errors
    assert optimizer_errors(parse_args(ec.flags(*ONEBIT)), "cpu", 2) == []
    assert optimizer_errors(parse_args(ec.flags(*ONEBIT, *TP2, *PP2)), "cpu", 8) == []
