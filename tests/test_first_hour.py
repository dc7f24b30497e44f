"""A new user's first hour (issue 25): plausible mistakes on every entry point and tool each end with one message
naming the input and the fix, exit code 2 and no traceback, on every launch path (plain python, torchrun,
mpiexec); independent problems are reported together.

The mistakes run as subprocesses, several at a time (each is a fresh interpreter, as a user's command is)."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "2"]
MOCK = TINY + ["--mock-data", "--vocab-size", "512"]
PY = [sys.executable]


def _mistakes(d: dict) -> list:
    """(name, command, [expected substrings], [substrings that must not appear]); `d` holds the fixtures' paths."""
    train, alcf = PY + ["pretrain_gpt.py"], PY + ["pretrain_gpt_alcf.py"]
    convert, generate = PY + ["tools/convert_checkpoint.py"], PY + ["tools/generate.py"]
    pre = PY + ["tools/preprocess_data.py"]
    return [
        ("README's tp 2 command under plain python", train + MOCK + ["--tensor-model-parallel-size", "2"],
         ["world size 1 is not divisible by --tensor-model-parallel-size 2", "launch a multiple of 2 ranks"], []),
        ("tp not dividing the heads", train + MOCK + ["--tensor-model-parallel-size", "3"],
         ["--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 3"], []),
        ("real data without --tokenizer-type", train + TINY + ["--data-path", d["data"]],
         ["no vocabulary: give --tokenizer-type"], []),
        ("a mistyped --model-preset", train + ["--model-preset", "tinny"] + MOCK[2:],
         ["unknown --model-preset 'tinny'; did you mean tiny?"], []),
        ("a missing data file and a bad batch, reported together",
         train + ["--model-preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "15", "--train-iters",
                  "2", "--data-path", d["missing"], "--vocab-size", "512"],
         ["2 problems", "--global-batch-size 15 is not divisible by --micro-batch-size 4",
          f"{d['missing']} is missing .bin and .idx"], []),
        ("a flag typo", train + MOCK + ["--lr-decay-stile", "cosine"],
         ["unknown flag --lr-decay-stile; did you mean --lr-decay-style?"], []),
        ("--fp16 on a CPU", train + MOCK + ["--fp16"], ["--fp16 does not run on CPU"], []),
        ("--hidden-size differs from the checkpoint's", train + MOCK + ["--load", d["ckpt"], "--finetune",
                                                                        "--hidden-size", "128"],
         ["--hidden-size gives 128, the checkpoint has 32", "The checkpoint is fine"], ["delete it"]),
        ("a tokenizer model file that is not there",
         train + TINY + ["--data-path", d["data"], "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                         d["missing"] + ".model"], [d["missing"] + ".model"], []),
        ("--mock-data without a vocabulary size", train + TINY + ["--mock-data"],
         ["--mock-data needs --vocab-size"], []),
        ("--save without --save-interval", train + MOCK + ["--save", d["tmp"] + "/s"],
         ["--save needs --save-interval"], []),
        ("a bad choice", train + MOCK + ["--lr-decay-style", "cosin"], ["--lr-decay-style", "invalid choice"], []),
        ("a missing --data-file-list", train + TINY + ["--data-file-list", d["missing"] + ".txt", "--vocab-size",
                                                       "512"], [d["missing"] + ".txt"], []),
        ("no run length", train + ["--model-preset", "tiny", "--mock-data", "--vocab-size", "512"],
         ["the run length is not set: give --train-iters"], []),
        ("upstream's ALCF entry point, tp 2 with one process", alcf + MOCK + ["--tensor-model-parallel-size", "2"],
         ["world size 1 is not divisible by --tensor-model-parallel-size 2"], []),
        ("converter: a folder with no checkpoint", convert + ["to-hf", "--load", d["tmp"], "--out", d["tmp"] + "/hf"],
         ["point --load at a directory written by pretrain_gpt.py --save"],
         ["drop --load", "Setting accelerator to CPU"]),
        ("converter: a layout the model cannot take",
         convert + ["reshard", "--load", d["ckpt"], "--save", d["tmp"] + "/r", "--tp", "3", "--pp", "1"],
         ["--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"], ["Setting accelerator"]),
        ("converter: from-hf of a missing folder",
         convert + ["from-hf", "--hf-dir", d["missing"], "--save", d["tmp"] + "/f"], [d["missing"]], []),
        ("generate: --hf with a wrong path", generate + ["--hf", d["missing"], "--prompt", "hi"],
         [f"--hf {d['missing']}: no such directory"], ["Repo id", "sentencepiece"]),
        ("generate: --hf of a folder without tokenizer files", generate + ["--hf", d["hf_no_tokenizer"], "--prompt",
                                                                           "hi"],
         ["no tokenizer files there"], ["sentencepiece"]),
        ("generate: --load with a wrong path", generate + ["--load", d["missing"], "--prompt", "hi"],
         [d["missing"]], []),
        ("preprocess: a missing input", pre + ["--input", d["missing"] + ".jsonl", "--json-keys", "text",
                                               "--output-prefix", d["tmp"] + "/p", "--tokenizer-type",
                                               "NullTokenizer", "--vocab-size", "10"],
         ["no such file"], []),
        ("preprocess: a malformed line", pre + ["--input", d["bad_jsonl"], "--json-keys", "text", "--output-prefix",
                                                d["tmp"] + "/p", "--tokenizer-type", "NullTokenizer",
                                                "--vocab-size", "10", "--workers", "1"],
         ["bad.jsonl:2: invalid JSON"], []),
        ("train_tokenizer: a glob matching nothing",
         PY + ["tools/train_tokenizer.py", "--input", d["tmp"] + "/zz*.jsonl", "--type", "sentencepiece",
               "--vocab-size", "300", "--output-dir", d["tmp"] + "/tok"], ["the glob matches no files"], []),
        ("train_tokenizer: a vocabulary smaller than the text's characters",
         PY + ["tools/train_tokenizer.py", "--input", d["chars_jsonl"], "--type", "sentencepiece", "--vocab-size",
               "300", "--output-dir", d["tmp"] + "/tok"], ["--vocab-size 300 does not fit this text"], []),
        ("merge_datasets: a missing prefix",
         PY + ["tools/merge_datasets.py", "--input", d["missing"], "--output-prefix", d["tmp"] + "/m"],
         [d["missing"] + ".idx not found"], []),
        ("build_corpus: an output directory that cannot be made",
         PY + ["tools/build_corpus.py", "--output-dir", d["data"] + ".bin/sub"], ["cannot create it", "--output-dir"],
         []),
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first_hour")
    from megatron.convert.ds_writer import write_checkpoint
    from megatron.checkpoint.layout import StateDictSource
    from megatron.config.model import TransformerConfig
    from megatron.data.indexed_dataset import IndexedDatasetBuilder
    from megatron.model import GPTModel

    builder = IndexedDatasetBuilder(str(tmp / "d_text_document.bin"), np.uint16)
    for doc in np.random.default_rng(0).integers(0, 500, (40, 100)):
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(str(tmp / "d_text_document.idx"))
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                               ffn_hidden_size=128, seq_length=64, vocab_size=512, normalization="rmsnorm",
                               swiglu=True, position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                               add_bias_linear=False)
    torch.manual_seed(0)
    write_checkpoint(StateDictSource(GPTModel(config).state_dict(), config,
                                     tokenizer_args={"tokenizer_type": "NullTokenizer", "vocab_size": 512}),
                     str(tmp / "ckpt"), progress=False)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text("{}")
    (tmp / "bad.jsonl").write_text('{"text": "1 2"}\n{"text": "3\n')
    (tmp / "chars.jsonl").write_text("".join(f'{{"text": "{chr(0x4E00 + i) * 3} {chr(0x4E00 + i + 1)}"}}\n'
                                             for i in range(0, 1200, 2)))
    return {"tmp": str(tmp), "data": str(tmp / "d_text_document"), "missing": str(tmp / "nothing_here"),
            "ckpt": str(tmp / "ckpt"), "hf_no_tokenizer": str(tmp / "hf"), "bad_jsonl": str(tmp / "bad.jsonl"),
            "chars_jsonl": str(tmp / "chars.jsonl")}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return env


def _run(command: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_twenty_plausible_mistakes_each_get_one_message_and_exit_2(inputs):
    mistakes = _mistakes(inputs)
    assert len(mistakes) >= 20
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda m: _run(m[1]), mistakes))
    failures = []
    for (name, command, expected, absent), result in zip(mistakes, results):
        output = result.stdout + result.stderr
        problems = []
        if result.returncode != 2:
            problems.append(f"exit {result.returncode}")
        if "Traceback" in output:
            problems.append("a traceback")
        problems += [f"no {text!r}" for text in expected if text not in output]
        problems += [f"says {text!r}" for text in absent if text in output]
        if expected and output.count(expected[0]) != 1:
            problems.append(f"{expected[0]!r} said {output.count(expected[0])} times")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    $ {' '.join(command[1:])}\n    {output[-1500:]}")
    assert not failures, "\n".join(failures)


def test_a_layout_mistake_is_said_once_under_torchrun_and_mpiexec():
    """Two ranks, tp 4: every rank refuses before any process group; the message is printed once. torchrun turns
    the child's exit code 2 into its own 1 (its design; docs/RELIABILITY.md says how to read the child's)."""
    script = MOCK + ["--tensor-model-parallel-size", "4"]
    message = "world size 2 is not divisible by --tensor-model-parallel-size 4"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "pretrain_gpt.py"] + script
    launches = [("torchrun", torchrun)]
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if mpiexec:
        launches.append(("mpiexec", [mpiexec, "-n", "2", sys.executable, "pretrain_gpt.py"] + script))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda launch: _run(launch[1]), launches))
    for (name, _), result in zip(launches, results):
        output = result.stdout + result.stderr
        assert output.count(message) == 1, (name, output[-3000:])
        ours = rf'File "{re.escape(str(ROOT))}/(?!\.venv/)'  # a traceback of ours (torchrun's own is its design)
        assert not re.search(ours, output), (name, output[-3000:])
        if name == "torchrun":
            assert result.returncode == 1 and "exitcode  : 2" in output, output[-3000:]
        else:
            assert result.returncode == 2, output[-3000:]


def _help(flag: str, monkeypatch) -> str:
    import contextlib
    import io

    from megatron.config.arguments import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([flag])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def test_help_states_every_default_and_leaves_refused_and_no_effect_flags_to_help_all(monkeypatch):
    from megatron.config import upstream_flags
    from megatron.config.arguments import COMPAT_NO_EFFECT, build_parser

    parser = build_parser()
    shown = [a for g in parser._action_groups if not getattr(g, "hidden_from_help", False) for a in g._group_actions]
    formatter = parser._get_formatter()
    silent = [a.option_strings[0] for a in shown if a.option_strings and a.default is not argparse_suppress()
              and not any(word in formatter._get_help_string(a).lower() for word in ("default", "required"))]
    assert silent == [], f"flags whose --help states no default: {silent}"

    main, everything = _help("--help", monkeypatch), _help("--help-all", monkeypatch)
    assert "--lr X" in main and "(default: 0.0003)" in main and "--split VALUE" in main and "969,30,1" in main
    hidden = [flag for flag, *_ in COMPAT_NO_EFFECT + upstream_flags.NO_EFFECT] + list(upstream_flags.REFUSED)
    listed = {token for line in main.splitlines() for token in line.split() if token.startswith("--")}
    assert [flag for flag in hidden if flag in listed and flag not in _working_flags(parser)] == []
    assert "--help-all lists them" in main
    assert all(f"{flag} " in everything or f"{flag}\n" in everything for flag in upstream_flags.REFUSED)
    assert "no effect: no fused kernels to turn off" in " ".join(everything.split())
    assert len(main.splitlines()) < 220, len(main.splitlines())  # was 927 with the refused and no-effect flags
    assert "--rotary-percent" not in main and "(+ 10 more: --help-all)" in main  # the rest: --help-all
    assert "--rotary-percent" in everything and "--muon-ns-steps" in everything
    assert "(default: 0.1, or the --model-preset's)" in main  # a model flag left unset: the model's default
    assert "std of the normal init of weights (default 0.02) ..." in " ".join(main.split())  # --help: first sentence
    assert "Hugging Face export refuses values" in " ".join(everything.split())  # --help-all: the whole text


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _working_flags(parser) -> set:
    """Flags of the groups --help shows (an upstream no-effect name can be implemented by a working flag)."""
    return {s for g in parser._action_groups if not getattr(g, "hidden_from_help", False)
            for a in g._group_actions for s in a.option_strings}


def test_flag_errors_and_model_shape_errors_are_reported_together():
    from megatron.config.arguments import parse_args
    from megatron.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_args(["--model-preset", "tiny", "--mock-data", "--vocab-size", "64", "--train-iters", "2", "--bf16",
                    "--fp16", "--num-attention-heads", "6"])
    assert "--bf16 and --fp16 both given" in str(info.value)
    assert "--hidden-size 64 is not divisible by --num-attention-heads 6" in str(info.value)


def test_preflight_reports_every_independent_problem_at_once(tmp_path):
    """Layout, batch, data file, tokenizer and engine problems of one command line, in one message."""
    from megatron.config.arguments import parse_args
    from megatron.errors import ConfigError
    from megatron.training.preflight import preflight

    run = parse_args(["--model-preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "15",
                      "--train-iters", "2", "--data-path", str(tmp_path / "gone"), "--fp16",
                      "--tensor-model-parallel-size", "3"])
    with pytest.raises(ConfigError) as info:
        preflight(run, world_size=3, device_type="cpu")
    message = str(info.value)
    for part in ("--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 3",
                 f"{tmp_path / 'gone'} is missing .bin and .idx", "no vocabulary: give --tokenizer-type",
                 "--fp16 does not run on CPU"):
        assert part in message, (part, message)
    run = parse_args(["--model-preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "15",
                      "--train-iters", "2", "--mock-data", "--vocab-size", "64"])
    with pytest.raises(ConfigError, match="--global-batch-size 15 is not divisible by --micro-batch-size 4"):
        preflight(run, world_size=1)


def test_a_refused_flag_does_not_hide_a_missing_data_file(tmp_path, capsys):
    """The flag stage refuses before a RunConfig exists; the data lists are still checked and said with it."""
    import pretrain_gpt

    code = pretrain_gpt.main(["--model-preset", "tiny", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
                              "--train-iters", "2", "--lr-bogus", "3", "--data-path", str(tmp_path / "gone")])
    err = capsys.readouterr().err
    assert code == 2 and "2 problems" in err and "unknown flag --lr-bogus" in err, err
    assert f"{tmp_path / 'gone'} is missing .bin and .idx" in err and err.count("pretrain_gpt.py:") == 1, err


def test_dry_run_names_the_flag_the_run_length_comes_from():
    from megatron.config.arguments import parse_args
    from megatron.training.dry_run import dry_run_report

    base = ["--model-preset", "tiny", "--mock-data", "--vocab-size", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4"]
    by_iters = dry_run_report(parse_args(base + ["--train-iters", "3"]), 1)
    assert "3 iterations = 12 samples = 768 tokens (--train-iters)" in by_iters
    assert "--train-samples" not in by_iters and "--train-tokens" not in by_iters
    by_samples = dry_run_report(parse_args(base + ["--train-samples", "10"]), 1)
    assert "2 iterations = 8 samples = 512 tokens (--train-samples gives 10 samples" in by_samples
