"""Make the upstream fixtures under tests/data/upstream/ by running argonne-lcf/Megatron-DeepSpeed itself.

This script is for making fixtures only: it runs in the side environment described in README.md
($SIDE_ENV, upstream's source extracted at --upstream) and never in the test suite.

    source $SIDE_ENV/bin/activate      # then add --upstream $UPSTREAM_SRC --work $SCRATCH to each line
    python tests/data/upstream/make_fixtures.py --stage data    # token files (upstream's tools/preprocess_data.py)
    python tests/data/upstream/make_fixtures.py --stage order   # sample-order dumps (upstream's gpt_dataset code)
    python tests/data/upstream/make_fixtures.py --stage train   # checkpoints + losses (upstream's pretrain_gpt_alcf.py)
    python tests/data/upstream/make_fixtures.py --stage logits  # upstream's forward of the saved models
    python tests/data/upstream/make_fixtures.py --stage index   # INDEX.json (numpy only)

--only a,b limits order/train/logits to those cases or runs; --work is the scratch directory.

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


def make_documents(n_docs, lo, hi, rng):
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
        docs = make_documents(n_docs, lo, hi, rng)
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
    # the data of the checkpoint runs below (ckpt/*): same data flags, split, iterations and batch
    "train_run": ["--data-file-list", "data/file_list.txt", "--shuffle-sample-in-corpus",
                  "--split", "990,10,0", "--train-iters", "8"],
}


def stage_order(args):
    env = upstream_env(args.upstream)
    env["PYTHONPATH"] = f"{args.upstream}{os.pathsep}{HERE}"
    only = set(args.only.split(",")) if args.only else set(ORDER_CASES)
    for k, (case, flags) in enumerate(ORDER_CASES.items()):
        if case not in only:
            continue
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


# --- checkpoints ----------------------------------------------------------------------------------
# The training command follows ALCF/helpers.sh (setup_run_cmd, set_args, generateDSconfig) at the
# upstream commit, with the tiny sizes below, NullTokenizer, gloo and CPU.
TRAIN_SIZES = dict(NLAYERS=2, HIDDEN=32, HEADS=4, NUM_KV_HEAD=4, FFN_HIDDEN_SIZE=64, SEQ=32,
                   MICRO_BATCH=2, GLOBAL_BATCH=8, TRAIN_ITERS=8, SAVE_ITER=4)
# name -> (tensor parallel, pipeline parallel, dtype[, data parallel = 1])
TRAIN_RUNS = {
    "tp2_fp32": (2, 1, "fp32"),
    "pp2_fp32": (1, 2, "fp32"),
    "tp2pp2_fp32": (2, 2, "fp32"),
    "tp2_bf16": (2, 1, "bf16"),
    "dp2_fp32": (1, 1, "fp32", 2),  # ZeRO-1 over two data-parallel ranks: the optimizer state is sharded
}
# run (--only pp2_bf16) but not committed, to keep the fixtures small; README.md records its losses
OPTIONAL_TRAIN_RUNS = {"pp2_bf16": (1, 2, "bf16")}


def ds_config(tp, pp, dtype, world):
    """The DeepSpeed config ALCF/helpers.sh generateDSconfig writes for ZERO_STAGE=1, OPT=adamw."""
    s = TRAIN_SIZES
    dp = world // tp // pp
    gas = s["GLOBAL_BATCH"] // (s["MICRO_BATCH"] * dp)
    cfg = {
        "train_batch_size": s["GLOBAL_BATCH"],
        "train_micro_batch_size_per_gpu": s["MICRO_BATCH"],
        "gradient_clipping": 1.0,
        "steps_per_print": 1,
        "gradient_accumulation_steps": gas,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 1},
    }
    if dtype == "bf16":
        cfg["fp16"] = {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
        cfg["bfloat16"] = {"enabled": True}
    else:
        cfg["communication_data_type"] = "fp32"
    if pp > 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    else:
        cfg["comms_logger"] = {"enabled": False, "verbose": False, "debug": False}
    # ALCF enables the flops profiler. DeepSpeed 0.19.4 then turns wall_clock_breakdown on, and its
    # PipelineEngine starts the bwd_microstep timer twice on a non-last stage ("bwd_microstep timer
    # has already been started"): with pipeline parallelism the profiler is off (no numerical effect).
    cfg["flops_profiler"] = {"enabled": pp == 1, "profile_step": 2, "module_depth": -1,
                             "top_modules": 1, "detailed": True, "output_file": None}
    return cfg


def train_flags(tp, pp, dtype, ckpt, train_iters):
    s = TRAIN_SIZES
    flags = [
        # lr_flags (LR=0.0002, cosine, warmup fraction 0.05)
        "--lr", "0.0002", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05",
        "--use-checkpoint-opt_param-scheduler",
        # llama_flags
        "--swiglu", "--hidden-dropout", "0", "--attention-dropout", "0", "--normalization", "rmsnorm",
        "--disable-bias-linear", "--no-query-key-layer-scaling", "--use-rotary-position-embeddings",
        "--untie-embeddings-and-output-weights", "--num-key-value-heads", str(s["NUM_KV_HEAD"]),
        "--ffn-hidden-size", str(s["FFN_HIDDEN_SIZE"]),
        # tokenizer
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        # ds_args
        "--deepspeed", *(["--no-pipeline-parallel"] if pp == 1 else []),
        "--deepspeed_config=ds_config.json", "--zero-stage=1",
        *(["--bf16"] if dtype == "bf16" else []),
        "--accumulate-allreduce-grads-in-fp32", "--adjust-word-embedding-init",
        "--adam-beta1=0.9", "--adam-beta2=0.95", "--adam-eps=0.00001", "--clip-grad=1.0",
        "--data-cache-path=cache", "--data-file-list=data/file_list.txt",
        "--distributed-backend=gloo", "--ds-sequence-parallel-size=1",
        "--eval-interval=1000", "--eval-iters=1",
        f"--global-batch-size={s['GLOBAL_BATCH']}", f"--hidden-size={s['HIDDEN']}",
        "--init-method-std=.111803",  # bc: sqrt(2 / (5 * HIDDEN)) with scale=6
        "--log-interval=1", f"--load={ckpt}", f"--max-position-embeddings={16 * s['SEQ']}",
        f"--micro-batch-size={s['MICRO_BATCH']}",
        "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
        "--no-gradient-accumulation-fusion",
        f"--num-layers={s['NLAYERS']}", f"--num-attention-heads={s['HEADS']}", "--optimizer=adamw",
        f"--pipeline-model-parallel-size={pp}", "--rotary-position-embeddings-theta=50000",
        f"--save={ckpt}", f"--seq-length={s['SEQ']}", "--split=990,10,0", "--shuffle-sample-in-corpus",
        f"--save-interval={s['SAVE_ITER']}", f"--train-iters={train_iters}",
        f"--tensor-model-parallel-size={tp}", "--timing-log-level=1", "--weight-decay=0.1",
        "--word-embedding-init-std=0.632455532",
        "--seed=1234",
    ]
    return flags


def strip_ansi(text):
    """Upstream logs through rich: drop the colour codes."""
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def parse_losses(text):
    """{iteration: (lm loss, learning rate)} and the lines, from upstream's training_log lines
    ' iteration=       5/       8 | ... | learning_rate=6.75301e-05 | ... | lm loss=6.443185 | ...'."""
    import re
    losses, lines = {}, []
    for line in strip_ansi(text).splitlines():
        m = re.search(r"iteration=\s*(\d+)/\s*\d+ \|.*?learning_rate=([0-9.eE+-]+) \|.*?lm loss=([0-9.eE+-]+) \|", line)
        if m:
            losses[int(m.group(1))] = {"lm_loss": float(m.group(3)), "learning_rate": float(m.group(2))}
            lines.append(line[line.index("iteration="):])
    return losses, lines


def stage_train(args):
    env = upstream_env(args.upstream)
    only = set(args.only.split(",")) if args.only else set(TRAIN_RUNS)
    s = TRAIN_SIZES
    for k, (name, (tp, pp, dtype, *dp)) in enumerate({**TRAIN_RUNS, **OPTIONAL_TRAIN_RUNS}.items()):
        if name not in only:
            continue
        dp = dp[0] if dp else 1
        world = tp * pp * dp
        work = args.work / "train" / name
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copytree(HERE / "data", work / "data", ignore=shutil.ignore_patterns("*.jsonl", "eod_*"))
        (work / "ds_config.json").write_text(json.dumps(ds_config(tp, pp, dtype, world), indent=2) + "\n")
        env["MASTER_PORT"] = str(29700 + k)
        env["LOCAL_SIZE"] = str(world)
        launcher = [Path(sys.executable).parent / "mpiexec", "-n", str(world)]
        entry = [sys.executable, args.upstream / "pretrain_gpt_alcf.py"]
        flags = train_flags(tp, pp, dtype, "checkpoints", s["TRAIN_ITERS"])
        # 1. the saved run: train toward TRAIN_ITERS, save at SAVE_ITER and exit there
        #    (--exit-interval), so the checkpoint directory is exactly as upstream leaves it then
        saved_cmd = [*launcher, *entry, *flags, f"--exit-interval={s['SAVE_ITER']}"]
        out = run(saved_cmd, work, env, log=work / "log_saved.txt")
        saved, saved_lines = parse_losses(out.stdout + out.stderr)
        shutil.copytree(work / "checkpoints", work / "checkpoint_at_save")
        # 2. the same command without the exit: upstream's losses after the save point
        shutil.rmtree(work / "checkpoints")
        cont_cmd = [*launcher, *entry, *flags]
        out = run(cont_cmd, work, env, log=work / "log_continuous.txt")
        continuous, continuous_lines = parse_losses(out.stdout + out.stderr)
        # 3. upstream's own resume from the saved checkpoint, same command
        shutil.rmtree(work / "checkpoints")
        shutil.copytree(work / "checkpoint_at_save", work / "checkpoints")
        out = run(cont_cmd, work, env, log=work / "log_resumed.txt")
        resumed, resumed_lines = parse_losses(out.stdout + out.stderr)
        print(name, "saved", saved, "continuous", continuous, "resumed", resumed, flush=True)

        dest = HERE / "ckpt" / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copytree(work / "checkpoint_at_save", dest / "checkpoints",
                        ignore=shutil.ignore_patterns("zero_to_fp32.py"))
        shutil.copy(work / "ds_config.json", dest / "ds_config.json")
        rel = lambda cmd: " ".join(str(c).replace(str(args.upstream) + "/", "").replace(sys.executable, "python")
                                   .replace(str(Path(sys.executable).parent) + "/", "") for c in cmd)
        (dest / "command.txt").write_text(
            "# run from a directory holding data/ (this fixture's ../../data without the jsonl) and ds_config.json\n"
            "# saved run (writes checkpoints/ at iteration %d and exits):\n%s\n"
            "# continuous run and upstream's own resume (same line, the latter with checkpoints/ = the saved one):\n%s\n"
            % (s["SAVE_ITER"], rel(saved_cmd), rel(cont_cmd)))
        (dest / "losses.json").write_text(json.dumps({
            "layout": {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                       "dtype": dtype, "zero_stage": 1, "world_size": world},
            "saved_iteration": s["SAVE_ITER"], "train_iters": s["TRAIN_ITERS"],
            "saved_run": saved, "continuous_run": continuous, "resumed_run": resumed,
        }, indent=2, sort_keys=True) + "\n")
        (dest / "losses_log.txt").write_text(
            "# saved run\n" + "\n".join(saved_lines) + "\n# continuous run\n" + "\n".join(continuous_lines)
            + "\n# upstream's own resume from checkpoints/\n" + "\n".join(resumed_lines) + "\n")


def logits_tokens():
    """The fixed sequences the logits are computed on: int64 [2, SEQ]."""
    s = TRAIN_SIZES["SEQ"]
    corpus = np.fromfile(HERE / "data" / "corpus_a_text_document.bin", dtype=np.uint16)[:s].astype(np.int64)
    rng = np.random.RandomState(7)
    other = rng.randint(0, VOCAB + 1, size=s).astype(np.int64)  # may hold the end-of-document id VOCAB
    other[s // 2] = VOCAB
    return np.stack([corpus, other])


def stage_logits(args):
    env = upstream_env(args.upstream)
    env["PYTHONPATH"] = f"{args.upstream}{os.pathsep}{HERE}"
    only = set(args.only.split(",")) if args.only else set(TRAIN_RUNS)
    out_dir = HERE / "logits"
    out_dir.mkdir(exist_ok=True)
    np.save(out_dir / "tokens.npy", logits_tokens())
    for k, (name, (tp, pp, dtype, *dp)) in enumerate({**TRAIN_RUNS, **OPTIONAL_TRAIN_RUNS}.items()):
        if name not in only or not (HERE / "ckpt" / name).is_dir():
            continue
        world = tp * pp * (dp[0] if dp else 1)
        work = args.work / "logits" / name
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copytree(HERE / "ckpt" / name / "checkpoints", work / "checkpoints")
        shutil.copy(HERE / "ckpt" / name / "ds_config.json", work / "ds_config.json")
        shutil.copytree(HERE / "data", work / "data", ignore=shutil.ignore_patterns("*.jsonl", "eod_*"))
        # the batch of the first iteration after the save: global samples [SAVE_ITER * GBS, + GBS) of
        # the checkpoint runs' data (order/train_run), as upstream's sequential sampler serves them
        gbs = TRAIN_SIZES["GLOBAL_BATCH"]
        first = TRAIN_SIZES["SAVE_ITER"] * gbs
        batch = np.load(HERE / "order" / "train_run" / "train_tokens.npy")[first:first + gbs]
        np.save(work / "batch.npy", batch)
        env.update(MASTER_PORT=str(29800 + k), LOCAL_SIZE=str(world),
                   TOKENS=str(out_dir / "tokens.npy"), LOGITS=str(work / "logits.npy"),
                   BATCH=str(work / "batch.npy"), BATCH_LOSS=str(work / "batch_loss.npy"))
        cmd = [Path(sys.executable).parent / "mpiexec", "-n", str(world), sys.executable, HERE / "dump_logits.py",
               *train_flags(tp, pp, dtype, "checkpoints", TRAIN_SIZES["TRAIN_ITERS"])]
        run(cmd, work, env, log=work / "log.txt")
        shutil.copy(work / "logits.npy", out_dir / f"{name}.npy")
        shutil.copy(work / "batch_loss.npy", out_dir / f"{name}_next_batch_token_loss.npy")


def pickle_globals(path):
    """The module.name of every global a torch.save zip's pickles reference (read with pickletools, nothing loaded)."""
    import io
    import pickletools
    import zipfile
    found = set()
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".pkl"):
                continue
            strings = []
            for op, arg, _ in pickletools.genops(io.BytesIO(z.read(member))):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.add(f"{strings[-2]}.{strings[-1]}")
    return sorted(found)


def stage_index(args):
    """INDEX.json: every fixture, its layout and files, for the tests that consume them."""
    index = {
        "upstream_commit": "ffa3456d68b630192fcaefcc3288bd18525b8d95",
        "deepspeed": "0.19.4", "torch": "2.13.0+cpu",
        "tokenizer": {"type": "NullTokenizer", "vocab_size_flag": VOCAB, "tokenizer_vocab_size": VOCAB + 1,
                      "eod_id": VOCAB},
        "data": {}, "order": {}, "checkpoints": {}, "logits": {},
    }
    for name, (n_docs, _, _, eod) in CORPORA.items():
        prefix = f"data/{name}_text_document"
        index["data"][name] = {"prefix": prefix, "documents": n_docs, "append_eod": eod, "dtype": "uint16",
                               "bin_tokens": (HERE / f"{prefix}.bin").stat().st_size // 2,
                               "jsonl": f"data/{name}.jsonl"}
    index["data_file_list"] = "data/file_list.txt"
    for case, flags in ORDER_CASES.items():
        d = HERE / "order" / case
        if not d.is_dir():
            continue
        entry = {"dir": f"order/{case}", "flags": ORDER_COMMON + flags,
                 "files": sorted(p.name for p in d.iterdir() if p.is_file()),
                 "cache_files": sorted(p.name for p in (d / "cache").iterdir())}
        for split in ("train", "valid"):
            if (d / f"{split}_tokens.npy").exists():
                entry[f"{split}_samples"] = int(np.load(d / f"{split}_tokens.npy").shape[0])
        index["order"][case] = entry
    for name in TRAIN_RUNS:
        d = HERE / "ckpt" / name
        if not d.is_dir():
            continue
        losses = json.loads((d / "losses.json").read_text())
        step = d / "checkpoints" / f"global_step{losses['saved_iteration']}"
        files = sorted(p.name for p in step.iterdir())
        index["checkpoints"][name] = {
            "dir": f"ckpt/{name}", "load": f"ckpt/{name}/checkpoints", **losses["layout"],
            "iteration": losses["saved_iteration"], "train_iters": losses["train_iters"],
            "padded_vocab_size": 128 * losses["layout"]["tensor_parallel"] * -(-(VOCAB + 1) // (128 * losses["layout"]["tensor_parallel"])),
            "files": files, "losses": f"ckpt/{name}/losses.json", "command": f"ckpt/{name}/command.txt",
            "ds_config": f"ckpt/{name}/ds_config.json",
            "pickle_globals": {f: pickle_globals(step / f) for f in files},
        }
        if (HERE / "logits" / f"{name}.npy").exists():
            index["logits"][name] = {"tokens": "logits/tokens.npy", "logits": f"logits/{name}.npy",
                                     "shape": list(np.load(HERE / "logits" / f"{name}.npy").shape),
                                     "dtype": "float32", "over": "the padded vocabulary",
                                     "next_batch_token_loss": f"logits/{name}_next_batch_token_loss.npy",
                                     "next_batch_samples": "order/train_run train samples 32-39 (iteration 5)"}
    (HERE / "INDEX.json").write_text(json.dumps(index, indent=1) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["data", "order", "train", "logits", "index"], required=True)
    parser.add_argument("--upstream", type=Path, required=True,
                        help="upstream's source extracted at ffa3456d, helpers compiled (README.md: set-up)")
    parser.add_argument("--work", type=Path, required=True, help="a scratch directory for the runs")
    parser.add_argument("--only", default="", help="comma-separated cases or runs of the stage (default: all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    globals()[f"stage_{args.stage}"](args)


if __name__ == "__main__":
    main()
