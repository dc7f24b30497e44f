"""DeepSpeed-Ulysses (--ds-sequence-parallel-size) composes with every other axis (issue 20).

On CPU fp32, sp = 2 alone, with ZeRO-3, with pp = 2 (DeepSpeed's pipeline engine, ZeRO-0 and -1) and with tp = 2 (TINY's 2 kv
heads leave one per tp rank, fewer than sp: replicated as DeepSpeed's Ulysses does; also with Megatron's
--sequence-parallel and ZeRO-2) give the single-rank losses of the first 3 steps within 1e-5; the model with one kv head and a document mask matches one rank; a resume at
sp = 2 × pp = 2 is bit-exact (dropout on); checkpoints move between sp = 1 and sp = 2 both ways; impossible
layouts are refused by name before any process group exists.

Three launches (1, 2 and 4 gloo ranks), each running its cases in turn (tests/ulysses_cases.py).
"""

import pytest
import torch

import engine_cases as ec
import ulysses_cases as uc
from multirank import run_ranks

STEPS = ["--train-iters", "3"]
SP2 = ["--ds-sequence-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-decay-style", "cosine",
           "--lr-warmup-iters", "1", "--min-lr", "1e-3"]


def saving(directory) -> list:
    """Save at iteration 2 (and at the end, iteration 3)."""
    return ["--save", str(directory), "--save-interval", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ulysses")


@pytest.fixture(scope="module")
def single(root):
    """The single-rank run, saving the checkpoint that sp = 2 resumes from."""
    return run_ranks(1, ec.train_cases, [("single", ec.flags(*STEPS, *saving(root / "single")))])[0]["single"]


@pytest.fixture(scope="module")
def two_ranks(root, single):
    cases = [("sp2", ec.flags(*STEPS, *SP2, *saving(root / "sp2"))),
             ("sp2_zero3", ec.flags(*STEPS, *SP2, "--zero-stage", "3")),
             ("sp2_from_sp1", ec.flags(*STEPS, *SP2, "--load", str(root / "single" / "global_step2")))]
    return run_ranks(2, uc.checks_and_trainings, cases, True, timeout=900)


@pytest.fixture(scope="module")
def four_ranks(root, two_ranks):
    resume = ec.flags(*STEPS, *SP2, *PP2, *DROPOUT)
    cases = [("sp2_pp2", ec.flags(*STEPS, *SP2, *PP2)),
             ("sp2_pp2_zero1", ec.flags(*STEPS, *SP2, *PP2, "--zero-stage", "1")),
             ("sp2_tp2", ec.flags(*STEPS, *SP2, *TP2)),
             ("sp2_tp2_megatron_sp", ec.flags(*STEPS, *SP2, *TP2, "--sequence-parallel", "--zero-stage", "2")),
             ("sp2_pp2_dropout", resume + saving(root / "sp2_pp2")),
             ("sp2_pp2_resumed", resume + ["--load", str(root / "sp2_pp2" / "global_step2")]),
             ("tp2_pp2_from_sp2", ec.flags(*STEPS, *TP2, *PP2, "--load", str(root / "sp2" / "global_step2")))]
    return run_ranks(4, uc.checks_and_trainings, cases, False, timeout=900)


def assert_single_rank_losses(result, single, steps=3):
    losses = result["losses"]
    assert len(losses) == steps
    assert losses == pytest.approx(single["losses"][-steps:], abs=1e-5)


@pytest.mark.parametrize("name", ["sp2", "sp2_zero3"])
def test_two_rank_ulysses_equals_one_rank(two_ranks, single, name):
    for rank in two_ranks:
        assert_single_rank_losses(rank[name], single)


@pytest.mark.parametrize("name", ["sp2_pp2", "sp2_pp2_zero1", "sp2_tp2", "sp2_tp2_megatron_sp"])
def test_ulysses_with_pipeline_or_tensor_parallelism_equals_one_rank(four_ranks, single, name):
    assert single["losses"][-1] < single["losses"][0]  # a reference that learns
    tp = 1 if name.startswith("sp2_pp2") else 2
    for rank in four_ranks:
        assert_single_rank_losses(rank[name], single)
        assert rank[name]["coords"][1] == (rank[name]["rank"] // tp) % 2  # the sp rank: tp fastest, then sp


def test_one_kv_head_and_document_masks_under_ulysses_equal_one_rank(two_ranks):
    errors = two_ranks[0]["model_checks"]
    assert any(name.startswith("document_mask/grad/") for name in errors)
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}


def test_resume_at_sp2_pp2_is_bit_exact(four_ranks):
    for rank in four_ranks:
        uninterrupted, resumed = rank["sp2_pp2_dropout"], rank["sp2_pp2_resumed"]
        assert resumed["start_iteration"] == 2 and resumed["iterations"] == [3]
        assert resumed["losses"] == uninterrupted["losses"][2:]
        assert uninterrupted["losses"] != rank["sp2_pp2"]["losses"]  # dropout and the schedule did change them


def test_checkpoints_move_between_sp1_and_sp2(two_ranks, four_ranks, single):
    for rank in two_ranks:  # saved at one rank (sp 1), resumed at sp 2
        assert rank["sp2_from_sp1"]["start_iteration"] == 2
        assert_single_rank_losses(rank["sp2_from_sp1"], single, steps=1)
    for rank in four_ranks:  # saved at sp 2, resumed at sp 1 (tp 2 × pp 2)
        assert rank["tp2_pp2_from_sp2"]["start_iteration"] == 2
        assert_single_rank_losses(rank["tp2_pp2_from_sp2"], single, steps=1)


# ---- what is accepted and what is refused, before any process group (in-process) ------------------------------

def layout_problems(world_size, *extra):
    from megatron.cli import parse_args
    from megatron.training.preflight import preflight_errors

    return "\n".join(preflight_errors(parse_args(ec.flags(*extra)), world_size))


def test_ulysses_composes_with_tp_pp_zero_gqa_and_document_masks():
    from megatron.training.engine import check_engine_config

    assert layout_problems(4, *SP2, *TP2) == ""  # one kv head per tp rank, sp 2: replicated
    assert layout_problems(8, *SP2, *TP2, *PP2, "--zero-stage", "1", "--reset-attention-mask") == ""
    assert layout_problems(4, *SP2, "--zero-stage", "3", "--num-key-value-heads", "1") == ""
    from megatron.cli import parse_args

    check_engine_config(parse_args(ec.flags(*SP2, *PP2)), torch.device("cpu"))  # no longer refused


@pytest.mark.parametrize("world_size, extra, expected", [
    (4, ["--num-attention-heads", "6", "--num-key-value-heads", "3", "--hidden-size", "48"],
     ["--num-key-value-heads 3", "--ds-sequence-parallel-size 2", "or 2 divisible by them"]),
    (8, ["--ds-sequence-parallel-size", "4", *TP2],
     ["attention heads per tp rank (--num-attention-heads 4 / --tensor-model-parallel-size 2 = 2)",
      "--ds-sequence-parallel-size 4"]),
    (4, ["--ds-sequence-parallel-size", "4", "--seq-length", "30", "--max-position-embeddings", "32"],
     ["--seq-length 30 is not divisible by --ds-sequence-parallel-size 4"]),
    (6, [*TP2, *PP2], ["world size 6 is not divisible by --tensor-model-parallel-size 2 × "
                       "--pipeline-model-parallel-size 2 × --ds-sequence-parallel-size 2 = 8"]),
])
def test_impossible_ulysses_layouts_are_refused_naming_the_flags(world_size, extra, expected):
    message = layout_problems(world_size, *SP2, *extra)
    for text in expected:
        assert text in message


def test_a_bad_layout_is_a_megatron_error_before_any_process_group():
    from megatron.cli import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.errors import MegatronError

    run = parse_args(ec.flags("--ds-sequence-parallel-size", "4", "--num-attention-heads", "2", "--hidden-size", "32"))
    with pytest.raises(MegatronError) as info:  # raised before it would need torch.distributed
        ParallelState.build(run.parallel, run.model, world_size=4, rank=0)
    assert info.value.exit_code == 2 and "--ds-sequence-parallel-size 4" in str(info.value)


def test_the_entry_point_exits_2_naming_the_flags_without_a_traceback(capsys):
    import pretrain_gpt

    code = pretrain_gpt.main(ec.flags("--ds-sequence-parallel-size", "4", "--seq-length", "30",
                                      "--max-position-embeddings", "32"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--seq-length 30 is not divisible by --ds-sequence-parallel-size 4" in err
    assert err.count("--seq-length 30 is not divisible") == 1


def test_the_ulysses_gradient_scale_follows_deepspeeds_zero_paths():
    from megatron.deepspeed_compat import ulysses_gradient_scale

    assert ulysses_gradient_scale({"stage": 3}, 2) == 2.0  # ZeRO-3's reduce-scatter averages over sp too
    assert ulysses_gradient_scale({"stage": 3, "reduce_scatter": True}, 4) == 4.0
    assert ulysses_gradient_scale({"stage": 2}, 2) == ulysses_gradient_scale({"stage": 3}, 1) == 1.0
    with pytest.raises(ValueError, match='"reduce_scatter": false'):
        ulysses_gradient_scale({"stage": 3, "reduce_scatter": False}, 2)


def test_a_deepspeed_file_without_reduce_scatter_is_refused_under_ulysses_zero3(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    message = layout_problems(2, *SP2, "--zero-stage", "3", "--deepspeed_config", str(path))
    assert f"--deepspeed_config {path}" in message and '"reduce_scatter": false' in message
    assert layout_problems(2, "--zero-stage", "3", "--deepspeed_config", str(path)) == ""  # without Ulysses: fine
