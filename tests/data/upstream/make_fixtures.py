"""Make the upstream fixtures under tests/data/upstream/ by running argonne-lcf/Megatron-DeepSpeed itself.

This script is for making fixtures only: it runs in the side environment described in README.md
(/work/upstream-env, upstream's source extracted at --upstream) and never in the test suite.

    source /work/upstream-env/bin/activate
    python tests/data/upstream/make_fixtures.py --stage data    # token files (upstream's tools/preprocess_data.py)
    python tests/data/upstream/make_fixtures.py --stage order   # sample-order dumps (upstream's gpt_dataset code)
    python tests/data/upstream/make_fixtures.py --stage train   # checkpoints + losses (upstream's pretrain_gpt_alcf.py)
    python tests/data/upstream/make_fixtures.py --stage logits  # upstream's forward of the saved models

Every upstream run happens in a scratch directory (--work) with paths relative to it, so that the
paths upstream records (data prefixes in cache descriptions, the data-file list) are the relative
ones committed here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB = 256  # --vocab-size given to upstream's NullTokenizer (it then has VOCAB + 1 tokens, eod = VOCAB)
SEED_DATA = 20240601

# name -> (number of documents, min length, max length, --append-eod)
CORPORA = {
    "corpus_a": (120, 8, 48, False),
    "corpus_b": (70, 4, 32, False),
    "corpus_c": (60, 3, 12, False),
    "corpus_d": (60, 5, 20, False),
    "eod_e": (30, 3, 15, True),
}
# the --data-file-list: weight, prefix (relative to the fixture directory), corpus
FILE_LIST = [
    (0.35, "data/corpus_a_text_document", "web"),
    (0.25, "data/corpus_b_text_document", "web"),
    (0.15, "data/corpus_c_text_document", "code"),
    (0.25, "data/corpus_d_text_document", "code"),
]


def upstream_env(upstream: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(upstream),
        DS_ACCELERATOR="cpu",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONHASHSEED="0",
    )
    return env


def run(cmd, cwd, env, log=None):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        Path(log).write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-5000:] + out.stderr[-5000:])
        raise SystemExit(f"failed ({out.returncode}): {' '.join(str(c) for c in cmd)}")
    return out


def make_documents(name, n_docs, lo, hi, rng):
    """Documents of arithmetic progressions mod VOCAB: learnable, so losses fall."""
    docs = []
    for _ in range(n_docs):
        length = int(rng.randint(lo, hi + 1))
        start = int(rng.randint(0, VOCAB))
        stride = int(rng.randint(1, 8))
        docs.append([(start + stride * k) % VOCAB for k in range(length)])
    return docs


def stage_data(args):
    work = args.work / "data"
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    env = upstream_env(args.upstream)
    out_dir = HERE / "data"
    out_dir.mkdir(exist_ok=True)
    rng = np.random.RandomState(SEED_DATA)
    for name, (n_docs, lo, hi, eod) in CORPORA.items():
        docs = make_documents(name, n_docs, lo, hi, rng)
        jsonl = work / "data" / f"{name}.jsonl"
        with open(jsonl, "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": " ".join(str(t) for t in doc)}) + "\n")
        cmd = [sys.executable, args.upstream / "tools" / "preprocess_data.py",
               "--input", f"data/{name}.jsonl", "--output-prefix", f"data/{name}",
               "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
               "--dataset-impl", "mmap", "--workers", "1"]
        if eod:
            cmd.append("--append-eod")
        run(cmd, work, env)
        for suffix in (".jsonl", "_text_document.bin", "_text_document.idx"):
            shutil.copy(work / "data" / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    with open(HERE / "data" / "file_list.txt", "w") as f:
        for w, prefix, corpus in FILE_LIST:
            f.write(f"{w} {prefix} {corpus}\n")


# the tiny model every upstream run uses (dataset building needs the model flags too)
MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "512",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
]
ORDER_COMMON = MODEL_FLAGS + [
    "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "24",
    "--eval-iters", "1", "--eval-interval", "1000", "--split", "98,1,1", "--seed", "1234",
    "--data-cache-path", "cache",
]
BLEND_TRIPLETS = ["0.5", "data/corpus_a_text_document", "web",
                  "0.2", "data/corpus_b_text_document", "web",
                  "0.3", "data/corpus_c_text_document", "code"]
ORDER_CASES = {
    "filelist": ["--data-file-list", "data/file_list.txt"],
    "filelist_shuffle": ["--data-file-list", "data/file_list.txt", "--shuffle-sample-in-corpus"],
    "filelist_blend": ["--data-file-list", "data/file_list.txt", "--blend-sample-in-corpus"],
    "filelist_shuffle_blend": ["--data-file-list", "data/file_list.txt",
                               "--shuffle-sample-in-corpus", "--blend-sample-in-corpus"],
    "datapath_triplets": ["--data-path", *BLEND_TRIPLETS],
    "single": ["--data-path", "data/corpus_b_text_document"],
    "eod_single": ["--data-path", "data/eod_e_text_document"],
}


def stage_order(args):
    env = upstream_env(args.upstream)
    env["PYTHONPATH"] = f"{args.upstream}{os.pathsep}{HERE}"
    for k, (case, flags) in enumerate(ORDER_CASES.items()):
        work = args.work / "order" / case
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copytree(HERE / "data", work / "data", ignore=shutil.ignore_patterns("*.jsonl"))
        env["DUMP_DIR"] = "dump"
        env["MASTER_PORT"] = str(29600 + k)
        cmd = [sys.executable, HERE / "dump_order.py", *ORDER_COMMON, *flags]
        run(cmd, work, env, log=work / "log.txt")
        dest = HERE / "order" / case
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(work / "dump", dest)
        shutil.copytree(work / "cache", dest / "cache")
        (dest / "command.txt").write_text(
            "python pretrain_gpt_alcf.py-equivalent dataset build (dump_order.py) with:\n"
            + " ".join(ORDER_COMMON + flags) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["data", "order", "train", "logits"], required=True)
    parser.add_argument("--upstream", type=Path, default=Path("/work/upstream-src/Megatron-DeepSpeed"))
    parser.add_argument("--work", type=Path, default=Path("/work/upstream-work"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    globals()[f"stage_{args.stage}"](args)


if __name__ == "__main__":
    main()
