"""Every --optimizer: the same step at every layout, learning, bit-exact resume, refusals; LR/WD schedules;
batch ramp-up trained multi-rank; the cooldown workflow (resume a constant-LR run into a cooldown).

Three launches hold all multi-rank trainings: 1 rank (references, 20-step learning, cooldown), 2 ranks
(tp=2 parity and save/resume per optimizer, ramp-up at dp=2, optimizer-state refusal; 8-bit Adam at tp=2 on
fixed tensors) and 8 ranks (tp=2 × pp=2 × dp=2 ZeRO-1 for every optimizer class, 1-bit LAMB's warmup at
ZeRO-0; ramp-up).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import engine_cases as ec  # noqa: E402
import optimizer_cases as oc  # noqa: E402
from multirank import run_ranks  # noqa: E402

from megatron.config.arguments import ConfigError, parse_args  # noqa: E402
from megatron.optimizer import optimizer_errors  # noqa: E402
from megatron.optimizer.lr_schedule import LRSchedule, build_lr_scheduler  # noqa: E402

TP2 = ("--tensor-model-parallel-size", "2")
TP2_PP2_DP2 = ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
SAVE_AT = 2
# 1-bit LAMB's warmup stage (freeze_step 1000 > 2 steps): LAMB with DeepSpeed's gradient all-reduce
ONEBIT_WARMUP = oc.optimizer_flags("ds.onebitlamb", "--clip-grad", "0", "--train-iters", "2")
SCHEDULE_FREE_EVAL = ("--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1")
# LAMB at a large global batch: 64 samples = 16 accumulated micro-batches of 4 on one rank, 8 per rank at dp=2
LAMB_LARGE_BATCH = ("--optimizer", "ds.fusedlamb", "--lr", "0.1", "--micro-batch-size", "4", "--global-batch-size",
                    "64", "--train-iters", "3")
# ramp-up: global batch 4 for the first 16 samples, then 8; 40 samples = 4 steps of 4 + 3 of 8
RAMPUP = ("--rampup-batch-size", "4", "4", "16", "--global-batch-size", "8", "--micro-batch-size", "2",
          "--train-samples", "40", "--lr-decay-style", "linear", "--lr-warmup-samples", "8", "--lr", "1e-2")


def _no_iters(flags):  # ramp-up runs are sized in samples: drop TINY's --train-iters
    i = flags.index("--train-iters")
    return flags[:i] + flags[i + 2:]


def rampup_flags(*extra):
    return _no_iters(ec.flags("--optimizer", "adamw", "--log-interval", "1", *RAMPUP, *extra))


def resume_cases(name: str, flags: list, root, exit_at: int = SAVE_AT) -> list:
    ckpt = str(root / name.replace(".", "_"))
    return [(f"{name}/uninterrupted", flags),
            (f"{name}/interrupted", flags + ["--save", ckpt, "--save-interval", "100", "--exit-interval",
                                              str(exit_at)]),
            (f"{name}/resumed", flags + ["--load", ckpt])]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("optimizers")


@pytest.fixture(scope="module")
def single(root):
    cases = [(name, oc.optimizer_flags(name, "--train-iters", "20")) for name in oc.OPTIMIZERS]
    cases.append(("rampup", rampup_flags()))
    cases.append(("lamb_large_batch", ec.flags(*LAMB_LARGE_BATCH)))
    cases.append(("schedule_free_eval", oc.optimizer_flags("adamwschedulefree", *SCHEDULE_FREE_EVAL)))
    cases.append(("onebitlamb_warmup", ONEBIT_WARMUP))
    # the cooldown workflow: 6 iterations at constant LR, then resume into a cooldown to --min-lr by iteration 12
    cooldown = str(root / "constant")
    constant = ec.flags("--optimizer", "ipex.fusedlamb", "--lr", "0.05", "--log-interval", "1", "--train-iters", "6")
    cases.append(("constant", constant + ["--save", cooldown, "--save-interval", "6"]))
    cooled = ["--train-iters", "12", "--load", cooldown, "--lr_constant_plus_cooldown",
              "--lr_constant_plus_cooldown_frac", "0.5", "--min-lr", "0.005"]
    cases.append(("cooldown", constant + cooled + ["--override-opt_param-scheduler"]))
    cases.append(("cooldown_without_override", constant + cooled))
    cases.append(("checkpoint_schedule", constant + cooled + ["--use-checkpoint-opt_param-scheduler"]))
    return run_ranks(1, oc.train_logged, cases, timeout=600)[0]


@pytest.fixture(scope="module")
def two_ranks(root):
    cases = []
    for name in oc.MULTI_RANK:
        cases += resume_cases(f"tp2_{name}", oc.optimizer_flags(name, *TP2, "--train-iters", "4"), root)
    cases += resume_cases("rampup_dp2", rampup_flags(), root, exit_at=3)  # resumed inside the ramp-up
    cases.append(("lamb_large_batch_dp2", ec.flags(*LAMB_LARGE_BATCH)))
    # ZeRO-1 by whole parameters for a whole-matrix optimizer: the single-rank steps, and a bit-exact resume
    cases += resume_cases("dp2_zero1_muon", oc.optimizer_flags("muon", "--zero-stage", "1", "--train-iters", "4"),
                          root)
    # schedule-free on ZeRO partitions: steps, evaluation at the averaged weights, save and resume
    cases += resume_cases("dp2_zero2_schedule_free",
                          oc.optimizer_flags("adamwschedulefree", *SCHEDULE_FREE_EVAL, "--zero-stage", "2"), root)
    cases.append(("dp2_zero1_bf16_schedule_free",
                  oc.optimizer_flags("adamwschedulefree", *SCHEDULE_FREE_EVAL, "--zero-stage", "1", "--bf16")))
    cases.append(("lamb_large_batch_dp2_zero1_bf16", ec.flags(*LAMB_LARGE_BATCH, "--zero-stage", "1", "--bf16")))
    adam = str(root / "tp2_adam")
    cases.append(("adam_state_into_muon", oc.optimizer_flags("muon", *TP2, "--train-iters", "4", "--load", adam)))
    cases.append(("muon_state_at_another_layout",  # tp=2 checkpoint, dp=2 run: resharded by parameter name
                  oc.optimizer_flags("muon", "--train-iters", "4", "--load", str(root / "tp2_muon"))))
    cases.append(("adam_state_into_muon_no_load_optim",
                  oc.optimizer_flags("muon", *TP2, "--train-iters", "4", "--load", adam, "--no-load-optim")))
    return run_ranks(2, oc.train_logged_and_fixed, cases, timeout=900)


@pytest.fixture(scope="module")
def eight_ranks():
    cases = []
    for name in oc.EIGHT_RANK:
        cases.append((name, oc.optimizer_flags(name, *TP2_PP2_DP2, "--zero-stage", "1", "--train-iters", "2")))
    cases.append(("rampup", rampup_flags(*TP2_PP2_DP2, "--zero-stage", "1")))
    cases.append(("onebitlamb_warmup", ONEBIT_WARMUP + list(TP2_PP2_DP2)))  # ZeRO-0: 1-bit LAMB refuses ZeRO
    return run_ranks(8, oc.train_logged, cases, timeout=900)


def _ok(result: dict, name: str) -> dict:
    assert "error" not in result, f"{name}: {result.get('error')}"
    return result


# ---- every optimizer at every layout --------------------------------------------------------------------

@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_each_optimizer_learns_in_20_steps(single, name):
    losses = _ok(single[name], name)["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", oc.MULTI_RANK)
def test_tp2_steps_equal_the_single_rank_steps(single, two_ranks, name):
    reference = single[name]["losses"][:4]
    for rank_result in two_ranks:
        losses = _ok(rank_result[f"tp2_{name}/uninterrupted"], name)["losses"]
        assert losses == pytest.approx(reference, abs=5e-5, rel=0), name


def test_adam8bit_at_tp2_steps_the_single_rank_tensors_bit_for_bit(two_ranks):
    """A fused weight split in segments: gathered as on one rank, its 8-bit state and blocks are the whole
    tensor's (a shard alone is too small for 8-bit state; concatenated shards cut other blocks)."""
    for rank_result in two_ranks:
        assert rank_result["adam8bit_tp2_fixed"] == {"shard": 0.0, "vector": 0.0, "eight_bit_state": True}


@pytest.mark.parametrize("name", oc.EIGHT_RANK)
def test_tp2_pp2_dp2_steps_equal_the_single_rank_steps(single, eight_ranks, name):
    reference = single[name]["losses"][:2]  # the loss at iteration 2 is the first step's result
    for rank_result in eight_ranks:
        losses = _ok(rank_result[name], name)["losses"]
        assert losses == pytest.approx(reference, abs=5e-5, rel=0), name


def test_onebitlamb_warmup_at_tp2_pp2_dp2_steps_equal_the_single_rank_steps(single, eight_ranks):
    reference = _ok(single["onebitlamb_warmup"], "ds.onebitlamb")["losses"]
    assert len(reference) == 2
    for rank_result in eight_ranks:
        losses = _ok(rank_result["onebitlamb_warmup"], "ds.onebitlamb")["losses"]
        assert losses == pytest.approx(reference, abs=5e-5, rel=0)


@pytest.mark.parametrize("name", oc.MULTI_RANK)
def test_resume_continues_each_optimizer_bit_for_bit(two_ranks, name):
    for rank_result in two_ranks:
        full = _ok(rank_result[f"tp2_{name}/uninterrupted"], name)
        cut = _ok(rank_result[f"tp2_{name}/interrupted"], name)
        resumed = _ok(rank_result[f"tp2_{name}/resumed"], name)
        assert cut["losses"] == full["losses"][:SAVE_AT]
        assert resumed["start_iteration"] == SAVE_AT
        assert resumed["losses"] == full["losses"][SAVE_AT:]  # exact float equality


def test_another_optimizers_state_is_refused_unless_no_load_optim(two_ranks):
    error = two_ranks[0]["adam_state_into_muon"]["error"]
    assert "holds the state of --optimizer adam, but this run uses --optimizer muon" in error
    assert "--no-load-optim" in error and "--finetune" in error
    fresh = _ok(two_ranks[0]["adam_state_into_muon_no_load_optim"], "no-load-optim")
    assert fresh["start_iteration"] == SAVE_AT and len(fresh["losses"]) == 4 - SAVE_AT


def test_muon_state_is_resharded_to_another_layout(two_ranks):
    """A tp=2 fp32 muon checkpoint resumed at dp=2 (tp=1): its state and weights are resharded by parameter name
    (megatron/checkpoint/full_matrix_state.py; tests/test_full_matrix_layouts.py checks bf16, the bit-exact round
    trip and the other optimizers), so it continues like the tp=2 run, within fp32 summation order."""
    for rank_result in two_ranks:
        full = _ok(rank_result["tp2_muon/uninterrupted"], "tp2 muon")["losses"]
        moved = _ok(rank_result["muon_state_at_another_layout"], "muon at another layout")
        assert moved["start_iteration"] == SAVE_AT
        assert moved["losses"] == pytest.approx(full[SAVE_AT:], rel=1e-4, abs=0)


# ---- batch ramp-up ------------------------------------------------------------------------------------

def _rampup_lr(consumed_before: int) -> float:
    # linear warmup over 8 samples, then linear decay to 0 at 40 samples (the schedule counts samples)
    if consumed_before <= 8:
        return 1e-2 * consumed_before / 8
    return 1e-2 * (1 - (consumed_before - 8) / (40 - 8))


def test_rampup_single_rank_batches_samples_and_lr_follow_megatron(single):
    log = _ok(single["rampup"], "rampup")["log"]
    assert [batch for _, _, _, batch in log] == [4, 4, 4, 4, 8, 8, 8]
    assert [consumed for _, consumed, _, _ in log] == [4, 8, 12, 16, 24, 32, 40]
    for _, consumed, lr, batch in log:  # the LR logged is the one after the step, as upstream logs it
        assert lr == pytest.approx(_rampup_lr(consumed), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("layout", ["dp2", "tp2_pp2_dp2"])
def test_rampup_multi_rank_matches_single_rank_every_step(single, two_ranks, eight_ranks, layout):
    reference = single["rampup"]
    run = two_ranks[0]["rampup_dp2/uninterrupted"] if layout == "dp2" else eight_ranks[0]["rampup"]
    _ok(run, layout)
    assert run["log"] == reference["log"]  # iteration, consumed samples, lr (as logged), global batch
    assert run["losses"] == pytest.approx(reference["losses"], abs=5e-5, rel=0)  # the same data stream
    assert run["consumed_samples"] == 40


def test_rampup_resume_inside_the_ramp_continues_bit_for_bit(two_ranks):
    for rank_result in two_ranks:
        full = rank_result["rampup_dp2/uninterrupted"]
        resumed = _ok(rank_result["rampup_dp2/resumed"], "resumed")
        assert resumed["start_iteration"] == 3
        assert resumed["losses"] == full["losses"][3:]
        assert resumed["log"] == full["log"][3:] if rank_result is two_ranks[0] else True


def test_lamb_at_a_large_accumulated_batch_learns_and_matches_across_dp(single, two_ranks):
    reference = _ok(single["lamb_large_batch"], "lamb")["losses"]
    assert reference[0] > reference[1] > reference[2]
    for rank_result in two_ranks:
        assert _ok(rank_result["lamb_large_batch_dp2"], "lamb dp2")["losses"] == pytest.approx(reference, abs=5e-5)
        # the AuroraGPT cooldown recipe's setting: LAMB on ZeRO-1 partitions in bf16
        bf16 = _ok(rank_result["lamb_large_batch_dp2_zero1_bf16"], "lamb bf16")["losses"]
        assert bf16 == pytest.approx(reference, abs=0.05) and bf16 != reference


# ---- the cooldown workflow (ALCF/notes/cooldown.md) --------------------------------------------------------

def test_cooldown_resumes_a_constant_lr_checkpoint_into_a_cooldown(single):
    constant = _ok(single["constant"], "constant")
    assert {lr for _, _, lr, _ in constant["log"]} == {0.05}
    cooled = _ok(single["cooldown"], "cooldown")
    assert cooled["start_iteration"] == 6 and [it for it, *_ in cooled["log"]] == list(range(7, 13))
    # decay length 12, cooldown over the last 0.5 · 12 = 6 steps: lr = min + (max - min)(1 - sqrt(s / 6)); the
    # log line shows the LR after each step, as upstream's does (steps 7..12 ran at s = 0..5, then show s + 1)
    expected = [0.005 + 0.045 * (1 - math.sqrt(s / 6)) for s in range(1, 7)]
    assert [lr for _, _, lr, _ in cooled["log"]] == pytest.approx(expected, rel=1e-4)
    assert cooled["losses"][-1] < constant["losses"][-1]


def test_cooldown_without_override_names_both_schedules(single):
    error = single["cooldown_without_override"]["error"]
    assert "--lr_constant_plus_cooldown/--lr_constant_plus_cooldown_frac: the flags give 6.0, the checkpoint has " \
           "None" in error
    assert "--lr-decay-iters/--lr-decay-samples (default: the run length): the flags give 12, the checkpoint has 6" \
           in error
    assert "--override-opt_param-scheduler" in error and "--use-checkpoint-opt_param-scheduler" in error


def test_use_checkpoint_schedule_keeps_the_constant_lr(single):
    kept = _ok(single["checkpoint_schedule"], "checkpoint_schedule")
    assert {lr for _, _, lr, _ in kept["log"]} == {0.05}


# ---- refusals -----------------------------------------------------------------------------------------

def _errors(*extra):
    run = parse_args(ec.flags(*extra))
    return "\n".join(optimizer_errors(run, "cpu"))


def test_schedule_free_at_zero_partitions_steps_evaluates_and_resumes_like_one_rank(single, two_ranks):
    """ZeRO-2 at dp=2 steps the flat fp32 partitions; the eval/train switch refreshes the model from them, so
    the evaluation (at the averaged weights) and the training losses are the single-rank ones, and the
    checkpoint saved at the averaged weights resumes bit for bit. bf16 on ZeRO-1 stays close."""
    reference = _ok(single["schedule_free_eval"], "reference")
    assert sorted(reference["eval"]) == [2, 4]
    for rank_result in two_ranks:
        run = _ok(rank_result["dp2_zero2_schedule_free/uninterrupted"], "zero2")
        assert run["losses"] == pytest.approx(reference["losses"], abs=5e-5, rel=0)
        assert run["eval"] == pytest.approx(reference["eval"], abs=5e-5, rel=0)
        cut = _ok(rank_result["dp2_zero2_schedule_free/interrupted"], "interrupted")
        resumed = _ok(rank_result["dp2_zero2_schedule_free/resumed"], "resumed")
        assert cut["losses"] == run["losses"][:SAVE_AT] and resumed["start_iteration"] == SAVE_AT
        assert resumed["losses"] == run["losses"][SAVE_AT:] and resumed["eval"] == {4: run["eval"][4]}
        bf16 = _ok(rank_result["dp2_zero1_bf16_schedule_free"], "bf16")
        assert bf16["losses"] == pytest.approx(reference["losses"], abs=0.05) and bf16["losses"] != run["losses"]


@pytest.mark.parametrize("name", ["adamwschedulefree", "sgdschedulefree"])
def test_schedule_free_refuses_zero_3_and_bf16_without_zero(name):
    assert _errors("--optimizer", name, "--zero-stage", "2") == ""
    assert _errors("--optimizer", name, "--zero-stage", "1", "--bf16") == ""
    assert "ZeRO-3 partitions the parameters themselves" in _errors("--optimizer", name, "--zero-stage", "3")
    assert "with --bf16 needs --zero-stage 1 or 2" in _errors("--optimizer", name, "--bf16")


def test_whole_matrix_zero1_partitions_by_whole_parameters_and_resumes_bit_for_bit(single, two_ranks):
    reference = single["muon"]["losses"][:4]
    for rank_result in two_ranks:
        full = _ok(rank_result["dp2_zero1_muon/uninterrupted"], "zero1 muon")
        assert full["losses"] == pytest.approx(reference, abs=5e-5, rel=0)
        cut = _ok(rank_result["dp2_zero1_muon/interrupted"], "interrupted")
        resumed = _ok(rank_result["dp2_zero1_muon/resumed"], "resumed")
        assert cut["losses"] == full["losses"][:SAVE_AT] and resumed["start_iteration"] == SAVE_AT
        assert resumed["losses"] == full["losses"][SAVE_AT:]


def test_whole_parameter_owners_balance_sizes():
    from megatron.optimizer.full_matrix import owners

    assert owners([10, 1, 7, 3, 3], 2) == [0, 1, 1, 1, 0]  # largest first to the least loaded: 10+3 | 7+3+1
    assert owners([5, 5, 5], 1) == [0, 0, 0]


@pytest.mark.parametrize("name", sorted(oc.WHOLE_MATRIX))
def test_whole_matrix_optimizers_run_zero_1_2_and_bf16_by_whole_parameters_and_refuse_zero_3(name):
    from megatron.optimizer import deepspeed_zero_stage

    for flags in (("--zero-stage", "1"), ("--zero-stage", "2"), ("--zero-stage", "1", "--bf16"),
                  ("--zero-stage", "2", "--bf16"), ("--bf16",)):
        assert _errors("--optimizer", name, *flags) == "", flags  # partitioned by whole parameters
        assert deepspeed_zero_stage(parse_args(ec.flags("--optimizer", name, *flags))) == 0
    zero3 = _errors("--optimizer", name, "--zero-stage", "3")
    assert f"--optimizer {name} needs whole matrices, which --zero-stage 3 never holds" in zero3
    assert "Use --zero-stage 1 or 2" in zero3
    assert _errors("--optimizer", name) == ""


@pytest.mark.parametrize("name", ["ds.fusedlamb", "ipex.lamb"])
def test_lamb_runs_on_zero_1_2_and_bf16_partitions_but_refuses_zero_3(name):
    assert _errors("--optimizer", name, "--zero-stage", "1", "--bf16") == ""
    assert _errors("--optimizer", name, "--zero-stage", "2") == ""
    assert "not from ZeRO-3's" in _errors("--optimizer", name, "--zero-stage", "3")
    assert "with --bf16 needs --zero-stage 1 or 2" in _errors("--optimizer", name, "--bf16")


@pytest.mark.parametrize("name, message", [
    ("galoreadamw8bit", "runs on CUDA only"), ("galoreadamw8bitperlayer", "runs on CUDA only"),
])
def test_unavailable_optimizers_are_refused_with_their_reason(name, message):
    assert message in _errors("--optimizer", name)


def test_eight_bit_adam_runs_on_whole_tensors_only():
    from megatron.optimizer import deepspeed_zero_stage

    for name in ("adam8bit", "galoreadamw8bit"):
        # tp shards are gathered whole, --zero-stage 1 partitions by whole parameters over DeepSpeed's stage 0
        run = parse_args(ec.flags("--optimizer", name, *TP2, "--zero-stage", "1"))
        assert optimizer_errors(run, "cuda", 2) == [] and deepspeed_zero_stage(run) == 0
        for flags in (("--zero-stage", "2"), ("--zero-stage", "1", "--bf16"), ("--fp16",)):
            assert optimizer_errors(parse_args(ec.flags("--optimizer", name, *flags)), "cuda", 2) == [], flags
        errors = "\n".join(optimizer_errors(parse_args(ec.flags("--optimizer", name, "--zero-stage", "3")), "cuda", 2))
        assert f"--optimizer {name} needs whole matrices, which --zero-stage 3 never holds" in errors, errors
    assert _errors("--optimizer", "adam8bit", *TP2, "--zero-stage", "1") == ""  # on this CPU too


def test_other_refusals_name_their_flags():
    assert "--cpu-optimizer steps with DeepSpeedCPUAdam" in _errors("--optimizer", "muon", "--zero-stage", "1",
                                                                    "--cpu-optimizer")
    assert "use --lr-decay-style constant (got cosine)" in _errors("--optimizer", "adamwschedulefree",
                                                                   "--lr-decay-style", "cosine")
    # Shampoo's blocks cut the single-rank tensors that tp shards are gathered into (checked by the tp=2 steps)
    assert _errors("--optimizer", "dshampooadamw", *TP2, "--dshampooadamw-max-preconditioner-dim", "16") == ""
    for flags, message in [
        (["--lr-finder"], "--lr-finder is not supported"),
        (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "both given; pick one"),
        (["--weight-decay-incr-style", "linear"], "needs both --start-weight-decay and --end-weight-decay"),
        (["--start-weight-decay", "0.1"], "need --weight-decay-incr-style linear or cosine"),
        (["--lr_constant_plus_cooldown", "--lr-decay-style", "cosine"], "needs --lr-decay-style constant"),
        (["--lr-decay-style", "infinite-cosine", "--min-lr", "0"], "decays exponentially to --min-lr: it must be > 0"),
        (["--lr-decay-style", "infinite-cosine", "--min-lr", "1e-3", "--constant-lr", "0.5"],
         r"needs --min-lr \(0.001\) < --constant-lr \(0.5\) <= --lr \(0.01\)"),
        (["--lr-cooldown-tokens", "10"], "give --lr-decay-tokens too"),
        (["--optimizer", "muonclip", "--muonclip-t", "0"], "--muonclip-t is the largest attention logit"),
        (["--optimizer", "muonclip", "--muonclip-alpha", "1.5"], r"--muonclip-alpha splits the clip .* \[0, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_args(ec.flags(*flags))


def test_ds_fused_adam_and_cpu_torch_adam_choose_upstreams_optimizers():
    """--ds_fused_adam: DeepSpeed's FusedAdam for --optimizer adam (decoupled decay, as upstream builds it);
    --cpu_torch_adam: torch's AdamW steps the --cpu-optimizer state instead of DeepSpeedCPUAdam."""
    from deepspeed.ops.adam import FusedAdam

    from megatron.optimizer import build_optimizer
    from megatron.training.ds_config import generate_deepspeed_config

    with pytest.raises(ConfigError, match="--cpu_torch_adam chooses the optimizer that --cpu-optimizer runs"):
        parse_args(ec.flags("--cpu_torch_adam"))
    with pytest.raises(ConfigError, match="--ds_fused_adam replaces the optimizer of --optimizer adam"):
        parse_args(ec.flags("--optimizer", "adamw", "--ds_fused_adam"))

    def one_step(optimizer_of):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        optimizer = optimizer_of(model)
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
        return optimizer, [p.detach().clone() for p in model.parameters()]

    run = parse_args(ec.flags("--optimizer", "adam", "--ds_fused_adam", "--weight-decay", "0.1"))
    fused, got = one_step(lambda m: build_optimizer(run, m))
    assert isinstance(fused, FusedAdam)
    opt = run.training.optimizer
    _, want = one_step(lambda m: torch.optim.AdamW(
        [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "weight_decay": 0.0}], lr=opt.lr,
        betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)

    run = parse_args(ec.flags("--zero-stage", "1", "--cpu-optimizer", "--cpu_torch_adam"))
    torch_adam, _ = one_step(lambda m: build_optimizer(run, m))
    assert type(torch_adam) is torch.optim.AdamW
    assert generate_deepspeed_config(run, 1)["zero_force_ds_cpu_optimizer"] is False
    plain = parse_args(ec.flags("--zero-stage", "1", "--cpu-optimizer"))
    assert "zero_force_ds_cpu_optimizer" not in generate_deepspeed_config(plain, 1)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_cpu_optimizer_steps_adamw_as_upstreams_deepspeed_cpu_adam(name):
    """Upstream builds DeepSpeedCPUAdam for --cpu-optimizer --optimizer adam with its default adamw_mode=True:
    decoupled weight decay (AdamW), the same step as --cpu_torch_adam's torch.optim.AdamW. --cpu-optimizer needs
    no --zero-stage: the default stage is 1."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from megatron.optimizer import build_optimizer

    def one_step(optimizer_of):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        optimizer = optimizer_of(model)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).square().sum().backward()
            optimizer.step()
        return optimizer, [p.detach().clone() for p in model.parameters()]

    wd = ["--weight-decay", "0.5", "--lr", "0.01"]
    base = ec.TINY[:-2]
    assert ec.TINY[-2:] == ["--zero-stage", "0"]
    run = parse_args(ec.flags("--optimizer", name, "--cpu-optimizer", *wd, base=base))  # no --zero-stage: stage 1
    assert run.training.zero.zero_stage == 1 and run.training.zero.cpu_optimizer
    cpu_adam, got = one_step(lambda m: build_optimizer(run, m))
    assert isinstance(cpu_adam, DeepSpeedCPUAdam) and cpu_adam.adam_w_mode
    torch_run = parse_args(ec.flags("--optimizer", name, "--cpu-optimizer", "--cpu_torch_adam", *wd, base=base))
    torch_adam, want = one_step(lambda m: build_optimizer(torch_run, m))
    assert type(torch_adam) is torch.optim.AdamW
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_cpu_torch_adam_trains_with_offloaded_zero_state():
    result = run_ranks(1, ec.train_cases, [("cpu_torch_adam", ec.flags(
        "--zero-stage", "1", "--cpu-optimizer", "--cpu_torch_adam", "--train-iters", "4", "--log-interval", "1"))])
    losses = result[0]["cpu_torch_adam"]["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_every_upstream_optimizer_name_is_accepted_by_the_parser():
    upstream = ["adam", "adam8bit", "adamw", "adamwschedulefree", "apex.adam", "apex.sgd", "ds.fusedlamb",
                "ds.onebitlamb", "galoreadamw", "galoreadamw8bit", "galoreadamw8bitperlayer", "ipex.fusedlamb",
                "ipex.lamb", "dshampooadamw", "sgdschedulefree", "sophiag", "adopt", "muon", "muonclip", "sgd"]
    for name in upstream:
        assert parse_args(ec.flags("--optimizer", name)).training.optimizer.optimizer == name


# ---- single-rank steps against reference formulas ---------------------------------------------------------

def test_lamb_matches_the_published_update_and_fusedlamb_bounds_its_trust_ratio():
    from megatron.optimizer.lamb import Lamb

    torch.manual_seed(0)
    w0, grads = torch.randn(6, 5), [torch.randn(6, 5) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        u = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-6) + 0.01 * w
        w = w - 0.1 * (w.norm() / u.norm()) * u
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    tiny = torch.nn.Parameter(torch.full((3,), 1e-6))
    bounded = Lamb([tiny], lr=1.0, min_coeff=0.01, max_coeff=10.0)
    tiny.grad = torch.ones(3)
    bounded.step()
    assert bounded.state[tiny]["trust_ratio"] == 0.01


def test_muon_on_one_rank_is_torch_muon_on_the_matrices_and_adamw_elsewhere():
    from megatron.optimizer.full_matrix import FullMatrixOptimizer

    torch.manual_seed(0)
    weight, bias = torch.randn(8, 4), torch.randn(8)
    a = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    b = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    ours = FullMatrixOptimizer([{"params": a, "weight_decay": 0.1}], lambda p: p.ndim == 2,
                               lambda g: torch.optim.Muon(g, lr=0.02, adjust_lr_fn="match_rms_adamw"),
                               lambda g: torch.optim.AdamW(g, lr=0.02))
    muon = torch.optim.Muon([b[0]], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([b[1]], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grads = torch.randn(8, 4), torch.randn(8)
        for params in (a, b):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        ours.step()
        muon.step()
        adamw.step()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_muonclip_scales_each_heads_query_and_key_rows_down_to_the_threshold():
    """GQA tiny model (4 query heads, 2 key heads per layer), lr 0: the step only clips. Each head's largest
    logit afterwards (same batch, same layer input) is <= t; in each key group the head with the smallest eta
    lands on t; the rows are scaled by eta^alpha (q) and min-of-group eta^(1 - alpha) (k)."""
    from megatron.distributed.parallel_state import ParallelState
    from megatron.model import GPTModel
    from megatron.optimizer import build_optimizer
    from megatron.optimizer.muon_clip import MuonClip, head_scales

    t, alpha = 0.05, 0.3
    run = parse_args(ec.flags("--optimizer", "muonclip", "--muonclip-t", str(t), "--muonclip-alpha", str(alpha),
                              "--lr", "0", "--vocab-size", "127"))  # 128 tokens (NullTokenizer adds the EOD): the
    # seeded model whose logits t cuts into
    ps = ParallelState.single()
    model = GPTModel(run.model, ps, seed=3)
    optimizer = build_optimizer(run, model, ps)
    assert isinstance(optimizer, MuonClip) and len(optimizer.attention) == 2
    first = optimizer.attention[0]
    torch.manual_seed(0)
    tokens = torch.randint(0, run.model.vocab_size, (2, 32))
    positions = torch.arange(32).expand(2, 32)
    model(tokens, position_ids=positions, labels=tokens).float().mean().backward()
    before = first.max_logits.clone()
    weight = first.qkv.weight.detach().clone()
    assert (before > t).any() and (before <= t).any()  # the threshold cuts into this layer's heads
    optimizer.step()
    assert optimizer.clipped_heads >= int((before > t).sum()) > 0  # both layers' heads are counted
    q_scale, k_scale = head_scales(before, t, alpha, kv_heads=2)
    d = run.model.head_dim
    expected = torch.cat([q_scale.repeat_interleave(d), k_scale.repeat_interleave(d), torch.ones(2 * d)])
    assert torch.equal(first.qkv.weight.detach(), weight * expected.unsqueeze(1))
    assert first.max_logits is None  # a new window for the next step
    with torch.no_grad():  # the first layer's input is unchanged (lr 0): the same logits, clipped
        model(tokens, position_ids=positions, labels=tokens)
    after = first.max_logits
    assert (after <= t * (1 + 1e-5)).all()
    for group_before, group_after in zip(before.view(2, 2), after.view(2, 2)):
        if group_before.max() > t:
            assert float(group_after.max()) == pytest.approx(t, rel=1e-5)
        else:
            torch.testing.assert_close(group_after, group_before)


def test_per_layer_galore_steps_in_backward_like_galoreadamw_after_backward():
    """The optimizer-in-backward of galoreadamw8bitperlayer (here with fp32 GaLoreAdamW: the 8-bit one needs
    CUDA) gives galoreadamw's update; gradients are freed in backward; the LR set on the groups is used."""
    from megatron.distributed.parallel_state import ParallelState
    from megatron.model import GPTModel
    from megatron.optimizer import build_optimizer, optimizer_param_groups, per_layer_galore
    from megatron.optimizer.per_layer import PerLayerOptimizer

    run = parse_args(ec.flags("--optimizer", "galoreadamw", "--weight-decay", "0.1"))
    ps = ParallelState.single()
    models = [GPTModel(run.model, ps, seed=5) for _ in range(2)]
    whole = build_optimizer(run, models[0], ps)
    opt = run.training.optimizer
    per_layer = PerLayerOptimizer(optimizer_param_groups(models[1], opt.weight_decay),
                                  per_layer_galore(opt, models[1], eight_bit=False))
    torch.manual_seed(0)
    for lr in (1e-2, 5e-3, 2e-3):
        tokens = torch.randint(0, run.model.vocab_size, (2, 32))
        positions = torch.arange(32).expand(2, 32)
        for model, optimizer in zip(models, (whole, per_layer)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            model(tokens, position_ids=positions, labels=tokens).float().mean().backward()
            if optimizer is per_layer:
                assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
                assert per_layer.consumed_grad_norm > 0
            optimizer.step()
            optimizer.zero_grad()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = per_layer.state_dict()
    again = PerLayerOptimizer(optimizer_param_groups(models[1], opt.weight_decay),
                              per_layer_galore(opt, models[1], eight_bit=False))
    again.load_state_dict(state)
    assert again.state_dict()["per_parameter"][0]["state"].keys() == state["per_parameter"][0]["state"].keys()
    per_layer.remove_hooks()
    again.remove_hooks()


def test_per_layer_galore_trains_through_the_engine_like_galoreadamw():
    flags = ("--clip-grad", "0", "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-2")
    cases = [("whole", ec.flags("--optimizer", "galoreadamw", *flags)),
             ("per_layer", ec.flags("--optimizer", "galoreadamw8bitperlayer", *flags))]
    result = run_ranks(1, oc.train_logged_per_layer_fp32, cases, timeout=300)[0]
    whole, per_layer = _ok(result["whole"], "whole")["losses"], _ok(result["per_layer"], "per layer")["losses"]
    assert len(per_layer) == 3 and per_layer == pytest.approx(whole, abs=1e-6, rel=0)


def test_per_layer_galore_refusals_name_their_flags():
    base = ("--optimizer", "galoreadamw8bitperlayer", "--clip-grad", "0", "--global-batch-size", "2")
    run = parse_args(ec.flags(*base))
    assert optimizer_errors(run, "cuda", world_size=1) == []
    assert "runs on CUDA only, not on cpu" in "\n".join(optimizer_errors(run, "cpu", world_size=1))
    assert "it runs on one rank only (this run has 2)" in "\n".join(optimizer_errors(run, "cuda", world_size=2))
    for extra, message in [(("--clip-grad", "1.0"), "give --clip-grad 0"),
                           (("--global-batch-size", "8"), "cannot accumulate gradients"),
                           (("--zero-stage", "1"), "needs the plain fp32 engine"),
                           (("--bf16",), "needs the plain fp32 engine")]:
        assert message in "\n".join(optimizer_errors(parse_args(ec.flags(*base, *extra)), "cuda", world_size=1))


def test_sophiag_is_upstreams_clipped_sign_momentum_step():
    from megatron.optimizer.sophia import SophiaG

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = SophiaG([p], lr=0.1, betas=(0.9, 0.95), rho=0.01, weight_decay=0.1)
    p.grad = torch.tensor([0.5, -1.0, 0.0, 1e-20])
    opt.step()
    m = 0.1 * torch.tensor([0.5, -1.0, 0.0, 1e-20])
    expected = torch.tensor([1.0, -2.0, 3.0, 0.5]) * (1 - 0.01)
    expected -= 0.1 * m.sign() * (m.abs() / 1e-15).clamp(max=1.0)
    torch.testing.assert_close(p.detach(), expected)


def test_schedule_free_eval_and_train_switch_back_bit_for_bit():
    from megatron.optimizer.schedule_free import AdamWScheduleFree

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    opt = AdamWScheduleFree([p], lr=0.1, warmup_steps=0)
    opt.train()
    for _ in range(3):
        p.grad = torch.randn(16)
        opt.step()
    y = p.detach().clone()
    opt.eval()
    x = p.detach().clone()
    assert not torch.equal(x, y)  # evaluation sees the averaged weights
    state = opt.state_dict()  # what a checkpoint saved in eval mode holds
    opt.train()
    assert torch.equal(p.detach(), y)
    p2 = torch.nn.Parameter(x.clone())
    resumed = AdamWScheduleFree([p2], lr=0.1, warmup_steps=0)
    resumed.load_state_dict(state)
    resumed.train()
    assert torch.equal(p2.detach(), y)


# ---- LR and weight-decay schedules ------------------------------------------------------------------------

def _opt():
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0,
                             "wd_mult": 1.0}], lr=1.0)


def test_infinite_cosine_and_inv_sqrt_cool_down_hold_then_decay_exponentially():
    kw = dict(max_lr=1.0, min_lr=0.01, decay_steps=100, warmup_steps=10, constant_lr=0.1, cooldown_steps=40,
              constant_steps=20)
    cos = LRSchedule(_opt(), decay_style="infinite-cosine", **kw)
    assert cos.lr_at(10) == pytest.approx(1.0) and cos.lr_at(30) == pytest.approx(0.55)
    assert cos.lr_at(50) == pytest.approx(0.1) and cos.lr_at(70) == pytest.approx(0.1)
    assert cos.lr_at(85) == pytest.approx(0.1 * (0.01 / 0.1) ** 0.5) and cos.lr_at(100) == pytest.approx(0.01)
    inv = LRSchedule(_opt(), decay_style="infinite-inv-square-root", timescale=10.0, **kw)

    def f(t):
        return 1 / math.sqrt(1 + 10 * t) - 1

    assert inv.lr_at(30) == pytest.approx(1.0 - 0.9 * f(0.5) / f(1.0)) and inv.lr_at(50) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="must be shorter than the decay length"):
        LRSchedule(_opt(), decay_style="infinite-cosine", **{**kw, "cooldown_steps": 80})


def test_constant_plus_cooldown_and_token_lengths_follow_upstream():
    s = LRSchedule(_opt(), max_lr=1.0, min_lr=0.1, decay_style="constant", decay_steps=100, warmup_steps=0,
                   constant_plus_cooldown_steps=20)
    assert s.lr_at(80) == 1.0 and s.lr_at(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert s.lr_at(100) == 0.1
    tokens = LRSchedule(_opt(), max_lr=1.0, decay_style="linear", decay_steps=1000, tokens_per_step=100,
                        decay_tokens=1000, warmup_tokens=200)
    lrs = []
    for _ in range(10):
        lrs.append(tokens.get_lr())
        tokens.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_sample_lengths_without_rampup_count_samples():
    run = parse_args(ec.flags("--lr-decay-style", "linear", "--lr-warmup-samples", "16", "--lr-decay-samples", "80",
                              "--train-iters", "10"))  # global batch 8
    s = build_lr_scheduler(_opt(), run)
    lrs = []
    for _ in range(6):
        lrs.append(s.get_lr())
        s.step()
    assert (s.increment, s.num_steps) == (8, 48)
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.01 * (1 - 8 / 64), 0.01 * (1 - 16 / 64), 0.01 * (1 - 24 / 64)])
    with pytest.raises(ConfigError, match="not both"):
        parse_args(ec.flags("--lr-warmup-samples", "16", "--lr-decay-iters", "10"))


def test_weight_decay_increments_from_start_to_end():
    run = parse_args(ec.flags("--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0",
                              "--end-weight-decay", "0.1", "--train-iters", "10"))
    opt = _opt()
    s = build_lr_scheduler(opt, run)
    for step in range(12):
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1 * min(step, 10) / 10)
        s.step()
    cosine = LRSchedule(_opt(), max_lr=1.0, decay_steps=10, start_wd=0.0, end_wd=0.1, wd_incr_style="cosine",
                        wd_incr_steps=10)
    assert cosine.wd_at(5) == pytest.approx(0.05) and cosine.wd_at(2) < 0.02


def test_resume_policy_override_keeps_flags_checkpoint_keeps_its_own_check_refuses():
    old = LRSchedule(_opt(), max_lr=1.0, decay_style="linear", decay_steps=10)
    for _ in range(4):
        old.step()
    state = old.state_dict()
    with pytest.raises(ConfigError, match=r"--lr: the flags give 2.0, the checkpoint has 1.0"):
        LRSchedule(_opt(), max_lr=2.0, decay_style="linear", decay_steps=10).load_state_dict(state)
    override = LRSchedule(_opt(), max_lr=2.0, decay_style="linear", decay_steps=10, on_resume="override")
    override.load_state_dict(state)
    assert override.num_steps == 4 and override.get_lr() == pytest.approx(2.0 * 0.6)
    kept = LRSchedule(_opt(), max_lr=2.0, decay_style="linear", decay_steps=10, on_resume="checkpoint")
    kept.load_state_dict(state)
    assert kept.get_lr() == pytest.approx(0.6)
