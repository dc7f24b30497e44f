"""--data-path / --data-file-list parsing, the all-at-once problem report, splits and header scans."""

from pathlib import Path

import numpy as np
import pytest

from megatron.data.data_list import (DataListError, blend_entries, parse_data_file_list, parse_data_path,
                                     parse_split, scan_blend, scan_file, scan_files, split_boundaries)
from megatron.data.indexed_dataset import IndexedDataset, write_dataset

LISTS = Path(__file__).resolve().parents[2] / "shared" / "data-lists"  # ../shared beside the repository


def write_file(prefix, num_documents, seed=0, max_length=40):
    rng = np.random.default_rng(seed)
    documents = [rng.integers(0, 1000, size=int(rng.integers(1, max_length))) for _ in range(num_documents)]
    write_dataset(str(prefix), documents, np.uint16)
    return documents


def test_data_path_single_prefix_means_weight_one_and_pairs_are_weight_prefix():
    (entry,) = parse_data_path(["/data/a_text_document"])
    assert (entry.weight, entry.prefix) == (1.0, "/data/a_text_document")
    entries = parse_data_path(["0.3", "/data/a", "0.7 /data/b"])  # quoted shell variables split too
    assert [(e.weight, e.prefix) for e in entries] == [(0.3, "/data/a"), (0.7, "/data/b")]


def test_data_path_reports_every_bad_weight_and_an_odd_word_count_together():
    with pytest.raises(DataListError) as info:
        parse_data_path(["x", "/data/a", "-1", "/data/b", "0", "/data/c", "/data/d"])
    problems = info.value.problems
    assert len(problems) == 4
    assert "odd" in str(info.value) or "pairs" in str(info.value)
    assert any("'x' is not a number" in p for p in problems)
    assert any("-1 of /data/b" in p for p in problems) and any("0 of /data/c" in p for p in problems)


def test_file_list_allows_comments_blank_lines_and_weights_not_summing_to_one(tmp_path):
    write_file(tmp_path / "a", 3)
    write_file(tmp_path / "b", 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n\n2 {tmp_path}/a corpus-a   # trailing comment\n"
                       f"   6 {tmp_path}/b.bin\n\n")
    entries = blend_entries(data_file_list=str(listing))
    assert [(e.weight, e.corpus, e.where) for e in entries] == [(2.0, "corpus-a", "line 3"), (6.0, None, "line 4")]
    assert entries[1].prefix.endswith("b.bin")  # suffixes are accepted and stripped when files are read


def test_file_list_reports_malformed_lines_bad_weights_and_missing_files_all_at_once(tmp_path):
    write_file(tmp_path / "good", 3)
    (tmp_path / "only_bin.bin").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([
        f"1.0 {tmp_path}/good web",
        "just-one-field",
        f"abc {tmp_path}/good",
        f"-0.5 {tmp_path}/good",
        f"0 {tmp_path}/good",
        f"1 {tmp_path}/absent web",
        f"1 {tmp_path}/only_bin web",
        f"1 {tmp_path}/good web extra-field",
    ]) + "\n")
    with pytest.raises(DataListError) as info:
        blend_entries(data_file_list=str(listing))
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    assert "missing .bin and .idx" in problems[4] and "missing .idx" in problems[5]
    assert "2 of 3 files are missing" in str(info.value)
    assert str(listing) in str(info.value)


@pytest.mark.parametrize("name,files,corpora", [("aurora-dolma-v1.7.txt", 2419, 14),
                                                ("aurora-olmo-mix-1124.txt", 1438, 7)])
def test_real_aurora_lists_parse_and_every_missing_file_is_named_with_the_count(name, files, corpora):
    path = LISTS / name
    if not path.exists():
        pytest.skip(f"{path} not on this machine")
    entries = parse_data_file_list(str(path))
    assert len(entries) == files and len({e.corpus for e in entries}) == corpora
    assert all(e.weight > 0 and e.prefix.startswith("/flare/") for e in entries)
    with pytest.raises(DataListError) as info:
        blend_entries(data_file_list=str(path))
    assert len(info.value.problems) == files
    assert f"{files} of {files} files are missing" in str(info.value)
    assert entries[0].prefix in info.value.problems[0] and info.value.problems[0].startswith("line 1:")
    assert entries[-1].prefix in info.value.problems[-1]
    assert "more (all of them in DataListError.problems)" in str(info.value)
    with pytest.raises(DataListError) as scanned:  # the one-pass scan that training uses says the same
        scan_blend(data_file_list=str(path))
    assert scanned.value.problems == info.value.problems and f"{files} of {files} files are missing" in str(scanned.value)


def test_split_string_and_document_boundaries_follow_megatron():
    assert parse_split("990,10,0") == (0.99, 0.01, 0.0)
    assert parse_split("98/2") == (0.98, 0.02, 0.0)
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_boundaries(parse_split("1,1,1"), 10) == [0, 4, 7, 10]  # rounded 3,3,3; shortfall moves all ends
    assert split_boundaries(parse_split("990,10,0"), 1) == [0, 1, 1, 1]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(DataListError, match="--split"):
            parse_split(bad)


def test_scan_reads_split_token_ranges_equal_to_the_full_index(tmp_path):
    documents = write_file(tmp_path / "f", 57, seed=3)
    splits = scan_file(str(tmp_path / "f"), parse_split("80,15,5"))
    full = IndexedDataset(str(tmp_path / "f"))
    starts = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    doc_bounds = split_boundaries(parse_split("80,15,5"), 57)
    assert list(splits.token_bounds) == [int(starts[b]) for b in doc_bounds]
    assert list(splits.sequence_bounds) == [int(full.document_indices[b]) for b in doc_bounds]
    assert splits.num_documents == 57 and splits.num_tokens == full.num_tokens
    start, stop = splits.token_range(1)
    assert splits.num_samples(1, 8) == (stop - start - 1) // 8


def test_scan_reports_every_corrupt_file_at_once(tmp_path):
    write_file(tmp_path / "good", 4)
    for name in ("bad1", "bad2"):
        write_file(tmp_path / name, 4)
        (tmp_path / f"{name}.idx").write_bytes(b"NOTMAGIC" + b"\0" * 40)
    entries = parse_data_path([f"1 {tmp_path}/good 1 {tmp_path}/bad1 1 {tmp_path}/bad2"])
    with pytest.raises(DataListError) as info:
        scan_files(entries, parse_split("1"), "--data-path")
    assert len(info.value.problems) == 2 and "bad1.idx" in str(info.value) and "bad2.idx" in str(info.value)


def test_one_pass_scan_reports_malformed_lines_missing_and_corrupt_files_together(tmp_path):
    """scan_blend finds missing files by its own open of each .idx: the same report as blend_entries (line order,
    the count and directory), and unreadable files in the same error; a clean blend gives entries and headers."""
    write_file(tmp_path / "good", 3)
    write_file(tmp_path / "corrupt", 3)
    (tmp_path / "corrupt.idx").write_bytes(b"NOTMAGIC" + b"\0" * 40)
    write_file(tmp_path / "no_idx", 3)
    (tmp_path / "no_idx.idx").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([f"1 {tmp_path}/good web", f"1 {tmp_path}/corrupt web", "just-one-field",
                                  f"1 {tmp_path}/absent web", f"1 {tmp_path}/no_idx web"]) + "\n")
    with pytest.raises(DataListError) as info:
        scan_blend(data_file_list=str(listing), fractions=parse_split("1"))
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 2"]
    assert problems[1].endswith("absent is missing .bin and .idx") and problems[2].endswith("no_idx is missing .idx")
    assert "corrupt.idx" in problems[3] and "MMIDIDX" in problems[3]
    assert "2 of 4 files are missing" in str(info.value) and "1 unreadable or inconsistent" in str(info.value)
    listing.write_text(f"2 {tmp_path}/good web\n")
    entries, files, source = scan_blend(data_file_list=str(listing), fractions=parse_split("1"))
    assert [e.weight for e in entries] == [2.0] and files == [scan_file(str(tmp_path / "good"), parse_split("1"))]
    assert source == f"--data-file-list {listing}"


def test_header_reads_use_threads_only_when_each_read_is_slow():
    import threading
    import time

    from megatron.data import data_list

    def fast(item):
        return item, threading.get_ident()

    def slow(item):  # a parallel filesystem's open: milliseconds, which threads overlap
        time.sleep(0.001)
        return item, threading.get_ident()

    main = threading.get_ident()
    items = list(range(300))
    for fn, threaded in ((fast, False), (slow, True)):
        results = data_list._map_in_threads(fn, items)
        assert [item for item, _ in results] == items  # in order either way
        others = {ident for _, ident in results[data_list.SERIAL_PROBE:]} - {main}
        assert bool(others) == threaded, fn.__name__


def test_paused_gc_restores_the_collector_as_it_found_it():
    import gc

    from megatron.data.data_list import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():  # also when the work raises
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # a run that manages the collector itself keeps it off
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_alcf_entry_blends_every_bin_file_of_a_data_path_directory_with_weight_one(tmp_path):
    """Upstream's pretrain_gpt_alcf.py: --data-path DIR takes every file whose name contains ".bin", weight 1 each,
    in os.listdir's order; pretrain_gpt.py (as upstream's plain entry) takes DIR as a prefix."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "corpus"
    data.mkdir()
    for name, seed in (("web_text_document", 0), ("code_text_document", 1), ("books_text_document", 2)):
        write_file(str(data / name), 20, seed=seed)
    (data / "README.txt").write_text("not data")
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--vocab-size", "256", "--tokenizer-type", "NullTokenizer", "--train-iters", "2",
             "--global-batch-size", "2", "--data-path", str(data), "--dry-run", "1"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    alcf = subprocess.run([sys.executable, str(root / "pretrain_gpt_alcf.py"), *flags], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert alcf.returncode == 0, alcf.stderr[-3000:]
    order = [f.split(".bin")[0] for f in os.listdir(str(data) + "/") if ".bin" in f]
    assert len(order) == 3

    import pretrain_gpt
    from megatron.config.arguments import parse_args

    run = parse_args(flags)
    pretrain_gpt.data_path_directory(run)
    assert run.data.data_path == [item for name in order for item in ("1", f"{data}/{name}")]
    assert "its 3 .bin files are blended with weight 1 each" in run.notices[-1]
    for name in order:
        assert name in alcf.stdout
    plain = subprocess.run([sys.executable, str(root / "pretrain_gpt.py"), *flags], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    assert plain.returncode == 2 and str(data) in plain.stderr


def test_data_path_reads_argonnes_weight_prefix_corpus_triplets():
    entries = parse_data_path(["0.5 /data/a web 0.2 /data/b web", "0.3", "/data/c", "code"])
    assert [(e.weight, e.prefix, e.corpus) for e in entries] == \
        [(0.5, "/data/a", "web"), (0.2, "/data/b", "web"), (0.3, "/data/c", "code")]
    pairs = parse_data_path(["0.5", "/data/a", "0.2", "/data/b", "0.3", "/data/c"])  # pairs stay pairs
    assert [(e.weight, e.corpus) for e in pairs] == [(0.5, None), (0.2, None), (0.3, None)]
