"""Injected faults inside a 2-rank training (one launch, three runs): a NaN loss at step 3 is reported and the
step skipped (plain torch optimizer and ZeRO-1); NaN from step 5 on stops the run after
--max-consecutive-nan-steps 2 with a checkpoint holding the last good weights (those after step 4; exit
code 4); resuming from it while a checkpoint read fails with ESTALE twice (a fault-injecting wrapper around
torch.load, so whichever reader reads first meets it) is retried, logged, and trains on."""

import errno
import math
import os
import re

import pytest
import torch

import engine_cases as ec
from multirank import run_ranks

GAS = 2  # TINY: global batch 8 = micro batch 2 × dp 2 × 2 accumulation steps


def _inject_nan_steps(steps: set):
    """Make the loss NaN at the given steps (counted from this run's first step)."""
    import megatron.training.engine as engine_module

    real = engine_module.masked_mean_loss
    calls = {"n": 0}

    def loss_with_nan(*args, **kwargs):
        step = calls["n"] // GAS + 1
        calls["n"] += 1
        loss, report = real(*args, **kwargs)
        if step in steps:
            return loss * float("nan"), report * float("nan")
        return loss, report

    engine_module.masked_mean_loss = loss_with_nan
    return lambda: setattr(engine_module, "masked_mean_loss", real)


def _flaky_reads(failures: int):
    """Reading a checkpoint file (torch.load of a .pt under the run's directories) fails with ESTALE `failures`
    times, then works: whichever reader reads first (the resume's, DeepSpeed's) meets the fault."""
    import torch

    real = torch.load
    left = {"n": failures}

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(".pt") and left["n"] > 0:
            left["n"] -= 1
            raise OSError(errno.ESTALE, "Stale file handle", str(f))
        return real(f, *args, **kwargs)

    torch.load = load
    return lambda: setattr(torch, "load", real)


def numerics_cases(rank: int, world_size: int, root: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from megatron.config.arguments import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    def run(argv, fault=None):
        lines = []
        undo = fault() if fault else None
        try:
            parsed = parse_args(argv)
            result = train(parsed, ParallelState.build(parsed.parallel, parsed.model), torch.device("cpu"),
                           printer=lines.append)
        finally:
            if undo:
                undo()
        return {"losses": dict(result.losses), "exit_code": result.exit_code, "exit_reason": result.exit_reason,
                "iteration": result.iteration, "lines": lines, "saved": list(result.saved)}

    out = {}
    for name, zero in (("plain", "0"), ("zero1", "1")):
        # NaN at step 3 (skipped, training goes on), then from step 5 on: stop after 2 in a row, at 6.
        out[name] = run(ec.flags("--zero-stage", zero, "--log-interval", "1", "--train-iters", "50",
                                 "--max-consecutive-nan-steps", "2", "--save", f"{root}/{name}",
                                 "--save-interval", "4"),
                        lambda: _inject_nan_steps({3} | set(range(5, 51))))
    out["flaky_resume"] = run(ec.flags("--train-iters", "50", "--exit-interval", "5", "--load", f"{root}/plain",
                                       "--log-interval", "1", "--max-consecutive-nan-steps", "2"),
                              lambda: _flaky_reads(2))
    return out


@pytest.fixture(scope="module")
def numerics(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    return root, run_ranks(2, numerics_cases, str(root))


@pytest.mark.parametrize("name", ["plain", "zero1"])
def test_a_nan_loss_at_step_k_is_reported_and_skipped_and_training_goes_on(numerics, name):
    results = numerics[1][0][name]
    losses = results["losses"]
    assert math.isnan(losses[3]) and all(math.isfinite(losses[i]) for i in (1, 2, 4))
    report = [line for line in results["lines"] if "--check-for-nan-in-loss-and-grad" in line]
    assert "rank 0: iteration 3: lm loss nan" in report[0] and "update was skipped (1 in a row" in report[0]
    log3 = [line for line in results["lines"] if re.search(r"iteration= +3/", line)][0]
    assert "number_of_skipped_iterations=  1 | number_of_nan_iterations=  1 |" in log3 and math.isfinite(losses[4])


@pytest.mark.parametrize("name", ["plain", "zero1"])
def test_consecutive_nan_steps_stop_with_a_checkpoint_of_the_last_good_weights(numerics, name):
    root, results = numerics
    stop = results[0][name]
    assert stop["exit_code"] == 4 and stop["iteration"] == 6  # steps 5 and 6 bad: stop after the second
    assert "2 consecutive steps with a NaN/Inf loss" in stop["exit_reason"]
    good = torch.load(root / name / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
    last = torch.load(root / name / "global_step6" / "mp_rank_00_model_states.pt", weights_only=False)
    assert good["module"].keys() == last["module"].keys()
    for key, value in good["module"].items():  # the bad steps changed nothing: the weights after step 4
        assert torch.all(torch.isfinite(value)) and torch.equal(value, last["module"][key]), key


def test_a_transient_checkpoint_read_error_is_retried_logged_and_the_resume_succeeds(numerics):
    for rank in (0, 1):
        flaky = numerics[1][rank]["flaky_resume"]
        retries = [line for line in flaky["lines"] if "ESTALE" in line]
        assert len(retries) == 2 and "retry 1/3" in retries[0] and "retry 2/3" in retries[1]
        assert "mp_rank_00_model_states.pt" in retries[0] or "optim" in retries[0] or "global_step3" in retries[0]
        # resumed from the NaN stop's checkpoint (iteration 6, the weights after step 4) and trained on
        assert flaky["iteration"] == 10 and sorted(flaky["losses"]) == [7, 8, 9, 10]
        assert all(math.isfinite(loss) for loss in flaky["losses"].values())
