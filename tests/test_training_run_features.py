"""Run-level flags change what they should: whole-batch run length with the final save, Megatron's log line,
per-phase timers, TensorBoard selections (learning rate, world size, optimizer states), one 2-rank launch."""

import re

import pytest

import engine_cases as ec
from multirank import run_ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = list(ec.TINY)
    i = base.index("--train-iters")
    del base[i:i + 2]
    # 21 samples at a global batch of 8: 2 whole batches (Megatron rounds down); the last iteration saves.
    cases = [("partial_batch", ec.flags(
        "--train-samples", "21", "--save", str(root / "ckpt"), "--save-interval", "100", "--log-interval", "1",
        "--timing-log-level", "2", "--no-log-learnig-rate-to-tensorboard", "--log-world-size-to-tensorboard",
        "--log-optimizer-states-to-tensorboard", "--log-timers-to-tensorboard", base=base))]
    return root, run_ranks(2, ec.logged_cases, cases)[0]


def test_samples_not_a_multiple_of_the_batch_train_whole_batches_and_save_at_the_end(runs):
    root, results = runs
    r = results["partial_batch"]
    assert r["iterations"] == [1, 2] and r["consumed_samples"] == 16 and r["exit_reason"] == "trained 2 iterations"
    assert r["saved"] and r["saved"][-1].endswith("iter_0000002")


def test_the_log_line_is_megatrons(runs):
    lines = runs[1]["partial_batch"]["lines"]
    line = next(x for x in lines if x.startswith(" iteration        2/       2 |"))
    assert re.search(r"\| consumed samples: +16 \| consumed tokens: +512 \| elapsed time per iteration \(ms\): "
                     r"[\d.]+ \| learning rate: [\d.]+E[-+]\d+ \| global batch size: +8 \| lm loss: [\d.]+E[-+]\d+ \|",
                     line), line
    assert "| number of skipped iterations:   0 |" in line and "| TFLOPs:" in line


def test_timers_report_each_phase_at_level_2_and_reach_tensorboard(runs):
    r = runs[1]["partial_batch"]
    lines = r["lines"]
    start = lines.index("(min, max) time across ranks (ms):")
    phases = {line.split()[0] for line in lines[start + 1:start + 7]}
    assert {"forward-backward", "forward-compute", "backward-compute", "batch-generator", "optimizer"} <= phases
    assert r["scalars"]["timers/forward-backward"][2] > 0 and r["scalars"]["timers/optimizer"][2] > 0


def test_tensorboard_selections_and_optimizer_states(runs):
    s = runs[1]["partial_batch"]["scalars"]
    assert "train/learning_rate" not in s and s["train/world_size"] == {1: 2.0, 2: 2.0}
    assert s["optimizer/momentum_l2"][2] > 0 and s["optimizer/variance_l2"][2] > 0
    assert s["optimizer/weight_l2"][2] > s["optimizer/weight_abs_max"][2] > 0
