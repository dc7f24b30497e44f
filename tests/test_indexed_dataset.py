"""Tests for megatron/data/indexed_dataset.py: the MMIDIDX byte layout, reads, merges and file checks."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, best_dtype, read_index_header,
    write_dataset, write_synthetic_dataset,
)


def _megatron_idx_bytes(code, sizes, pointers, documents):
    """The layout spelled out independently: magic, <Q version, <B code, <Q counts, then the arrays."""
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    header += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(documents))
    return (header + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
            + struct.pack(f"<{len(documents)}q", *documents))


def test_writer_produces_megatron_layout_byte_for_byte(tmp_path):
    prefix = str(tmp_path / "two_docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_item([5, 6, 7])
    builder.end_document()
    builder.add_document(np.array([8, 9, 10, 11]), [2, 2])  # one document of two sequences
    builder.finalize(prefix + ".idx")

    expected_idx = _megatron_idx_bytes(8, [3, 2, 2], [0, 6, 10], [0, 1, 3])
    assert open(prefix + ".idx", "rb").read() == expected_idx
    assert open(prefix + ".bin", "rb").read() == struct.pack("<7H", 5, 6, 7, 8, 9, 10, 11)
    assert sorted(os.listdir(tmp_path)) == ["two_docs.bin", "two_docs.idx"]  # no temporary files left


def test_reader_returns_sequences_documents_and_flat_token_ranges(tmp_path):
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    builder.add_item([1, 2, 3])
    builder.add_item([70000])
    builder.end_document()
    builder.add_documents(np.array([4, 5, 6, 7, 8]), np.array([2, 3]))  # two one-sequence documents
    builder.finalize(prefix + ".idx")

    ds = IndexedDataset(prefix + ".idx")  # suffixes are accepted too
    assert ds.path_prefix == prefix and ds.dtype == np.int32
    assert len(ds) == 4 and ds.num_documents == 3 and ds.num_tokens == 9
    assert ds.sequence_lengths.tolist() == [3, 1, 2, 3]
    assert ds.sequence_pointers.tolist() == [0, 12, 16, 24]
    assert ds.document_indices.tolist() == [0, 2, 3, 4]
    assert ds.document_lengths().tolist() == [4, 2, 3]
    assert ds.get(1).tolist() == [70000]
    assert ds.get(3, offset=1).tolist() == [7, 8]
    assert ds.get(0, offset=1, length=1).tolist() == [2]
    assert ds[-1].tolist() == [6, 7, 8]
    assert [a.tolist() for a in ds[1:3]] == [[70000], [4, 5]]
    assert ds.tokens(2, 6).tolist() == [3, 70000, 4, 5]
    assert ds.tokens(0, 0).size == 0
    with pytest.raises(IndexError, match="outside sequence 0"):
        ds.get(0, offset=2, length=5)
    with pytest.raises(IndexError, match="out of range"):
        ds.get(4)
    with pytest.raises(IndexError, match=r"token range \[5, 10\)"):
        ds.tokens(5, 10)

    header = read_index_header(prefix)
    assert header == (np.dtype(np.int32), 4, 4, 36, 9)

    pickled = pickle.dumps(ds)
    assert len(pickled) < 300 and pickle.loads(pickled).get(3).tolist() == [6, 7, 8]  # path only, reopened


def test_add_index_appends_documents_and_refuses_a_dtype_mismatch(tmp_path):
    a, b, c = (str(tmp_path / name) for name in "abc")
    write_dataset(a, [[1, 2], [3]], np.uint16)
    write_dataset(b, [[4, 5, 6]], np.uint16)
    write_dataset(c, [[7]], np.int32)

    merged = str(tmp_path / "merged")
    builder = IndexedDatasetBuilder(merged + ".bin", np.uint16)
    builder.add_index(a)
    builder.add_item([9])
    builder.end_document()
    builder.add_index(b)
    builder.finalize(merged + ".idx")
    ds = IndexedDataset(merged)
    assert [ds.get(i).tolist() for i in range(len(ds))] == [[1, 2], [3], [9], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]

    builder = IndexedDatasetBuilder(str(tmp_path / "bad.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"c\.bin: dtype int32 differs"):
        builder.add_index(c)
    builder.abort()
    assert not [name for name in os.listdir(tmp_path) if name.startswith("bad")]


def test_builder_refuses_token_ids_that_overflow_the_dtype(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="token id 70000 does not fit"):
        builder.add_item([1, 70000])
    builder.abort()


def test_opening_damaged_files_names_the_file_and_the_problem(tmp_path):
    prefix = str(tmp_path / "good")
    write_dataset(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    idx_bytes = open(prefix + ".idx", "rb").read()
    bin_bytes = open(prefix + ".bin", "rb").read()

    def damaged(name, idx=idx_bytes, data=bin_bytes):
        path = str(tmp_path / name)
        if idx is not None:
            open(path + ".idx", "wb").write(idx)
        if data is not None:
            open(path + ".bin", "wb").write(data)
        return path

    cases = [
        (damaged("foreign", idx=b"TNTIDX\x00\x00" + idx_bytes[8:]), r"foreign\.idx: not a Megatron MMIDIDX"),
        (damaged("short_header", idx=idx_bytes[:20]), r"short_header\.idx: truncated index file"),
        (damaged("cut_arrays", idx=idx_bytes[:-4]), r"cut_arrays\.idx: index file truncated"),
        (damaged("version", idx=idx_bytes[:9] + struct.pack("<Q", 2) + idx_bytes[17:]), "version 2"),
        (damaged("code", idx=idx_bytes[:17] + b"\x09" + idx_bytes[18:]), "unknown dtype code 9"),
        (damaged("short_bin", data=bin_bytes[:-2]), r"short_bin\.bin: size 8 bytes disagrees"),
        (damaged("odd_bin", data=bin_bytes[:-1]), r"odd_bin\.bin: size 9 bytes is not a multiple"),
        (damaged("long_bin", data=bin_bytes + b"\x00\x00"), r"long_bin\.bin: size 12 bytes disagrees"),
        (damaged("no_bin", data=None), r"no_bin\.bin: data file missing"),
        (str(tmp_path / "absent"), r"absent\.idx: index file not found"),
    ]
    for path, message in cases:
        with pytest.raises(IndexedDatasetError, match=message):
            IndexedDataset(path)
    assert isinstance(IndexedDatasetError("x"), ValueError)


def test_read_index_header_needs_only_the_header_and_file_sizes(tmp_path):
    prefix = str(tmp_path / "huge")
    write_synthetic_dataset(prefix, num_tokens=3_000_000_000, num_documents=7, dtype=np.uint16, sparse=True)
    stat = os.stat(prefix + ".bin")
    assert stat.st_size == 6_000_000_000 and stat.st_blocks * 512 < 1 << 20  # sparse: nothing written
    header = read_index_header(prefix)
    assert header.dtype == np.uint16 and header.num_tokens == 3_000_000_000
    assert header.num_sequences == 7 and header.num_documents == 8 and header.bin_bytes == 6_000_000_000
    ds = IndexedDataset(prefix)
    assert ds.sequence_lengths.tolist() == [428571429] * 4 + [428571428] * 3  # equal, remainder on the first
    assert ds.sequence_lengths.sum() == 3_000_000_000
    assert ds.tokens(2_999_999_990, 3_000_000_000).tolist() == [0] * 10


def test_dense_synthetic_dataset_is_seeded_and_sums_to_the_request(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_synthetic_dataset(a, num_tokens=10_000, num_documents=37, dtype=np.int32, seed=3)
    write_synthetic_dataset(b, num_tokens=10_000, num_documents=37, dtype=np.int32, seed=3)
    ds = IndexedDataset(a)
    assert len(ds) == 37 and ds.num_tokens == 10_000 and ds.sequence_lengths.min() >= 1
    assert len(set(ds.sequence_lengths.tolist())) > 5  # random lengths, not equal ones
    assert open(a + ".bin", "rb").read() == open(b + ".bin", "rb").read()
    with pytest.raises(ValueError, match="num_documents <= num_tokens"):
        write_synthetic_dataset(str(tmp_path / "c"), num_tokens=3, num_documents=5, dtype=np.uint16)


def test_best_dtype_and_codes_follow_megatron():
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32 and DTYPE_CODES[6] == np.float64
    assert DTYPE_CODES[7] == np.float32 and DTYPE_CODES[1] == np.uint8 and len(DTYPE_CODES) == 8


def test_empty_dataset_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    write_dataset(prefix, [], np.uint16)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
