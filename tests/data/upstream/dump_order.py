"""Dump upstream's sample order (run by make_fixtures.py --stage order, in the side environment only).

Builds the train/valid/test datasets exactly as upstream's pretrain_gpt_alcf.py does
(megatron.training.build_train_valid_test_datasets with pretrain_gpt_alcf's provider, after
initialize_megatron on the same command line), then writes, for the train and valid splits, every
global sample's tokens and where it came from into $DUMP_DIR.

    python dump_order.py <upstream's own pretraining flags>
"""

import os
import sys

import numpy as np

import pretrain_gpt_alcf  # its import sets up torch.distributed through ezpz, as upstream's entry point does)
from megatron import get_args
from megatron.initialize import initialize_megatron
from megatron.training import build_train_valid_test_datasets


def provenance(ds, idx):
    """(corpus index, sample index in the corpus, file index in the corpus, sample index in the file).

    Corpora are numbered in sorted name order, as upstream builds them; -1 where the level does not
    exist (a single --data-path file has no blend)."""
    if not hasattr(ds, "dataset_index"):
        return -1, -1, -1, int(idx)
    c = int(ds.dataset_index[idx])
    j = int(ds.dataset_sample_index[idx])
    corpus = ds.datasets[c]
    if hasattr(corpus, "shuffle_index"):  # BuildCorpusDataset
        s = corpus.shuffle_index[j]
        return c, j, int(corpus.dataset_index[s]), int(corpus.dataset_sample_index[s])
    return c, j, c, j


def blend_prefixes(args):
    """The file prefixes in the order the command line lists them (--data-file-list or --data-path triplets)."""
    if args.data_file_list is not None:
        with open(args.data_file_list) as f:
            return [line.split()[1].split(".bin")[0] for line in f if line.strip()]
    if args.data_path and len(args.data_path) > 1:
        return [args.data_path[3 * i + 1] for i in range(len(args.data_path) // 3)]
    return list(args.data_path or [])


def main():
    out = os.environ["DUMP_DIR"]
    os.makedirs(out, exist_ok=True)
    initialize_megatron(allow_no_cuda=True)
    args = get_args()
    train, valid, _ = build_train_valid_test_datasets(pretrain_gpt_alcf.train_valid_test_datasets_provider)
    for name, ds in (("train", train), ("valid", valid)):
        if ds is None:
            continue
        n = len(ds)
        tokens = np.zeros((n, args.seq_length + 1), dtype=np.int64)
        where = np.zeros((n, 5), dtype=np.int64)
        listed = blend_prefixes(args)
        for i in range(n):
            item = ds[i]
            tokens[i] = item["text"]
            where[i, :4] = provenance(ds, i)
            if where[i, 0] >= 0:
                prefix = ds.datasets[where[i, 0]].dataset_builders[where[i, 2]].prefix
                where[i, 4] = listed.index(prefix)
            else:
                where[i, 4] = 0
        np.save(os.path.join(out, f"{name}_tokens.npy"), tokens)
        np.save(os.path.join(out, f"{name}_where.npy"), where)
        print(f"dumped {name}: {n} samples", flush=True)
    if not hasattr(train, "dataset_index"):  # a single file: also what upstream reads for each document
        indexed = train.indexed_dataset
        docs = [np.asarray(indexed.get(k), dtype=np.int64) for k in range(len(indexed))]
        np.save(os.path.join(out, "documents_read.npy"), np.concatenate(docs))
        np.save(os.path.join(out, "documents_read_sizes.npy"), np.array([len(d) for d in docs], dtype=np.int64))


if __name__ == "__main__":
    main()
    sys.exit(0)
