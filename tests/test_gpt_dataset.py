"""GPT datasets over a blend (tokens vs a brute-force reference, document mode, vocab check, mock data)
and the data iterator (dp-size independence and resume)."""

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
            stream = np.concatenate(contents[meta.prefix])  # brute force: the whole file's tokens
            start = meta.token_range(split)[0] + s * SEQ
            assert np.array_equal(tokens[g], stream[start:start + SEQ + 1])
            assert start + SEQ + 1 <= meta.token_range(split)[1]  # never past the split
        assert np.array_equal(dataset[7]["tokens"], tokens[7])
        # each file's samples are all used once before any repeats (the train split goes round > 1 time)
        for f in range(dataset.num_files):
            first = location.sample[(location.file == f) & (location.epoch == 0)]
            if location.epoch[location.file == f].max() > 0:
                assert np.array_equal(np.sort(first), np.arange(dataset.samples_per_file[f]))
    assert train.epochs_per_file().max() > 1


def test_document_mode_shuffles_documents_per_epoch_and_samples_span_them(tmp_path):
    data_path, contents = make_blend(tmp_path, sizes=(30, 50))
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents")
    cache = tmp_path / "cache"
    datasets = [build_datasets(config, SEQ, 3, (300, 0, 0), 500, rank=r, world_size=2,
                               document_index_cache=str(cache) if r else None)[0] for r in (0, 1)]
    rank0, rank1 = datasets
    tokens = rank0.get_tokens(np.arange(300))
    assert np.array_equal(tokens, rank1.get_tokens(np.arange(300)))  # ranks agree without talking
    location = rank0.index.locate(np.arange(300))
    for f in range(2):
        documents = contents[rank0.files[f].prefix]
        orders = []
        for epoch in np.unique(location.epoch[location.file == f]):
            order, sample_idx = rank0.document_index.get(f, int(epoch))
            assert np.array_equal(np.sort(order), np.arange(len(documents)))
            orders.append(order)
            stream = np.concatenate([documents[d] for d in order])  # reference: shuffled documents end to end
            for g in np.flatnonzero((location.file == f) & (location.epoch == epoch)):
                s = int(location.sample[g])
                assert np.array_equal(tokens[g], stream[s * SEQ:s * SEQ + SEQ + 1])
        assert len(orders) > 1 and not np.array_equal(orders[0], orders[1])  # a new shuffle each epoch
    # the cache is written atomically and read back identically by a fresh dataset
    assert list(cache.glob("*.npz")) and not list(cache.glob("*.tmp*"))
    again = build_datasets(config, SEQ, 3, (300, 0, 0), 500, document_index_cache=str(cache))[0]
    assert np.array_equal(again.get_tokens(np.arange(300)), tokens)
    for dataset in (rank0, rank1, again):
        dataset.document_index.close()


def test_document_index_builds_own_files_in_background_and_others_on_demand(tmp_path):
    data_path, _ = make_blend(tmp_path, sizes=(10, 10, 10, 10))
    config = DataConfig(data_path=data_path, split="1", sample_mode="documents")
    dataset = build_datasets(config, SEQ, 3, (50, 0, 0), 500, rank=1, world_size=2)[0]
    index = dataset.document_index
    assert index.own_files == [1, 3]
    index._thread.join(timeout=30)
    assert sorted(index._built) == [(1, 0), (3, 0)]
    dataset.get_tokens(np.arange(50))  # needs files 0 and 2 too: built here, nobody waits for rank 0
    assert {(0, 0), (2, 0)} <= set(index._built)


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
