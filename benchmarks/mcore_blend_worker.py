"""Times megatron-core's BlendedMegatronDatasetBuilder + GPTDataset on a blend (run by bench_blend.py).

Runs inside benchmarks/.venv-mcore (megatron-core==0.16.1 with its compiled helpers), never in our venv:
its `megatron.core` package would collide with ours. Builds the blend (or loads it from --cache when a
previous run left it there: the warm restart), then fetches the tokens of the first global batch through
the dataset's own __getitem__, as a trainer does. Prints one JSON line of timings and peak RSS on stdout.
Usage: python mcore_blend_worker.py --data-file-list LIST --seq-length 4096 --train-samples N --cache DIR
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402

import numpy  # noqa: E402
import torch.distributed  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402

IMPORTED = time.perf_counter()


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own address space since exec; ru_maxrss would also
    count the parent's resident memory at fork time)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


class FixedVocabTokenizer:
    """The three attributes megatron-core's GPTDataset reads from a tokenizer."""
    vocab_size = 32000
    eod = 2
    pad = 0
    unique_identifiers = {"class": "FixedVocabTokenizer", "vocab_size": 32000}  # part of its cache key


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
    with open("/proc/self/status") as status:
        rss_imported = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_imported = usage.ru_utime + usage.ru_stime
    built = time.perf_counter()
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [args.train_samples, args.valid_samples, 0], lambda: True, config).build()
    built_at = time.perf_counter()
    # the tokens of the first global batch, through the dataset's own __getitem__ (tokens + the last label)
    first = numpy.stack([numpy.append(sample["tokens"].numpy(), sample["labels"].numpy()[-1:])
                         for sample in (train[i] for i in range(args.global_batch))])
    ready = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_batch = usage.ru_utime + usage.ru_stime  # CPU seconds of the whole process so far (load-insensitive)
    peak_at_first_batch = peak_rss_mb()
    spawn_to_first_batch = time.time() - float(os.environ.get("BENCH_SPAWN_EPOCH", "nan"))
    assert first.shape == (args.global_batch, args.seq_length + 1)

    rng = numpy.random.default_rng(0)
    batch_times = []
    for _ in range(3):
        start = int(rng.integers(0, len(train) - args.global_batch))
        t0 = time.perf_counter()
        for i in range(start, start + args.global_batch):
            train[i]["tokens"]
        batch_times.append(time.perf_counter() - t0)
    torch.distributed.destroy_process_group()
    # resident memory now (after 4 batches): anonymous (the process's own) and file-backed (mapped pages)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    anon_mb, file_mb = (int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile"))
    print(json.dumps({
        "import_s": IMPORTED - START, "build_s": built_at - built, "first_batch_s": ready - built_at,
        "to_first_batch_s": ready - START, "spawn_to_first_batch_s": spawn_to_first_batch,
        "batch_s": float(numpy.median(batch_times)), "samples": len(train),
        "peak_rss_mb": peak_rss_mb(), "cpu_to_first_batch_s": cpu_at_batch,
        "rss_first_batch_mb": peak_at_first_batch, "anon_mb": anon_mb, "file_mb": file_mb,
        "rss_imported_mb": rss_imported, "cpu_imported_s": cpu_imported,
    }))


if __name__ == "__main__":
    main()
