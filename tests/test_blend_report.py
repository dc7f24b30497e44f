"""The blend report (numbers vs a brute-force count, warnings, atomic files, TensorBoard text, the training
start-up), per-split blends (--train/--valid/--test-data-path), the small-weight error and short-file warning."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.config.arguments import ConfigError, parse_args
from megatron.config.data import DataConfig
from megatron.data.blend_report import blend_report, blend_report_for_config, publish_blend_report
from megatron.data.data_list import DataListError
from megatron.data.gpt_dataset import build_datasets
from megatron.data.indexed_dataset import IndexedDataset, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SEQ = 8


def write_file(prefix, num_documents, seed, vocab=100):
    rng = np.random.default_rng(seed)
    write_dataset(str(prefix), [rng.integers(0, vocab, size=int(rng.integers(1, 20))) for _ in range(num_documents)],
                  np.uint16)
    return str(prefix)


def corpus_blend(tmp_path):
    """Three corpora: 'web' (2 big files), 'code' (1 file), 'tiny' (1 small file, upsampled a lot)."""
    files = [(0.5, write_file(tmp_path / "web0", 60, 1), "web"), (0.2, write_file(tmp_path / "web1", 40, 2), "web"),
             (0.2, write_file(tmp_path / "code0", 50, 3), "code"), (0.1, write_file(tmp_path / "tiny0", 6, 4), "tiny")]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{w} {p} {c}\n" for w, p, c in files))
    return str(listing), files


def test_report_numbers_equal_a_brute_force_count_and_name_the_repeated_corpus(tmp_path):
    listing, files = corpus_blend(tmp_path)
    config = DataConfig(data_file_list=listing, split="80,20,0")
    datasets = build_datasets(config, SEQ, seed=7, num_samples=(300, 60, 0), vocab_size=100)
    report = blend_report(datasets, threshold=4.0)
    corpus_of = {p: c for _, p, c in files}
    for dataset in datasets[:2]:
        split = ("train", "valid")[dataset.split]
        location = dataset.index.locate(np.arange(len(dataset)))  # brute force: map every sample
        present = {corpus_of[f.prefix] for f in dataset.files}
        assert present == ({"web", "code", "tiny"} if split == "train" else {"web", "code"})  # tiny too short
        for corpus in present:
            row = next(r for r in report.rows if r.split == split and r.corpus == corpus)
            members = [f for f in range(dataset.num_files) if corpus_of[dataset.files[f].prefix] == corpus]
            drawn = int(np.isin(location.file, members).sum())
            tokens = 0
            per_epoch = 0
            for f in members:  # tokens of the split's documents, read from the file itself
                reader = IndexedDataset(dataset.files[f].prefix)
                first, last = dataset.files[f].sequence_range(dataset.split)
                count = int(reader.sequence_lengths[first:last].sum())
                tokens += count
                per_epoch += (count - 1) // SEQ
            assert (row.files, row.tokens, row.samples_per_epoch, row.samples_requested) == \
                (len(members), tokens, per_epoch, drawn)
            assert row.epochs == pytest.approx(drawn / per_epoch)
            epochs = [np.sum(location.file == f) / dataset.samples_per_file[f] for f in members]
            assert row.max_file_epochs == pytest.approx(max(epochs))
            used = {f.prefix for f in dataset.files}
            assert row.weight == pytest.approx(sum(w for w, p, c in files if c == corpus and p in used)
                                               / sum(w for w, p, c in files if p in used))
    train_tiny = next(r for r in report.rows if r.split == "train" and r.corpus == "tiny")
    assert train_tiny.epochs > 4
    assert any("train: corpus tiny is repeated" in w and "--blend-epochs-warning 4" in w for w in report.warnings)
    assert not any("corpus web" in w for w in report.warnings)
    table = report.table()
    assert "train: 300 samples requested" in table and "valid: 60 samples requested" in table
    assert any(line.strip().startswith("tiny") and line.endswith("!") for line in table.splitlines())
    assert "tiny0 left out: 5 tokens" in table
    # the same numbers without building document indices (the --dry-run entry point)
    again = blend_report_for_config(DataConfig(data_file_list=listing, split="80,20,0", sample_mode="documents"),
                                    SEQ, 7, (300, 60, 0), 4.0)
    assert again.to_dict() == report.to_dict()


def test_report_is_written_atomically_and_logged_as_a_tensorboard_table(tmp_path):
    listing, _ = corpus_blend(tmp_path)
    datasets = build_datasets(DataConfig(data_file_list=listing, split="1"), SEQ, 7, (100, 0, 0), 100)

    class Recorder:
        def __init__(self):
            self.tables = []

        def log_table(self, name, columns, rows, text="", step=0):
            self.tables.append((name, columns, rows, text))

    printed, tracker = [], Recorder()
    save = tmp_path / "ckpt"
    report = publish_blend_report(datasets, 4.0, printed.append, tracker, str(save))
    assert printed == [report.table()]
    assert sorted(os.listdir(save)) == ["blend_report.json", "blend_report.txt"]  # no temporary left
    assert (save / "blend_report.txt").read_text() == report.table() + "\n"
    assert json.loads((save / "blend_report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    name, columns, rows, text = tracker.tables[0]
    assert name == "data/blend_report" and len(rows) == 3 and text == report.table()
    assert publish_blend_report(build_datasets(DataConfig(mock_data=True), SEQ, 1, (4, 0, 0), 50), 4.0,
                                printed.append) is None  # mock data: nothing to report

    from megatron.config.logging import LoggingConfig
    from megatron.training.tracking import Tracker

    with Tracker(LoggingConfig(tensorboard_dir=str(tmp_path / "tb")), rank=0) as real:
        publish_blend_report(datasets, 4.0, lambda line: None, real)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_a_weight_too_small_for_the_schedule_is_an_error_naming_the_file(tmp_path):
    big, small = write_file(tmp_path / "big", 30, 1), write_file(tmp_path / "small", 30, 2)
    config = DataConfig(data_path=["1", big, "1e-14", small], split="1")
    with pytest.raises(DataListError, match=r"small: weight 1e-14 .* too small for the schedule ever to give it"):
        build_datasets(config, SEQ, 1, (50, 0, 0), 100)
    build_datasets(DataConfig(data_path=["1", big, "1e-9", small], split="1"), SEQ, 1, (50, 0, 0), 100)


def test_files_too_short_for_a_split_are_named_with_their_tokens(tmp_path, caplog):
    good = write_file(tmp_path / "good", 40, 1)
    short = str(tmp_path / "short")
    write_dataset(short, [np.arange(5), np.arange(3)], np.uint16)  # 8 tokens < SEQ + 1
    config = DataConfig(data_path=["1", good, "1", short], split="1")
    with caplog.at_level(logging.WARNING, logger="megatron.data.gpt_dataset"):
        train = build_datasets(config, SEQ, 1, (30, 0, 0), 100)[0]
    assert f"{short} (8 tokens)" in caplog.text and "1 of 2 files" in caplog.text
    assert train.num_files == 1
    report = blend_report((train,))
    assert any(f"{short} left out: 8 tokens" in w and "1 file(s) hold fewer" in w for w in report.warnings)
    assert report.to_dict()["left_out"] == {"train": [[short, 8]]}
    # many short files: one warning naming the first 20, the JSON lists them all
    many = [str(tmp_path / f"s{i}") for i in range(25)]
    for prefix in many:
        write_dataset(prefix, [np.arange(4)], np.uint16)
    train = build_datasets(DataConfig(data_path=["1", good] + [w for p in many for w in ("1", p)], split="1"), SEQ, 1, (30, 0, 0), 100)[0]
    report = blend_report((train,))
    assert len(report.warnings) == 1 and "25 file(s)" in report.warnings[0] and "and 5 more" in report.warnings[0]
    assert len(report.to_dict()["left_out"]["train"]) == 25


def test_per_split_data_paths_are_separate_blends_of_whole_files(tmp_path):
    a, b = write_file(tmp_path / "a", 30, 1), write_file(tmp_path / "b", 30, 2)
    v = write_file(tmp_path / "v", 20, 3)
    model = ["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", str(SEQ)]
    run = parse_args(model + ["--train-data-path", "0.7", a, "0.3", b, "--valid-data-path", v, "--split", "50,50,0",
                      "--blend-epochs-warning", "2.5", "--data-cache-path", str(tmp_path / "c"),
                      "--shuffle-sample-in-corpus", "--repeated-dataloader"])
    assert run.data.train_data_path == ["0.7", a, "0.3", b] and run.data.valid_data_path == [v]
    assert run.data.blend_epochs_warning == 2.5 and run.data.data_cache_path == str(tmp_path / "c")
    train, valid, test = build_datasets(run.data, SEQ, 1, (40, 20, 5), 100)
    assert test is None  # no --test-data-path: no test split (--split is not used)
    assert [f.prefix for f in train.files] == [a, b] and [f.prefix for f in valid.files] == [v]
    whole = IndexedDataset(v).num_tokens
    assert valid.files[0].token_range(1) == (0, whole) and valid.samples_per_file[0] == (whole - 1) // SEQ
    assert train.files[0].token_range(0) == (0, IndexedDataset(a).num_tokens)
    stream = np.asarray(IndexedDataset(v).tokens(0, whole), dtype=np.int64)
    location = valid.index.locate(np.arange(20))
    tokens = valid.get_tokens(np.arange(20))
    first_epoch = location.epoch == 0
    for row in np.flatnonzero(first_epoch):  # the valid split reads the whole valid file
        start = int(location.sample[row]) * SEQ
        assert np.array_equal(tokens[row], stream[start:start + SEQ + 1])
    with pytest.raises(DataListError, match="--train-data-path pair 1: weight 'x'"):
        build_datasets(DataConfig(train_data_path=["x", a]), SEQ, 1, (4, 0, 0), 100)
    for argv, message in ((["--train-data-path", a, "--data-path", b], "both given"),
                          (["--valid-data-path", v], "without --train-data-path"),
                          (["--blend-epochs-warning", "0"], "must be > 0")):
        with pytest.raises(ConfigError, match=message):
            parse_args(model + argv)


def test_training_start_up_prints_the_report_and_writes_it_into_the_checkpoint_directory(tmp_path):
    from engine_cases import flags, rank_env
    from multirank import free_port

    listing, _ = corpus_blend(tmp_path)
    save = tmp_path / "ckpt"
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *flags(
        "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--vocab-size", "128",
        "--data-file-list", listing, "--split", "1", "--save", str(save), "--save-interval", "100")]
    argv.remove("--mock-data")
    result = subprocess.run(argv, env=rank_env(0, 1, free_port()), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (save / "blend_report.txt").read_text()
    assert "train: 2 samples requested" in report and "tiny" in report
    assert report.splitlines()[1] in result.stdout
