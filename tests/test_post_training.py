"""SFT and DPO on the training engine (finetune_gpt.py's tasks): the layouts agree with one rank, the global-batch
normalisation, SFT's loss against Hugging Face's, DPO's reference store and its refusals, and resume."""

import math

import pytest
import torch

from multirank import run_ranks
from post_training_cases import TINY_POST, post_training_cases


def _close(a, b, tol=1e-5):
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b)) and len(a) == len(b)


def test_tp2_pp2_dp2_zero1_equals_one_rank_for_sft_and_dpo(tmp_path):
    """8 gloo ranks (tp 2 × pp 2 × dp 2, ZeRO-1, DeepSpeed's pipeline engine) against one rank: the first 3 steps'
    losses and DPO's metrics within 1e-5 (fp32), the reference pass included (each layout computes its own)."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--zero-stage", "1"]
    single = run_ranks(1, post_training_cases, [
        ("sft", ["--task", "sft"], TINY_POST),
        ("dpo", ["--task", "dpo", "--ref-logps-path", str(tmp_path / "one.pt"), "--rpo-alpha", "0.5"], TINY_POST)],
        timeout=600)[0]
    eight = run_ranks(8, post_training_cases, [
        ("sft", ["--task", "sft"], TINY_POST + layout),
        ("dpo", ["--task", "dpo", "--ref-logps-path", str(tmp_path / "eight.pt"), "--rpo-alpha", "0.5"],
         TINY_POST + layout)], timeout=900)
    for name in ("sft", "dpo"):
        for rank, result in enumerate(eight):
            assert _close(result[name]["losses"], single[name]["losses"]), (name, rank, result[name]["losses"],
                                                                            single[name]["losses"])
    assert single["sft"]["losses"][-1] < single["sft"]["losses"][0]
    for rank, result in enumerate(eight):
        for got, want in zip(result["dpo"]["metrics"], single["dpo"]["metrics"]):
            assert set(got) == set(want) and _close(list(got.values()), list(want.values())), (rank, got, want)
    torch.testing.assert_close(torch.tensor(eight[0]["dpo"]["reference"]), torch.tensor(single["dpo"]["reference"]),
                               rtol=1e-5, atol=1e-5)
    first = single["dpo"]["metrics"][0]  # step 1: the policy is the reference
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
