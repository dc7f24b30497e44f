"""--sample-mode upstream serves argonne-lcf/Megatron-DeepSpeed's own sample order.

The expected tokens are upstream's, dumped by its real code (ffa3456d), never reconstructed:
- tests/data/upstream/order/*.npz and manifest.json, made by make_order_fixtures.py (which says how it was run)
  from the token files next to it: four files in two corpora over 1 to 11 epochs each, train/valid/test from
  --split 90,8,2, with the corpus flags of pretrain_gpt_alcf.py, a single prefix, each split's own paths,
  upstream's data loader resumed at consumed_samples = N, and helpers.cpp's greedy blend itself;
- tests/data/upstream/order/<case>/ (tests/data/upstream/README.md): upstream's command lines, tokens and its
  own --data-cache-path output, read here through our parse_args.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from megatron.config.arguments import parse_args
from megatron.config.data import DataConfig
from megatron.data.data_iterator import build_data_iterator
from megatron.data.gpt_dataset import build_datasets
from megatron.data.upstream_index import GreedyBlend, UpstreamOrderError, upstream_split
from megatron.data.upstream_order import SharedArrays, choose_sample_mode

FIXTURES = Path(__file__).parent / "data" / "upstream" / "order"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _file_list(tmp_path, corpus=True) -> str:
    path = tmp_path / "data_file_list.txt"
    path.write_text("".join(f"{f['weight']} {FIXTURES / 'data' / f['name']}" + (f" {f['corpus']}" if corpus else "")
                            + "\n" for f in MANIFEST["files"]))
    return str(path)


def _requested() -> tuple[int, int, int]:
    """Upstream's training.py arithmetic for the manifest's run (train, valid, test samples)."""
    m = MANIFEST
    evals = (m["train_iters"] // m["eval_interval"] + 1) * m["eval_iters"]
    return m["train_iters"] * m["global_batch_size"], evals * m["global_batch_size"], \
        m["eval_iters"] * m["global_batch_size"]


def _datasets(tmp_path, name: str):
    flags, kind = MANIFEST["configs"][name]["flags"], MANIFEST["configs"][name]["kind"]
    prefix = [str(FIXTURES / "data" / f["name"]) for f in MANIFEST["files"]]
    if kind == "list":
        config = DataConfig(data_file_list=_file_list(tmp_path), split=MANIFEST["split"], sample_mode="upstream",
                            shuffle_sample_in_corpus="--shuffle-sample-in-corpus" in flags,
                            blend_sample_in_corpus="--blend-sample-in-corpus" in flags)
    elif kind == "single":
        config = DataConfig(data_path=[prefix[0]], split=MANIFEST["split"], sample_mode="upstream")
    else:  # each split its own paths, as make_order_fixtures.py gives them
        config = DataConfig(train_data_path=["0.6", prefix[0], "0.4", prefix[2]], valid_data_path=[prefix[3]],
                            test_data_path=["0.5", prefix[1], "0.5", prefix[3]], split=MANIFEST["split"],
                            sample_mode="upstream")
    return build_datasets(config, MANIFEST["seq_length"], MANIFEST["seed"], _requested(), None)


@pytest.mark.parametrize("name", sorted(MANIFEST["configs"]))
def test_every_sample_of_every_split_is_upstreams(tmp_path, name):
    expected = np.load(FIXTURES / f"{name}.npz")
    datasets = _datasets(tmp_path, name)
    for split, dataset in zip(("train", "valid", "test"), datasets):
        assert split in expected.files, f"upstream has no {split} split here"
        ours = dataset.get_tokens(np.arange(len(dataset)))
        assert ours.shape == expected[split].shape
        np.testing.assert_array_equal(ours, expected[split], err_msg=f"{name} {split}")


@pytest.mark.parametrize("name", ["list_shuffle", "list_blend_shuffle"])
def test_resuming_at_consumed_samples_continues_at_upstreams_sample(tmp_path, name):
    expected = np.load(FIXTURES / f"{name}.npz")
    train = _datasets(tmp_path, name)[0]
    mbs = MANIFEST["micro_batch_size"]
    for key in [k for k in expected.files if k.startswith("resume_")]:
        consumed = int(key.split("_")[1])
        train.blend._blocks.clear()
        batches = build_data_iterator(train, mbs, 0, 1, consumed)
        assert bool(train.blend._blocks) == (consumed > 0)  # computed before any worker would fork
        ours = np.concatenate([next(batches)["tokens"].numpy() for _ in range(2)])
        np.testing.assert_array_equal(ours, expected[key], err_msg=f"resumed at {consumed}")
        # two data-parallel ranks read the same global samples between them
        ranks = [build_data_iterator(train, mbs // 2, r, 2, consumed) for r in range(2)]
        both = np.concatenate([next(it)["tokens"].numpy() for it in ranks])
        np.testing.assert_array_equal(both, expected[key][:mbs])


def test_a_dataset_sent_to_a_worker_process_serves_the_same_samples(tmp_path):
    train = _datasets(tmp_path, "list_blend_shuffle")[0]
    samples = np.arange(0, len(train), 7)
    first = train.get_tokens(samples)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(train)).get_tokens(samples[::-1]), first[::-1])


def test_the_lazy_greedy_blend_recomputes_passed_blocks_exactly():
    weights = np.array([0.37, 0.21, 0.29, 0.13])
    whole = GreedyBlend(weights, 5000, block=100000).arrays()
    blocked = GreedyBlend(weights, 5000, block=64)
    assert blocked[4321] == (int(whole[0][4321]), int(whole[1][4321]))  # forward to block 67 first ...
    for sample in (3, 4999, 64, 63, 2000):  # ... then back and forth
        assert blocked[sample] == (int(whole[0][sample]), int(whole[1][sample]))
    for a, b in zip(blocked.arrays(10, 4000), (whole[0][10:4000], whole[1][10:4000])):
        np.testing.assert_array_equal(a, b)
    many = GreedyBlend(np.full(60, 1 / 60), 500, block=50)  # the numpy path (more than 48 datasets)
    chosen, numbers = many.arrays()
    assert np.bincount(chosen, minlength=60).tolist() == [9] * 20 + [8] * 40
    assert all(numbers[chosen == d].tolist() == list(range((chosen == d).sum())) for d in range(60))


@pytest.mark.parametrize("name", ["greedy_5", "greedy_60"])
@pytest.mark.parametrize("python_max_datasets", [0, 100])  # the numpy path, the plain-Python path
def test_both_greedy_paths_are_helpers_cpps_blend(name, python_max_datasets):
    expected = np.load(FIXTURES / f"{name}.npz")
    blend = GreedyBlend(expected["weights"], expected["index"].size, block=1000)
    blend.python_max_datasets = python_max_datasets
    chosen, numbers = blend.arrays()
    np.testing.assert_array_equal(chosen, expected["index"])
    np.testing.assert_array_equal(numbers, expected["sample_index"])


def test_upstream_checkpoints_select_upstreams_order_unless_the_flag_says_otherwise():
    default = DataConfig(data_path=["x"])
    assert choose_sample_mode(default, None, False) == ("samples", None)
    mode, why = choose_sample_mode(default, "/ckpt", True)
    assert mode == "upstream" and "because --load /ckpt is an upstream checkpoint" in why
    typed = DataConfig(data_path=["x"], sample_mode="documents", sample_mode_given=True)
    mode, why = choose_sample_mode(typed, "/ckpt", True)
    assert mode == "documents" and "not upstream's" in why
    assert choose_sample_mode(DataConfig(mock_data=True), "/ckpt", True)[0] == "samples"
    mode, why = choose_sample_mode(default, "/ours", False, "upstream")  # ours, saved by a run in upstream's order
    assert mode == "upstream" and "because --load /ours was trained in it" in why
    assert choose_sample_mode(default, "/ours", False, "samples") == ("samples", None)


def test_the_flags_reach_the_data_config():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "64",
            "--train-iters", "10", "--data-file-list", "/tmp/list.txt", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "100"]
    run = parse_args(base + ["--sample-mode", "upstream", "--shuffle-sample-in-corpus", "--blend-sample-in-corpus"])
    d = run.data
    assert (d.sample_mode, d.sample_mode_given, d.shuffle_sample_in_corpus, d.blend_sample_in_corpus) == \
        ("upstream", True, True, True)
    d = parse_args(base).data
    assert (d.sample_mode, d.sample_mode_given, d.shuffle_sample_in_corpus, d.blend_sample_in_corpus) == \
        ("samples", False, False, False)


def test_blends_upstream_cannot_read_are_refused_by_name(tmp_path):
    prefix = str(FIXTURES / "data" / MANIFEST["files"][0]["name"])
    with pytest.raises(UpstreamOrderError, match="no corpus"):
        build_datasets(DataConfig(data_file_list=_file_list(tmp_path, corpus=False), split="90,8,2",
                                  sample_mode="upstream"), 16, 1, (10, 0, 0), None)
    with pytest.raises(UpstreamOrderError, match="triplets") as refused:
        build_datasets(DataConfig(data_path=["1", prefix, "1", prefix], split="90,8,2", sample_mode="upstream"),
                       16, 1, (10, 0, 0), None)
    assert "--sample-mode samples or documents reads this blend in our own order" in str(refused.value)
    with pytest.raises(UpstreamOrderError, match="integers"):
        build_datasets(DataConfig(data_file_list=_file_list(tmp_path), split="90.5,9.5,0", sample_mode="upstream"),
                       16, 1, (10, 0, 0), None)


def test_the_split_follows_upstreams_rounding():
    assert upstream_split("969, 30, 1", 1000) == [0, 969, 999, 1000]
    assert upstream_split("90,8,2", 26) == [0, 23, 25, 26]  # 23.4, 2.08, 0.52 rounded, the excess off the end
    assert upstream_split("1", 7) == [0, 7, 7, 7]


def test_large_orders_are_written_once_per_node_and_mapped_by_the_other_ranks(tmp_path):
    def train():
        dataset = _datasets(tmp_path, "list_shuffle")[0]
        dataset.shared = SharedArrays(str(tmp_path / "orders"), min_bytes=0)  # share every array
        return dataset

    first, second = train(), train()
    samples = np.arange(len(first))
    expected = first.get_tokens(samples)
    # 4 file orders and the 2 corpus permutations
    assert (first.shared.builds, first.shared.loads) == (6, 0) and len(list((tmp_path / "orders").iterdir())) == 6
    np.testing.assert_array_equal(second.get_tokens(samples), expected)
    assert (second.shared.builds, second.shared.loads) == (0, 6)
    first.close()
    assert not list((tmp_path / "orders").iterdir())
    np.testing.assert_array_equal(second.get_tokens(samples), expected)  # its maps stay valid


def test_the_blend_counts_kept_in_the_data_cache_path_spare_the_next_resume(tmp_path):
    weights = np.array([0.5, 0.3, 0.2])
    first = GreedyBlend(weights, 5000, block=8, store=str(tmp_path))
    expected = first[4000]
    [stored] = list(tmp_path.glob("upstream-blend-*.npy"))
    assert np.load(stored).shape == (501, 3)
    again = GreedyBlend(weights, 5000, block=8, store=str(tmp_path))
    calls = []
    run = again._run
    again._run = lambda *a: calls.append(a[0]) or run(*a)
    assert again[4000] == expected and calls == [4000]  # only the block itself, from the kept counts
    assert GreedyBlend(weights, 5000, block=8).arrays(3990, 4010)[0].tolist() == \
        again.arrays(3990, 4010)[0].tolist()
    np.save(stored, np.ones((600, 2), dtype=np.int64))  # not this blend's: ignored
    assert GreedyBlend(weights, 5000, block=8, store=str(tmp_path))[4000] == expected


def test_a_file_without_documents_in_a_split_fails_when_drawn_as_upstream_does(tmp_path):
    from megatron.data.indexed_dataset import write_dataset

    write_dataset(str(tmp_path / "big"), [np.arange(1, 30, dtype=np.uint16)] * 40, np.uint16)
    write_dataset(str(tmp_path / "tiny"), [np.arange(1, 30, dtype=np.uint16)] * 3, np.uint16)  # no valid document
    listing = tmp_path / "list.txt"
    listing.write_text(f"1 {tmp_path / 'big'} a\n1 {tmp_path / 'tiny'} b\n")
    train, valid, _ = build_datasets(DataConfig(data_file_list=str(listing), split="90,8,2", sample_mode="upstream"),
                                     16, 1, (40, 20, 0), None)
    assert train.get_tokens(np.arange(len(train))).shape == (len(train), 17)
    with pytest.raises(UpstreamOrderError, match="tiny: no document in the valid split"):
        valid.get_tokens(np.arange(len(valid)))


# ---- the fixtures of tests/data/upstream/README.md ("order/"): upstream's own command lines, through ours ----
UPSTREAM_DIR = Path(__file__).parent / "data" / "upstream"
UPSTREAM_CASES = sorted(p.name for p in (UPSTREAM_DIR / "order").iterdir() if (p / "command.txt").exists())


def _upstream_case(case: str, monkeypatch, tmp_path):
    """Our parse_args of the case's exact upstream command line (+ --sample-mode upstream), its datasets, run in
    a copy of the fixtures' data (the command lines name data/... and --data-cache-path cache relative to it)."""
    import shlex

    from upstream_fixtures import copy_data

    from megatron.training.loop import requested_samples

    monkeypatch.chdir(copy_data(tmp_path / "run"))
    argv = shlex.split((UPSTREAM_DIR / "order" / case / "command.txt").read_text().splitlines()[1])
    run = parse_args(argv + ["--sample-mode", "upstream"])
    return run, build_datasets(run.data, run.model.seq_length, run.training.seed, requested_samples(run, 1), None)


@pytest.mark.parametrize("case", UPSTREAM_CASES)
def test_upstreams_command_lines_read_upstreams_samples(case, monkeypatch, tmp_path):
    _, datasets = _upstream_case(case, monkeypatch, tmp_path)
    for split, dataset in zip(("train", "valid"), datasets):
        path = UPSTREAM_DIR / "order" / case / f"{split}_tokens.npy"
        if not path.exists():  # upstream built no such split (an empty one)
            assert dataset is None
            continue
        expected = np.load(path)
        np.testing.assert_array_equal(dataset.get_tokens(np.arange(len(dataset))), expected, err_msg=f"{case} {split}")


def test_each_files_indices_are_upstreams_cached_arrays(monkeypatch, tmp_path):
    """Below the tokens: doc_idx, sample_idx and shuffle_idx of every train file equal upstream's cache files."""
    _, (train, _, _) = _upstream_case("filelist_shuffle", monkeypatch, tmp_path)
    cache = UPSTREAM_DIR / "order" / "filelist_shuffle" / "cache"
    compared = 0
    for description in cache.glob("*.dsc"):
        lines = description.read_text().splitlines()
        if lines[0] != "GPT Dataset" or "Dataset name train" not in lines:
            continue
        prefix = lines[2].removeprefix("Data prefix ")
        file = [f.prefix for f in train.files].index(prefix)
        order = train.file_order(file)
        stem = str(description)[:-len(".dsc")]
        np.testing.assert_array_equal(order.doc_idx + order.first, np.load(stem + "_doc_idx.npy"))
        np.testing.assert_array_equal(order.sample_idx, np.load(stem + "_sample_idx.npy"))
        np.testing.assert_array_equal(order.shuffle_idx, np.load(stem + "_shuffle_idx.npy"))
        compared += 1
    assert compared == len(train.files) == 4


def test_upstreams_own_cached_blend_is_read_from_the_data_cache_path(monkeypatch, tmp_path, caplog):
    """Upstream's run left its blend index in --data-cache-path: a resume reads it (as upstream does) instead of
    recomputing the blend; a cache that is not this blend's is not used."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(UPSTREAM_DIR / "order" / "filelist_shuffle" / "cache", cache)
    run, _ = _upstream_case("filelist_shuffle", monkeypatch, tmp_path)
    run.data.data_cache_path = str(cache)
    from megatron.training.loop import requested_samples

    import megatron.data.upstream_index as upstream_index

    def no_listing(path):
        raise AssertionError(f"listed {path}: the cache should be found by name")

    with caplog.at_level("INFO", logger="megatron.data.upstream_order"), \
            monkeypatch.context() as patch:  # upstream's file name: the md5 of its description, numpy's print
        patch.setattr(upstream_index.os, "listdir", no_listing)
        train, valid, _ = build_datasets(run.data, run.model.seq_length, run.training.seed,
                                         requested_samples(run, 1), None)
    assert type(train.blend).__name__ == "CachedIndex" and type(valid.blend).__name__ == "CachedIndex"
    assert all(type(c.index).__name__ == "CachedIndex" for c in train.corpora)  # keyed by corpus name and size
    assert train.summary().startswith("train: 195 samples in upstream's order from 2 corpora (code 78, web 117) "
                                      "of 4 files, blend index from upstream's cache ")
    assert "read from upstream's cache" in caplog.text
    for split, dataset in (("train", train), ("valid", valid)):
        expected = np.load(UPSTREAM_DIR / "order" / "filelist_shuffle" / f"{split}_tokens.npy")
        np.testing.assert_array_equal(dataset.get_tokens(np.arange(len(dataset))), expected)
    again = pickle.loads(pickle.dumps(train))  # as a spawned worker gets it: the cache mapped again
    assert isinstance(again.blend.index, np.memmap) and len(pickle.dumps(train.blend)) < 1000
    np.testing.assert_array_equal(again.get_tokens(np.arange(len(train))), train.get_tokens(np.arange(len(train))))
    stem = str(train.blend.path)[:-len("_index.npy")]
    listed = sorted(p.name for p in cache.iterdir())
    (cache / Path(stem + ".dsc").name).rename(cache / "renamed.dsc")  # not found by name: found by its content
    for suffix in ("_index.npy", "_sample_index.npy"):
        Path(stem + suffix).rename(cache / f"renamed{suffix}")
    moved = build_datasets(run.data, run.model.seq_length, run.training.seed, requested_samples(run, 1), None)[0]
    assert moved.blend.path == str(cache / "renamed_index.npy") and len(listed) == len(list(cache.iterdir()))
    stem = str(cache / "renamed")
    index = np.load(stem + "_index.npy")
    np.save(stem + "_index.npy", 1 - index)  # another blend's: refused by its first block
    train = build_datasets(run.data, run.model.seq_length, run.training.seed, requested_samples(run, 1), None)[0]
    assert type(train.blend).__name__ == "GreedyBlend"


def test_an_upstream_checkpoint_resumes_its_validation_samples_where_upstream_would():
    from megatron.checkpoint.argonne import ArgonneCheckpoint

    checkpoint = object.__new__(ArgonneCheckpoint)  # only the two dictionaries client_state reads
    checkpoint.state0, checkpoint.args = {"iteration": 40, "tokens": 0}, {}
    checkpoint.argonne_args = {"consumed_train_samples": 320, "consumed_valid_samples": 48}
    state = checkpoint.client_state
    assert (state["consumed_samples"], state["consumed_valid_samples"]) == (320, 48)


@pytest.mark.slow  # DataLoader worker processes
def test_dataloader_workers_serve_the_same_batches(tmp_path):
    train = _datasets(tmp_path, "list_blend_shuffle")[0]
    mbs = MANIFEST["micro_batch_size"]
    plain = build_data_iterator(train, mbs, 0, 1, 120)
    workers = build_data_iterator(train, mbs, 0, 1, 120, num_workers=2, multiprocessing_context="fork")
    for _ in range(4):
        np.testing.assert_array_equal(next(workers)["tokens"].numpy(), next(plain)["tokens"].numpy())
