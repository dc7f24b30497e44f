"""Whole-matrix optimizer checkpoints at another layout (megatron/checkpoint/full_matrix_state.py): bf16 ZeRO-1
muon, dshampooadamw and adam8bit saved at tp=2 × pp=2 resume at tp=1 × pp=1 × dp=4, at another tp / pp, and from
a universal folder.

What "bit-exact" means across layouts. A run at another layout sums its bf16 activations and gradients in
another order, so its losses are the original layout's within bf16 tolerance only (relative 2e-3, half a bf16
ulp, as tests/test_mixed_precision.py; measured below 4e-4). What must be exact is the state that crosses:
  - round trip: saved at tp 2 × pp 2 (A), resumed at tp 1 × dp 4 and saved there at once (B), resumed back at
    tp 2 × pp 2 and saved at once (C): C's optimizer state and fp32 masters in the files equal A's bit for bit
    (Shampoo's preconditioner objects, 8-bit codes and absmax included), and C continues with exactly the losses
    of the uninterrupted run A. Any state lost or rounded at tp 1 would show in both. The one exception is the
    masters' vocabulary padding rows, which restart at zero: they never reach the loss, but adam8bit moves those
    in the last live quantisation block a little (bitsandbytes quantises their zero moments to a code near 0,
    not to 0), so A's are not all zero.
  - the universal folder of A resumed at tp 1 × dp 4 continues with exactly the losses of B (the direct reshard
    at that layout): the folder carries the same state.
One 4-rank launch runs every case; refusals are planned before anything loads and are checked without ranks.
"""

import os
import re
import types

import pytest
import torch

import full_matrix_layout_cases as fc
from multirank import run_ranks

from megatron.checkpoint.full_matrix_state import (EIGHT_BIT_BLOCK, ParameterState, SavedFullMatrixState,
                                                   cut_for_rank)
from megatron.checkpoint.layout import ConversionError

NAMES = ["muon", "dshampooadamw", "adam8bit"]
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
TP1_DP4 = ["--micro-batch-size", "1"]
# another tp / pp than both: muon at tp 2 × pp 1 × dp 2 (ZeRO-2), adam8bit at tp 1 × pp 2 × dp 2
OTHER = {"muon": ["--tensor-model-parallel-size", "2", "--zero-stage", "2"],
         "adam8bit": ["--pipeline-model-parallel-size", "2"]}
# hidden 32: adam8bit's embedding of 100 tokens padded to 128 rows at tp 2 (4,096 elements: 8-bit state) and to
# 112 rows at tp 1 (3,584: bitsandbytes keeps it in 32 bits), so a tp 2 checkpoint cannot resume at tp 1 exactly
NARROW = ["--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2"]
SAVE_AT, STEPS = 2, 4
VOCAB, PADDED_VOCAB = 100, 128  # NullTokenizer's 99 + 1 tokens, padded to a multiple of 16 × tp 2
JOBS = ["a", "b", "c", "to_universal", "universal"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_matrix_layouts")
    jobs = []
    for name in NAMES:
        a, b, c = (str(root / f"{name}_{x}") for x in "abc")
        jobs += [("train_save_continue_losses", fc.flags(name, *TP2_PP2), a, SAVE_AT, STEPS),
                 ("resume_save_continue", fc.flags(name, *TP1_DP4), a, b, STEPS),
                 ("resume_save_continue", fc.flags(name, *TP2_PP2), b, c, STEPS),
                 ("to_universal", a),
                 ("resume_save_continue", fc.flags(name, *TP1_DP4, "--universal-checkpoint"), a, "", STEPS)]
    for name, layout in OTHER.items():
        jobs.append(("resume_save_continue", fc.flags(name, *layout), str(root / f"{name}_a"), "", STEPS))
    narrow = str(root / "adam8bit_narrow")
    jobs += [("train_save_continue_losses", fc.flags("adam8bit", *NARROW, "--tensor-model-parallel-size", "2"),
              narrow, SAVE_AT, SAVE_AT),
             ("refused", fc.flags("adam8bit", *NARROW, *TP1_DP4), narrow)]
    results = run_ranks(4, fc.run_sequence, jobs, timeout=1500)
    return root, results


def _job(results, rank: int, name: str, job: str):
    return results[rank][NAMES.index(name) * len(JOBS) + JOBS.index(job)]


def _other(results, rank: int, name: str):
    return results[rank][len(NAMES) * len(JOBS) + list(OTHER).index(name)]


@pytest.mark.parametrize("name", NAMES)
def test_resumed_at_tp1_pp1_dp4_it_continues_within_bf16_tolerance_of_the_original_layout(runs, name):
    _, results = runs
    uninterrupted = _job(results, 0, name, "a")["losses"]
    assert len(uninterrupted) == STEPS
    for rank in range(4):
        resumed = _job(results, rank, name, "b")
        assert resumed["iteration"] == SAVE_AT
        assert resumed["losses"] == pytest.approx(uninterrupted[SAVE_AT:], rel=2e-3, abs=0)


@pytest.mark.parametrize("name", NAMES)
def test_back_at_the_original_layout_it_continues_exactly_like_the_uninterrupted_run(runs, name):
    _, results = runs
    for rank in range(4):  # tp 2 × pp 2: the last stage's ranks hold the loss
        uninterrupted = _job(results, rank, name, "a")["losses"]
        back = _job(results, rank, name, "c")
        assert back["iteration"] == SAVE_AT and back["losses"] == uninterrupted[SAVE_AT:]


def _same(a, b, where: str) -> None:
    """Deep bitwise equality of saved optimizer state (tensors, library objects, numbers)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, set(a) ^ set(b))))
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        _same(vars(a), vars(b), f"{where}<{type(a).__name__}>")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_tp1_gives_back_every_state_and_master_bit_for_bit(runs, name):
    root, _ = runs
    original, back = root / f"{name}_a" / f"global_step{SAVE_AT}", root / f"{name}_c" / f"global_step{SAVE_AT}"
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.checkpoint.layout import VOCAB_ROWS

    ckpt = DeepSpeedCheckpoint(str(original))
    files = sorted(f for f in os.listdir(original) if f.startswith("mp_rank_"))
    assert len(files) == 4
    for mp_rank, file in enumerate(files):
        a, c = (torch.load(d / file, map_location="cpu", weights_only=False)["optimizer"] for d in (original, back))
        assert a["format"] == "full_matrix/2" and len(a["masters"]) > 5 and len(a["state"]) == len(a["masters"])
        for key in ("state", "inner_groups"):
            _same(a[key], c[key], f"{name} {file} {key}")
        assert set(a["masters"]) == set(c["masters"])
        tp_rank, stage = mp_rank % 2, mp_rank // 2
        names = [n for n, _ in ckpt.model_states(tp_rank, stage)[1]]
        for number, master in a["masters"].items():
            if names[number] in VOCAB_ROWS:  # the real vocabulary's rows; padding rows restart at zero
                rows = master.shape[0]
                real = max(0, min(rows, VOCAB - (0 if rows == PADDED_VOCAB else tp_rank * rows)))
                assert torch.equal(master[:real], c["masters"][number][:real]), (name, file, names[number])
                assert not c["masters"][number][real:].any()
            else:
                _same(master, c["masters"][number], f"{name} {file} master {names[number]}")
    if name == "adam8bit":  # the gathered embedding's 8-bit state crossed a padding of 112 rows (tp 1), not 128
        state = torch.load(original / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        codes = [v for _, v in state["optimizer"]["state"].values()
                 if v.get("__bnb_optimizer_quant_state__", {}).get("state1", torch.zeros(0)).dtype == torch.uint8]
        assert codes and codes[0]["__bnb_optimizer_quant_state__"]["state1"].shape[0] == 128


@pytest.mark.parametrize("name", NAMES)
def test_a_universal_folder_carries_the_state_exactly_like_the_direct_reshard(runs, name):
    root, results = runs
    folder = root / f"{name}_a" / f"global_step{SAVE_AT}_universal"
    parameter = folder / "zero" / "layers.0.mlp.fc1.weight"
    assert {"fp32.pt", "full_matrix.state"} <= set(os.listdir(parameter))
    if name == "muon":
        assert "momentum_buffer.pt" in os.listdir(parameter)
        assert {"exp_avg.pt", "exp_avg_sq.pt"} <= set(os.listdir(folder / "zero" / "layers.0.input_norm.weight"))
    for rank in range(4):
        direct, universal = _job(results, rank, name, "b"), _job(results, rank, name, "universal")
        assert universal["iteration"] == SAVE_AT and universal["losses"] == direct["losses"]


@pytest.mark.parametrize("name", list(OTHER))
def test_resumed_at_another_tp_or_pp_it_continues_within_bf16_tolerance(runs, name):
    _, results = runs
    uninterrupted = _job(results, 0, name, "a")["losses"]
    for rank in range(4):
        resumed = _other(results, rank, name)
        if resumed["losses"]:  # pp 2: the first stage's ranks report no loss
            assert resumed["losses"] == pytest.approx(uninterrupted[SAVE_AT:], rel=2e-3, abs=0)


def test_the_saved_state_names_every_parameter_like_the_model(runs):
    root, _ = runs
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.checkpoint.layout import full_parameter_names

    ckpt = DeepSpeedCheckpoint(str(root / "dshampooadamw_a"))
    saved = SavedFullMatrixState(ckpt)
    kinds = {name: saved.parameter_state(name).kind for name in full_parameter_names(ckpt.config)}
    assert kinds["layers.0.attention.qkv.weight"] == "matrix" and kinds["embedding.word_embeddings.weight"] == "other"
    assert saved.master("output_layer.weight").shape == (ckpt.config.vocab_size, ckpt.config.hidden_size)


# ---- refusals -----------------------------------------------------------------------------------------------

def test_8bit_state_that_another_padding_would_keep_in_32_bits_is_refused_on_every_rank(runs):
    """Only the owner of the embedding (ZeRO-1 at dp 4) meets the refusal; every rank raises it, none hangs."""
    _, results = runs
    for rank in range(4):
        message = results[rank][-1]
        assert message is not None and re.search(r"(embedding\.word_embeddings|output_layer)\.weight: its "
                                                 r"optimizer state is 8-bit", message), message
        assert "at tp 1 the padded tensor has 3584 elements" in message and "--no-load-optim" in message


def _eight_bit_embedding(rows: int, hidden: int, padding_value: int = 0) -> ParameterState:
    """adam8bit's layout-free state of an embedding of `rows` real rows (codes trimmed to the live blocks)."""
    elements = rows * hidden
    blocks = -(-elements // EIGHT_BIT_BLOCK)
    codes = torch.full((blocks * EIGHT_BIT_BLOCK,), 5, dtype=torch.uint8)
    qmap = torch.linspace(-1, 1, 256)
    state = {"step": 3, "state1": codes, "qmap1": qmap, "absmax1": torch.ones(blocks),
             "state2": codes.clone(), "qmap2": qmap.clone(), "absmax2": torch.ones(blocks)}
    return ParameterState(kind="matrix", state=state, eight_bit_elements=elements, nested=tuple(state))


def test_8bit_state_that_would_cross_bitsandbytes_32bit_threshold_is_refused_naming_the_fix():
    from megatron.config.model import TransformerConfig

    # saved where the padded embedding had >= 4,096 elements (8-bit state), resumed at tp 1 where it is padded to
    # 208 rows x 16 = 3,328 elements, which bitsandbytes keeps in 32 bits
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=200,
                               make_vocab_size_divisible_by=16, seq_length=8, max_position_embeddings=8)
    state = _eight_bit_embedding(200, 16)
    with pytest.raises(ConversionError, match=r"8-bit .*4096 elements in 32 bits.*at tp 1 .* 3328 elements.*"
                                              r"--no-load-optim"):
        cut_for_rank(state, "embedding.word_embeddings.weight", config, 1, 0, whole=False)
    config = config.replace(make_vocab_size_divisible_by=128)  # 256 rows: 4,096 elements, 8-bit as saved
    cut = cut_for_rank(state, "embedding.word_embeddings.weight", config, 1, 0, whole=False)
    assert cut["__bnb_optimizer_quant_state__"]["state1"].shape == (256, 16)
    assert cut["__bnb_optimizer_quant_state__"]["absmax1"].tolist() == [1.0] * 13 + [0.0] * 3


def test_8bit_state_in_dropped_padding_rows_is_refused():
    from megatron.checkpoint.full_matrix_state import _trim_codes

    codes = torch.full((4, 256), 200, dtype=torch.uint8)  # 4 blocks, all non-zero state
    qmap = torch.linspace(-1, 1, 256)
    with pytest.raises(ConversionError, match="padding rows hold 8-bit optimizer state.*--no-load-optim"):
        _trim_codes(codes, torch.ones(4), qmap, 300, "x")
    kept, absmax = _trim_codes(codes, torch.tensor([1.0, 1.0, 0.0, 0.0]), qmap, 300, "x")  # padding blocks: 0
    assert kept.numel() == 512 and absmax.tolist() == [1.0, 1.0]


def _plan(kind: str, source=None, optimizer="muon"):
    from megatron.checkpoint.resume import CheckpointDescription, plan_resume
    from megatron.config.arguments import parse_args

    run = parse_args(fc.flags(optimizer) + ["--load", "somewhere"])
    desc = CheckpointDescription(kind, "somewhere", "global_step2", "somewhere/global_step2", source or object(),
                                 {}, run.model, optimizer, has_optimizer_state=True, has_rng=True,
                                 lr_scheduler=None, tp=2, pp=2)
    ps = types.SimpleNamespace(tp_size=1, pp_size=1, dp_size=1, sp_size=1)
    return plan_resume(desc, run, ps)


def test_whole_matrix_state_from_argonne_or_deepspeeds_own_universal_folders_is_refused_by_name():
    from megatron.errors import ConfigError

    for kind in ("argonne", "universal"):
        with pytest.raises(ConfigError, match=r"carry --optimizer muon's whole-matrix state to another layout; "
                                              r"this one carries Adam state only.*--no-load-optim"):
            _plan(kind)
    plan = _plan("universal", types.SimpleNamespace(has_full_matrix_state=True))
    assert plan.how == "universal" and plan.load_optim
    assert _plan("ours").how == "reshard"


def test_to_universal_refuses_workers_for_a_whole_matrix_checkpoint(runs, tmp_path):
    from megatron.convert.to_universal import convert_to_universal

    root, _ = runs
    with pytest.raises(ConversionError, match=r"--workers 2: .*whole-matrix optimizer's state.*drop --workers"):
        convert_to_universal(str(root / "muon_a"), str(tmp_path / "universal"), workers=2)
    assert not (tmp_path / "universal").exists()
