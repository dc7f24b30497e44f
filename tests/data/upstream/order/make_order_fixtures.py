"""Makes tests/data/upstream/order/: token files and upstream's own sample order, from upstream's real code.

Runs in the side environment only (tests/data/upstream/README.md says how to build it), never in the suite:

    source $SIDE_ENV/bin/activate                 # the side environment of tests/data/upstream/README.md
    cd $UPSTREAM_SRC                              # git archive of argonne-lcf/Megatron-DeepSpeed ffa3456d
    PYTHONPATH=$PWD DS_ACCELERATOR=cpu WANDB_MODE=disabled OMP_NUM_THREADS=1 MASTER_ADDR=127.0.0.1 \
        GLOO_SOCKET_IFNAME=lo python <repo>/tests/data/upstream/order/make_order_fixtures.py <repo>/tests/data/upstream/order

What it does, all with upstream's code: writes 4 token files with upstream's MMapIndexedDatasetBuilder (int32
tokens; token value = 100000 * file + its position in the file, so a sample names where each token came from);
parses a command line with upstream's megatron.arguments.parse_args; builds the datasets through upstream's
megatron.training.build_train_valid_test_datasets (its train/valid/test sample arithmetic) with
pretrain_gpt_alcf.train_valid_test_datasets_provider (its --data-file-list reader; pretrain_gpt.py's provider
for the case with --train-/--valid-/--test-data-path), so through
gpt_dataset.build_train_valid_test_datasets, BuildCorpusDataset, BlendableDataset and helpers.cpp; and dumps
every sample of every split, plus the first micro-batches of upstream's build_pretraining_data_loader at
consumed_samples = N (a resume). One .npz per configuration (flags below), and manifest.json. Also
greedy_60.npz and greedy_5.npz: helpers.build_blending_indices itself over 60 and 5 weights, 6,000 samples.

The one change to upstream's import path: megatron.training imports megatron/model/vision/knn_monitor.py,
which imports megatron/data/vit_dataset.py, which needs torchvision (CUDA-only wheels): that module is
replaced by a stub in sys.modules before the import (nothing here uses it).
"""

import json
import os
import sys
import tempfile
import types

import numpy as np

OUT = os.path.abspath(sys.argv[1])
vit = types.ModuleType("megatron.data.vit_dataset")
vit.ClassificationTransform = object
sys.modules["megatron.data.vit_dataset"] = vit

import torch  # noqa: E402

import pretrain_gpt_alcf  # noqa: E402  (ezpz sets up torch.distributed, one gloo rank)
from megatron import global_vars  # noqa: E402
from megatron.arguments import parse_args  # noqa: E402
from megatron.core import mpu  # noqa: E402
from megatron.data.data_samplers import build_pretraining_data_loader  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder  # noqa: E402
from megatron.training import build_train_valid_test_datasets  # noqa: E402

SEQ, SEED = 16, 1234
TRAIN_ITERS, GBS, MBS, EVAL_INTERVAL, EVAL_ITERS = 30, 8, 4, 10, 2
FILES = [("books", 0.4, 30), ("web", 0.3, 34), ("books", 0.2, 26), ("web", 0.1, 40)]  # corpus, weight, docs
RESUME_AT = (0, 8, 120, 232)


def write_files(directory):
    rng = np.random.default_rng(7)
    prefixes = []
    for f, (_, _, docs) in enumerate(FILES):
        prefix = os.path.join(directory, f"file{f}_text_document")
        builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        position = 0
        for d in range(docs):
            length = 0 if (f == 1 and d == 5) else int(rng.integers(1, 41))  # one empty document
            builder.add_item(torch.arange(position, position + length, dtype=torch.int64) + 100000 * f)
            builder.end_document()
            position += length
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


CONFIGS = {  # name: (data flags: "list", "single" or "separate", extra flags)
    "list_shuffle": ("list", ["--shuffle-sample-in-corpus"]),  # what ALCF/helpers.sh passes
    "list_blend_shuffle": ("list", ["--shuffle-sample-in-corpus", "--blend-sample-in-corpus"]),
    "list_plain": ("list", []),
    "single_prefix": ("single", []),
    # each split its own paths: pretrain_gpt.py's provider (pretrain_gpt_alcf.py's needs --data-path or a list)
    "separate_paths": ("separate", []),
}


def upstream_args(argv):
    sys.argv = ["pretrain_gpt_alcf.py"] + argv
    args = parse_args()
    args.dataloader_type = "single"  # what upstream's validate_args sets when the flag is not given
    global_vars.set_args(args)
    return args


def main():
    os.makedirs(OUT, exist_ok=True)
    data_dir = os.path.join(OUT, "data")
    os.makedirs(data_dir, exist_ok=True)
    prefixes = write_files(data_dir)
    list_path = os.path.join(data_dir, "data_file_list.txt")
    with open(list_path, "w") as handle:
        for prefix, (corpus, weight, _) in zip(prefixes, FILES):
            handle.write(f"{weight} {prefix} {corpus}\n")
    mpu.initialize_model_parallel(1, 1)
    manifest = {"upstream_commit": "ffa3456d68b630192fcaefcc3288bd18525b8d95", "seq_length": SEQ, "seed": SEED,
                "train_iters": TRAIN_ITERS, "global_batch_size": GBS, "micro_batch_size": MBS,
                "eval_interval": EVAL_INTERVAL, "eval_iters": EVAL_ITERS, "split": "90,8,2",
                "files": [{"name": os.path.basename(p), "corpus": c, "weight": w} for p, (c, w, _) in zip(prefixes, FILES)],
                "configs": {}}
    import pretrain_gpt

    for name, (kind, flags) in CONFIGS.items():
        with tempfile.TemporaryDirectory() as cache:
            data = {"list": ["--data-file-list", list_path], "single": ["--data-path", prefixes[0]],
                    "separate": ["--train-data-path", "0.6", prefixes[0], "0.4", prefixes[2],
                                 "--valid-data-path", prefixes[3],
                                 "--test-data-path", "0.5", prefixes[1], "0.5", prefixes[3]]}[kind]
            argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length",
                    str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", str(MBS),
                    "--global-batch-size", str(GBS), "--train-iters", str(TRAIN_ITERS), "--eval-interval",
                    str(EVAL_INTERVAL), "--eval-iters", str(EVAL_ITERS), "--split", "90,8,2", "--seed", str(SEED),
                    "--data-cache-path", cache, "--tokenizer-type", "NullTokenizer", "--vocab-size", "500000",
                    "--num-workers", "0"] + data + flags
            upstream_args(argv)
            provider = pretrain_gpt if kind == "separate" else pretrain_gpt_alcf
            datasets = build_train_valid_test_datasets(provider.train_valid_test_datasets_provider)
            arrays = {}
            for split, ds in zip(("train", "valid", "test"), datasets):
                if ds is None:
                    continue
                arrays[split] = np.stack([np.asarray(ds[i]["text"], dtype=np.int64) for i in range(len(ds))])
            for n in RESUME_AT:
                loader = build_pretraining_data_loader(datasets[0], n)
                batches = []
                for batch in loader:
                    batches.append(batch["text"].numpy())
                    if len(batches) == 2:
                        break
                arrays[f"resume_{n}"] = np.concatenate(batches)
            np.savez_compressed(os.path.join(OUT, f"{name}.npz"), **arrays)
            manifest["configs"][name] = {"flags": data[:1] + flags, "kind": kind, "argv": argv,
                                         "splits": {k: list(v.shape) for k, v in arrays.items()}}
    # helpers.cpp's greedy blend itself, over many datasets (uneven weights, some nearly equal) and a few
    from megatron.data import helpers

    for name, count in (("greedy_60", 60), ("greedy_5", 5)):
        weights = np.random.default_rng(count).random(count)
        weights[1::7] = weights[0]  # ties
        weights /= weights.sum()
        index, sample_index = np.zeros(6000, np.int64), np.zeros(6000, np.int64)
        helpers.build_blending_indices(index, sample_index, weights, count, 6000, False)
        np.savez_compressed(os.path.join(OUT, f"{name}.npz"), weights=weights, index=index, sample_index=sample_index)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(OUT))))  # the repository

    def portable(value):  # no path of the machine that made the fixtures: repository-relative, cache dirs named
        if isinstance(value, str) and os.path.isabs(value):
            inside = os.path.relpath(value, root)
            return "<a fresh temporary directory>" if inside.startswith("..") else inside
        return value

    for config in manifest["configs"].values():
        config["flags"], config["argv"] = ([portable(v) for v in config[k]] for k in ("flags", "argv"))
    with open(os.path.join(OUT, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=1)
    os.remove(list_path)
    print("wrote", OUT)


main()
