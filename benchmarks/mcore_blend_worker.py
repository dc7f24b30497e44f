"""Times megatron-core's BlendedMegatronDatasetBuilder + GPTDataset on a blend (run by bench_blend.py).

Runs inside benchmarks/.venv-mcore (megatron-core==0.16.1 with its compiled helpers), never in our venv:
its `megatron.core` package would collide with ours. Prints one JSON line of timings on stdout.
Usage: python mcore_blend_worker.py --data-file-list LIST --seq-length 4096 --train-samples N --cache DIR
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import os  # noqa: E402
import socket  # noqa: E402

import numpy  # noqa: E402
import torch.distributed  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402

IMPORTED = time.perf_counter()


class FixedVocabTokenizer:
    """The three attributes megatron-core's GPTDataset reads from a tokenizer."""
    vocab_size = 32000
    eod = 2
    pad = 0
    unique_identifiers = {"class": "FixedVocabTokenizer", "vocab_size": 32000}  # part of its cache key


def locate(blended, global_samples):
    """megatron-core's equivalent of our mapping: global sample -> (dataset, document, token offset)."""
    datasets = blended.dataset_index[global_samples]
    in_dataset = blended.dataset_sample_index[global_samples]
    documents = numpy.empty(len(global_samples), dtype=numpy.int64)
    offsets = numpy.empty(len(global_samples), dtype=numpy.int64)
    for d in numpy.unique(datasets):
        rows = numpy.flatnonzero(datasets == d)
        dataset = blended.datasets[int(d)]
        shuffled = dataset.shuffle_index[in_dataset[rows]]
        documents[rows] = dataset.document_index[dataset.sample_index[shuffled, 0]]
        offsets[rows] = dataset.sample_index[shuffled, 1]
    return datasets, documents, offsets


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-file-list", required=True)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--train-samples", type=int, required=True)
    parser.add_argument("--valid-samples", type=int, default=0)
    parser.add_argument("--split", default="990,10,0")
    parser.add_argument("--cache", required=True, help="empty directory for megatron-core's index cache")
    parser.add_argument("--global-batch", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # megatron-core's BlendedDataset asks torch.distributed for the rank: a one-process gloo group, as in training
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    prefixes, weights = [], []
    with open(args.data_file_list) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields:
                weights.append(float(fields[0]))
                prefixes.append(fields[1])
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=args.seq_length, blend=(prefixes, weights), split=args.split,
        path_to_cache=args.cache, tokenizer=FixedVocabTokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    built = time.perf_counter()
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [args.train_samples, args.valid_samples, 0], lambda: True, config).build()
    first = locate(train, numpy.arange(args.global_batch))
    ready = time.perf_counter()
    spawn_to_first_batch = time.time() - float(os.environ.get("BENCH_SPAWN_EPOCH", "nan"))
    assert len(first[0]) == args.global_batch

    rng = numpy.random.default_rng(0)
    batch_times = []
    for _ in range(20):
        start = int(rng.integers(0, len(train) - args.global_batch))
        t0 = time.perf_counter()
        locate(train, numpy.arange(start, start + args.global_batch))
        batch_times.append(time.perf_counter() - t0)
    torch.distributed.destroy_process_group()
    print(json.dumps({
        "import_s": IMPORTED - START, "build_s": ready - built, "to_first_batch_s": ready - START,
        "spawn_to_first_batch_s": spawn_to_first_batch, "map_batch_s": float(numpy.median(batch_times)), "samples": len(train),
    }))


if __name__ == "__main__":
    main()
