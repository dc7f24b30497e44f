"""Upstream's AuroraGPT command lines run here unchanged: the flags argonne-lcf/Megatron-DeepSpeed's
ALCF/helpers.sh builds (tests/data/upstream_recipes/, reconstructed from it) train 2 iterations on one CPU rank
with only overrides appended (last flag wins) that shrink the model and the batch, point the data at a tiny
tokenized file list, and name an empty directory as --load (where every upstream recipe begins).

Each passes --accumulate-allreduce-grads-in-fp32 and a DeepSpeed config without data_types (upstream's at pp = 1): the
file decides, as upstream, so gradients accumulate in bf16 (a notice names the overridden flag), and the 2B recipe
runs at ZeRO stage 0 as it asks."""

import json
from pathlib import Path

import numpy as np
import pytest

import engine_cases as ec
from multirank import run_ranks

DATA = Path(__file__).parent / "data" / "upstream_recipes"
RECIPES = ["aurora_7b_adamw", "aurora_2b_sophiag", "aurora_cooldown"]


def upstream_argv(name: str) -> list[str]:
    return [line for line in (DATA / f"{name}.txt").read_text().splitlines() if line and not line.startswith("#")]


def upstream_ds_config(zero_stage: int, global_batch: int, micro_batch: int, gas: int) -> dict:
    """What helpers.sh's generateDSconfig writes for DTYPE=bf16, PP=1 (with these batch values)."""
    cfg = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": 1.0,
           "steps_per_print": 1, "gradient_accumulation_steps": gas, "zero_force_ds_cpu_optimizer": False,
           "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
           "fp16": {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
           "bfloat16": {"enabled": True},
           "flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                              "detailed": True, "output_file": None}}
    if zero_stage in (1, 2):
        cfg["zero_optimization"] = {"stage": zero_stage}
        cfg["comms_logger"] = {"enabled": False, "verbose": False, "debug": False}
    return cfg


def tiny_file_list(root: Path) -> Path:
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    lines = []
    for corpus in ("web", "code"):
        prefix = root / f"{corpus}_text_document"
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
        for _ in range(40):
            n = int(rng.integers(20, 60))
            builder.add_document(rng.integers(1, 255, n), [n])
        builder.finalize(str(prefix) + ".idx")
        lines.append(f"0.5 {prefix} {corpus}")
    path = root / "file_list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    file_list = tiny_file_list(root)
    cases = []
    for name in RECIPES:
        argv = upstream_argv(name)
        zero = int(next(a.split("=")[1] for a in argv if a.startswith("--zero-stage=")))
        ds = root / f"{name}_ds_config.json"
        ds.write_text(json.dumps(upstream_ds_config(zero, global_batch=2, micro_batch=1, gas=2)))
        (root / name / "empty").mkdir(parents=True)
        overrides = [
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-key-value-heads", "2",
            "--ffn-hidden-size", "128", "--seq-length", "32", "--max-position-embeddings", "512",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--deepspeed_config", str(ds),
            "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "2",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--data-file-list", str(file_list),
            "--data-cache-path", str(root / name / "cache"), "--distributed-backend", "gloo", "--num-workers", "0",
            "--load", str(root / name / "empty"), "--save", str(root / name / "ckpt"),
            "--tensorboard-dir", str(root / name / "tb"),
        ]
        cases.append((name, argv + overrides))
    return root, run_ranks(1, ec.run_main_cases, cases, timeout=600)[0]


@pytest.mark.parametrize("name", RECIPES)
def test_upstream_recipe_trains_two_iterations_from_an_empty_load_directory(ran, name):
    root, results = ran
    code, err = results[name]
    assert code == 0, err[-3000:]
    assert (root / name / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
