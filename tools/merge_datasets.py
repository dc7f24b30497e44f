"""Concatenate Megatron `.bin/.idx` datasets into one, keeping every document boundary.

    python tools/merge_datasets.py --input out/tokenized/code --output-prefix out/code_all_text_document
    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix ab_text_document
A directory contributes all its prefixes (every NAME.idx with its NAME.bin), sorted by name; the
datasets must share a dtype. The output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder, IndexedDatasetError, data_file_path, index_file_path, read_index_header,
)


def expand_prefixes(inputs) -> list[str]:
    """Dataset prefixes from directories (every *.idx inside, sorted) and explicit prefixes, in order."""
    prefixes: list[str] = []
    for value in inputs:
        if os.path.isdir(value):
            found = sorted(os.path.join(value, name[:-4]) for name in os.listdir(value) if name.endswith(".idx"))
            if not found:
                raise IndexedDatasetError(f"--input {value}: directory holds no .idx files")
        else:
            prefix = value[:-4] if value.endswith((".bin", ".idx")) else value
            if not os.path.isfile(index_file_path(prefix)):
                raise IndexedDatasetError(f"--input {value}: {index_file_path(prefix)} not found (give a "
                                          "dataset prefix, without .bin/.idx, or a directory)")
            found = [prefix]
        prefixes.extend(prefix for prefix in found if prefix not in prefixes)
    return prefixes


def merge_datasets(prefixes, output_prefix: str) -> dict:
    """Write output_prefix.bin/.idx holding every dataset in order; returns totals."""
    if not prefixes:
        raise IndexedDatasetError("--input: nothing to merge")
    headers = [read_index_header(prefix) for prefix in prefixes]
    dtypes = {header.dtype for header in headers}
    if len(dtypes) > 1:
        listing = ", ".join(f"{prefix} ({header.dtype})" for prefix, header in zip(prefixes, headers))
        raise IndexedDatasetError(f"--input: datasets have different dtypes and cannot be merged: {listing}; "
                                  "re-tokenize them with one tokenizer")
    if os.path.abspath(output_prefix) in {os.path.abspath(prefix) for prefix in prefixes}:
        raise IndexedDatasetError(f"--output-prefix {output_prefix}: is also an input; choose another name")
    from tqdm import tqdm

    builder = IndexedDatasetBuilder(data_file_path(output_prefix), headers[0].dtype)
    try:
        for prefix in tqdm(prefixes, desc="merge", unit="dataset", disable=len(prefixes) < 20):
            builder.add_index(prefix)
        builder.finalize(index_file_path(output_prefix))
    except BaseException:
        builder.abort()
        raise
    return {"datasets": len(prefixes), "documents": sum(h.num_documents - 1 for h in headers),
            "tokens": sum(h.num_tokens for h in headers), "dtype": headers[0].dtype}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="directories and/or dataset prefixes, in order")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        prefixes = expand_prefixes(args.input)
        directory = os.path.dirname(os.path.abspath(args.output_prefix))
        os.makedirs(directory, exist_ok=True)
        totals = merge_datasets(prefixes, args.output_prefix)
    except IndexedDatasetError as error:  # a bad user input: exit 2, as every entry point (docs/RELIABILITY.md)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: --output-prefix {args.output_prefix}: cannot write there ({error.strerror}); choose a "
              "writable directory", file=sys.stderr)
        return 2
    print(f"merged {totals['datasets']} dataset(s): {totals['documents']:,} documents, {totals['tokens']:,} "
          f"{totals['dtype']} tokens into {args.output_prefix}.bin/.idx in {time.time() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
