"""Upstream's checkpoint and logging flags change what they should (one 2-rank launch):
--no-save-optim / --no-save-rng write checkpoints without that state, and resuming them needs --no-load-optim /
--no-load-rng; --no-load-lr-state restarts the LR schedule; --load-tag picks a checkpoint other than the
pointer's (a missing one is named with the ones there); --use-checkpoint-args takes the model shape from the
checkpoint; --log-params-norm logs the same norm at dp 2, tp 2, pp 2 and ZeRO-3; --empty-unused-memory-level
releases the cache after each step (1) and after each optimizer step too (2)."""

import json

import pytest
import torch

import engine_cases as ec
from multirank import run_ranks

# TINY at ZeRO-1 with a warmup-then-linear LR schedule over 4 iterations (so a restarted schedule shows).
BASE = ec.flags("--zero-stage", "1", "--lr-decay-style", "linear", "--lr-warmup-iters", "2", "--train-iters", "4",
                "--log-interval", "1")
SHAPE = {"--num-layers": 1, "--hidden-size": 1, "--num-attention-heads": 1, "--num-key-value-heads": 1,
         "--ffn-hidden-size": 1, "--seq-length": 1, "--max-position-embeddings": 1, "--normalization": 1,
         "--swiglu": 0, "--position-embedding-type": 1}


def without_shape(argv):
    out, i = [], 0
    while i < len(argv):
        if argv[i] in SHAPE:
            i += 1 + SHAPE[argv[i]]
            continue
        out.append(argv[i])
        i += 1
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckptflags")
    ckpt, pipe = str(root / "ckpt"), str(root / "pipe")
    resume = ["--load", ckpt, "--no-load-optim", "--no-load-rng"]
    norm = ["--log-params-norm", "--exit-interval", "1"]
    cases = [
        ("bare", BASE + ["--save", ckpt, "--save-interval", "2", "--exit-interval", "2", "--no-save-optim",
                         "--no-save-rng", "--log-params-norm", "--empty-unused-memory-level", "2"]),
        ("refused", BASE + ["--load", ckpt]),
        ("fresh_lr", BASE + resume + ["--no-load-lr-state", "--empty-unused-memory-level", "1"]),
        ("resumed", BASE + resume + ["--save", ckpt, "--save-interval", "2"]),  # full checkpoint at 4
        ("tag", BASE + resume + ["--load-tag", "global_step2"]),
        ("tag_missing", BASE + resume + ["--load-tag", "global_step3"]),
        ("checkpoint_args", without_shape(BASE) + resume + ["--use-checkpoint-args", "--load-tag", "global_step2"]),
        ("norm_tp2", BASE + norm + ["--tensor-model-parallel-size", "2"]),
        ("norm_pp2", BASE + norm + ["--pipeline-model-parallel-size", "2", "--zero-stage", "0", "--save", pipe,
                                    "--save-interval", "1", "--no-save-optim"]),
        ("norm_zero3", BASE + norm + ["--zero-stage", "3"]),
    ]
    return root, run_ranks(2, ec.checkpoint_flag_cases, cases, timeout=600)[0]


def test_no_save_optim_and_rng_write_neither_and_the_manifest_says_so(runs):
    root, r = runs
    assert r["bare"]["error"] is None, r["bare"]["error"]
    directory = root / "ckpt" / "global_step2"
    names = sorted(p.name for p in directory.iterdir())
    assert "mp_rank_00_model_states.pt" in names
    assert not [n for n in names if n.endswith("optim_states.pt") or n.startswith("rng_state")], names
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["contents"] == {"optimizer": False, "rng": False} and set(manifest["files"]) == set(names) - {
        "manifest.json"}
    # the full checkpoint saved later by "resumed" holds both (ZeRO-1 shards of each dp rank, every rank's RNG)
    full = sorted(p.name for p in (root / "ckpt" / "global_step4").iterdir())
    assert len([n for n in full if n.endswith("optim_states.pt")]) == 2 and len(
        [n for n in full if n.startswith("rng_state")]) == 2


def test_no_save_optim_without_zero_drops_the_optimizer_entry_and_keeps_the_schedule(runs):
    root, r = runs
    assert r["norm_pp2"]["error"] is None, r["norm_pp2"]["error"]
    state = torch.load(root / "pipe" / "global_step1" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert state["optimizer"] is None and state["lr_scheduler"]["num_steps"] == 1 and state["iteration"] == 1
    assert state["contents"] == {"optimizer": False, "rng": True}


def test_resuming_a_checkpoint_without_optimizer_or_rng_state_names_the_flags_to_add(runs):
    error = runs[1]["refused"]["error"]
    assert error and "global_step2" in error and "--no-save-optim" in error and "--no-load-optim" in error
    assert "--no-save-rng" in error and "--no-load-rng" in error


def test_no_load_lr_state_restarts_the_schedule_where_a_plain_resume_continues_it(runs):
    r = runs[1]
    # the LR logged is the one after the iteration's step, as upstream logs it
    lr = {name: r[name]["scalars"]["learning-rate/learning-rate"] for name in ("bare", "fresh_lr", "resumed")}
    assert r["fresh_lr"]["start_iteration"] == r["resumed"]["start_iteration"] == 2
    assert lr["bare"][1] == pytest.approx(0.5e-2) and lr["bare"][2] == pytest.approx(1e-2)  # 2 warmup steps
    assert lr["fresh_lr"][3] == pytest.approx(lr["bare"][1]) and lr["fresh_lr"][4] == pytest.approx(lr["bare"][2])
    # a plain resume continues the checkpoint's schedule: warmup done, it decays linearly to 0 after step 4
    assert lr["resumed"][3] == pytest.approx(0.5e-2) and lr["resumed"][4] == pytest.approx(0.0, abs=1e-12)


def test_load_tag_resumes_the_named_checkpoint_not_the_pointers(runs):
    root, r = runs
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert r["tag"]["error"] is None and r["tag"]["start_iteration"] == 2 and r["tag"]["iterations"] == [3, 4]
    error = r["tag_missing"]["error"]
    assert "--load-tag global_step3" in error and "global_step2, global_step4" in error


def test_use_checkpoint_args_takes_the_model_shape_from_the_checkpoint(runs):
    r = runs[1]
    case = r["checkpoint_args"]
    assert case["error"] is None, case["error"]
    assert case["model"] == r["bare"]["model"] and case["start_iteration"] == 2
    assert any("--use-checkpoint-args" in n and "--hidden-size 32" in n and "--num-layers 2" in n
               for n in case["notices"])


def test_params_norm_is_logged_and_the_same_on_every_layout(runs):
    r = runs[1]
    line = next(x for x in r["bare"]["lines"] if x.startswith(" iteration=       1/"))
    assert " params_norm=" in line and line.index("| grad_norm=") < line.index("| params_norm=")
    norms = {name: r[name]["scalars"]["training/params-norm"][1] for name in ("bare", "norm_tp2", "norm_pp2",
                                                                              "norm_zero3")}
    assert norms["bare"] > 1.0
    for name, value in norms.items():
        assert value == pytest.approx(norms["bare"], rel=1e-4), norms
    assert r["bare"]["scalars"]["loss/params_norm"][1] == norms["bare"]  # upstream's other name for it
    assert "training/params-norm" not in r["resumed"]["scalars"]  # only with the flag


def test_empty_unused_memory_level_releases_after_forward_backward_and_after_the_step(runs):
    r = runs[1]
    assert r["bare"]["empty_cache_calls"] == ["cpu"] * 4  # level 2: 2 iterations × (forward-backward, step)
    assert r["fresh_lr"]["empty_cache_calls"] == ["cpu"] * 2  # level 1: 2 iterations × forward-backward
    assert r["resumed"]["empty_cache_calls"] == []  # level 0 (default)


def test_no_save_optim_is_refused_at_zero_3_where_the_weights_live_in_the_optimizer_shards():
    from megatron.config.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"--no-save-optim with --zero-stage 3: .* would hold no weights"):
        parse_args(ec.flags("--zero-stage", "3", "--no-save-optim"))
    assert parse_args(ec.flags("--zero-stage", "2", "--no-save-optim")).checkpoint.no_save_optim


def test_a_checkpoint_without_optimizer_state_is_refused_by_the_universal_converter_naming_why(runs):
    from megatron.checkpoint.layout import ConversionError
    from megatron.convert.to_universal import convert_to_universal

    with pytest.raises(ConversionError, match=r"saved with --no-save-optim: .* convert it with `reshard`"):
        convert_to_universal(str(runs[0] / "ckpt" / "global_step2"), str(runs[0] / "universal"))
