"""What an AuroraGPT user reads matches argonne-lcf/Megatron-DeepSpeed's current main: the training log line
(megatron/training_log.py), the evaluation lines (megatron/training.py's evaluate_and_print_results and the
end-of-training validation and test evaluations), and wandb/TensorBoard (metric names; wandb on by default in
pretrain_gpt_alcf.py, opt-in in pretrain_gpt.py). A parser written from upstream's printing code
(tests/upstream_log_parser.py) reads our lines."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_cases import flags
from multirank import free_port, rank_env
from upstream_log_parser import parse_eval_line, parse_log, parse_training_line

ROOT = Path(__file__).resolve().parents[1]

# upstream's own output, from its ALCF/notes/cooldown.md (an Aurora run of November 2025)
UPSTREAM_TRAIN = (
    "[2025-11-10 09:43:36,161992][I][megatron/training_log:402:training_log]  iteration=  136004/  136100 | "
    "consumed_samples=   835608576 | consumed_tokens=6845305454592 | elapsed_time_per_iteration_ms=3415.3 | "
    "learning_rate=2.0127e-05 | global_batch_size= 6144 | lm loss=12.316531 | loss_scale=1.0 | grad_norm=1020.352 | "
    "actual_seqlen= 8192 | number_of_skipped_iterations=  0 | number_of_nan_iterations=  0 | "
    "samples_per_second=1798.971 | tokens_per_gpu_per_second_tgs=4797.255 | TFLOPs=53.66 |")
UPSTREAM_VALID = (
    "[2025-11-10 12:29:58,134910][I][megatron/training:1693:evaluate_and_print_results]  validation loss at "
    "iteration 137650 on 122880-sample draw from validation set | lm loss value=2.697780lm loss PPL=14.846734")


def upstream_training_log_string(iteration, train_iters, consumed_samples, consumed_tokens, elapsed_s,
                                 learning_rate, batch_size, losses, loss_scale, grad_norm, params_norm, seq_len,
                                 skipped, nan, samples_per_sec, tgs, tflops):
    """Upstream's training_log() string building, copied statement for statement (megatron/training_log.py)."""
    log_string = f" iteration={iteration:8d}/{train_iters:8d} |"
    log_string += f" consumed_samples={consumed_samples:12d} |"
    log_string += f" consumed_tokens={consumed_tokens:12d} |"
    log_string += " elapsed_time_per_iteration_ms=" f"{elapsed_s * 1000.0:.1f} |"
    log_string += f" learning_rate={learning_rate:.6g} |"
    log_string += f" global_batch_size={batch_size:5d} |"
    for key, avg in losses.items():
        if avg > 0.0:
            log_string += " {}={:.6f} |".format(key, avg)
    if loss_scale is not None:
        log_string += " loss_scale={:.1f} |".format(loss_scale)
    if grad_norm is not None:
        log_string += " grad_norm={:.3f} |".format(grad_norm)
    if params_norm is not None:
        log_string += " params_norm={:.3f} |".format(params_norm)
    log_string += " actual_seqlen={:5d} |".format(seq_len)
    log_string += " number_of_skipped_iterations={:3d} |".format(skipped)
    log_string += " number_of_nan_iterations={:3d} |".format(nan)
    log_string += " samples_per_second={:.3f} |".format(samples_per_sec)
    log_string += " tokens_per_gpu_per_second_tgs={:.3f} |".format(tgs)
    log_string += " TFLOPs={:.2f} |".format(tflops)
    return log_string


def test_the_parser_reads_upstreams_own_lines():
    train = parse_training_line(UPSTREAM_TRAIN)
    assert train == {"iteration": 136004, "train_iters": 136100, "consumed_samples": 835608576,
                     "consumed_tokens": 6845305454592, "elapsed_time_per_iteration_ms": 3415.3,
                     "learning_rate": 2.0127e-05, "global_batch_size": 6144, "lm loss": 12.316531, "loss_scale": 1.0,
                     "grad_norm": 1020.352, "actual_seqlen": 8192, "number_of_skipped_iterations": 0,
                     "number_of_nan_iterations": 0, "samples_per_second": 1798.971,
                     "tokens_per_gpu_per_second_tgs": 4797.255, "TFLOPs": 53.66}
    valid = parse_eval_line(UPSTREAM_VALID)
    assert valid == {"iteration": 137650, "set": "validation", "draw": 122880, "end_of_training": True,
                     "losses": {"lm loss": (2.69778, 14.846734)}}
    assert parse_training_line(UPSTREAM_VALID) is None and parse_eval_line(UPSTREAM_TRAIN) is None
    # the pre-2024 format that we used to print is not read
    assert parse_training_line(" iteration        3/      10 | consumed samples:           12 | lm loss: 4.1E+00 |") \
        is None


@pytest.mark.parametrize("case", ["bf16", "fp16_skipped", "fp32_no_scale_params_norm", "no_applied_step"])
def test_our_line_is_upstreams_string_with_our_fields_after_it(case):
    from megatron.training.loop import megatron_log_line

    values = dict(iteration=3, train_iters=10, consumed_samples=12, consumed_tokens=12 * 4096, elapsed_s=0.2501,
                  learning_rate=2.0127e-05, batch_size=4, losses={"lm loss": 4.1234567}, loss_scale=1.0,
                  grad_norm=1.23456, params_norm=None, seq_len=4096, skipped=0, nan=0, samples_per_sec=15.99,
                  tgs=8186.88, tflops=0.456)
    if case == "fp16_skipped":
        values.update(loss_scale=65536.0, skipped=2, nan=1, learning_rate=0.0003)
    elif case == "fp32_no_scale_params_norm":
        values.update(loss_scale=None, params_norm=123.4567, learning_rate=1e-2)
    elif case == "no_applied_step":  # every step of the interval skipped: upstream shows no loss
        values.update(losses={"lm loss": 0.0}, skipped=1, grad_norm=None)
    expected = upstream_training_log_string(**values)
    loss = values["losses"]["lm loss"] or None
    ours = megatron_log_line(values["iteration"], values["train_iters"], values["consumed_samples"],
                             values["consumed_tokens"], 1000 * values["elapsed_s"], values["learning_rate"],
                             values["batch_size"], loss, values["loss_scale"], values["grad_norm"],
                             values["seq_len"], values["skipped"], values["nan"], values["samples_per_sec"],
                             values["tgs"], values["tflops"], 0.25, 0.3, 1234.4, values["params_norm"])
    assert ours == expected + " MFU_percent=25.00 | HFU_percent=30.00 | memory_MB=1234 |"
    assert parse_training_line(ours)["iteration"] == 3


def _run(argv, cwd, env, world_size=1, timeout=600):
    """Launch `world_size` ranks of argv (torchrun's variables) with exactly `env` otherwise; rank 0's output."""
    port = free_port()
    procs = [subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, **rank_env(r, world_size, port)}) for r in range(world_size)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world_size, outs[0][-4000:]
    return outs[0]


FAKE_WANDB = '''"""A stand-in for wandb: records wandb.init's arguments and every key logged, into $FAKE_WANDB_OUT."""
import json, os


class Table:
    def __init__(self, columns=None, data=None):
        self.columns, self.data = columns, data


class _Run:
    def __init__(self, kwargs):
        self.kwargs, self.logged = kwargs, {}

    def log(self, scalars, step=None):
        for key, value in scalars.items():
            if not isinstance(value, Table):
                self.logged.setdefault(key, {})[str(step)] = value

    def finish(self):
        with open(os.environ["FAKE_WANDB_OUT"], "w") as f:
            json.dump({"init": {k: self.kwargs.get(k) for k in ("project", "dir", "name")}, "logged": self.logged}, f)


def init(**kwargs):
    return _Run(kwargs)
'''


def _environment(tmp_path, **extra):
    """This environment without a wandb project, with the fake wandb first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("WB_PROJECT", "WANDB_PROJECT")}
    return {**env, **_fake_wandb(tmp_path), **extra}


def _fake_wandb(tmp_path):
    package = tmp_path / "fake" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_WANDB)
    return {"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}", "FAKE_WANDB_OUT": str(tmp_path / "wandb.json")}


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_parser_for_upstreams_format_reads_our_training_validation_and_test_lines(tmp_path):
    """pretrain_gpt.py on 2 ranks (dp 2, bf16, ZeRO-1), with validation every 3 iterations and a test set; a fake
    wandb on the path shows that the plain entry leaves wandb off without --wandb-project, as upstream's does."""
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *flags(
        "--train-iters", "6", "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "2", "--split", "8,1,1",
        "--bf16", "--zero-stage", "1", "--lr-warmup-iters", "2", "--lr-decay-style", "linear",
        "--tensorboard-dir", str(tmp_path / "tb"))]
    out = _run(argv, tmp_path, _environment(tmp_path), world_size=2)
    assert not (tmp_path / "wandb.json").exists()  # opt-in in pretrain_gpt.py, as upstream's plain entry
    parsed = parse_log(out)
    tb = _scalars(tmp_path / "tb")
    seq, batch = 32, 8

    # training: every --log-interval; values against the per-iteration scalars and the run's shape
    assert [t["iteration"] for t in parsed["train"]] == [2, 4, 6]
    for t in parsed["train"]:
        it = t["iteration"]
        assert t["train_iters"] == 6 and t["global_batch_size"] == batch and t["actual_seqlen"] == seq
        assert t["consumed_samples"] == it * batch and t["consumed_tokens"] == it * batch * seq
        mean = (tb["lm-loss-training/lm loss"][it - 1] + tb["lm-loss-training/lm loss"][it]) / 2
        assert t["lm loss"] == pytest.approx(mean, abs=2e-6)  # the interval's mean, 6 decimals
        # the LR after the iteration's step: warmup to 1e-2 over 2 steps, then linear to 0 at 6
        assert t["learning_rate"] == pytest.approx(1e-2 * min(it / 2, (6 - it) / 4), abs=1e-9)
        assert t["learning_rate"] == pytest.approx(tb["learning-rate/learning-rate"][it], rel=1e-5, abs=1e-12)
        assert t["loss_scale"] == 1.0 and t["grad_norm"] == pytest.approx(tb["training/grad-norm"][it], abs=1e-3)
        assert t["number_of_skipped_iterations"] == 0 and t["number_of_nan_iterations"] == 0
        assert t["samples_per_second"] > 0 and t["tokens_per_gpu_per_second_tgs"] == pytest.approx(
            t["samples_per_second"] * seq / 2, rel=1e-3) and t["TFLOPs"] >= 0
        assert t["elapsed_time_per_iteration_ms"] == pytest.approx(
            1000 * tb["training/iteration_time"][it], abs=0.05)

    # validation: during training at 3 and 6, then at the end of training; then the test set
    valid, test = parsed["validation"], parsed["test"]
    assert [(v["iteration"], v["draw"]) for v in valid] == [(3, None), (6, None), (6, 2 * batch)]
    assert [(t["iteration"], t["draw"]) for t in test] == [(6, 2 * batch)]
    for record, key in [(valid[0], "val"), (test[0], "test")]:  # (iteration 6 has two validation values)
        value, ppl = record["losses"]["lm loss"]
        assert value == pytest.approx(tb[f"{key}/lm loss"][record["iteration"]], abs=1e-6)
        assert ppl == pytest.approx(math.exp(value), rel=1e-5)
    # the end-of-training validation draws other samples than the one at iteration 6 (upstream's iterator goes on)
    assert valid[2]["losses"]["lm loss"][0] != valid[1]["losses"]["lm loss"][0]
    # upstream's TensorBoard validation series, against iterations, consumed samples and tokens
    assert tb["lm-loss-validation/lm loss validation"][3] == pytest.approx(valid[0]["losses"]["lm loss"][0],
                                                                           abs=1e-6)
    assert tb["lm-loss-validation/lm loss validation vs samples"][3 * batch] == pytest.approx(
        valid[0]["losses"]["lm loss"][0], abs=1e-6)
    assert tb["lm-loss-validation/lm loss test vs tokens"][6 * batch * seq] == pytest.approx(
        test[0]["losses"]["lm loss"][0], abs=1e-6)


# upstream's wandb keys (megatron/training_log.py, megatron/training.py's evaluate_and_print_results, timers.py)
UPSTREAM_KEYS = {
    "learning-rate/iteration", "learning-rate/learning-rate",
    "lm-loss-training/iteration", "lm-loss-training/consumed_train_tokens", "lm-loss-training/lm loss",
    "training/grad-norm",
    "optimizer/learning_rate", "optimizer/iteration", "optimizer/consumed_train_tokens", "optimizer/variance_l2",
    "optimizer/variance_sqrt_l2", "optimizer/momentum_l2", "optimizer/weight_l2", "optimizer/variance_l1",
    "optimizer/variance_sqrt_l1", "optimizer/momentum_l1", "optimizer/weight_l1", "optimizer/variance_abs_max",
    "optimizer/variance_sqrt_abs_max", "optimizer/momentum_abs_max", "optimizer/weight_abs_max",
    "throughput/iteration", "throughput/iteration-time", "throughput/samples_per_sec",
    "throughput/samples_per_sec_per_replica", "throughput/tokens_per_sec", "throughput/tokens_per_sec_per_replica",
    "throughput/tokens_per_gpu_per_sec", "throughput/tokens_per_gpu_per_sec_per_replica", "throughput/tflops",
    "throughput/tflops-new", "throughput/tflops-lm", "throughput/approx_params_in_billions",
    "throughput/elapsed_ms_per_iteration",
    "loss/iteration", "loss/lm loss", "loss/lm loss_avg", "loss/loss_scale", "loss/grad_norm",
    "training/iteration", "training/iteration_time", "training/iteration_time_vs_tokens",
    "training/iteration_time_vs_samples", "training/consumed_samples", "training/consumed_tokens",
    "training/skiped_iterations", "training/nan_iterations",
    "val/iteration", "val/lm loss", "val/ppl_lm loss", "test/iteration", "test/lm loss", "test/ppl_lm loss",
    "timers/iteration", "timers/forward-backward-time",
}


def test_the_alcf_entry_starts_wandb_by_default_with_upstreams_names(tmp_path):
    """pretrain_gpt_alcf.py without any wandb flag: rank 0 starts wandb in the working directory (ezpz's
    default), project "AuroraGPT" without $WB_PROJECT/$WANDB_PROJECT; the keys are upstream's."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = _environment(tmp_path, WANDB_MODE="offline")
    argv = [sys.executable, str(ROOT / "pretrain_gpt_alcf.py"), *flags(
        "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1", "--split", "8,1,1",
        "--zero-stage", "1", "--log-optimizer-states-to-tensorboard", "--log-timers-to-tensorboard",
        "--timing-log-level", "1", "--tensorboard-dir", str(tmp_path / "tb"))]
    _run(argv, run_dir, env)
    record = json.loads((tmp_path / "wandb.json").read_text())
    assert record["init"]["project"] == "AuroraGPT" and record["init"]["dir"] == str(run_dir)
    logged = record["logged"]
    assert UPSTREAM_KEYS <= set(logged), sorted(UPSTREAM_KEYS - set(logged))
    assert logged["training/consumed_samples"] == {"2": 16, "4": 32}
    assert logged["lm-loss-validation/lm loss validation"].keys() == {"2", "4"}
    # TensorBoard gets the same names
    tb = _scalars(tmp_path / "tb")
    assert UPSTREAM_KEYS <= set(tb), sorted(UPSTREAM_KEYS - set(tb))
    assert tb["loss/lm loss_avg"][4] == pytest.approx(logged["loss/lm loss_avg"]["4"], rel=1e-6)


@pytest.mark.parametrize("environ, flag, expected", [
    ({}, None, ("AuroraGPT", True)),
    ({"WANDB_PROJECT": "mine"}, None, ("mine", True)),
    ({"WB_PROJECT": "first", "WANDB_PROJECT": "second"}, None, ("first", True)),
    ({"WB_PROJECT": "first"}, "flag", ("flag", False)),  # asked for: a wandb that cannot start is an error
    ({"WANDB_MODE": "disabled", "WB_PROJECT": "first"}, "flag", (None, False)),
])
def test_alcf_wandb_project_comes_from_the_environment_as_upstreams(environ, flag, expected, tmp_path,
                                                                     monkeypatch):
    from megatron.config.logging import LoggingConfig
    from megatron.training.tracking import alcf_wandb_defaults

    monkeypatch.chdir(tmp_path)
    logging = alcf_wandb_defaults(LoggingConfig(wandb_project=flag), environ)
    assert (logging.wandb_project, logging.wandb_optional) == expected
    if logging.wandb_project:
        assert logging.wandb_save_dir == str(tmp_path)


def test_an_alcf_default_wandb_that_cannot_start_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import megatron.training.tracking as tracking
    from megatron.config.logging import LoggingConfig

    def refuse(*args):
        raise tracking.TrackingError("wandb could not start (not logged in)")

    monkeypatch.setattr(tracking, "_start_wandb", refuse)
    optional = tracking.alcf_wandb_defaults(LoggingConfig(), {})
    with tracking.Tracker(optional, rank=0) as tracker:
        assert tracker.wandb_run is None
    assert "wandb: not started, the run goes on without it" in capsys.readouterr().err
    with pytest.raises(tracking.TrackingError):  # --wandb-project given: refused as before
        tracking.Tracker(LoggingConfig(wandb_project="asked"), rank=0)


def test_wandb_project_writes_under_save_wandb_as_upstreams_plain_entry(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    from megatron.config.logging import LoggingConfig
    from megatron.training.tracking import Tracker, default_wandb_dir

    save = tmp_path / "ckpt"
    with Tracker(LoggingConfig(wandb_project="plain"), rank=0, wandb_dir=default_wandb_dir(str(save))) as tracker:
        tracker.log({"x": 1.0}, 1)
    assert any(p.name.startswith("offline-run-") for p in (save / "wandb" / "wandb").iterdir())
    assert not (tmp_path / "wandb").exists()
