"""Flags that reach a library change what they should there: --tensorboard-queue-size (SummaryWriter's queue),
--wandb-save-dir (where wandb writes), --multiprocessing-context (how DataLoader workers start; they still ignore
the job's signals), --trust-remote-code (a tokenizer directory's own code runs only with it), and
--empty-unused-memory-level is a genuine no-op on CPU."""

import json
import os
import signal

import pytest
import torch

from megatron.config.arguments import parse_args
from megatron.config.logging import LoggingConfig
from megatron.training.tracking import Tracker


def test_tensorboard_queue_size_is_the_writers_queue(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb

    made = []

    class RecordingWriter(tb.SummaryWriter):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tb, "SummaryWriter", RecordingWriter)
    run = parse_args(["--model-preset", "tiny", "--mock-data", "--vocab-size", "64", "--train-iters", "1",
                      "--tensorboard-dir", str(tmp_path / "tb"), "--tensorboard-queue-size", "7"])
    with Tracker(run.logging) as tracker:
        tracker.log({"x": 1.0}, 1)
    with Tracker(LoggingConfig(tensorboard_dir=str(tmp_path / "tb2"))):
        pass
    assert [kwargs["max_queue"] for kwargs in made] == [7, 1000]  # the flag, then upstream's default


def test_wandb_save_dir_is_where_wandb_writes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tensorboard, chosen = tmp_path / "tb", tmp_path / "wandb_here"
    logging = LoggingConfig(tensorboard_dir=str(tensorboard), wandb_project="flags", wandb_save_dir=str(chosen))
    with Tracker(logging) as tracker:
        tracker.log({"x": 1.0}, 1)
    assert any(p.name.startswith("offline-run-") for p in (chosen / "wandb").iterdir())
    assert not (tensorboard / "wandb").exists()  # the default without the flag


def test_spawned_dataloader_workers_give_the_same_batches_and_ignore_job_signals():
    from megatron.data.data_iterator import build_data_iterator
    from megatron.data.gpt_dataset import MockGPTDataset

    dataset = MockGPTDataset(16, 8, 50, seed=3)
    expected = [b["tokens"] for b in build_data_iterator(dataset, 2, 0, 1, 0, num_workers=0)]
    batches = build_data_iterator(dataset, 2, 0, 1, 0, num_workers=1, multiprocessing_context="spawn")
    first = next(batches)["tokens"]
    workers = batches._workers
    assert [type(w).__name__ for w in workers] == ["SpawnProcess"]
    os.kill(workers[0].pid, signal.SIGTERM)  # a batch system's SIGTERM to the whole job: the rank decides
    rest = [b["tokens"] for b in batches]
    assert all(torch.equal(a, b) for a, b in zip([first] + rest, expected)) and len(rest) + 1 == len(expected)


def test_trust_remote_code_lets_a_tokenizer_directory_run_its_own_class(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron.config.data import DataConfig
    from megatron.data.tokenizers import TokenizerError, build_tokenizer_from_config

    tok = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "marked_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass MarkedTokenizerFast(PreTrainedTokenizerFast):\n"
        "    pass\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MarkedTokenizerFast", "eos_token": "<eos>",
        "auto_map": {"AutoTokenizer": [None, "marked_tokenizer.MarkedTokenizerFast"]}}))
    config = DataConfig(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path))
    with pytest.raises(TokenizerError, match="pass --trust-remote-code"):
        build_tokenizer_from_config(config)
    config.trust_remote_code = True
    tokenizer = build_tokenizer_from_config(config)
    assert type(tokenizer._tokenizer).__name__ == "MarkedTokenizerFast" and tokenizer.eod == 0
    assert tokenizer.tokenize("a b a") == [1, 2, 1]


def test_empty_cache_is_a_genuine_no_op_on_cpu():
    from megatron.distributed.device import empty_cache

    assert empty_cache(torch.device("cpu")) is False
