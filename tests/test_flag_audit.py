"""Upstream's flags (a frozen list taken from argonne-lcf/Megatron-DeepSpeed's arguments.py, tests/data/) are each
implemented, refused with a reason, or accepted as a true no-op; none is unknown. Errors report every problem
at once, spelled as typed, and a "did you mean" never flips a flag's meaning."""

import contextlib
import io
from pathlib import Path

import pytest

from megatron.config import upstream_flags
from megatron.config.arguments import COMPAT_NO_EFFECT, ConfigError, build_parser, parse_args

UPSTREAM = [line.strip() for line in (Path(__file__).parent / "data" / "upstream_flags.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]

# The only accepted-with-no-effect flags: kernel/fusion toggles, and flags that ask for what is always done here.
TRUE_NO_OPS = {
    "--deepspeed", "--deepscale", "--deepspeed-mpi", "--local-rank", "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--no-async-tensor-model-parallel-allreduce",
    "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-batch-size-to-tensorboard",
    "--disable-mem-efficient-ln", "--no-barrier-with-level-1-timing", "--use-cpu-initialization",
    "--no-initialization", "--zero-reduce-scatter", "--zero-contigious-gradients", "--use-pin-memory",
    "--deepspeed-activation-checkpointing",
}
# Still listed as no-ops until their owners (other issues) or this issue implement them.


def _normalized(flag: str) -> str:
    return flag.replace("_", "-")


def _options():
    parser = build_parser()
    return parser, {option: action for action in parser._actions for option in action.option_strings}


def test_the_frozen_list_is_upstreams_and_complete():
    assert len(UPSTREAM) == len(set(UPSTREAM)) > 340
    for name in ("--lr_constant_plus_cooldown", "--adjust-word-embedding-init", "--use-checkpoint-opt_param-scheduler",
                 "--deepspeed_config", "--profile_steps", "--retro-workdir"):
        assert name in UPSTREAM


def test_every_upstream_flag_is_implemented_refused_or_a_true_no_op():
    _, options = _options()
    unknown = [name for name in UPSTREAM
               if _normalized(name) not in options and name not in options]
    assert unknown == []


def test_refused_flags_are_registered_as_refusals_with_a_reason():
    _, options = _options()
    for flag, why in upstream_flags.REFUSED.items():
        assert why and flag in options, flag
        action = options[flag]
        if action.dest.startswith("refused__"):
            assert action.help == why


def test_the_no_effect_list_keeps_only_true_no_ops_and_help_says_so():
    parser, options = _options()
    no_effect = {flag for flag, _, _ in COMPAT_NO_EFFECT + upstream_flags.NO_EFFECT
                 if (options[flag].help or "").startswith("no effect:")}
    assert no_effect <= TRUE_NO_OPS
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help-all"])  # --help lists the flags that act; --help-all adds these (issue 25)
    text = " ".join(out.getvalue().split())
    assert "no effect: no fused kernels to turn off" in text
    assert "no effect here (kernel-fusion toggles" in text


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--mock-data", "--vocab-size", "100", "--train-iters", "3"]


@pytest.mark.parametrize("typed, reason", [
    (["--num-experts", "8"], "mixture-of-experts layers are not supported"),
    (["--fp8_hybrid"], "fp8 / Transformer Engine training is not supported"),
    (["--retro-workdir", "/x"], "RETRO (retrieval-augmented) models are not supported"),
    (["--img_h", "224"], "vision models are not supported"),
    (["--encoder-num-layers", "2"], "BERT/T5 encoder(-decoder) models are not supported"),
    (["--ict-head-size", "8"], "biencoder/ICT retriever models are not supported"),
    (["--contigious-checkpointing"], "DeepSpeed's contiguous checkpoint buffers"),
])
def test_a_refused_flag_is_named_as_typed_with_its_reason(typed, reason):
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + typed)
    assert f"{typed[0]}: {reason}" in str(e.value)


def test_num_experts_1_is_a_dense_model_and_accepted():
    assert parse_args(BASE + ["--num-experts", "1"]).model.num_layers == 2


def test_unknown_flags_and_invalid_values_are_reported_together_as_typed():
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--lr_decay_style", "cosin", "--optimizer", "adamx", "--num_layer", "3", "--lr", "x",
                           "--retro-workdir", "/x"])
    lines = str(e.value).splitlines()
    assert "  - --lr_decay_style: invalid choice: 'cosin'" in "\n".join(lines)
    assert any(line.startswith("  - --optimizer: invalid choice: 'adamx'") for line in lines)
    assert "  - --lr: invalid float value: 'x'" in lines
    assert "  - unknown flag --num_layer; did you mean --num-layers?" in lines
    assert any(line.startswith("  - --retro-workdir: RETRO") for line in lines)


@pytest.mark.parametrize("typed, never", [
    ("--load-optim", "--no-load-optim"),
    ("--bias-linear", "--disable-bias-linear"),
    ("--pipeline-parallel", "--no-pipeline-parallel"),
    ("--no-rotary-position-embeddings", "--use-rotary-position-embeddings"),
])
def test_did_you_mean_never_names_a_flag_of_the_opposite_meaning(typed, never):
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + [typed])
    assert f"unknown flag {typed}" in str(e.value) and never not in str(e.value)
