"""LR schedules: each style against hand-computed values, warmup by fraction, wsd cooldown, exact resume."""

import math

import pytest
import torch

from megatron.config.arguments import ConfigError, parse_args
from megatron.optimizer.lr_schedule import LRSchedule, build_lr_scheduler

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "64", "--mock-data",
         "--vocab-size", "10"]


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def _schedule(**kw):
    return LRSchedule(_optimizer(), **kw)


def test_warmup_is_linear_from_zero_then_each_decay_style_matches_the_formula():
    # max 1.0, min 0.1, 10 warmup steps, decay over 110 steps (100 after warmup).
    kw = dict(max_lr=1.0, min_lr=0.1, decay_steps=110, warmup_steps=10)
    lin, cos = _schedule(decay_style="linear", **kw), _schedule(decay_style="cosine", **kw)
    for s in (lin, cos):
        assert [s.lr_at(n) for n in (0, 5, 10)] == [0.0, 0.5, 1.0]
        assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == 0.1
    assert lin.lr_at(35) == pytest.approx(0.1 + 0.75 * 0.9)  # a quarter of the way: coeff 0.75
    assert cos.lr_at(35) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9)
    assert cos.lr_at(60) == pytest.approx(0.55)  # halfway: exactly between max and min
    const = _schedule(decay_style="constant", **kw)
    assert const.lr_at(5) == 0.5 and const.lr_at(11) == 1.0 and const.lr_at(10_000) == 1.0
    inv = _schedule(decay_style="inverse-square-root", max_lr=1.0, min_lr=0.1, decay_steps=1000, warmup_steps=4)
    assert inv.lr_at(16) == pytest.approx(0.5) and inv.lr_at(64) == pytest.approx(0.25)
    assert inv.lr_at(900) == pytest.approx(0.1)  # sqrt(4/900) = 0.067 is clamped to min_lr


@pytest.mark.parametrize("style, at_half", [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5**0.5 - 1)])
def test_wsd_holds_max_lr_until_the_cooldown_fraction_then_decays_to_min(style, at_half):
    s = _schedule(decay_style="wsd", max_lr=1.0, min_lr=0.0, decay_steps=100, warmup_steps=10,
                  wsd_decay_steps=20, wsd_decay_style=style)
    assert s.lr_at(10) == 1.0 and s.lr_at(50) == 1.0 and s.lr_at(80) == 1.0
    assert s.lr_at(90) == pytest.approx(at_half)
    assert s.lr_at(100) == pytest.approx(0.0) and s.lr_at(120) == 0.0
    assert s.lr_at(81) < 1.0


def test_built_from_flags_warmup_fraction_and_wsd_fraction_use_decay_iters():
    run = parse_args([*MODEL, "--train-iters", "1000", "--lr", "0.01", "--min-lr", "0.001", "--lr-decay-style",
                      "WSD", "--lr-decay-iters", "400", "--lr-warmup-fraction", "0.05", "--lr-decay-fraction", "0.25"])
    s = build_lr_scheduler(_optimizer(), run)
    assert (s.decay_steps, s.warmup_steps, s.wsd_decay_steps) == (400, 20, 100)
    assert s.lr_at(300) == pytest.approx(0.01) and s.lr_at(350) == pytest.approx(0.0055)
    run = parse_args([*MODEL, "--train-iters", "50", "--lr-warmup-iters", "5"])
    s = build_lr_scheduler(_optimizer(), run)
    assert (s.decay_steps, s.warmup_steps, s.decay_style) == (50, 5, "linear")  # decay defaults to train iters;
    # the style to upstream's default, linear


def test_step_sets_every_param_group_lr_with_its_multiplier():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr_mult": 0.1}], lr=99.0)
    s = LRSchedule(opt, max_lr=1.0, decay_style="linear", decay_steps=20, warmup_steps=4)
    assert s.get_last_lr() == [0.0, 0.0]  # Megatron: the first update runs at lr 0 when warming up
    s.step()
    assert s.get_last_lr() == pytest.approx([0.25, 0.025])
    s.step(increment=3)
    assert s.num_steps == 4 and s.get_last_lr() == pytest.approx([1.0, 0.1])


def test_resume_from_state_dict_continues_exactly():
    kw = dict(max_lr=3e-4, min_lr=3e-5, decay_style="cosine", decay_steps=50, warmup_steps=5)
    straight = _schedule(**kw)
    expected = []
    for _ in range(30):
        straight.step()
        expected.append(straight.get_last_lr()[0])
    first = _schedule(**kw)
    for _ in range(12):
        first.step()
    state = first.state_dict()
    resumed = _schedule(max_lr=1.0, decay_style="linear", decay_steps=7,  # flags changed: the checkpoint wins
                        on_resume="checkpoint")
    resumed.load_state_dict(state)
    got = expected[:12] + []
    for _ in range(18):
        resumed.step()
        got.append(resumed.get_last_lr()[0])
    assert got[12:] == expected[12:]
    with pytest.raises(ConfigError, match="lacks"):
        resumed.load_state_dict({"num_steps": 3})


def test_rampup_runs_count_samples_and_errors_name_the_flags():
    run = parse_args([*MODEL, "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "96",
                      "--train-samples", "1000", "--lr-warmup-samples", "100", "--lr-decay-style", "linear"])
    s = build_lr_scheduler(_optimizer(), run, dp_size=2)
    assert (s.decay_steps, s.warmup_steps, s.increment) == (1000, 100, 4)
    s.step()
    assert s.num_steps == 4 and s.get_lr() == pytest.approx(s.max_lr * 4 / 100)
    with pytest.raises(ConfigError, match="needs dp_size"):
        build_lr_scheduler(_optimizer(), run)
    with pytest.raises(ConfigError, match=r"warmup \(60 steps\) must be shorter than the decay \(50 steps\)"):
        build_lr_scheduler(_optimizer(), parse_args([*MODEL, "--train-iters", "50", "--lr-warmup-iters", "60"]))
    with pytest.raises(ConfigError, match=r"--lr-decay-style 'step'"):
        _schedule(max_lr=1.0, decay_style="step", decay_steps=10)


def _fraction_run(*extra):
    return parse_args([*MODEL, "--train-iters", "50", "--lr", "1.0", "--min-lr", "0.0", "--lr-decay-style", "linear",
                       "--lr-warmup-fraction", "0.05", *extra])


def test_warmup_fraction_is_not_rounded_to_whole_iterations_as_upstream():
    s = build_lr_scheduler(_optimizer(), _fraction_run())
    assert s.warmup_steps == pytest.approx(2.5) and s.warmup_rounding == "none"  # 0.05 × 50, as upstream's scheduler
    lrs = []
    for _ in range(4):
        lrs.append(s.get_lr())
        s.step()
    assert lrs == pytest.approx([0.0, 1 / 2.5, 2 / 2.5, 1.0 - 0.5 / 47.5])
    assert s.state_dict()["warmup_rounding"] == "none"
    wsd = build_lr_scheduler(_optimizer(), _fraction_run("--lr-decay-style", "wsd", "--lr-decay-fraction", "0.99"))
    assert (wsd.warmup_steps, wsd.wsd_decay_steps) == (pytest.approx(2.5), 47)  # the cooldown stays after warmup


def test_a_checkpoint_of_a_version_that_rounded_the_warmup_down_passes_the_check_and_keeps_its_warmup():
    older = build_lr_scheduler(_optimizer(), _fraction_run()).state_dict()
    older.update(warmup_steps=2, num_steps=1)  # what int(0.05 × 50) saved, without the record of its rounding
    del older["warmup_rounding"]
    resumed = build_lr_scheduler(_optimizer(), _fraction_run())
    assert resumed.differences(older) == []
    resumed.load_state_dict(older)  # the default policy: "check"
    assert (resumed.warmup_steps, resumed.warmup_rounding) == (2, "floor") and resumed.get_lr() == 0.5
    resumed.step()
    assert resumed.get_lr() == 1.0 and resumed.state_dict()["warmup_rounding"] == "floor"
    again = build_lr_scheduler(_optimizer(), _fraction_run())  # its own later checkpoints pass the check as well
    again.load_state_dict(resumed.state_dict())
    assert again.warmup_steps == 2
    # still a check: another fraction, or a rounded warmup that is not the flags' rounded down, is refused
    other = build_lr_scheduler(_optimizer(), _fraction_run("--lr-warmup-fraction", "0.1"))
    assert other.differences(older) == ["--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction: the flags give "
                                        "5, the checkpoint has 2"]
    with pytest.raises(ConfigError, match="--override-opt_param-scheduler"):
        other.load_state_dict(older)
    newer = build_lr_scheduler(_optimizer(), _fraction_run()).state_dict()
    newer["warmup_steps"] = 2  # a state that says it was not rounded must hold the flags' 2.5
    assert len(build_lr_scheduler(_optimizer(), _fraction_run()).differences(newer)) == 1
    override = build_lr_scheduler(_optimizer(), _fraction_run("--override-opt_param-scheduler"))
    override.load_state_dict(older)
    assert (override.warmup_steps, override.warmup_rounding, override.num_steps) == (pytest.approx(2.5), "none", 1)
