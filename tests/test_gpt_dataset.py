"""GPT datasets over a blend (tokens vs a brute-force reference, document mode, vocab check, mock data)
and the data iterator (dp-size independence and resume)."""

import gc
import os

import numpy as np
import pytest
import torch

from megatron.config.data import DataConfig
from megatron.data.data_iterator import build_data_iterator
from megatron.data.gpt_dataset import MockGPTDataset, build_datasets
from megatron.data.indexed_dataset import write_dataset

SEQ = 8


def make_blend(tmp_path, sizes=(40, 15, 70), vocab=500, seed=0):
    """Small files of random documents; returns (data_path list, {prefix: list of documents})."""
    rng = np.random.default_rng(seed)
    data_path, contents = [], {}
    for i, num_documents in enumerate(sizes):
        documents = [rng.integers(0, vocab, size=int(rng.integers(1, 30))) for _ in range(num_documents)]
        prefix = str(tmp_path / f"file{i}_text_document")
        write_dataset(prefix, documents, np.uint16)
        data_path += [str(i + 1), prefix]
        contents[prefix] = documents
    return data_path, contents


def test_samples_are_exactly_the_file_tokens_the_mapping_names_over_several_epochs(tmp_path):
    data_path, contents = make_blend(tmp_path)
    config = DataConfig(data_path=data_path, split="80,20,0")
    train, valid, test = build_datasets(config, SEQ, seed=5, num_samples=(600, 50, 10), vocab_size=500)
    assert test is None and len(train) == 600 and len(valid) == 50
    for dataset, split in ((train, 0), (valid, 1)):
        location = dataset.index.locate(np.arange(len(dataset)))
        tokens = dataset.get_tokens(np.arange(len(dataset)))
        assert tokens.dtype == np.int64 and tokens.shape == (len(dataset), SEQ + 1)
        for g in range(len(dataset)):
            f, s = int(location.file[g]), int(location.sample[g])
            meta = dataset.files[f]
            first, stop = meta.token_range(split)
            stream = np.concatenate(contents[meta.prefix])[first:stop]  # brute force: the split's tokens
            epoch = int(location.epoch[g])
            start = dataset.window_offset(f, epoch) + s * SEQ
            assert (dataset.window_offset(f, epoch) == 0) == (epoch == 0)
            cyclic = np.concatenate([stream, stream])  # an epoch's last window may wrap to the split's start
            assert np.array_equal(tokens[g], cyclic[start:start + SEQ + 1])
            assert start < len(stream) and start + SEQ + 1 <= 2 * len(stream)
        assert np.array_equal(dataset[7]["tokens"], tokens[7])
        # each file's samples are all used once before any repeats (the train split goes round > 1 time)
        for f in range(dataset.num_files):
            first = location.sample[(location.file == f) & (location.epoch == 0)]
            if location.epoch[location.file == f].max() > 0:
                assert np.array_equal(np.sort(first), np.arange(dataset.samples_per_file[f]))
    assert train.epochs_per_file().max() > 1


def test_samples_mode_cuts_new_windows_every_epoch_and_never_repeats_a_token_within_one(tmp_path):
    rng = np.random.default_rng(11)
    prefix = str(tmp_path / "small_text_document")
    write_dataset(prefix, [rng.integers(0, 50_000, size=int(n)) for n in rng.integers(5, 40, size=12)], np.int32)
    big = str(tmp_path / "big_text_document")
    write_dataset(big, [rng.integers(0, 50_000, size=3000)], np.int32)
    seq = 16
    # the small file is upsampled ~7 times: every epoch of it must bring windows never seen before
    train = build_datasets(DataConfig(data_path=["0.5", prefix, "0.5", big], split="1"), seq, 4, (400, 0, 0),
                           50_000)[0]
    small = train.files.index(next(f for f in train.files if f.prefix == prefix))
    location = train.index.locate(np.arange(400))
    rows = np.flatnonzero(location.file == small)
    epochs = location.epoch[rows]
    assert epochs.max() >= 5
    tokens = train.get_tokens(rows)
    seen, starts = {}, set()
    length = train.files[small].token_range(0)[1]
    for row, epoch, sample in zip(tokens, epochs, location.sample[rows]):
        window = tuple(row.tolist())
        assert seen.setdefault(window, int(epoch)) == int(epoch), "a window came back in a later epoch"
        starts.add((train.window_offset(small, int(epoch)) + int(sample) * seq) % length)
    assert len(starts) == len(rows)  # no window start is used twice over all epochs
    for epoch in range(int(epochs.max())):  # within a full epoch every token is read once (windows share one)
        chosen = location.sample[rows][epochs == epoch]
        covered = np.zeros(length, dtype=int)
        for sample in chosen:
            start = train.window_offset(small, epoch) + int(sample) * seq
            covered[np.arange(start, start + seq) % length] += 1
        assert covered.max() == 1 and covered.sum() == seq * train.samples_per_file[small]


def test_document_mode_shuffles_documents_per_epoch_and_samples_span_them(tmp_path):
    data_path, contents = make_blend(tmp_path, sizes=(30, 50))
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents")
    shared = tmp_path / "shared"
    datasets = [build_datasets(config, SEQ, 3, (300, 0, 0), 500, rank=r, world_size=2,
                               document_index_cache=str(shared))[0] for r in (0, 1)]
    for dataset in datasets:
        dataset.document_index.share_min_bytes = 0  # share even these tiny indices
    rank0, rank1 = datasets
    tokens = rank0.get_tokens(np.arange(300))
    assert np.array_equal(tokens, rank1.get_tokens(np.arange(300)))  # ranks agree without talking
    location = rank0.index.locate(np.arange(300))
    for f in range(2):
        documents = contents[rank0.files[f].prefix]
        orders = []
        offsets = np.cumsum([0] + [len(d) for d in documents])[:-1]  # where each document starts in the .bin
        for epoch in np.unique(location.epoch[location.file == f]):
            starts, ends = rank0.document_index.get(f, int(epoch))
            order = np.searchsorted(offsets, starts)
            assert np.array_equal(offsets[order], starts)
            assert np.array_equal(order, rank0.document_index.order(f, int(epoch)))
            assert np.array_equal(np.sort(order), np.arange(len(documents)))
            orders.append(np.asarray(order))
            stream = np.concatenate([documents[d] for d in order])  # reference: shuffled documents end to end
            assert ends[-1] == len(stream)
            for g in np.flatnonzero((location.file == f) & (location.epoch == epoch)):
                s = int(location.sample[g])
                assert np.array_equal(tokens[g], stream[s * SEQ:s * SEQ + SEQ + 1])
        assert len(orders) > 1 and not np.array_equal(orders[0], orders[1])  # a new shuffle each epoch
    # rank 1 found rank 0's indices in the node's directory instead of building them again
    assert rank0.document_index.builds > 0 and rank1.document_index.builds == 0
    assert rank1.document_index.shared_loads == rank0.document_index.builds
    assert list(shared.glob("*.npy")) and not list(shared.glob("*.tmp*"))
    rank0.document_index.close()  # the writer removes its files; a rank that still needs one rebuilds it
    assert not list(shared.glob("*.npy"))
    again = build_datasets(config, SEQ, 3, (300, 0, 0), 500, document_index_cache=str(shared))[0]
    again.document_index.share_min_bytes = 0
    assert np.array_equal(again.get_tokens(np.arange(300)), tokens) and again.document_index.builds > 0


def test_document_index_memory_stays_under_its_bound_however_many_files_are_touched(tmp_path):
    data_path, contents = make_blend(tmp_path, sizes=[12] * 40, seed=2)
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents")
    bounded = build_datasets(config, SEQ, 3, (2000, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    index = bounded.document_index
    index.cache_bytes = 5 * sum(part.nbytes for part in index.build(0, 0))  # room for the indices of 5 files
    reference = build_datasets(config, SEQ, 3, (2000, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    peak = 0
    for first in range(0, 2000, 50):  # batch after batch touches every file, epoch after epoch
        rows = np.arange(first, first + 50)
        assert np.array_equal(bounded.get_tokens(rows), reference.get_tokens(rows))
        peak = max(peak, index.cached_bytes())
    touched = np.unique(np.stack([bounded.index.locate(np.arange(2000)).file,
                                  bounded.index.locate(np.arange(2000)).epoch]), axis=1).shape[1]
    assert touched > 100 and peak <= index.cache_bytes and len(index._indices.entries) <= 5
    assert index.builds > touched  # evicted indices were rebuilt when needed again, identically
    assert reference.document_index.cached_bytes() > index.cache_bytes  # the unbounded one kept them all


def test_documents_mode_warns_at_start_up_when_one_epoch_of_indices_outgrows_the_cache(tmp_path, monkeypatch,
                                                                                         caplog):
    from megatron.data import gpt_dataset

    data_path, _ = make_blend(tmp_path, sizes=[12] * 4, seed=2)  # 48 documents: 384 bytes of indices
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents")
    with caplog.at_level("WARNING"):
        build_datasets(config, SEQ, 3, (20, 0, 0), 500, document_index_cache=str(tmp_path / "s"))
        assert not [r for r in caplog.records if "document indices" in r.getMessage()]
        monkeypatch.setattr(gpt_dataset, "DEFAULT_INDEX_CACHE_BYTES", 300)
        build_datasets(config, SEQ, 3, (20, 0, 0), 500, document_index_cache=str(tmp_path / "s"))
    warned = [r.getMessage() for r in caplog.records if "document indices" in r.getMessage()]
    assert len(warned) == 1 and "train split's 48 documents" in warned[0] and "--sample-mode samples" in warned[0]


def test_token_id_outside_the_vocabulary_raises_naming_the_file_when_read(tmp_path):
    prefix = str(tmp_path / "wide_text_document")
    write_dataset(prefix, [np.arange(100) * 10], np.uint16)  # ids up to 990
    config = DataConfig(data_path=[prefix], split="1")
    train = build_datasets(config, SEQ, 0, (20, 0, 0), vocab_size=500)[0]  # start-up does not scan tokens
    with pytest.raises(ValueError, match="wide_text_document.bin: token id .* outside the vocabulary"):
        train.get_tokens(np.arange(20))


def test_mock_dataset_is_deterministic_learnable_and_needs_a_vocab_size():
    config = DataConfig(mock_data=True)
    train, valid, test = build_datasets(config, 64, seed=1, num_samples=(10, 4, 0), vocab_size=1000)
    assert test is None and isinstance(train, MockGPTDataset)
    again = build_datasets(config, 64, seed=1, num_samples=(10, 4, 0), vocab_size=1000)[0]
    assert np.array_equal(train[3]["tokens"], again[3]["tokens"])
    assert train[3]["tokens"].shape == (65,) and train[3]["tokens"].max() < 1000
    assert not np.array_equal(train[3]["tokens"], train[4]["tokens"])
    assert not np.array_equal(train[3]["tokens"], valid[3]["tokens"])
    # structure: a token's successor is nearly determined by the token (bigram entropy far below uniform)
    many = MockGPTDataset(400, 64, 1000, seed=1)
    stream = np.concatenate([many[i]["tokens"] for i in range(400)])  # 26,000 tokens
    pairs = set(zip(stream[:-1].tolist(), stream[1:].tolist()))
    assert len(pairs) < 0.5 * (len(stream) - 1)  # uniform random tokens would give ~26,000 distinct pairs
    with pytest.raises(ValueError, match="vocab-size"):
        build_datasets(config, 64, seed=1, num_samples=(10, 0, 0), vocab_size=None)


def _stream(dataset, mbs, dp, consumed, steps, num_workers=0):
    """Global batches (concatenated over dp ranks) for `steps` micro-steps."""
    iterators = [build_data_iterator(dataset, mbs, r, dp, consumed, num_workers) for r in range(dp)]
    batches = []
    for _ in range(steps):
        parts = [next(it)["tokens"] for it in iterators]
        assert all(p.dtype == torch.int64 and p.shape == (mbs, SEQ + 1) for p in parts)
        batches.append(torch.cat(parts))
    return torch.cat(batches)


def test_dp1_and_dp2_iterators_give_the_same_global_stream_and_resume_from_consumed_samples(tmp_path):
    data_path, _ = make_blend(tmp_path)
    train = build_datasets(DataConfig(data_path=data_path, split="1"), SEQ, 9, (200, 0, 0), 500)[0]
    reference = torch.from_numpy(train.get_tokens(np.arange(96)))
    assert torch.equal(_stream(train, 4, 1, 0, 24), reference)
    assert torch.equal(_stream(train, 2, 2, 0, 24), reference)  # dp=2: rank slices interleave to the same
    # a run that consumed 40 samples at dp=2 resumes at dp=4 (or dp=1 with worker processes) exactly
    assert torch.equal(_stream(train, 2, 4, 40, 7), reference[40:96])
    assert torch.equal(_stream(train, 4, 1, 40, 3, num_workers=1), reference[40:52])
    # the iterator stops before a partial global micro-batch and refuses a finished run
    assert len(list(build_data_iterator(train, 4, 0, 2, 190))) == 1
    with pytest.raises(ValueError, match="consumed_samples"):
        build_data_iterator(train, 4, 0, 2, 201)
    assert build_data_iterator(None, 4, 0, 1, 0) is None


def test_samples_are_read_without_mapping_the_token_files_and_with_a_bounded_number_open(tmp_path):
    data_path, _ = make_blend(tmp_path, sizes=[12] * 10, seed=4)
    for mode in ("samples", "documents"):
        config = DataConfig(data_path=data_path, split="1", sample_mode=mode)
        bounded = build_datasets(config, SEQ, 3, (400, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
        bounded.max_open_files = 3
        reference = build_datasets(config, SEQ, 3, (400, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
        assert np.array_equal(bounded.get_tokens(np.arange(400)), reference.get_tokens(np.arange(400)))
        assert len(bounded._readers) == 3 and len(reference._readers) == 10
        if os.path.isdir("/proc/self/fd"):  # each reader holds its .bin and, in documents mode, its .idx open
            del reference
            gc.collect()
            held = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    held.append(os.readlink(f"/proc/self/fd/{fd}"))
                except FileNotFoundError:  # the descriptor listdir itself used
                    pass
            held = [path for path in held if path.startswith(str(tmp_path))]
            open_files = {bounded.files[f].prefix for f in bounded._readers}
            assert {path.rsplit(".", 1)[0] for path in held} <= open_files, held  # only the open readers' files
            assert sum(path.endswith(".bin") for path in held) == 3 and (
                mode == "documents" or not any(path.endswith(".idx") for path in held)), held
        if os.path.exists("/proc/self/maps"):  # Linux: positioned reads leave no page of a token file mapped
            with open("/proc/self/maps") as maps:
                mapped = [line for line in maps if str(tmp_path) in line and line.rstrip().endswith((".bin", ".idx"))]
            assert not mapped


def test_transient_token_read_errors_are_retried_and_a_truncated_file_is_named(tmp_path, monkeypatch, caplog):
    import errno

    from megatron import fileio
    from megatron.data import indexed_dataset
    from megatron.data.indexed_dataset import IndexedDatasetError

    data_path, contents = make_blend(tmp_path, sizes=(20,), seed=6)
    train = build_datasets(DataConfig(data_path=data_path, split="1"), SEQ, 1, (10, 0, 0), 500)[0]
    expected = train.get_tokens(np.arange(10))
    train = build_datasets(DataConfig(data_path=data_path, split="1"), SEQ, 1, (10, 0, 0), 500)[0]
    monkeypatch.setattr(fileio, "RETRY_BACKOFF_S", 0.001)
    failures = {"left": 2}
    real_preadv = os.preadv

    def flaky_preadv(fd, buffers, offset):  # a fault-injecting filesystem: EIO on the first two reads
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(indexed_dataset.os, "preadv", flaky_preadv)
    with caplog.at_level("WARNING"):
        assert np.array_equal(train.get_tokens(np.arange(10)), expected)
    retries = [r.getMessage() for r in caplog.records if "EIO" in r.getMessage()]
    assert len(retries) == 2 and "file0_text_document.bin" in retries[0] and "retry 1/3" in retries[0]
    failures["left"] = 100
    with pytest.raises(IndexedDatasetError, match=r"file0_text_document.bin: reading failed 4 times with EIO"):
        train.get_tokens([0])
    monkeypatch.setattr(indexed_dataset.os, "preadv", real_preadv)
    with open(str(tmp_path / "file0_text_document.bin"), "r+b") as f:  # cut short after the run started
        f.truncate(20)
    with pytest.raises(IndexedDatasetError, match=r"file0_text_document.bin: 20 bytes, but bytes .* were asked for; "
                                                  r"the file was truncated"):
        train.get_tokens(np.arange(10))


def test_documents_mode_names_an_index_whose_sequences_run_past_the_token_file(tmp_path):
    from megatron.data.indexed_dataset import HEADER_BYTES, IndexedDatasetError

    data_path, contents = make_blend(tmp_path, sizes=(20,), seed=8)
    train = build_datasets(DataConfig(data_path=data_path, split="1", sample_mode="documents"), SEQ, 1, (10, 0, 0),
                           500, document_index_cache=str(tmp_path / "s"))[0]
    with open(str(tmp_path / "file0_text_document.idx"), "r+b") as f:  # sequence 3's pointer past the .bin
        f.seek(HEADER_BYTES + 4 * 20 + 8 * 3)
        f.write(np.array([10 ** 6], dtype="<i8").tobytes())
    with pytest.raises(IndexedDatasetError, match=r"file0_text_document.idx: a sequence in \[0, 20\) ends after"):
        train.get_tokens(np.arange(10))


def _epoch_order(dataset, f: int, epoch: int, offsets: np.ndarray) -> tuple[np.ndarray, list]:
    """The documents of (file, epoch) in the order documents mode lays them end to end, and its blocks."""
    index = dataset.document_index
    if not index.blocked(f):
        starts, _ = index.get(f, epoch)
        return np.searchsorted(offsets, starts), []
    order, block_ends = index.build_plan(f, epoch)
    blocks = []
    for block in order.tolist():
        starts, ends = index.build_block(f, epoch, block)
        assert np.array_equal(offsets[np.searchsorted(offsets, starts)], starts)
        blocks.append(np.searchsorted(offsets, starts))
        assert int(ends[-1]) == int(block_ends[len(blocks) - 1]) - (int(block_ends[len(blocks) - 2])
                                                                     if len(blocks) > 1 else 0)
    return np.concatenate(blocks), blocks


def test_documents_mode_shuffles_large_files_in_blocks_and_samples_run_across_blocks(tmp_path):
    data_path, contents = make_blend(tmp_path, sizes=(90, 7), seed=5)  # 90 documents: 6 blocks of 16
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents", document_shuffle_block=16)
    train = build_datasets(config, SEQ, 3, (1500, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    assert train.document_index.blocked(0) and not train.document_index.blocked(1)
    tokens = train.get_tokens(np.arange(1500))
    location = train.index.locate(np.arange(1500))
    documents = contents[train.files[0].prefix]
    offsets = np.cumsum([0] + [len(d) for d in documents])[:-1]
    orders, groupings = [], []
    for epoch in np.unique(location.epoch[location.file == 0]).tolist():
        order, blocks = _epoch_order(train, 0, epoch, offsets)
        assert np.array_equal(np.sort(order), np.arange(90))  # every document once per epoch
        assert sorted(len(b) for b in blocks) == [10] + [16] * 5
        for block in blocks:  # a block is consecutive documents of the file (wrapping at its end), shuffled
            members = set(block.tolist())
            first = [d for d in members if (d - 1) % 90 not in members]
            assert len(first) == 1 and members == {(first[0] + j) % 90 for j in range(len(block))}
        stream = np.concatenate([documents[d] for d in order])
        rows = np.flatnonzero((location.file == 0) & (location.epoch == epoch))
        for g in rows.tolist():
            s = int(location.sample[g])
            assert np.array_equal(tokens[g], stream[s * SEQ:s * SEQ + SEQ + 1])
        orders.append(order)
        groupings.append({frozenset(b.tolist()) for b in blocks})
    assert len(orders) > 2 and not np.array_equal(orders[0], orders[1])
    assert groupings[0] != groupings[1]  # the blocks themselves are cut elsewhere each epoch
    # DataLoader worker processes rebuild plans and blocks themselves and read the same samples (dp=2, resumed)
    assert torch.equal(_stream(train, 2, 2, 600, 5, num_workers=1), torch.from_numpy(tokens[600:620]))
    # block 0 would take the whole file: the same order as the one-shuffle mode of a file that small
    whole = build_datasets(DataConfig(data_path=data_path, split="1", sample_mode="documents",
                                      document_shuffle_block=0), SEQ, 3, (1500, 0, 0), 500,
                           document_index_cache=str(tmp_path / "s"))[0]
    assert not whole.document_index.blocked(0)
    assert np.array_equal(whole.get_tokens(np.flatnonzero(location.file == 1)),
                          tokens[location.file == 1])  # the small file's samples do not depend on the setting


def test_block_shuffled_files_keep_the_cache_under_its_bound_however_many_files_are_touched(tmp_path):
    data_path, _ = make_blend(tmp_path, sizes=[40] * 30, seed=6)  # 30 files of 40 documents: 5 blocks of 8
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents", document_shuffle_block=8)
    bounded = build_datasets(config, SEQ, 3, (3000, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    reference = build_datasets(config, SEQ, 3, (3000, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    index = bounded.document_index
    index.block_cache_bytes = 6 * sum(part.nbytes for part in index.build_block(0, 0, 0))  # a few blocks' room
    index.cache_bytes = 4 * sum(part.nbytes for part in index.build_plan(0, 0))  # and a few plans'
    peak_blocks = peak_plans = 0
    for first in range(0, 3000, 100):
        rows = np.arange(first, first + 100)
        assert np.array_equal(bounded.get_tokens(rows), reference.get_tokens(rows))
        peak_blocks, peak_plans = max(peak_blocks, index._blocks.bytes), max(peak_plans, index._indices.bytes)
    assert peak_blocks <= index.block_cache_bytes and peak_plans <= index.cache_bytes
    assert not list((tmp_path / "s").glob("*.npy"))  # nothing written to share
    assert reference.document_index.cached_bytes() > 10 * (index.cache_bytes + index.block_cache_bytes)
    assert len([key for key in reference.document_index._indices.entries if key[0] == "plan"]) > 50  # files × epochs


def test_block_shuffle_names_an_index_whose_documents_do_not_lie_back_to_back(tmp_path):
    from megatron.data.indexed_dataset import HEADER_BYTES, IndexedDatasetError

    data_path, contents = make_blend(tmp_path, sizes=(40,), seed=9)
    prefix = tmp_path / "file0_text_document"
    with open(f"{prefix}.idx", "r+b") as f:  # a one-token gap before document 20: pointers 20.. move by one
        f.seek(HEADER_BYTES + 4 * 40 + 8 * 20)
        pointers = np.frombuffer(f.read(8 * 20), dtype="<i8") + 2
        f.seek(HEADER_BYTES + 4 * 40 + 8 * 20)
        f.write(pointers.tobytes())
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0\0")
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents", document_shuffle_block=8)
    train = build_datasets(config, SEQ, 1, (60, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    with pytest.raises(IndexedDatasetError, match=r"file0_text_document.idx: documents \d+.. of this file hold "
                                                  r"\d+ tokens by their lengths but \d+ by their pointers.*"
                                                  r"--document-shuffle-block 0"):
        train.get_tokens(np.arange(60))


def test_document_shuffle_block_flag_reaches_the_data_config_and_refuses_negatives():
    from megatron.config.arguments import ConfigError, parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "128"]
    assert parse_args(base).data.document_shuffle_block == 8192
    assert parse_args(base + ["--document-shuffle-block", "0"]).data.document_shuffle_block == 0
    with pytest.raises(ConfigError, match="--document-shuffle-block: .*must be >= 0"):
        parse_args(base + ["--document-shuffle-block", "-4"])


def test_block_shuffle_handles_empty_documents_and_blocks_across_the_wrap(tmp_path):
    rng = np.random.default_rng(11)
    sizes = rng.choice([0] * 7 + [9, 17], size=80)  # mostly empty: blocks may start on runs of empty documents
    documents = [rng.integers(0, 500, size=int(n)) for n in sizes]
    prefix = str(tmp_path / "sparse_text_document")
    write_dataset(prefix, documents, np.uint16)
    config = DataConfig(data_path=[prefix], split="1", sample_mode="documents", document_shuffle_block=4)
    train = build_datasets(config, SEQ, 2, (120, 0, 0), 500, document_index_cache=str(tmp_path / "s"))[0]
    tokens, location = train.get_tokens(np.arange(120)), train.index.locate(np.arange(120))
    offsets = np.cumsum([0] + [len(d) for d in documents])[:-1]
    assert len(np.unique(location.epoch)) > 1 and min(len(d) for d in documents) == 0
    for epoch in np.unique(location.epoch).tolist():
        index = train.document_index
        order, block_ends = index.build_plan(0, epoch)
        laid = [index.build_block(0, epoch, b) for b in order.tolist()]
        assert np.array_equal(np.cumsum([int(ends[-1]) for _, ends in laid]), block_ends)
        flat = np.concatenate(documents)  # the .bin's tokens; each document laid at its start, its length long
        lengths = [np.diff(np.concatenate([[0], ends.astype(np.int64)])) for _, ends in laid]
        stream = np.concatenate([flat[int(start):int(start) + int(n)] for (starts, _), sizes in zip(laid, lengths)
                                 for start, n in zip(starts, sizes)])
        assert np.array_equal(np.sort(np.concatenate([s.astype(np.int64) for s, _ in laid])),
                              np.sort(offsets))  # each document (empty ones too) once in the epoch
        for g in np.flatnonzero(location.epoch == epoch).tolist():
            s = int(location.sample[g])
            assert np.array_equal(tokens[g], stream[s * SEQ:s * SEQ + SEQ + 1])


def test_document_positions_take_four_bytes_only_when_both_positions_and_running_totals_fit():
    from megatron.data.gpt_dataset import _position_dtype

    assert _position_dtype(1000, 1000) == np.uint32
    assert _position_dtype(1 << 32, 10) == np.int64  # positions past 4 bytes
    # an .idx listing one document many times: the running total outgrows a small .bin's positions
    assert _position_dtype(1 << 20, (1 << 32) + 5) == np.int64
