"""Repair the index of a token file written by argonne-lcf/Megatron-DeepSpeed's tools/preprocess_data.py with
--append-eod: its .bin holds each document's end-of-document token, but its .idx counts it in no size (and its
pointers skip it), so upstream reads every document shifted back by the EOD tokens before it and never trains on
an EOD. This rewrites only the .idx so that the last sequence of each non-empty document counts its EOD token.

    python tools/repair_index.py data/corpus_text_document                 # EOD id: the .bin's last token
    python tools/repair_index.py data/corpus_text_document --eod-id 2      # or the tokenizer's, checked
    python tools/repair_index.py data/*_text_document --check              # report, write nothing

Every document must end in the EOD id, else the file is refused (naming the first that does not) and left as
it is. The new .idx is written under a temporary name and renamed over the old one. A repaired file is read
with its EOD tokens, so it no longer gives the very tokens an upstream run read from the unrepaired one.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetError, MissingFileError, repair_appended_eod)


def _missing_message(prefix: str, error: MissingFileError) -> str:
    """This tool's own words for a prefix whose files are not there (the reader's message speaks of --data-path)."""
    base = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    names = " and ".join(base + suffix for suffix in error.suffixes)
    return (f"{prefix}: {names} not found; give tools/repair_index.py the prefix of an existing .bin/.idx pair "
            "(the path without .bin/.idx, e.g. data/corpus_text_document)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="+", help="dataset prefixes (PREFIX.bin / PREFIX.idx; a suffix is dropped)")
    parser.add_argument("--eod-id", type=int, default=None,
                        help="the tokenizer's end-of-document id (default: the .bin's last token, checked "
                             "against the end of every document)")
    parser.add_argument("--check", action="store_true", help="check and report only; write nothing")
    args = parser.parse_args(argv)
    failed = 0
    for prefix in args.prefixes:
        try:
            result = repair_appended_eod(prefix, eod_id=args.eod_id, check_only=args.check)
        except MissingFileError as error:  # a bad input: named, exit 2 (docs/RELIABILITY.md)
            print(f"error: {_missing_message(prefix, error)}", file=sys.stderr)
            failed += 1
            continue
        except IndexedDatasetError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        if result["eod_tokens"] == 0:
            print(f"{prefix}: the index lists every token of the .bin; nothing to repair")
        elif args.check:
            print(f"{prefix}: {result['eod_tokens']} end-of-document tokens (id {result['eod_id']}) of "
                  f"{result['documents']} documents are not counted by the index; repairable (run without --check)")
        else:
            print(f"{prefix}: the index now counts the {result['eod_tokens']} end-of-document tokens "
                  f"(id {result['eod_id']}) of {result['documents']} documents")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
