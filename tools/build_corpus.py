"""Build the embedded default corpus from text every Python installation has: the standard library.

    python tools/build_corpus.py --output-dir data/corpus
writes three corpora of jsonl shards, {"text", "path", "corpus"} per line:
  code/   the stdlib's .py sources, one document per file
  prose/  their docstrings and comments (extracted with ast and tokenize), one document per module
  text/   the stdlib's other text files (LICENSE.txt, README, *.txt, *.rst, *.md)
and data_file_list.txt ("weight prefix corpus" lines, weight = the shard's bytes) naming the
prefixes tools/preprocess_data.py writes when run as printed at the end. Deterministic: files are
picked by a hash of their relative path until --max-mb per corpus, then written in sorted order.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
import sysconfig
import tokenize
import zlib

CORPORA = ("code", "prose", "text")
TEXT_SUFFIXES = (".txt", ".rst", ".md")
TEXT_NAMES = ("LICENSE", "README", "NEWS", "COPYING")
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_directory() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_text_file(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES) or name.upper().startswith(TEXT_NAMES)


def list_source_files(root: str) -> tuple[list[str], list[str]]:
    """Relative paths of .py files and of other text files under root, sorted, skipping site-packages."""
    python_files, text_files = [], []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(directory, name), root)
            if name.endswith(".py"):
                python_files.append(relative)
            elif _is_text_file(name):
                text_files.append(relative)
    return sorted(python_files), sorted(text_files)


def read_text(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() and "\x00" not in text else None


_PRAGMAS = ("!", "-*-", "noqa", "type:", "pragma", "fmt:", "pylint", "XXX")


def extract_prose(source: str):
    """Docstrings and comments of one module in source order, comment runs joined into paragraphs."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    pieces = []  # (line, text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and docstring.strip():
                pieces.append((getattr(node, "lineno", 0), docstring.strip()))
    try:
        paragraph, paragraph_line, previous_line = [], 0, -2
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type != tokenize.COMMENT:
                continue
            text = token.string.lstrip("#").strip()
            line = token.start[0]
            if not text or text.startswith(_PRAGMAS) or not any(char.isalpha() for char in text):
                continue
            if line != previous_line + 1 and paragraph:
                pieces.append((paragraph_line, " ".join(paragraph)))
                paragraph = []
            if not paragraph:
                paragraph_line = line
            paragraph.append(text)
            previous_line = line
        if paragraph:
            pieces.append((paragraph_line, " ".join(paragraph)))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    pieces.sort(key=lambda piece: piece[0])
    text = "\n\n".join(piece for _, piece in pieces)
    return text if text.strip() else None


def _selection_order(relative_paths):
    """A fixed pseudo-random order (crc32 of the path), so a size cap takes a cross-section of the stdlib."""
    return sorted(relative_paths, key=lambda path: (zlib.crc32(path.encode("utf-8")), path))


def collect_documents(root: str, max_bytes: int, max_docs) -> tuple[dict, dict]:
    """{corpus: [document dicts in path order]} under the caps, and counts of skipped files."""
    python_files, text_files = list_source_files(root)
    documents = {corpus: [] for corpus in CORPORA}
    sizes = {corpus: 0 for corpus in CORPORA}
    skipped = {"unreadable": 0, "unparsable": 0, "over_cap": 0}

    def add(corpus, relative, text) -> None:
        size = len(text.encode("utf-8"))
        if sizes[corpus] + size > max_bytes or (max_docs is not None and len(documents[corpus]) >= max_docs):
            skipped["over_cap"] += 1
            return
        sizes[corpus] += size
        documents[corpus].append({"text": text, "path": relative, "corpus": corpus})

    from tqdm import tqdm

    for relative in tqdm(_selection_order(python_files), desc="stdlib .py files", unit="file", leave=False):
        if sizes["code"] >= max_bytes * 0.999 and sizes["prose"] >= max_bytes * 0.999:
            break
        source = read_text(os.path.join(root, relative))
        if source is None:
            skipped["unreadable"] += 1
            continue
        add("code", relative, source)
        prose = extract_prose(source)
        if prose is None:
            skipped["unparsable"] += 1
        else:
            add("prose", relative, prose)
    for relative in _selection_order(text_files):
        text = read_text(os.path.join(root, relative))
        if text is None:
            skipped["unreadable"] += 1
        else:
            add("text", relative, text)
    for corpus in CORPORA:
        documents[corpus].sort(key=lambda document: document["path"])
    return documents, skipped


def split_into_shards(documents: list, shards: int) -> list[list]:
    """Contiguous runs of documents with about equal bytes each (at most `shards`, never empty)."""
    total = sum(len(document["text"]) for document in documents)
    target = total / shards if shards else total
    result, current, size = [], [], 0
    for document in documents:
        current.append(document)
        size += len(document["text"])
        if size >= target * (len(result) + 1) and len(result) < shards - 1:
            result.append(current)
            current = []
    if current:
        result.append(current)
    return result


def write_jsonl(path: str, documents: list) -> int:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return os.path.getsize(path)


def build_corpus(output_dir: str, shards: int = 4, max_mb: float = 6.0, max_docs=None, root=None,
                 tokenized_dir=None) -> dict:
    """Write the corpora and data_file_list.txt; returns {corpus: [(shard path, bytes, documents)]}."""
    root = root or stdlib_directory()
    tokenized_dir = tokenized_dir or os.path.join(output_dir, "tokenized")
    documents, skipped = collect_documents(root, int(max_mb * 1024 * 1024), max_docs)
    written: dict = {}
    list_lines = ["# weight prefix corpus  (weight = shard bytes; prefixes as written by the commands "
                  "tools/build_corpus.py printed)"]
    for corpus in CORPORA:
        directory = os.path.join(output_dir, corpus)
        os.makedirs(directory, exist_ok=True)
        written[corpus] = []
        for index, shard in enumerate(split_into_shards(documents[corpus], shards)):
            name = f"{corpus}_{index:02d}"
            path = os.path.join(directory, name + ".jsonl")
            size = write_jsonl(path, shard)
            written[corpus].append((path, size, len(shard)))
            prefix = os.path.join(tokenized_dir, corpus, name + "_text_document")
            list_lines.append(f"{size} {prefix} {corpus}")
    list_path = os.path.join(output_dir, "data_file_list.txt")
    tmp = f"{list_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(list_lines) + "\n")
    os.replace(tmp, list_path)
    written["_skipped"] = skipped
    written["_data_file_list"] = list_path
    written["_tokenized_dir"] = tokenized_dir
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/corpus")
    parser.add_argument("--shards", type=int, default=4, help="jsonl files per corpus")
    parser.add_argument("--max-mb", type=float, default=6.0, help="cap on each corpus's text, in MiB")
    parser.add_argument("--max-docs", type=int, default=None, help="cap on each corpus's documents")
    parser.add_argument("--stdlib", default=None, help="directory to read instead of this Python's stdlib")
    parser.add_argument("--tokenized-dir", default=None,
                        help="where the data file list expects tokenized shards (default OUTPUT_DIR/tokenized)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards {args.shards}: must be >= 1")
    if args.stdlib and not os.path.isdir(args.stdlib):
        parser.error(f"--stdlib {args.stdlib}: not a directory")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as error:
        parser.error(f"--output-dir {args.output_dir}: cannot create it ({error.strerror}); choose a writable "
                     "directory")
    written = build_corpus(args.output_dir, args.shards, args.max_mb, args.max_docs, args.stdlib, args.tokenized_dir)
    skipped = written.pop("_skipped")
    list_path = written.pop("_data_file_list")
    tokenized_dir = written.pop("_tokenized_dir")
    print(f"read {args.stdlib or stdlib_directory()}")
    for corpus, shards in written.items():
        total = sum(size for _, size, _ in shards)
        documents = sum(count for _, _, count in shards)
        print(f"  {corpus:6s}: {documents:5d} documents, {total / 1e6:6.2f} MB in {len(shards)} shard(s) under "
              f"{os.path.join(args.output_dir, corpus)}")
    print(f"skipped files: {skipped['unreadable']} unreadable, {skipped['unparsable']} without parsable prose, "
          f"{skipped['over_cap']} over the caps")
    print(f"wrote {list_path}; tokenize each shard so its prefixes exist, e.g.:")
    for corpus in written:
        print(f"  python tools/preprocess_data.py --input {os.path.join(args.output_dir, corpus)}/{corpus}_NN.jsonl "
              f"--output-prefix {os.path.join(tokenized_dir, corpus)}/{corpus}_NN --append-eod "
              "--tokenizer-type ... --workers 2   (for NN = 00, 01, ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
