"""--dry-run's optimizer memory (megatron/optimizer/memory.py) against the tensors a real run holds: one step
of the tiny model through the training engine, then the bytes of the optimizer's state tensors and of the fp32
copies it steps, next to the estimate for the same flags. adam (DeepSpeed's optimizers), muon and adam8bit
(whole-matrix, bf16 with fp32 masters) at one rank and at dp 2 with ZeRO-1 (DeepSpeed's flat partitions /
whole parameters per owner), and at one rank also GaLore, Shampoo (blocks of 16) and SGD with momentum: within
3% (the estimate counts no step scalars, nor DeepSpeed's alignment padding; measured: equal to the byte).
"""

from __future__ import annotations

import pytest

import dry_run_memory_cases as cases
import engine_cases as ec
import optimizer_cases as oc
from megatron.config.arguments import parse_args
from megatron.optimizer.memory import optimizer_memory
from multirank import run_ranks

TOLERANCE = 0.03
ONE_STEP = ("--train-iters", "1", "--global-batch-size", "4")
ONE_RANK = {"adam": ("--optimizer", "adam"), "adam_bf16": ("--optimizer", "adam", "--bf16"),
            "muon": ("--optimizer", "muon", "--bf16"), "adam8bit": ("--optimizer", "adam8bit", "--bf16"),
            "galoreadamw": ("--optimizer", "galoreadamw", "--bf16"),
            "dshampooadamw": ("--optimizer", "dshampooadamw", *oc.EXTRA["dshampooadamw"], "--bf16"),
            "sgd_momentum": ("--optimizer", "sgd", "--sgd-momentum", "0.9")}
DP2_ZERO1 = {name: (*flags, "--bf16", "--zero-stage", "1")
             for name, flags in (("adam", ("--optimizer", "adam")), ("muon", ("--optimizer", "muon")),
                                 ("adam8bit", ("--optimizer", "adam8bit")))}


def _close(measured: float, estimated: float) -> bool:
    return abs(estimated - measured) <= TOLERANCE * measured


@pytest.fixture(scope="module")
def one_rank():
    memory = [(name, ec.flags(*flags, *ONE_STEP)) for name, flags in ONE_RANK.items()]
    return run_ranks(1, cases.measure, memory, timeout=600)[0]


@pytest.fixture(scope="module")
def two_ranks():
    memory = [(name, ec.flags(*flags, *ONE_STEP)) for name, flags in DP2_ZERO1.items()]
    return run_ranks(2, cases.measure, memory, timeout=600)


@pytest.mark.parametrize("name", list(ONE_RANK))
def test_the_estimate_is_the_optimizer_state_and_masters_one_rank_holds(one_rank, name):
    held, estimate = one_rank[name]["held"], one_rank[name]["estimate"]
    assert held["state"] > 0
    assert _close(held["state"], estimate["state"]), (held, estimate)
    assert _close(held["masters"], estimate["masters"]), (held, estimate)


@pytest.mark.parametrize("name", list(DP2_ZERO1))
def test_at_dp2_zero1_the_estimate_is_the_most_loaded_ranks_share(two_ranks, name):
    held = [two_ranks[r][name]["held"] for r in range(2)]
    estimate = two_ranks[0][name]["estimate"]
    worst = max(held, key=lambda h: h["state"] + h["masters"])
    assert _close(worst["state"], estimate["state"]), (held, estimate)
    assert _close(worst["masters"], estimate["masters"]), (held, estimate)
    assert estimate["state"] < 0.75 * _one_rank_estimate(name)["state"]  # partitioned, not replicated


def _one_rank_estimate(name: str) -> dict:
    flags = DP2_ZERO1[name]
    return optimizer_memory(parse_args(ec.flags(*flags, *ONE_STEP)), 1)


def test_the_stage_lists_every_parameter_and_tp_keeps_whole_copies_of_gathered_matrices():
    from megatron.optimizer.memory import stage_parameters

    run = parse_args(ec.flags("--optimizer", "muon", "--bf16", *ONE_STEP))
    padded = run.model.replace(vocab_size=run.model.padded_vocab_size(1))  # the embedding rows the model holds
    assert sum(q.numel for q in stage_parameters(run.model, 1, 1)) == padded.num_parameters()
    one = optimizer_memory(run, 1)
    tp2 = optimizer_memory(parse_args(ec.flags("--optimizer", "muon", "--bf16", "--tensor-model-parallel-size",
                                               "2", *ONE_STEP)), 2)
    # Muon's momenta and fp32 copies of the hidden matrices are whole on each tp rank: more than half of one
    # rank's; the AdamW side (embedding) is halved
    assert one["state"] / 2 < tp2["state"] < one["state"]
    assert one["masters"] / 2 < tp2["masters"] < one["masters"]
