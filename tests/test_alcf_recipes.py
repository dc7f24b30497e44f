"""The ALCF recipes take upstream's knobs (argonne-lcf/Megatron-DeepSpeed ALCF/helpers.sh names and defaults),
refuse unknown or conflicting ones before launching, follow Aurora's launch conventions, and DRY_RUN=1 prints
the resolved run of every recipe."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.config.arguments import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ALCF"))
import recipe  # noqa: E402  (ALCF/recipe.py)

RECIPES = sorted(p.name for p in (ROOT / "ALCF").glob("train_*.sh"))


def _hosts(tmp_path, n=2) -> str:
    path = tmp_path / f"nodefile{n}"
    path.write_text("".join(f"x4000c0s{i}b0n0\n" for i in range(n)))
    return str(path)


def _run(machine, env, extra=()):
    r = recipe.resolve(machine, env, list(extra))
    return r, parse_args(r["flags"])


def test_upstream_defaults_on_two_aurora_nodes(tmp_path):
    r, run = _run("aurora", {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1"})
    assert r["world_size"] == 24
    m, t = run.model, run.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.ffn_hidden_size,
            m.seq_length) == (32, 4096, 32, 8, 11008, 4096)  # upstream's default MODEL_ARCH=7B
    assert m.rope_theta == 50000 and m.max_position_embeddings == 16 * 4096 and m.word_embedding_init_std == 0.632455532
    # 2 hosts: GRAD_ACC_STEPS 16 (get_grad_acc_steps_on_aurora), GLOBAL_BATCH = 24 × 1 × 16
    assert (t.micro_batch_size, t.global_batch_size, t.zero.zero_stage) == (1, 384, 1)
    assert t.train_iters == 4673780159710 // 4096 // 384  # TRAIN_TOKENS default
    o = t.optimizer
    assert (o.optimizer, o.lr, o.lr_decay_style, o.lr_warmup_fraction, o.weight_decay) == \
        ("adamw", 2e-4, "cosine", 0.05, 0.1)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (0.9, 0.95, 1e-5, 1.0)
    # upstream's DeepSpeed config has no data_types at pp = 1: bf16 accumulation (ZeRO-1), whatever its flag says
    assert t.precision.bf16 and not t.precision.accumulate_allreduce_grads_in_fp32
    assert run.logging.timing_log_level == 1 and run.logging.log_interval == 1
    assert run.parallel.distributed_backend == "ccl" and t.eval_iters == 20 and t.eval_interval == 100


def test_knobs_reach_the_run(tmp_path):
    env = {"PBS_NODEFILE": _hosts(tmp_path, 4), "MOCK_DATA": "1", "MODEL_ARCH": "AuroraGPT-2B", "TP": "2",
           "GRAD_ACC_STEPS": "2", "OPT": "sgd", "ADAM_EPS": "1e-6", "ADAM_BETA1": "0.8", "ROPE_THETA": "10000",
           "LR": "3e-4", "LR_WARMUP_FRAC": "0.1", "LR_DECAY_ITERS": "500", "TRAIN_ITERS": "700", "ZERO_STAGE": "2",
           "USE_ACTIVATION_CHECKPOINTING": "1", "ACT_CKPT_NUM_LAYERS": "2", "TIMING_LOG_LEVEL": "2",
           "DTYPE": "fp32", "LOG_INTERVAL": "10", "SAVE_INTERVAL": "7", "CKPT_DIR": "/lus/ckpt"}
    r, run = _run("aurora", env)
    m, t = run.model, run.training
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.seq_length, m.num_key_value_heads) == \
        (12, 2048, 11008, 8192, 4)  # upstream's AuroraGPT-2B: FFN 11008, SEQ 8192
    assert run.parallel.tp == 2 and t.global_batch_size == 48 // 2 * 2 and t.train_iters == 700
    assert t.optimizer.optimizer == "sgd" and t.optimizer.adam_eps == 1e-6 and t.optimizer.adam_beta1 == 0.8
    assert m.rope_theta == 10000 and t.optimizer.lr_decay_iters == 500 and t.optimizer.lr_warmup_fraction == 0.1
    assert t.zero.zero_stage == 2 and m.checkpoint_activations and m.checkpoint_num_layers == 2
    assert run.logging.timing_log_level == 2 and not t.precision.bf16 and run.logging.log_interval == 10
    assert run.checkpoint.load == run.checkpoint.save == "/lus/ckpt" and run.checkpoint.save_interval == 7
    assert run.logging.tensorboard_dir == "/lus/ckpt/tensorboard"


def test_presets_equal_upstreams_model_definitions():
    from megatron.config.presets import PRESETS

    assert PRESETS["auroragpt-2b"]["ffn_hidden_size"] == 11008 and PRESETS["auroragpt-70b"]["seq_length"] == 8192
    r, run = _run("polaris", {"MOCK_DATA": "1", "MODEL_ARCH": "70B", "WORLD_SIZE": "64", "TP": "8", "PP": "8"})
    assert (run.model.num_layers, run.model.hidden_size, run.model.seq_length) == (80, 8192, 8192)
    assert run.training.precision.fp16 and run.training.global_batch_size == 8  # Polaris: fp16, GAS 8


@pytest.mark.parametrize("env, message", [
    ({"GRAD_ACC_STEP": "2"}, "unknown knob GRAD_ACC_STEP; did you mean GRAD_ACC_STEPS?"),
    ({"MODEL_PRESET": "auroragpt-2b"}, "MODEL_PRESET: use MODEL_ARCH"),
    ({"KV_HEADS": "4"}, "KV_HEADS: use NUM_KV_HEAD"),
    ({"OPT": "adamw", "OPTIMIZER": "sophiag"}, "these knobs disagree: OPT=adamw, OPTIMIZER=sophiag"),
    ({"MODEL_ARCH": "AuroraGPT-2B", "HIDDEN": "4096"}, "HIDDEN=4096 disagrees with MODEL_ARCH=AuroraGPT-2B"),
    ({"TRAIN_TOKENS": "1000000", "TRAIN_ITERS": "10"}, "TRAIN_TOKENS=1000000 and TRAIN_ITERS=10 both given"),
    ({"GLOBAL_BATCH": "100", "GRAD_ACC_STEPS": "2"}, "GLOBAL_BATCH=100 disagrees with MICRO_BATCH 1 × DP 24"),
    ({"MODEL_ARCH": "13B"}, "MODEL_ARCH=13B is not one of upstream's architectures"),
    ({"LAUNCH_WITH": "deepspeed"}, "LAUNCH_WITH=deepspeed: these recipes launch with mpiexec only"),
])
def test_unknown_or_conflicting_knobs_are_errors(tmp_path, env, message):
    with pytest.raises(recipe.RecipeError) as e:
        recipe.resolve("aurora", {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", **env}, [])
    assert message in str(e.value)


def _bash(script, env, tmp_path, *args):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    marker = tmp_path / "launched"
    (fake_bin / "mpiexec").write_text(f"#!/bin/sh\necho launched > {marker}\necho mpiexec says hello\n"
                                      "echo mpiexec warns >&2\nexit 0\n")
    (fake_bin / "mpiexec").chmod(0o755)
    full = {"PATH": f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
            "PYTHONPATH": str(ROOT), "LOAD_MODULES": "0", "PBS_NODEFILE": _hosts(tmp_path),
            "VIRTUAL_ENV": sys.prefix, **env}
    # a copy of ALCF/ under tmp_path: a launched recipe writes logs/ and checkpoints/ in its repository root
    repo = tmp_path / "repo"
    if not repo.exists():
        shutil.copytree(ROOT / "ALCF", repo / "ALCF")
    proc = subprocess.run(["bash", str(repo / "ALCF" / script), *args], env=full, capture_output=True, text=True,
                          timeout=300)
    return proc, marker.exists()


def test_a_bad_knob_stops_the_recipe_before_mpiexec(tmp_path):
    proc, launched = _bash("train_aurora.sh", {"MOCK_DATA": "1", "ZERO_STAGES": "2"}, tmp_path)
    assert proc.returncode == 2 and "unknown knob ZERO_STAGES; did you mean ZERO_STAGE?" in proc.stderr
    assert not launched
    proc, launched = _bash("train_aurora.sh", {"MOCK_DATA": "1"}, tmp_path, "--seq-length", "100")
    assert proc.returncode == 0 and launched and "mpiexec --envall --np=24 --ppn=12" in proc.stdout


@pytest.mark.parametrize("script", RECIPES)
def test_dry_run_prints_the_resolved_run_of_every_recipe(tmp_path, script):
    proc, launched = _bash(script, {"DRY_RUN": "1", "MOCK_DATA": "1", "VOCAB_SIZE": "32000"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert not launched
    for part in ("== launch", "mpiexec --envall", "--hostfile=", "pretrain_gpt_alcf.py", "== layout",
                 "== DeepSpeed config", '"train_batch_size"', "== blend", "== model", "parameters:",
                 "memory per device (estimate):"):
        assert part in out, part
    if script == "train_aurora.sh":
        assert "--ppn=12" in out and "--cpu-bind=list:2-4:10-12:18-20" in out and "--line-buffer" in out
        assert "CCL_ATL_TRANSPORT=ofi" in out and "FI_PROVIDER=cxi" in out
        assert "world 24 = tp 1 × sp 1 × dp 24 × pp 1" in out
    else:
        assert "--ppn=4" in out and "world 8 = tp 1 × sp 1 × dp 8 × pp 1" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "ALCF").glob("*.sh")))
def test_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "ALCF" / script)], check=True)


# Upstream's run directories (ALCF/helpers.sh get_output_prefix) for its three AuroraGPT recipes: the 7B defaults
# and train_aGPT_2B_sophiag_stage2.sh on 2 Aurora nodes, and ALCF/notes/cooldown.md on 256 nodes (its log shows
# "checkpoints/AuroraGPT-2B-ws3072-...-optipex.fusedlamb-lr0.0002-lwf0.05_ntok0B_flash/tensorboard").
UPSTREAM_RUNS = {
    "7b": ({}, 2, "AuroraGPT-7B-ws24-ds-stage1-nl32-hs4096-mb1-seq4096-gb384-sp1-pp1-tp1-bf16-optadamw-lr0.0002"
                  "-lwf0.05_ntok4673B_flash"),
    "2b": ({"MODEL_ARCH": "AuroraGPT-2B", "TRAIN_TOKENS": "7064155541716", "OPT": "sophiag", "LR": "2.17e-5",
            "GRAD_ACC_STEPS": "2", "MICRO_BATCH": "1", "USE_ACTIVATION_CHECKPOINTING": "0", "ZERO_STAGE": "0",
            "LR_DECAY_STYLE": "constant", "TOKENIZER_TYPE": "HFTokenizer", "TOKENIZER_MODEL": "google/gemma-7b"}, 2,
           "AuroraGPT-2B-ws24-ds-stage0-nl12-hs2048-mb1-seq8192-gb48-sp1-pp1-tp1-bf16-optsophiag-lr2.17e-5-lwf0.05"
           "_ntok7064B_tokHF_tmgoogle_gemma-7b_flash"),
    "cooldown": ({"MODEL_ARCH": "AuroraGPT-2B", "LR_DECAY_STYLE": "constant", "LR": "0.0002", "OPT": "ipex.fusedlamb",
                  "OVERRIDE_CKPT_OPT_PARAM": "1", "TRAIN_ITERS": "137650", "GRAD_ACC_STEPS": "2",
                  "LOAD": "test_rollback"}, 256,
                 "AuroraGPT-2B-ws3072-ds-stage1-nl12-hs2048-mb1-seq8192-gb6144-sp1-pp1-tp1-bf16-optipex.fusedlamb"
                 "-lr0.0002-lwf0.05_ntok0B_flash"),
}
COOLDOWN_ARGS = ["--lr_constant_plus_cooldown", "--lr_constant_plus_cooldown_frac=0.9", "--min-lr=2e-5",
                 "--override-opt_param-scheduler"]


@pytest.mark.parametrize("name", sorted(UPSTREAM_RUNS))
def test_dry_run_prints_upstreams_exact_run_directory(tmp_path, name):
    env, hosts, prefix = UPSTREAM_RUNS[name]
    full = {**env, "DRY_RUN": "1", "MOCK_DATA": "1", "PBS_NODEFILE": _hosts(tmp_path, hosts)}
    proc, launched = _bash("train_aurora.sh", full, tmp_path, *(COOLDOWN_ARGS if name == "cooldown" else []))
    assert proc.returncode == 0 and not launched, proc.stderr[-3000:]
    assert f"checkpoints: checkpoints/{prefix}\n" in proc.stdout
    world = 12 * hosts
    assert re.search(rf"log: logs/{re.escape(prefix)}/\d{{8}}-\d{{6}}_{world}_{re.escape(socket.gethostname())}"
                     r"/output.log\n", proc.stdout), proc.stdout[:2000]
    r, run = _run("aurora", {**env, "MOCK_DATA": "1", "PBS_NODEFILE": _hosts(tmp_path, hosts)})
    assert run.checkpoint.save == f"checkpoints/{prefix}"  # a relaunch resumes from upstream's directory
    assert run.checkpoint.load == ("test_rollback" if name == "cooldown" else f"checkpoints/{prefix}")
    assert run.logging.tensorboard_dir == f"checkpoints/{prefix}/tensorboard"


@pytest.mark.parametrize("knobs, suffix", [
    ({"LR_DECAY_ITERS": "500"}, "_ntok4673B_ldi500_flash"),
    ({"NO_FLASH_ATTN": "1", "TOKENIZER_TYPE": "Llama2Tokenizer"}, "_ntok4673B_tokLlama2"),
    ({"TRAIN_TOKENS": "2000000000000", "TOKENIZER_MODEL": "meta-llama/Llama-2-7b-hf"},
     "_ntok2000B_tmmeta-llama_Llama-2-7b-hf_flash"),
    ({"MODEL_ARCH": "smollm3-3B", "NLAYERS": "8"}, "_ntok4673B_flash"),
])
def test_run_directory_suffixes_follow_upstreams_knobs(tmp_path, knobs, suffix):
    r = recipe.resolve("aurora", {"MOCK_DATA": "1", "PBS_NODEFILE": _hosts(tmp_path), **knobs}, [])
    assert r["output_prefix"].endswith(suffix) and r["ckpt_dir"] == f"checkpoints/{r['output_prefix']}"
    if "MODEL_ARCH" in knobs:
        assert r["output_prefix"].startswith("smollm3-nLayers8-ws24-ds-stage1-nl8-hs2048-")


def test_a_launched_recipe_tees_its_output_and_saves_the_environment_as_upstream(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc, launched = _bash("train_aurora.sh", {"MOCK_DATA": "1", "CKPT_DIR": str(ckpt), "MY_KNOB_VALUE": "42"},
                           tmp_path)
    assert proc.returncode == 0 and launched, proc.stderr[-3000:]
    repo = tmp_path / "repo"
    logs = [Path(line) for line in (repo / "logs" / "latest").read_text().splitlines()]
    assert len(logs) == 1 and logs[0].parts[0] == "logs" and logs[0].name == "output.log"
    prefix = recipe.resolve("aurora", {"MOCK_DATA": "1", "PBS_NODEFILE": _hosts(tmp_path)}, [])["output_prefix"]
    assert logs[0].parts[1] == prefix  # named after the run even when CKPT_DIR is given, as upstream
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}_24_{re.escape(socket.gethostname())}", logs[0].parts[2])
    text = (repo / logs[0]).read_text()
    assert text.startswith("CCL_KVS_MODE=mpi ") and "mpiexec --envall --np=24" in text.splitlines()[0]
    assert f"Output will be saved to {logs[0]}" in text
    assert "mpiexec says hello" in text and "mpiexec warns" in text  # stdout and stderr, as |& tee
    assert "mpiexec says hello" in proc.stdout
    dotenv = (ckpt / ".env").read_text().splitlines()
    assert "MY_KNOB_VALUE=42" in dotenv and "MOCK_DATA=1" in dotenv


def _upstream_ds_config(dtype, zero, pp, cpu_optimizer) -> dict:
    """The settings of upstream's generateDSconfig (ALCF/helpers.sh) that decide the accumulation dtype."""
    cfg = {"bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}
    if zero in (1, 2, 3):
        cfg["zero_optimization"] = {"stage": zero}
        if cpu_optimizer and zero in (1, 2):
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if zero in (1, 2) and pp > 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def _deepspeed_accumulation_dtype(cfg: dict) -> str:
    """DeepSpeed 0.19.8's choice (engine.get_data_types / _do_optimizer_sanity_check): fp32 accumulation for bf16
    only at ZeRO stage 1 without CPU offload (its BF16 optimizer); the model's dtype everywhere else."""
    model = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
    zero = cfg.get("zero_optimization", {})
    asked = cfg.get("data_types", {}).get("grad_accum_dtype", model)
    offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
    if model == "bf16" and asked == "fp32" and zero.get("stage", 0) == 1 and not offload:
        return "fp32"
    return model


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_gradient_accumulation_dtype_equals_upstreams_for_every_knob_setting(tmp_path, dtype):
    """Upstream's DeepSpeed config decides its accumulation dtype (its --accumulate-allreduce-grads-in-fp32 never
    reaches DeepSpeed): data_types.grad_accum_dtype = fp32 only at pp > 1. The config generated from our
    recipe's flags accumulates in the same dtype for every knob setting, and states fp32 wherever upstream's
    fp32 takes effect."""
    from megatron.training.ds_config import generate_deepspeed_config

    checked = 0
    for zero in (0, 1, 2, 3):
        for pp in (1, 2):
            for cpu in (False, True):
                env = {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", "DTYPE": dtype, "ZERO_STAGE": str(zero),
                       "PP": str(pp), "MODEL_ARCH": "AuroraGPT-2B", **({"CPU_OPTIMIZER": "1"} if cpu else {})}
                try:
                    r, run = _run("aurora", env)
                except ConfigError:
                    continue  # refused here (ZeRO-2/3 with pp > 1, --cpu-optimizer at ZeRO-0): not a silent change
                ours = generate_deepspeed_config(run, dp_size=24 // pp)
                theirs = _upstream_ds_config(dtype, zero, pp, cpu)
                assert _deepspeed_accumulation_dtype(ours) == _deepspeed_accumulation_dtype(theirs), (zero, pp, cpu)
                if dtype == "bf16" and _deepspeed_accumulation_dtype(theirs) == "fp32":  # upstream's fp32 counts
                    assert ours["data_types"] == theirs["data_types"]
                checked += 1
    assert checked >= 8
    r, run = _run("aurora", {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", "DTYPE": dtype})
    assert "data_types" not in generate_deepspeed_config(run, dp_size=24)  # the default Aurora run: pp = 1
    if dtype == "bf16":
        r, run = _run("aurora", {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", "PP": "2"})
        assert generate_deepspeed_config(run, dp_size=12)["data_types"] == {"grad_accum_dtype": "fp32"}


WHOLE_MATRIX = ("muon", "muonclip", "dshampooadamw", "galoreadamw", "adam8bit")


def test_whole_matrix_optimizers_take_auroras_default_bf16_at_zero_1_and_2(tmp_path):
    for opt in WHOLE_MATRIX:
        for zero in ("1", "2"):
            env = {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", "OPT": opt, "ZERO_STAGE": zero}
            r, run = _run("aurora", env)
            t = run.training
            assert (t.optimizer.optimizer, t.precision.bf16, t.zero.zero_stage) == (opt, True, int(zero))
            assert f"-bf16-opt{opt}-" in r["output_prefix"]  # upstream's run directory names the optimizer
            assert recipe.run_errors(r) == [], (opt, zero)


@pytest.mark.parametrize("machine, env, message", [
    ("aurora", {"OPT": "muon", "ZERO_STAGE": "3"}, "--optimizer muon needs whole matrices, which --zero-stage 3"),
    ("aurora", {"OPT": "galoreadamw8bit"}, "runs on CUDA only (it synchronises the CUDA device), not on xpu"),
    ("polaris", {"OPT": "muon", "DTYPE": "fp16", "PP": "2", "WORLD_SIZE": "8"}, "--fp16 scales the loss itself"),
])
def test_a_combination_the_engine_refuses_is_named_before_launch(tmp_path, machine, env, message):
    r, _ = _run(machine, {"PBS_NODEFILE": _hosts(tmp_path), "MOCK_DATA": "1", **env})
    assert any(message in line for line in recipe.run_errors(r))


def test_a_refused_optimizer_stops_the_recipe_before_mpiexec(tmp_path):
    proc, launched = _bash("train_aurora.sh", {"MOCK_DATA": "1", "OPT": "muon", "ZERO_STAGE": "3"}, tmp_path)
    assert proc.returncode == 2 and not launched
    assert "ALCF recipe: OPT=muon DTYPE=bf16 ZERO_STAGE=3 PP=1 TP=1 cannot run on aurora (xpu)" in proc.stderr
    assert "--zero-stage 3" in proc.stderr
