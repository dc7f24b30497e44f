"""pretrain_gpt.py on 2 ranks refuses bad runs with exit code 2 and ONE message (rank 0) for flag errors:
flags vs --deepspeed_config, fp16 on CPU, an LR warmup longer than the decay (checked before the model is
built); a --load without a complete checkpoint is named by every rank.

All cases run through `pretrain_gpt.main` in one 2-rank launch (tests/engine_cases.run_main_cases); the
single-process refusal checks are in test_training_errors.py.
"""

import json

import pytest

import engine_cases as ec
from multirank import run_ranks


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    ds_file = root / "ds.json"
    ds_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    no_latest = root / "no_latest"
    (no_latest / "global_step4").mkdir(parents=True)
    cases = [
        ("ds_config_mismatch", ec.flags("--zero-stage", "1", "--deepspeed_config", str(ds_file))),
        ("fp16_on_cpu", ec.flags("--fp16")),
        ("warmup_past_decay", ec.flags("--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
                                       "--lr-decay-iters", "10")),
        ("load_without_latest", ec.flags("--load", str(no_latest))),
    ]
    return root, run_ranks(2, ec.run_main_cases, cases)


@pytest.mark.parametrize("name", ["ds_config_mismatch", "fp16_on_cpu", "warmup_past_decay"])
def test_flag_errors_exit_2_with_one_message_from_rank_0(refused, name):
    _, results = refused
    code, err = results[0][name]
    assert code == 2 and err.strip() and "Traceback" not in err
    assert results[1][name] == (2, "")


def test_deepspeed_config_disagreeing_with_flags_names_both_sides(refused):
    root, results = refused
    err = results[0]["ds_config_mismatch"][1]
    assert "--zero-stage 1" in err and str(root / "ds.json") in err and "zero_optimization.stage = 2" in err


def test_fp16_on_cpu_is_refused_with_the_alternative(refused):
    err = refused[1][0]["fp16_on_cpu"][1]
    assert "--fp16 does not run on CPU" in err and "--bf16" in err


def test_lr_warmup_longer_than_decay_is_refused_naming_the_flags(refused):
    err = refused[1][0]["warmup_past_decay"][1]
    assert "warmup (10 steps) must be shorter than the decay (10 steps)" in err and "--lr-warmup-iters" in err


def test_load_without_a_complete_checkpoint_is_named_by_every_rank(refused):
    root, results = refused
    for rank in (0, 1):
        code, err = results[rank]["load_without_latest"]
        assert code == 2 and str(root / "no_latest") in err and "latest_checkpointed_iteration.txt" in err
