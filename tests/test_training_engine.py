"""The training engine on CPU ranks: every layout learns and tracks the single-rank loss, resume is bit-exact,
a checkpoint resumes on another layout, and --finetune loads a checkpoint converted from Hugging Face.

Trainings are packed into four launches (1, 2, 2 and 4 gloo ranks) by tests/engine_cases.train_cases;
the tests then compare the losses the ranks returned.
"""

import os
import subprocess
import sys

import pytest

import engine_cases as ec
from multirank import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVE_AT = 4  # interrupted runs save and exit here (--exit-interval), resumed runs go on to 10

# Layouts that must give the single-rank loss (same global batch of 8): (name, ranks, flags)
LAYOUTS_2 = {
    "dp2_zero0": ["--zero-stage", "0"],
    "dp2_zero1": ["--zero-stage", "1"],
    "dp2_zero2": ["--zero-stage", "2"],
    "dp2_zero3": ["--zero-stage", "3"],
    # --cpu-optimizer runs DeepSpeedCPUAdam in AdamW mode for --optimizer adam, as upstream: compared with AdamW
    "dp2_zero2_cpu_optimizer": ["--zero-stage", "2", "--cpu-optimizer"],
    "ulysses_sp2": ["--ds-sequence-parallel-size", "2"],
}
LAYOUTS_4 = {
    "tp2_dp2": ["--tensor-model-parallel-size", "2", "--zero-stage", "1"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
    "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "tp2_dp2_sequence_parallel": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "2"],
}
BF16 = ["--zero-stage", "1", "--bf16"]

# Exact resume: dropout on and a warmup + cosine schedule, so RNG and scheduler state both matter.
RESUME = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-decay-style", "cosine",
          "--lr-warmup-iters", "3", "--min-lr", "1e-3"]
RESUME_LAYOUTS = {
    "dp2_zero2": (2, ["--zero-stage", "2"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


def resume_cases(name: str, layout: list[str], root) -> list:
    """Uninterrupted run; run saving at SAVE_AT and exiting; run resuming from that save."""
    ckpt = str(root / f"resume_{name}")
    argv = ec.flags(*RESUME, *layout)
    return [(f"{name}/uninterrupted", argv),
            (f"{name}/interrupted", argv + ["--save", ckpt, "--save-interval", "100",
                                                 "--exit-interval", str(SAVE_AT)]),
            (f"{name}/resumed", argv + ["--load", ckpt])]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


# the single-rank run each layout must track: Adam (TINY's default), or AdamW where the layout runs AdamW
REFERENCE_OF = {"dp2_zero2_cpu_optimizer": "single_adamw"}


@pytest.fixture(scope="module")
def references():
    return run_ranks(1, ec.train_cases, [("single", ec.flags()),
                                         ("single_adamw", ec.flags("--optimizer", "adamw"))])[0]


@pytest.fixture(scope="module")
def reference(references):
    return references["single"]


@pytest.fixture(scope="module")
def two_ranks(root):
    cases = [(name, ec.flags(*extra)) for name, extra in LAYOUTS_2.items()]
    cases.append(("dp2_bf16", ec.flags(*BF16)))
    cases += resume_cases("dp2_zero2", RESUME_LAYOUTS["dp2_zero2"][1], root)
    # the checkpoint that later launches resume at another layout and convert to Hugging Face
    cases.append(("tp2_save", ec.flags("--tensor-model-parallel-size", "2", "--save", str(root / "tp2"),
                                       "--save-interval", "100", "--exit-interval", str(SAVE_AT))))
    return run_ranks(2, ec.train_cases, cases, timeout=400)


@pytest.fixture(scope="module")
def four_ranks(root):
    cases = [(name, ec.flags(*extra)) for name, extra in LAYOUTS_4.items()]
    cases += resume_cases("tp2_pp2", RESUME_LAYOUTS["tp2_pp2"][1], root)
    return run_ranks(4, ec.train_cases, cases, timeout=400)


@pytest.fixture(scope="module")
def other_layouts(root, two_ranks):
    """The tp=2 checkpoint resumed at tp=1 × dp=2, and (via HF and `convert_checkpoint.py from-hf`) fine-tuned."""
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.convert.hf_io import export_to_hf

    export_to_hf(DeepSpeedCheckpoint(str(root / "tp2")), str(root / "hf"), progress=False)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-hf",
                    "--hf-dir", str(root / "hf"), "--save", str(root / "from_hf"), "--tp", "2"],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    cases = [("tp1_dp2_from_tp2", ec.flags("--zero-stage", "1", "--load", str(root / "tp2"))),
             ("finetune_from_hf", ec.flags("--zero-stage", "1", "--load", str(root / "from_hf"), "--finetune"))]
    return run_ranks(2, ec.train_cases, cases, timeout=400)


def assert_tracks(losses, reference, first_tol, all_tol):
    assert len(losses) == len(reference) == 10
    assert losses[0] == pytest.approx(reference[0], abs=first_tol)
    assert losses == pytest.approx(reference, abs=all_tol)
    assert losses[-1] < losses[0] - 0.5  # it learns


def test_single_rank_reference_learns(reference):
    assert reference["losses"][-1] < reference["losses"][0] - 0.5


@pytest.mark.parametrize("name", list(LAYOUTS_2))
def test_two_rank_layout_matches_single_rank_loss(two_ranks, references, name):
    reference = references[REFERENCE_OF.get(name, "single")]
    for rank_result in two_ranks:  # every rank reports the same global-batch loss
        assert_tracks(rank_result[name]["losses"], reference["losses"], 1e-5, 2e-4)


@pytest.mark.parametrize("name", list(LAYOUTS_4))
def test_four_rank_layout_matches_single_rank_loss(four_ranks, reference, name):
    for rank_result in four_ranks:
        assert_tracks(rank_result[name]["losses"], reference["losses"], 1e-5, 2e-4)


def test_bf16_tracks_the_fp32_loss(two_ranks, reference):
    losses = two_ranks[0]["dp2_bf16"]["losses"]
    assert_tracks(losses, reference["losses"], 0.03, 0.1)
    assert losses != reference["losses"]  # it really ran in bf16


def test_every_layout_reports_and_clips_by_the_single_rank_grad_norm(two_ranks, four_ranks, references):
    # the clipping norm must count every parameter once over tp and pp (--clip-grad 1.0 is active here)
    assert max(references["single"]["grad_norms"]) > 1.0
    for results, names in ((two_ranks, LAYOUTS_2), (four_ranks, LAYOUTS_4)):
        for name in names:
            reference = references[REFERENCE_OF.get(name, "single")]
            assert results[0][name]["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4), name


@pytest.mark.parametrize("name", list(RESUME_LAYOUTS))
def test_resume_continues_the_uninterrupted_run_bit_for_bit(two_ranks, four_ranks, name):
    results = two_ranks if RESUME_LAYOUTS[name][0] == 2 else four_ranks
    for rank_result in results:
        full = rank_result[f"{name}/uninterrupted"]
        cut = rank_result[f"{name}/interrupted"]
        resumed = rank_result[f"{name}/resumed"]
        assert cut["iterations"] == list(range(1, SAVE_AT + 1)) and "--exit-interval" in cut["exit_reason"]
        assert cut["saved"] and cut["saved"][-1].endswith(f"global_step{SAVE_AT}")
        assert cut["losses"] == full["losses"][:SAVE_AT]
        assert resumed["start_iteration"] == SAVE_AT and resumed["iterations"] == list(range(SAVE_AT + 1, 11))
        assert resumed["losses"] == full["losses"][SAVE_AT:]  # exact float equality


def test_checkpoint_files_and_pointers(root, two_ranks):
    ckpt = root / "resume_dp2_zero2"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(SAVE_AT)
    assert (ckpt / "latest").read_text().strip() == f"global_step{SAVE_AT}"
    files = os.listdir(ckpt / f"global_step{SAVE_AT}")
    assert "rng_state_rank_00000.pt" in files and "rng_state_rank_00001.pt" in files
    assert any(f.endswith("optim_states.pt") for f in files)
    assert not [f for f in os.listdir(ckpt) if f.startswith(".tmp-")]


def test_checkpoint_records_the_model_config(root, two_ranks):
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint

    ckpt = DeepSpeedCheckpoint(str(root / "tp2"))
    assert ckpt.client_state["model_config"]["hidden_size"] == 32 and ckpt.tp == 2 and ckpt.iteration == SAVE_AT


def test_resume_at_another_layout_continues_the_loss(other_layouts, reference):
    for rank_result in other_layouts:
        resumed = rank_result["tp1_dp2_from_tp2"]
        assert resumed["start_iteration"] == SAVE_AT and resumed["consumed_samples"] == 10 * 8
        assert resumed["losses"] == pytest.approx(reference["losses"][SAVE_AT:], abs=2e-4)


def test_finetune_from_a_hugging_face_conversion_starts_at_iteration_zero_with_its_weights(other_layouts,
                                                                                           reference):
    tuned = other_layouts[0]["finetune_from_hf"]
    assert tuned["start_iteration"] == 0 and tuned["iterations"] == list(range(1, 11))
    # the converted weights were trained SAVE_AT steps on the same phrases: far below a fresh model's loss
    assert tuned["losses"][0] < reference["losses"][0] - 0.3
    assert tuned["losses"][-1] < tuned["losses"][0]
