"""Checkpoints written by upstream itself (argonne-lcf/Megatron-DeepSpeed ffa3456d, tests/data/upstream/ckpt/, see
its README and INDEX.json): they open without upstream installed, to-hf gives upstream's own forward, our loss over
the padded vocabulary is upstream's loss, and resuming with upstream's exact command line through
pretrain_gpt_alcf.py repeats upstream's next learning rates and losses."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.checkpoint import unpickle
from megatron.checkpoint.argonne import ArgonneCheckpoint
from megatron.distributed.parallel_state import ParallelState
from megatron.model.gpt_model import GPTModel
from megatron.model.sharding import shard_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(ROOT, "tests", "data", "upstream")
INDEX = json.load(open(os.path.join(UPSTREAM, "INDEX.json")))
CHECKPOINTS = sorted(INDEX["checkpoints"])
FP32 = [name for name in CHECKPOINTS if INDEX["checkpoints"][name]["dtype"] == "fp32"]
BF16_LOGITS_ATOL = 0.05  # measured 0.026 on logits up to 3.1 (bf16 keeps 8 bits of mantissa)
BF16_LOSS_ATOL = 2e-3  # resumed bf16 losses, ours against upstream's: measured at most 7e-4 (tp2_bf16)


def _load(name):
    return os.path.join(UPSTREAM, INDEX["checkpoints"][name]["load"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_upstream_checkpoint_opens_without_upstream(name):
    info = INDEX["checkpoints"][name]
    files = glob.glob(os.path.join(_load(name), f"global_step{info['iteration']}", "*.pt"))
    assert files and all(unpickle.unknown_globals(f) == [] for f in files)  # ModelType, Namespace, numpy RNG, ...
    ckpt = ArgonneCheckpoint(_load(name))
    assert ckpt.state0["args"].model_type is unpickle.ModelType.encoder_or_decoder
    assert (ckpt.tp, ckpt.pp, ckpt.iteration) == (info["tensor_parallel"], info["pipeline_parallel"], info["iteration"])
    # NullTokenizer --vocab-size 256: 257 tokens (EOD 256), padded as upstream padded it
    assert ckpt.config.vocab_size == INDEX["tokenizer"]["tokenizer_vocab_size"] == 257
    assert ckpt.config.padded_vocab_size(ckpt.tp) == info["padded_vocab_size"]
    assert ckpt.config.loss_over_padded_vocab
    sched = ckpt.lr_scheduler_state()  # their samples: 4 iterations of 8, warmup 0.05 × 64 samples
    assert (sched["num_steps"], sched["warmup_steps"], sched["decay_steps"], sched["increment"]) == (32, 3.2, 64, 8)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_to_hf_gives_upstreams_own_forward(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import main

    assert main(["to-hf", "--load", _load(name), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.from_numpy(np.load(os.path.join(UPSTREAM, INDEX["logits"][name]["tokens"])))
    with torch.no_grad():
        logits = hf(tokens).logits
    assert logits.shape[-1] == 257  # the Hugging Face model has the real vocabulary only
    theirs = torch.from_numpy(np.load(os.path.join(UPSTREAM, INDEX["logits"][name]["logits"])))
    # fp32: upstream's own forward to 1e-5; bf16: upstream ran in bf16 (bf16 weights and activations), the export
    # holds the fp32 master weights and runs in fp32, so they agree to bf16's precision only
    atol = 1e-5 if INDEX["checkpoints"][name]["dtype"] == "fp32" else BF16_LOGITS_ATOL
    torch.testing.assert_close(logits, theirs[..., :257], rtol=0, atol=atol)


def _our_model(name):
    """GPTModel (one rank) with the checkpoint's weights and its padding rows, padded as upstream padded them."""
    ckpt = ArgonneCheckpoint(_load(name))
    ckpt.keep_vocab_padding = True
    padded = ckpt.config.padded_vocab_size(ckpt.tp)
    config = ckpt.config.replace(make_vocab_size_divisible_by=padded)  # one rank, upstream's padded width
    model = GPTModel(config, ParallelState.single(), seed=0)
    model.load_state_dict(shard_state_dict(ckpt.state_dict(), config, 1, 0))
    return model.eval(), config


@pytest.mark.parametrize("name", FP32)
def test_our_loss_over_the_padded_vocabulary_is_upstreams(name):
    """With --loss-over-padded-vocab (the default on an upstream checkpoint) our per-token loss on the batch of
    iteration 5 is upstream's own (logits/<fixture>_next_batch_token_loss.npy, whose mean upstream logged); the
    real-vocabulary loss (--no-loss-over-padded-vocab) is another number (at pp2: 6.17 against 5.78)."""
    from megatron.core.cross_entropy import vocab_parallel_cross_entropy

    model, config = _our_model(name)
    samples = np.load(os.path.join(UPSTREAM, "order", "train_run", "train_tokens.npy"))[32:40]  # iteration 5
    theirs = torch.from_numpy(np.load(os.path.join(UPSTREAM, "logits", f"{name}_next_batch_token_loss.npy")))
    tokens = torch.from_numpy(samples).long()
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        ours = vocab_parallel_cross_entropy(logits, tokens[:, 1:], None, config.loss_vocab_size)
        masked = vocab_parallel_cross_entropy(logits, tokens[:, 1:], None, config.vocab_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert ours.mean().item() - masked.mean().item() > 0.3  # the padding columns' share of the softmax
    forward = torch.from_numpy(np.load(os.path.join(UPSTREAM, INDEX["logits"][name]["logits"])))
    with torch.no_grad():  # the padding columns too
        torch.testing.assert_close(model(torch.from_numpy(np.load(os.path.join(UPSTREAM, "logits", "tokens.npy")))),
                                   forward, rtol=0, atol=1e-5)


# ---- resuming upstream's run with upstream's exact command line ---------------------------------------------------

DEFAULT_POLICY = ("pp2_fp32", "dp2_fp32")  # resumed without --use-checkpoint-opt_param-scheduler


def _command(name):
    """Upstream's command line of the continuous / resumed run (command.txt), after the script name."""
    fixture = os.path.join(UPSTREAM, INDEX["checkpoints"][name]["dir"])
    lines = [line for line in open(os.path.join(fixture, "command.txt")) if "pretrain_gpt_alcf.py" in line]
    return lines[-1].split("pretrain_gpt_alcf.py", 1)[1].split()


def test_the_default_policy_compares_the_schedule_upstreams_way():
    """Without --use-checkpoint-opt_param-scheduler upstream checks the flags' schedule against the checkpoint's
    (its _check_and_set), in samples with the warmup fraction unrounded: its own command line passes, a changed
    --lr or warmup is refused naming it."""
    from megatron.checkpoint.resume import describe, plan_resume
    from megatron.config.arguments import parse_args
    from megatron.errors import ConfigError

    name = "pp2_fp32"  # tp 1: one rank's padding is the checkpoint's
    load = _load(name)
    argv = [a for a in _command(name) if a != "--use-checkpoint-opt_param-scheduler"
            and not a.startswith(("--load=", "--deepspeed_config=", "--data-file-list="))]
    argv += ["--load", load, "--mock-data"]
    desc = describe("argonne", load, f"global_step{INDEX['checkpoints'][name]['iteration']}")
    plan_resume(desc, parse_args(argv), ParallelState.single())
    for flags, named in ((["--lr", "0.0003"], "--lr: the flags give 0.0003, the checkpoint has 0.0002"),
                         (["--lr-warmup-fraction", "0.1"], "the flags give 6.4, the checkpoint has 3.2")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            plan_resume(desc, parse_args(argv + flags), ParallelState.single())


_LINE = re.compile(r"iteration=\s*(\d+)/\s*\d+ \|.*?learning_rate=([0-9.e+-]+) \|.*?lm loss=([0-9.]+)")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_resume_with_upstreams_command_line_repeats_its_losses(name, tmp_path):
    """Their command (command.txt) run from a copy of the fixture's layout, through our pretrain_gpt_alcf.py on
    tp × pp ranks: the checkpoint's LR schedule, the padded-vocabulary loss and upstream's sample order are
    chosen from the checkpoint, and iterations 5..8 repeat upstream's (fp32: the printed 6 decimals, within 1e-5;
    bf16 within BF16_LOSS_ATOL)."""
    from multirank import free_port, rank_env

    info = INDEX["checkpoints"][name]
    fixture = os.path.join(UPSTREAM, info["dir"])
    shutil.copytree(os.path.join(UPSTREAM, "data"), tmp_path / "data", ignore=shutil.ignore_patterns("*.jsonl"))
    shutil.copytree(_load(name), tmp_path / "checkpoints")  # --save writes there too
    shutil.copy(os.path.join(fixture, "ds_config.json"), tmp_path)
    argv = _command(name)
    if name in DEFAULT_POLICY:  # upstream accepts its schedule without the flag too (the flags agree with it)
        argv.remove("--use-checkpoint-opt_param-scheduler")
    port, world = free_port(), info["world_size"]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt_alcf.py"), *argv], cwd=tmp_path,
                              env={**os.environ, **rank_env(rank, world, port), "WANDB_MODE": "disabled",
                                   "PYTHONPATH": ROOT},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    outputs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, "".join(out[-3000:] for out in outputs)
    text = "".join(outputs)
    assert "resume: the loss's softmax runs over the padded vocabulary" in text
    assert "sample order: upstream's" in text
    ours = {int(i): (float(lr), float(loss)) for i, lr, loss in _LINE.findall(text)}
    theirs = json.load(open(os.path.join(fixture, "losses.json")))["resumed_run"]
    assert sorted(ours) == sorted(int(i) for i in theirs) == [5, 6, 7, 8]
    for i, values in theirs.items():
        lr, loss = ours[int(i)]
        tolerance = 1e-5 if info["dtype"] == "fp32" else BF16_LOSS_ATOL
        assert loss == pytest.approx(values["lm_loss"], abs=tolerance), (i, loss, values)
        assert lr == pytest.approx(values["learning_rate"], rel=1e-5, abs=1e-12), (i, lr, values)
