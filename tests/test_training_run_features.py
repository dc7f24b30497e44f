"""Run-level flags change what they should: whole-batch run length with the final save, upstream's log line,
per-phase timers, TensorBoard selections (learning rate, world size, optimizer states), skipped iterations,
torch.profiler traces, the kill-switch file and --skip-train; one 2-rank launch."""

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
    (root / "stop").write_text("")
    cases += [
        ("skip_and_profile", ec.flags("--train-iters", "4", "--train-range-to-skip", "2", "3", "--log-interval", "1",
                                      "--profile", "pt", "--profile_steps", "4,4", "--profile-ranks", "1",
                                      "--trace-dir", str(root / "trace"))),
        ("kill_switch", ec.flags("--kill-switch-file", str(root / "stop"), "--save", str(root / "killed"),
                                 "--save-interval", "100")),
        ("skip_train", ec.flags("--skip-train", "--eval-iters", "1", "--eval-interval", "5", "--split", "8,1,1")),
        # upstream's --train-tokens budget: 763 tokens = 2.98 batches of 8 × 32, so training stops after 3 of 10
        ("train_tokens", ec.flags("--train-iters", "10", "--train-tokens", str(3 * 8 * 32 - 5),
                                  "--save", str(root / "tokens"), "--save-interval", "100")),
    ]
    return root, run_ranks(2, ec.logged_cases, cases)[0]


def test_samples_not_a_multiple_of_the_batch_train_whole_batches_and_save_at_the_end(runs):
    root, results = runs
    r = results["partial_batch"]
    assert r["iterations"] == [1, 2] and r["consumed_samples"] == 16 and r["exit_reason"] == "trained 2 iterations"
    assert r["saved"] and r["saved"][-1].endswith("global_step2")


def test_the_log_line_is_upstreams(runs):
    lines = runs[1]["partial_batch"]["lines"]
    line = next(x for x in lines if x.startswith(" iteration=       2/       2 |"))
    # argonne-lcf/Megatron-DeepSpeed's megatron/training_log.py: fields, order and number formats (fp32 ZeRO-0:
    # no loss scale); the LR is the one after the step (constant here)
    assert re.fullmatch(r" iteration=       2/       2 \| consumed_samples=          16 \| consumed_tokens=         512 \| "
                        r"elapsed_time_per_iteration_ms=\d+\.\d \| learning_rate=0\.01 \| global_batch_size=    8 \| "
                        r"lm loss=\d+\.\d{6} \| grad_norm=\d+\.\d{3} \| actual_seqlen=   32 \| "
                        r"number_of_skipped_iterations=  0 \| number_of_nan_iterations=  0 \| samples_per_second=\d+\.\d{3} \| "
                        r"tokens_per_gpu_per_second_tgs=\d+\.\d{3} \| TFLOPs=\d+\.\d\d \| memory_MB=\d+ \|", line), line


def test_timers_report_each_phase_at_level_2_and_reach_tensorboard(runs):
    r = runs[1]["partial_batch"]
    lines = r["lines"]
    start = lines.index("(min, max) time across ranks (ms):")
    phases = {line.split()[0] for line in lines[start + 1:start + 7]}
    assert {"forward-backward", "forward-compute", "backward-compute", "batch-generator", "optimizer"} <= phases
    assert r["scalars"]["timers/forward-backward-time"][2] > 0 and r["scalars"]["timers/optimizer-time"][2] > 0


def test_tensorboard_selections_and_optimizer_states(runs):
    s = runs[1]["partial_batch"]["scalars"]
    assert "learning-rate/learning-rate" not in s and s["world-size/world-size"] == {1: 2.0, 2: 2.0}
    assert s["optimizer/iteration"] == {1: 1.0, 2: 2.0} and s["optimizer/consumed_train_tokens"][2] == 16 * 32
    assert s["optimizer/momentum_l2"][2] > 0 and s["optimizer/variance_l2"][2] > 0
    assert s["optimizer/weight_l2"][2] > s["optimizer/weight_abs_max"][2] > 0


def test_skipped_iterations_read_their_batch_and_advance_the_schedule_without_training(runs):
    r = runs[1]["skip_and_profile"]
    assert r["iterations"] == [1, 2, 3, 4] and r["consumed_samples"] == 32  # batches 2 and 3 were read
    assert [x != x for x in r["losses"]] == [False, True, True, False]  # no loss computed for 2 and 3
    assert any(line.startswith("iteration 2 skipped") for line in r["lines"])
    # upstream counts them per log interval (--log-interval 1 here), in the line and as training/skiped_iterations
    assert r["scalars"]["training/skiped_iterations"] == {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0}
    skipped = [x for x in r["lines"] if x.startswith(" iteration=       3/")][0]
    assert "| number_of_skipped_iterations=  1 | number_of_nan_iterations=  0 |" in skipped
    assert "lm loss=" not in skipped  # no applied step in the interval: upstream shows no loss


def test_profile_writes_a_chrome_trace_of_the_chosen_steps_on_the_chosen_ranks(runs):
    root, _ = runs
    traces = sorted(p.name for p in (root / "trace").iterdir())
    assert traces == ["torch-trace-1-of-2-steps4-4.json"]  # --profile-ranks 1 only
    assert '"traceEvents"' in (root / "trace" / traces[0]).read_text()  # a Chrome trace


def test_the_kill_switch_file_saves_and_exits(runs):
    root, results = runs
    r = results["kill_switch"]
    assert r["iterations"] == [1] and "kill switch file" in r["exit_reason"]
    assert (root / "killed" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_skip_train_evaluates_without_training(runs):
    r = runs[1]["skip_train"]
    assert r["iterations"] == [] and r["exit_reason"].startswith("--skip-train")
    assert 0 in r["eval_losses"] and r["test_loss"] is not None
    # upstream's end-of-training lines (megatron/training.py): "validation loss at" for the test set too
    lines = "\n".join(r["lines"])
    assert (f" validation loss at iteration 0 on 8-sample draw from validation set | "
            f"lm loss value={r['eval_losses'][0]:.6f}lm loss PPL=") in lines
    assert (f" validation loss at iteration 0 on 8-sample draw from test set | "
            f"lm loss value={r['test_loss']:.6f}lm loss PPL=") in lines


def test_train_tokens_stops_training_once_consumed_as_upstreams_loop(runs):
    root, results = runs
    r = results["train_tokens"]
    assert r["iterations"] == [1, 2, 3] and r["consumed_samples"] == 24
    assert r["exit_reason"] == "consumed --train-tokens 763 tokens"
    assert r["saved"] and r["saved"][-1].endswith("global_step3")  # the normal end: the final save
