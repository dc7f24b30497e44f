"""The resume rules of megatron/checkpoint/resume.py, trained end to end (one 2-rank launch, the tiny model):

- a checkpoint's optimizer state that the run's --optimizer cannot take is refused before the engine is built,
  also at ZeRO-3 (whose model-states file is zero_pp_rank_0_mp_rank_00_model_states.pt), and --no-load-optim
  resumes it with the weights of the checkpoint it names (also at tp 2, where DeepSpeed's own weights-only
  ZeRO-3 load fails);
- a changed --weight-decay / --clip-grad / --adam-beta2 is refused by default (naming the flag, the checkpoint's
  value and both policy flags), the flag's value is what the first resumed step uses with
  --override-opt_param-scheduler, the checkpoint's with --use-checkpoint-opt_param-scheduler (with a notice);
- the first resumed step uses the LR of the resumed schedule, not the stale lr DeepSpeed's load put back into
  the param groups (the checkpoint was saved at lr 0);
- tags are global_stepN with upstream's two pointer files, and --load may name the tag directory itself;
- a resume deserializes each checkpoint file at most once per rank (the reader hands its model-states object to
  DeepSpeed's load).
Two control cases switch off the re-application of the hyperparameters and the hand-over, and show that the
checks above then fail."""

import os

import pytest

import engine_cases as ec
from multirank import run_ranks

# TINY at ZeRO-1, constant LR; the "save" cases train 2 of 3 iterations and save global_step2.
BASE = ec.flags("--zero-stage", "1", "--train-iters", "3", "--log-interval", "1", "--weight-decay", "0.01",
                "--adam-beta2", "0.95", "--clip-grad", "1.0")
SAVE = ["--save-interval", "2", "--exit-interval", "2"]
OVERRIDE, USE_CHECKPOINT = "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"
CHANGED = ["--clip-grad", "0.5", "--adam-beta2", "0.99"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_rules")
    z1, lr0, z3, z3tp = str(root / "z1"), str(root / "lr0"), str(root / "z3"), str(root / "z3tp")
    stale = BASE + ["--load", lr0, "--lr", "1e-3", OVERRIDE]
    cases = [
        ("save_z1", BASE + ["--save", z1] + SAVE),
        ("save_lr0", BASE + ["--lr", "0", "--min-lr", "0", "--save", lr0] + SAVE),
        ("save_z3", BASE + ["--zero-stage", "3", "--save", z3] + SAVE),
        # ZeRO-3's optimizer state into another optimizer
        ("z3_sgd", BASE + ["--zero-stage", "3", "--load", z3, "--optimizer", "sgd"]),
        # a plain ZeRO-3 resume that saves global_step3, then global_step2 (named as a tag directory: not the
        # pointer's) into another optimizer
        ("z3_plain", BASE + ["--zero-stage", "3", "--load", z3, "--save", z3, "--save-interval", "3"]),
        ("z3_sgd_no_load_optim", BASE + ["--zero-stage", "3", "--load", os.path.join(z3, "global_step2"),
                                         "--optimizer", "sgd", "--no-load-optim"]),
        # ZeRO-3 at tp 2 (two model-parallel ranks' files): trains 3 iterations (global_step2 and 3), then
        # global_step2's weights without its optimizer state
        ("save_z3_tp2", BASE + ["--zero-stage", "3", "--tensor-model-parallel-size", "2", "--save", z3tp,
                                "--save-interval", "2"]),
        ("z3_tp2_no_load_optim", BASE + ["--zero-stage", "3", "--tensor-model-parallel-size", "2", "--load",
                                         os.path.join(z3tp, "global_step2"), "--no-load-optim"]),
        # --weight-decay under each policy
        ("wd_check", BASE + ["--load", z1, "--weight-decay", "0.05"]),
        ("wd_override", BASE + ["--load", z1, "--weight-decay", "0.05", OVERRIDE]),
        ("wd_checkpoint", BASE + ["--load", z1, "--weight-decay", "0.05", USE_CHECKPOINT]),
        # --clip-grad and --adam-beta2 together under each policy
        ("cb_check", BASE + ["--load", z1] + CHANGED),
        ("cb_override", BASE + ["--load", z1] + CHANGED + [OVERRIDE]),
        ("cb_checkpoint", BASE + ["--load", z1] + CHANGED + [USE_CHECKPOINT]),
        # the stale-LR first step, and its control
        ("stale_lr", stale),
        ("stale_lr_without_apply", stale, {"skip_apply_hyperparameters": True}),
        # the read counter's control: DeepSpeed's load reads the model-states file again
        ("plain_without_handover", BASE + ["--load", z1], {"no_handover": True}),
        # a plain resume that saves global_step3 (the pointers move on), then --load of the tag directory itself
        ("plain", BASE + ["--load", z1, "--save", z1, "--save-interval", "3"]),
        ("tag_dir", BASE + ["--load", os.path.join(z1, "global_step2")]),
    ]
    return root, run_ranks(2, ec.resume_rule_cases, cases, timeout=600)


def ok(rank_result, name):
    case = rank_result[name]
    assert case["error"] is None, f"{name}: {case['error']}"
    return case


def decay_groups(case):
    """The param groups with weight decay (the engine puts biases and norms in a group with none)."""
    groups = [g for g in case["after_load"]["groups"] if g["weight_decay"] != 0.0]
    assert groups, case["after_load"]
    return groups


def test_zero3_checkpoint_into_another_optimizer_is_refused_before_the_engine_is_built(runs):
    root, results = runs
    assert any(n.startswith("zero_pp_rank_0_mp_rank_00_model_states") for n in os.listdir(root / "z3" / "global_step2"))
    for r in results:
        case = r["z3_sgd"]
        assert case["error"] is not None and case["engines_built"] == 0
        assert "--optimizer adam" in case["error"] and "--optimizer sgd" in case["error"]
        assert "--no-load-optim" in case["error"] and "global_step2" in case["error"]


def test_no_load_optim_resumes_a_zero3_checkpoint_into_another_optimizer_with_its_weights(runs):
    for r in runs[1]:
        case = ok(r, "z3_sgd_no_load_optim")
        assert case["start_iteration"] == 2 and case["iterations"] == [3]
        assert case["weight_change"] > 0
        # iteration 3's loss is the forward pass at global_step2's weights (not global_step3's, the pointer's)
        assert ok(r, "z3_plain")["start_iteration"] == 2
        assert case["losses"] == pytest.approx(r["z3_plain"]["losses"], rel=1e-6)


def test_no_load_optim_at_zero3_and_tp2_resumes_each_tp_ranks_weights_of_the_named_checkpoint(runs):
    """DeepSpeed's own ZeRO-3 weights-only load (zero_to_fp32) merges one model-parallel rank only and fails at
    tp 2; the resume takes the weights from its reader instead."""
    for r in runs[1]:
        case = ok(r, "z3_tp2_no_load_optim")
        full = ok(r, "save_z3_tp2")
        assert full["saved"][-1].endswith("global_step3")
        assert case["start_iteration"] == 2 and case["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)


def test_a_changed_weight_decay_is_refused_by_default_naming_the_flag_the_checkpoints_value_and_the_fixes(runs):
    for r in runs[1]:
        case = r["wd_check"]
        assert case["error"] is not None and case["engines_built"] == 0
        assert "--weight-decay 0.05 differs from the checkpoint's 0.01" in case["error"]
        assert OVERRIDE in case["error"] and USE_CHECKPOINT in case["error"]


def test_override_opt_param_scheduler_resumes_with_the_flags_weight_decay(runs):
    for r in runs[1]:
        case = ok(r, "wd_override")
        assert all(g["weight_decay"] == 0.05 for g in decay_groups(case))
        assert case["start_iteration"] == 2 and case["iterations"] == [3] and case["weight_change"] > 0
    assert any("--weight-decay: using the flag's 0.05" in line for line in runs[1][0]["wd_override"]["lines"])


def test_use_checkpoint_opt_param_scheduler_resumes_with_the_checkpoints_weight_decay_and_says_so(runs):
    for r in runs[1]:
        case = ok(r, "wd_checkpoint")
        assert all(g["weight_decay"] == 0.01 for g in decay_groups(case))
        assert case["iterations"] == [3] and case["weight_change"] > 0
    lines = runs[1][0]["wd_checkpoint"]["lines"]
    assert any("--weight-decay: using the checkpoint's 0.01" in line and USE_CHECKPOINT in line for line in lines)


def test_a_changed_clip_grad_or_adam_beta2_is_refused_by_default_both_named(runs):
    for r in runs[1]:
        error = r["cb_check"]["error"]
        assert error is not None and r["cb_check"]["engines_built"] == 0
        assert "--clip-grad 0.5 differs from the checkpoint's 1.0" in error
        assert "--adam-beta2 0.99 differs from the checkpoint's 0.95" in error
        assert OVERRIDE in error and USE_CHECKPOINT in error


def test_override_resumes_with_the_flags_clip_grad_and_betas(runs):
    for r in runs[1]:
        case = ok(r, "cb_override")
        assert case["after_load"]["clip_grad"] == 0.5  # ZeRO-1's optimizer (its load put back the saved 1.0)
        assert all(g["betas"] == [0.9, 0.99] for g in case["after_load"]["groups"])
        assert case["iterations"] == [3] and case["weight_change"] > 0


def test_use_checkpoint_resumes_with_the_checkpoints_clip_grad_and_betas(runs):
    for r in runs[1]:
        case = ok(r, "cb_checkpoint")
        assert case["after_load"]["clip_grad"] == 1.0
        assert all(g["betas"] == [0.9, 0.95] for g in case["after_load"]["groups"])
        assert case["iterations"] == [3] and case["weight_change"] > 0
    lines = runs[1][0]["cb_checkpoint"]["lines"]
    for notice in ("--clip-grad: using the checkpoint's 1.0", "--adam-beta2: using the checkpoint's 0.95"):
        assert any(notice in line for line in lines), lines


def test_the_first_resumed_step_uses_the_resumed_schedules_lr_not_the_checkpoints_stale_one(runs):
    lr = "learning-rate/learning-rate"  # upstream's name; the LR after each step, as upstream logs it
    for r in runs[1]:
        saved = ok(r, "save_lr0")
        assert saved["scalars"][lr] == {1: 0.0, 2: 0.0}
        case = ok(r, "stale_lr")
        assert [g["lr"] for g in case["after_load"]["groups"]] == [1e-3] * len(case["after_load"]["groups"])
        assert case["scalars"][lr] == {3: 1e-3}
        assert case["weight_change"] > 0
        # control: without the re-application the step runs at the saved lr 0 and nothing moves (the schedule
        # sets 1e-3 only after that step)
        control = ok(r, "stale_lr_without_apply")
        assert [g["lr"] for g in control["after_load"]["groups"]] == [0.0] * len(control["after_load"]["groups"])
        assert control["weight_change"] == 0.0


def test_checkpoints_are_global_stepN_with_both_pointer_files_and_resume_from_the_directory(runs):
    root, results = runs
    for r in results:
        assert ok(r, "save_z1")["pointers"] == ("global_step2", "2")
        assert r["save_z1"]["saved"] == [str(root / "z1" / "global_step2")]
        plain = ok(r, "plain")
        assert plain["start_iteration"] == 2 and plain["iterations"] == [3]
        assert plain["saved"] == [str(root / "z1" / "global_step3")] and plain["pointers"] == ("global_step3", "3")
    assert sorted(n for n in os.listdir(root / "z1") if n.startswith("global_step")) == ["global_step2",
                                                                                       "global_step3"]


def test_load_of_a_tag_directory_resumes_that_checkpoint_not_the_pointers_and_says_so(runs):
    root, results = runs
    for r in results:
        case = ok(r, "tag_dir")
        assert case["start_iteration"] == 2 and case["iterations"] == [3]  # the pointer names global_step3
    tag_dir = os.path.join(str(root / "z1"), "global_step2")
    assert any(f"--load {tag_dir} is one checkpoint directory" in line and "tag global_step2" in line
               for line in results[0]["tag_dir"]["lines"])


RESUMED = ("z3_plain", "z3_sgd_no_load_optim", "z3_tp2_no_load_optim", "wd_override", "wd_checkpoint", "cb_override", "cb_checkpoint", "stale_lr",
           "plain", "tag_dir")


def test_a_resume_deserializes_each_checkpoint_file_at_most_once(runs):
    for r in runs[1]:
        for name in RESUMED:
            reads = ok(r, name)["reads"]
            model_states = [p for p in reads if p.endswith("model_states.pt")]
            assert model_states, (name, reads)  # the counter sees the reads
            assert any(p.endswith("optim_states.pt") for p in reads), (name, reads)
            assert all(n == 1 for n in reads.values()), (name, {os.path.basename(p): n for p, n in reads.items()})
        # control: without the hand-over DeepSpeed's load reads the model-states file the reader already read
        reads = ok(r, "plain_without_handover")["reads"]
        assert [n for p, n in reads.items() if p.endswith("mp_rank_00_model_states.pt")][0] > 1, reads


def test_load_tag_is_refused_naming_what_load_is_when_it_is_not_a_save_directory(tmp_path):
    from megatron.checkpoint.resume import locate
    from megatron.config.arguments import parse_args
    from megatron.errors import ConfigError

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    run = parse_args(["--model-preset", "tiny", "--mock-data", "--vocab-size", "256", "--train-iters", "1",
                      "--load", str(hf), "--load-tag", "global_step3", "--finetune"])
    with pytest.raises(ConfigError, match=r"--load-tag global_step3 .* is a Hugging Face folder: point --load at that "
                                          r"folder itself and drop --load-tag"):
        locate(run, log=lambda line: None, rank=0)
