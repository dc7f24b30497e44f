"""Tests for tools/preprocess_data.py, merge_datasets.py and build_corpus.py: outputs equal direct tokenization."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset, write_dataset
from megatron.data.tokenizers import build_tokenizer
from tools import build_corpus, merge_datasets, preprocess_data
from tools.train_tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"text": "import os\n\ndef main():\n    print('héllo')\n", "title": "first"},
    {"text": "", "title": "an empty text is dropped"},
    {"text": "Zeile mit Ümlauten und 漢字.\n" * 3, "title": "third"},
    {"text": "x = [i ** 2 for i in range(10)]  # squares", "title": "fourth"},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe([document["text"] * 20 for document in DOCS] + [open(__file__).read()], 400, str(directory))
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(directory / "vocab.json"),
            "--merge-file", str(directory / "merges.txt")]


def _tokenizer(flags):
    return build_tokenizer("GPT2BPETokenizer", vocab_file=flags[3], merge_file=flags[5])


def _write_inputs(directory: Path, copies: int = 1):
    """a.jsonl (plain, blank line inside) and b.jsonl.gz, documents in that order."""
    lines = [json.dumps(document, ensure_ascii=False) for document in DOCS * copies]
    half = len(lines) // 2
    (directory / "a.jsonl").write_text("\n".join(lines[:half]) + "\n\n")
    with gzip.open(directory / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[half:]) + "\n")
    return [document for document in DOCS * copies]


def _contents(prefix):
    ds = IndexedDataset(prefix)
    return [ds.get(i).tolist() for i in range(len(ds))], ds


def test_preprocess_writes_each_key_exactly_as_the_tokenizer_tokenizes_it(tmp_path, bpe, capsys):
    documents = _write_inputs(tmp_path)
    prefix = tmp_path / "out" / "corpus"
    assert preprocess_data.main(["--input", str(tmp_path / "*.jsonl*"), "--json-keys", "text", "title",
                                 "--append-eod", "--workers", "2", "--output-prefix", str(prefix), "--quiet"]
                                + bpe) == 0
    tok = _tokenizer(bpe)
    for key in ("text", "title"):
        expected = [tok.tokenize(d[key]) + [tok.eod] for d in documents if tok.tokenize(d[key])]
        got, ds = _contents(f"{prefix}_{key}_document")
        assert got == expected, key
        assert ds.dtype == np.uint16 and ds.num_documents == len(expected)
    assert "skipped 1 documents with no tokens" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == [f"corpus_{k}_document.{e}" for k in ("text", "title")
                                                    for e in ("bin", "idx")]


def test_partitions_and_worker_counts_give_byte_identical_files(tmp_path, bpe):
    _write_inputs(tmp_path, copies=40)
    outputs = {}
    for workers, partitions in ((1, 1), (2, 3)):
        prefix = str(tmp_path / f"w{workers}p{partitions}")
        # tiny blocks: many tasks, and partition cuts fall inside the plain file
        assert preprocess_data.main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                                     "--workers", str(workers), "--partitions", str(partitions),
                                     "--block-mb", "0.001", "--output-prefix", prefix, "--quiet"] + bpe) == 0
        outputs[workers] = [open(f"{prefix}_text_document.{e}", "rb").read() for e in ("bin", "idx")]
    assert outputs[1] == outputs[2]
    got, _ = _contents(str(tmp_path / "w2p3_text_document"))
    tok = _tokenizer(bpe)
    assert got == [tok.tokenize(d["text"]) for d in DOCS * 40 if d["text"]]
    assert not [name for name in os.listdir(tmp_path) if "part" in name or "tmp" in name]


def test_segments_cut_at_any_byte_cover_every_line_exactly_once(tmp_path):
    path = tmp_path / "lines.jsonl"
    lines = [json.dumps({"text": "x" * (i % 7)}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    data = path.read_bytes()
    for cut in range(len(data) + 1):  # every possible cut, including exactly after a newline
        segments = [preprocess_data.Segment(str(path), 0, cut), preprocess_data.Segment(str(path), cut, None)]
        blocks = [(block, offset) for segment in segments
                  for block, offset, _ in preprocess_data.read_blocks(segment, 50)]
        assert b"".join(block for block, _ in blocks) == data, cut
        assert all(data[offset:offset + len(block)] == block for block, offset in blocks), cut
    for count in (2, 3, 7):
        parts = preprocess_data.split_into_partitions([str(path)], count)
        assert len(parts) == count
        assert b"".join(block for part in parts for segment in part
                        for block, _, _ in preprocess_data.read_blocks(segment, 100)) == data


def test_a_malformed_line_stops_with_file_and_line_or_is_counted_when_skipped(tmp_path, bpe, capsys):
    lines = [json.dumps({"text": "ok"}), json.dumps({"text": "fine"}), "", '{"text": "broken',
             json.dumps({"other": 1}), json.dumps({"text": 5}), json.dumps(["text"]), json.dumps({"text": "end"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "out")
    args = ["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", prefix, "--workers", "2", "--quiet"] + bpe
    assert preprocess_data.main(args) == 2
    assert "bad.jsonl:4: invalid JSON" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing under final or temporary names

    assert preprocess_data.main(args + ["--partitions", "2", "--block-mb", "0.00005"]) == 2
    assert "bad.jsonl:4: invalid JSON" in capsys.readouterr().err  # line numbers survive partitioning
    assert os.listdir(tmp_path) == ["bad.jsonl"]

    assert preprocess_data.main(args + ["--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "skipped 4 malformed line(s)" in out
    assert "bad.jsonl:5: missing key 'text'" in out and "bad.jsonl:6: key 'text'" in out
    assert "bad.jsonl:7: line is JSON but not an object" in out
    tok = _tokenizer(bpe)
    assert _contents(prefix + "_text_document")[0] == [tok.tokenize(t) for t in ("ok", "fine", "end")]

    (tmp_path / "ids.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 five"}\n{"text": "7"}\n')
    null = ["--input", str(tmp_path / "ids.jsonl"), "--output-prefix", str(tmp_path / "ids"), "--quiet",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--append-eod"]
    assert preprocess_data.main(null) == 2
    assert "ids.jsonl:2: the tokenizer refused the text" in capsys.readouterr().err
    assert preprocess_data.main(null + ["--skip-bad-lines"]) == 0
    assert _contents(str(tmp_path / "ids_text_document"))[0] == [[1, 2, 3, 10], [7, 10]]  # upstream's EOD: id V

    with pytest.raises(SystemExit):
        preprocess_data.main(["--input", str(tmp_path / "missing*.jsonl"), "--output-prefix", prefix] + bpe)
    assert "--input" in capsys.readouterr().err


def test_merge_datasets_concatenates_documents_and_refuses_mixed_dtypes(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    write_dataset(str(tmp_path / "dir" / "b"), [[3], [4, 5]], np.uint16)
    write_dataset(str(tmp_path / "dir" / "a"), [[1, 2]], np.uint16)
    write_dataset(str(tmp_path / "c"), [[6, 7, 8]], np.uint16)
    write_dataset(str(tmp_path / "wide"), [[70000]], np.int32)
    out = str(tmp_path / "merged")
    assert merge_datasets.main(["--input", str(tmp_path / "dir"), str(tmp_path / "c.bin"), "--output-prefix", out]) == 0
    got, ds = _contents(out)
    assert got == [[1, 2], [3], [4, 5], [6, 7, 8]] and ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert merge_datasets.main(["--input", str(tmp_path / "c"), str(tmp_path / "wide"),
                                "--output-prefix", str(tmp_path / "mixed")]) == 2  # bad input: exit 2
    assert "different dtypes" in capsys.readouterr().err and not os.path.exists(tmp_path / "mixed.bin")


def test_build_corpus_is_deterministic_and_feeds_the_pipeline(tmp_path, bpe):
    stdlib = tmp_path / "stdlib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "site-packages").mkdir()
    (stdlib / "site-packages" / "skipped.py").write_text("'''not stdlib'''\n")
    (stdlib / "LICENSE.txt").write_text("Permission is granted to use this text.\n")
    for i in range(6):
        (stdlib / "pkg" / f"mod{i}.py").write_text(
            f'"""Module {i} docstring."""\n\n# A comment about step {i}\n# that continues.\n'
            f'def f{i}(x):\n    """Return x plus {i}."""\n    return x + {i}  # noqa\n')
    (stdlib / "broken.py").write_text("def (:\n")
    runs = []
    for name in ("one", "two"):
        written = build_corpus.build_corpus(str(tmp_path / name), shards=3, max_mb=1, root=str(stdlib))
        runs.append({path.relative_to(tmp_path / name): path.read_bytes()
                     for path in (tmp_path / name).rglob("*") if path.is_file() and path.suffix == ".jsonl"})
    assert runs[0] == runs[1] and len(runs[0]) == 3 + 3 + 1
    assert written["_skipped"]["unparsable"] == 1
    code = [json.loads(line) for f in sorted((tmp_path / "two" / "code").glob("*.jsonl")) for line in open(f)]
    prose = [json.loads(line) for f in sorted((tmp_path / "two" / "prose").glob("*.jsonl")) for line in open(f)]
    assert [d["path"] for d in code] == ["broken.py"] + [f"pkg/mod{i}.py" for i in range(6)]
    assert prose[0] == {"text": "Module 0 docstring.\n\nA comment about step 0 that continues.\n\nReturn x plus 0.",
                        "path": "pkg/mod0.py", "corpus": "prose"}

    list_lines = (tmp_path / "two" / "data_file_list.txt").read_text().splitlines()[1:]
    assert len(list_lines) == 7 and all(len(line.split()) == 3 for line in list_lines)
    weight, prefix, corpus = list_lines[0].split()
    assert corpus == "code" and prefix.endswith("tokenized/code/code_00_text_document")
    shard = tmp_path / "two" / "code" / "code_00.jsonl"
    assert int(weight) == shard.stat().st_size
    assert preprocess_data.main(["--input", str(shard), "--output-prefix", prefix[: -len("_text_document")],
                                 "--quiet"] + bpe) == 0
    assert IndexedDataset(prefix).num_documents == len(shard.read_text().splitlines())


def test_every_tool_answers_help():
    for tool in ("tools/preprocess_data.py", "tools/merge_datasets.py", "tools/train_tokenizer.py",
                 "tools/build_corpus.py", "benchmarks/bench_preprocess.py"):
        result = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, (tool, result.stderr)
