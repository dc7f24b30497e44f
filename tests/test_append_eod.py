"""Upstream's --append-eod token files (argonne-lcf/Megatron-DeepSpeed tools/preprocess_data.py): the .bin holds
each document's EOD token, the .idx counts it in no size and its pointers skip it. Read as upstream reads them
(by pointers and sizes) with one warning per file; tools/repair_index.py makes the index count them."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.data import indexed_dataset as idx
from megatron.data.data_list import scan_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 7
DOCS = [[[1, 2, 3], [4, 5]], [], [[8, 9]], [[10], [11, 12, 13]]]  # documents of sentences; the second is empty


def _write_upstream_append_eod(prefix: str, docs=DOCS, eod=EOD):
    """What upstream's preprocess_data.py --append-eod writes: EOD after each non-empty document in the .bin,
    sizes of the sentences only, pointers the running sum of the sizes, one document index per document."""
    tokens, sizes, documents = [], [], [0]
    for doc in docs:
        for sentence in doc:
            tokens += sentence
            sizes.append(len(sentence))
        if doc:
            tokens.append(eod)
        documents.append(len(sizes))
    np.asarray(tokens, dtype=np.uint16).tofile(prefix + ".bin")
    idx.write_index(prefix + ".idx", np.uint16, np.asarray(sizes), np.asarray(documents))
    return np.asarray(tokens, dtype=np.uint16), sizes


@pytest.fixture(autouse=True)
def _fresh_warnings():
    idx._WARNED_UNLISTED.clear()
    yield
    idx._WARNED_UNLISTED.clear()


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "--append-eod" in r.getMessage()]


def test_read_by_pointers_as_upstream_with_one_warning(tmp_path, caplog):
    prefix = str(tmp_path / "corpus_text_document")
    flat, sizes = _write_upstream_append_eod(prefix)
    caplog.set_level(logging.WARNING)
    ds = idx.IndexedDataset(prefix)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # upstream's pointers: the sizes alone
    for i, (start, size) in enumerate(zip(starts, sizes)):
        assert ds.get(i).tolist() == flat[start:start + size].tolist()
    assert ds.get(2).tolist() == [7, 8]  # the third sentence, read shifted back by the first document's EOD
    idx.IndexedDataset(prefix)
    scan_file(prefix, (1.0, 0.0, 0.0))
    warned = _warnings(caplog)
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "3 end-of-document tokens" in message and f"tools/repair_index.py {prefix}" in message


def test_repair_counts_the_eod_tokens(tmp_path, caplog):
    prefix = str(tmp_path / "corpus_text_document")
    flat, _ = _write_upstream_append_eod(prefix)
    before = open(prefix + ".idx", "rb").read()
    checked = idx.repair_appended_eod(prefix, check_only=True)
    assert checked == {"documents": 4, "eod_tokens": 3, "eod_id": EOD, "repaired": False}
    assert open(prefix + ".idx", "rb").read() == before

    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "repair_index.py"), prefix, "--eod-id",
                          str(EOD)], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "now counts the 3 end-of-document tokens" in out.stdout
    caplog.set_level(logging.WARNING)
    ds = idx.IndexedDataset(prefix)
    assert _warnings(caplog) == []
    assert ds.sequence_lengths.tolist() == [3, 3, 2 + 1, 1, 3 + 1]
    documents = [sum((ds.get(s).tolist() for s in range(a, b)), [])
                 for a, b in zip(ds.document_indices[:-1], ds.document_indices[1:])]
    assert documents == [[1, 2, 3, 4, 5, EOD], [], [8, 9, EOD], [10, 11, 12, 13, EOD]]
    assert open(prefix + ".bin", "rb").read() == flat.tobytes()
    assert idx.repair_appended_eod(prefix)["eod_tokens"] == 0  # repaired: nothing left to do
    assert not [n for n in os.listdir(tmp_path) if n not in ("corpus_text_document.bin", "corpus_text_document.idx")]


def test_repair_refuses_a_document_without_the_eod(tmp_path):
    prefix = str(tmp_path / "bad_text_document")
    flat, _ = _write_upstream_append_eod(prefix)
    flat[8] = 3  # the third document's EOD (tokens 1 2 3 4 5 EOD 8 9 EOD ...)
    flat.tofile(prefix + ".bin")
    before = open(prefix + ".idx", "rb").read()
    with pytest.raises(idx.IndexedDatasetError) as info:
        idx.repair_appended_eod(prefix, eod_id=EOD)
    assert "document 2 ends in token 3, not the end-of-document id 7" in str(info.value)
    assert prefix + ".bin" in str(info.value)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "repair_index.py"), prefix, "--eod-id", "7"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "document 2 ends in token 3" in out.stderr and "Traceback" not in out.stderr
    assert open(prefix + ".idx", "rb").read() == before


def test_other_unlisted_bytes_still_refused(tmp_path):
    """More unlisted tokens than documents is not --append-eod's defect: still refused as before."""
    prefix = str(tmp_path / "long_text_document")
    flat, _ = _write_upstream_append_eod(prefix)
    np.concatenate([flat, np.zeros(10, dtype=np.uint16)]).tofile(prefix + ".bin")
    with pytest.raises(idx.IndexedDatasetError, match="does not list|disagrees"):
        scan_file(prefix, (1.0, 0.0, 0.0))
    with pytest.raises(idx.IndexedDatasetError, match="not an index written by upstream's --append-eod|another"):
        idx.repair_appended_eod(prefix)


# ---- upstream's own --append-eod file (tests/data/upstream/, written by its tools/preprocess_data.py) ----------

UPSTREAM = os.path.join(ROOT, "tests", "data", "upstream")


def test_upstream_append_eod_file_reads_as_upstream_and_repairs(tmp_path, caplog):
    import json
    import shutil

    source = os.path.join(UPSTREAM, "data", "eod_e_text_document")
    read = np.load(os.path.join(UPSTREAM, "order", "eod_single", "documents_read.npy"))
    read_sizes = np.load(os.path.join(UPSTREAM, "order", "eod_single", "documents_read_sizes.npy"))
    caplog.set_level(logging.WARNING)
    ds = idx.IndexedDataset(source)
    ours = [ds.get(k) for k in range(ds.num_documents)]  # one sentence per document
    assert [len(d) for d in ours] == read_sizes.tolist()
    assert np.concatenate(ours).tolist() == read.tolist()  # what upstream's MMapIndexedDataset.get served
    scan_file(source, (0.98, 0.01, 0.01))
    warned = _warnings(caplog)
    assert len(warned) == 1 and "30 end-of-document tokens" in warned[0].getMessage()

    prefix = str(tmp_path / "eod_e_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copy(source + suffix, prefix + suffix)
    assert idx.repair_appended_eod(prefix) == {"documents": 30, "eod_tokens": 30, "eod_id": 256, "repaired": True}
    repaired = idx.IndexedDataset(prefix)
    with open(os.path.join(UPSTREAM, "data", "eod_e.jsonl")) as f:
        texts = [[int(t) for t in json.loads(line)["text"].split(" ")] for line in f]
    assert [repaired.get(k).tolist() for k in range(repaired.num_documents)] == [t + [256] for t in texts]


def test_repair_index_names_its_own_input_when_the_files_are_missing(tmp_path, capsys):
    """A prefix with no files: the message names the prefix given to tools/repair_index.py and its fix, not the
    training reader's --data-path (exit code 2)."""
    from tools import repair_index

    prefix = str(tmp_path / "absent_text_document")
    assert repair_index.main([prefix + ".bin"]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}.bin and {prefix}.idx not found" in err and "give tools/repair_index.py the prefix" in err
    assert "--data-path" not in err
