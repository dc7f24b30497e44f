"""Upstream's ALCF recipe knobs → pretrain_gpt_alcf.py flags and the machine's mpiexec line.

    MODEL_ARCH=AuroraGPT-2B OPT=sophiag GRAD_ACC_STEPS=2 python3 ALCF/recipe.py aurora [extra flags...]
    DRY_RUN=1 bash ALCF/train_aurora.sh             # print the resolved run, launch nothing

The environment variables are argonne-lcf/Megatron-DeepSpeed's (`ALCF/helpers.sh`: setParams, setup_run_cmd,
set_args, get_model_arch_*), with its defaults, and the flags are the ones its `setup_run_cmd` builds, so a
recipe moves over unchanged. The run is named as upstream names it (get_output_prefix): checkpoints, TensorBoard
and a relaunch's --load in checkpoints/<prefix> (CKPT_DIR overrides), the whole output teed to
logs/<prefix>/<%Y%m%d-%H%M%S>_<WORLD_SIZE>_<HOSTNAME>/output.log (listed in logs/latest), and the environment
saved to CKPT_DIR/.env (upstream's save_dotenv), all relative to the repository root. Differences, each on purpose:
  - a knob this file does not know (a misspelling, or one of upstream's we do not support) and two knobs that
    disagree (OPT vs OPTIMIZER, GLOBAL_BATCH vs MICRO_BATCH × DP × GRAD_ACC_STEPS, HIDDEN under a fixed
    MODEL_ARCH, ...) are errors before launch; upstream silently takes one of them;
  - flags given after the script name come last, so they win (upstream puts them before its own);
  - no DeepSpeed JSON file is written: the flags carry the same settings and pretrain_gpt.py generates it
    (DRY_RUN=1 prints it); DATA_FILE_LIST has no machine default (we ship no data lists);
  - --accumulate-allreduce-grads-in-fp32 is passed only where upstream's run accumulates in fp32: upstream passes
    the flag always, but its DeepSpeed config decides, and that asks for data_types.grad_accum_dtype = fp32 only
    at pp > 1 (ZeRO 1/2), which DeepSpeed honours for bf16 at ZeRO stage 1 without CPU offload (its BF16
    optimizer). So the default Aurora run (bf16, ZeRO-1, pp = 1) accumulates in bf16, as upstream's does;
  - OPT passes any of our --optimizer names through, as upstream's does (`--optimizer=${OPT}`), the
    whole-matrix ones (muon, muonclip, dshampooadamw, galoreadamw, adam8bit, galoreadamw8bit) with the machine's
    default DTYPE and ZERO_STAGE=1 or 2 as well; what the engine would refuse on the machine's accelerator (an
    optimizer at ZERO_STAGE=3, galoreadamw8bit on Aurora's XPUs, fp16 where it cannot run, ...) is an error
    before launch (`run_errors`), where upstream's job would fail (or run another update) after the queue;
  - our additions: MOCK_DATA=1 (random tokens, VOCAB_SIZE), CPU_OPTIMIZER=1, WANDB_PROJECT, PEAK_TFLOPS,
    DRY_RUN=1, CPU_BIND.
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# MODEL_ARCH (upstream's spellings) → (preset name, knobs the user may override, NLAYERS default when overridable)
_ARCH_ALIASES = {
    "auroragpt-7b": ("7B", "AuroraGPT-7B", "aurora-gpt-7b", "llama-3.1-7B", "llama-3.1-7b", "llama-3.2-7B",
                     "llama-3.2-7b"),
    "auroragpt-2b": ("2B", "AuroraGPT-2B", "AuroraGPT_2B", "Aurora-GPT-2B", "AuroraGPT2B", "Aurora_GPT_2B",
                     "aurora-gpt-2b", "aurora_gpt_2b"),
    "auroragpt-70b": ("70B",),
    "auroragpt-33b": ("33B", "llama-3.2-33B", "llama-3.2-33b"),
    "llama3-3b": ("llama3-3B", "llama-3B"),
    "smollm3-3b": ("smollm3-3B", "smollm3_3B"),
    "phi4-mini": ("phi4-mini", "phi4_mini"),
}
ARCHS = {alias: preset for preset, aliases in _ARCH_ALIASES.items() for alias in aliases}
# Knobs upstream lets the user override per architecture (the others are fixed by get_model_arch_*).
_OVERRIDABLE = {"auroragpt-7b": {"HEADS", "NLAYERS", "HIDDEN", "NUM_KV_HEAD", "FFN_HIDDEN_SIZE", "SEQ"},
                "llama3-3b": {"NLAYERS"}, "smollm3-3b": {"NLAYERS"}, "phi4-mini": {"NLAYERS"}}
# Upstream's custom-nLayers architectures default to fewer layers than the full model.
_NLAYERS_DEFAULT = {"smollm3-3b": 24, "phi4-mini": 24}
# get_model_arch_33B also fixes the run's layout.
_ARCH_RUN = {"auroragpt-33b": {"TP": "6", "ZERO_STAGE": "2", "GRAD_ACC_STEPS": "1", "MICRO_BATCH": "1"}}
_MODEL_KNOBS = {"HEADS": "num_attention_heads", "NLAYERS": "num_layers", "HIDDEN": "hidden_size",
                "NUM_KV_HEAD": "num_key_value_heads", "FFN_HIDDEN_SIZE": "ffn_hidden_size", "SEQ": "seq_length"}

MACHINES = {
    "aurora": dict(ngpu_per_host=12, dtype="bf16", backend_knob="CCL", backend="ccl", flash="--use-flash-attn-builder",
                   peak_tflops="229", device="xpu"),
    "polaris": dict(ngpu_per_host=4, dtype="fp16", backend_knob="NCCL", backend="nccl", flash="--use-flash-attn-v2",
                    peak_tflops="312", device="cuda"),
}
# Aurora: the cores ezpz binds (upstream's launcher); 0-1, 52-53 and the CCL worker cores stay free.
AURORA_CPU_BIND = "list:2-4:10-12:18-20:26-28:34-36:42-44:54-56:62-64:70-72:78-80:86-88:94-96"
# Aurora: upstream's CCL/FI environment (set_ccl_vars_on_aurora, update_ccl_env_vars_aurora); the user's values win.
AURORA_ENV = {
    "CCL_KVS_MODE": "mpi", "CCL_CONFIGURATION_PATH": "", "CCL_CONFIGURATION": "cpu_gpu_dpcpp",
    "CCL_KVS_CONNECTION_TIMEOUT": "3600", "FI_CXI_RX_MATCH_MODE": "hybrid", "CCL_BCAST": "double_tree",
    "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1", "CCL_PROCESS_LAUNCHER": "pmix", "FI_PROVIDER": "cxi", "PALS_PMI": "pmix",
    "CCL_ATL_TRANSPORT": "ofi", "TORCH_LLM_ALLREDUCE": "1", "CCL_SYCL_ESIMD": "1",
    "CCL_ALLGATHERV_MEDIUM_SIZE_THRESHOLD": "0", "CCL_ENABLE_SYCL_KERNELS": "1",
    "CCL_WORKER_AFFINITY": "5,13,21,29,37,45,57,65,73,81,89,97", "CCL_ZE_CACHE_OPEN_IPC_HANDLES_THRESHOLD": "32768",
    "FI_CXI_DEFAULT_CQ_SIZE": "1048576", "NUMEXPR_MAX_THREADS": "16",
}

# Every knob read here (upstream's names, then ours).
KNOWN = {
    "MODEL_ARCH", "HEADS", "NHEADS", "NLAYERS", "NUM_LAYERS", "HIDDEN", "NUM_KV_HEAD", "FFN_HIDDEN_SIZE", "SEQ",
    "TP", "PP", "SP", "ZERO_STAGE", "MICRO_BATCH", "GRAD_ACC_STEPS", "GLOBAL_BATCH", "TRAIN_TOKENS", "TRAIN_ITERS",
    "TRAIN_ITER", "LR", "LR_DECAY_STYLE", "LR_WARMUP_FRAC", "LR_DECAY_ITERS", "OPT", "OPTIMIZER", "OPTIM",
    "WEIGHT_DECAY", "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPS", "CLIP_GRAD", "DTYPE", "TIMING_LOG_LEVEL",
    "ACT_CKPT_NUM_LAYERS", "USE_ACTIVATION_CHECKPOINTING", "ROPE_THETA", "EVAL_INTERVAL", "EVAL_ITERS",
    "LOG_INTERVAL", "SAVE_INTERVAL", "TRAIN_SPLIT", "VAL_SPLIT", "TEST_SPLIT", "DATA_FILE_LIST", "TOKENIZER_TYPE",
    "TOKENIZER_MODEL", "CKPT_DIR", "LOAD", "SAVE", "NO_TENSORBOARD", "OVERRIDE_CKPT_OPT_PARAM", "NO_FLASH_ATTN",
    "NO_LLAMA", "DATA_CACHE_PATH", "NGPU_PER_HOST", "HOSTFILE", "PBS_NODEFILE", "WORLD_SIZE", "CCL", "NCCL",
    "LAUNCH_WITH", "LAUNCH_CMD", "DEBUG",
    "MOCK_DATA", "VOCAB_SIZE", "CPU_OPTIMIZER", "WANDB_PROJECT", "PEAK_TFLOPS", "DRY_RUN", "CPU_BIND", "LOAD_MODULES",
}
# Names this framework's earlier recipes used: say the upstream name instead.
RENAMED = {"MODEL_PRESET": "MODEL_ARCH", "KV_HEADS": "NUM_KV_HEAD", "FFN": "FFN_HIDDEN_SIZE",
           "LR_WARMUP_FRACTION": "LR_WARMUP_FRAC", "ACT_CKPT": "USE_ACTIVATION_CHECKPOINTING",
           "ACT_CKPT_LAYERS": "ACT_CKPT_NUM_LAYERS", "GLOBAL_BATCH_SIZE": "GLOBAL_BATCH", "MICRO_BATCH_SIZE":
           "MICRO_BATCH", "BACKEND": "CCL (Aurora) or NCCL (Polaris)",
           "EXTRA_FLAGS": "flags after the script name (bash ALCF/train_aurora.sh --flag value)",
           "DATA_PATH": "DATA_FILE_LIST (a file of 'weight prefix [corpus]' lines)",
           "MIN_LR": "--min-lr after the script name", "SEED": "--seed after the script name",
           "TENSORBOARD_DIR": "CKPT_DIR (TensorBoard writes to CKPT_DIR/tensorboard)",
           "VOCAB_FILE": "--vocab-file after the script name", "MERGE_FILE": "--merge-file after the script name",
           "MEGATRON_SP": "--sequence-parallel after the script name"}
# Upstream knobs that ask for something this framework does not do.
UNSUPPORTED = {"DS_CONFIG": "the DeepSpeed config is generated from the flags (DRY_RUN=1 prints it)",
               "OPT_PARAM_SCHEDULER": "use OVERRIDE_CKPT_OPT_PARAM=1 or the scheduler flags"}


class RecipeError(ValueError):
    pass


def _get(env: dict, name: str, default=None):
    value = env.get(name)
    return default if value is None or value == "" else value


def check_knobs(env: dict) -> list[str]:
    """Unknown knobs (misspellings of known ones, renamed or unsupported ones) and knobs that disagree."""
    errors = []
    for name in sorted(env):
        if name in KNOWN:
            continue
        if name in RENAMED:
            errors.append(f"{name}: use {RENAMED[name]} (upstream's name)")
        elif name in UNSUPPORTED:
            errors.append(f"{name}: not supported: {UNSUPPORTED[name]}")
        else:
            close = difflib.get_close_matches(name, sorted(KNOWN), n=1, cutoff=0.85)
            if close and name.isupper():
                errors.append(f"unknown knob {name}; did you mean {close[0]}?")
    for names in (("OPT", "OPTIMIZER", "OPTIM"), ("HEADS", "NHEADS"), ("NLAYERS", "NUM_LAYERS"),
                  ("TRAIN_ITERS", "TRAIN_ITER")):
        given = {n: env[n] for n in names if _get(env, n) is not None}
        if len(set(given.values())) > 1:
            errors.append("these knobs disagree: " + ", ".join(f"{n}={v}" for n, v in given.items()))
    if _get(env, "TRAIN_TOKENS") and (_get(env, "TRAIN_ITERS") or _get(env, "TRAIN_ITER")):
        errors.append(f"TRAIN_TOKENS={env['TRAIN_TOKENS']} and TRAIN_ITERS={_get(env, 'TRAIN_ITERS') or env['TRAIN_ITER']} "
                      "both given: give one (upstream silently takes TRAIN_TOKENS)")
    if _get(env, "MOCK_DATA") == "1" and _get(env, "DATA_FILE_LIST"):
        errors.append("MOCK_DATA=1 and DATA_FILE_LIST both given: drop one")
    launcher = _get(env, "LAUNCH_WITH") or _get(env, "LAUNCH_CMD")
    if launcher and launcher.lower() not in ("mpich", "mpiexec"):
        errors.append(f"LAUNCH_WITH={launcher}: these recipes launch with mpiexec only (the deepspeed launcher "
                      "is not supported)")
    return errors


def _num_hosts(env: dict) -> int:
    hostfile = _get(env, "HOSTFILE") or _get(env, "PBS_NODEFILE")
    if not hostfile:
        return 1
    try:
        with open(hostfile) as f:
            return max(1, sum(1 for line in f if line.strip()))
    except OSError as e:
        raise RecipeError(f"HOSTFILE/PBS_NODEFILE {hostfile}: {e.strerror}") from None


def aurora_grad_acc_steps(nhosts: int) -> int:
    """Upstream's get_grad_acc_steps_on_aurora: fewer accumulation steps on more nodes."""
    if nhosts >= 256:
        return 1
    if 128 <= nhosts < 256:
        return 2
    if 32 < nhosts < 129:
        return 4
    if 16 <= nhosts <= 32:
        return 8
    return 16


def bc_init_method_std(hidden: int) -> str:
    """Upstream's `echo "scale=6; sqrt(2 / (5 * HIDDEN))" | bc -l`: the quotient truncated to 6 decimals, then
    the root truncated to 6 decimals, printed without the leading 0 (.009848 for HIDDEN=4096)."""
    import math

    quotient = (2 * 10**6 // (5 * hidden)) / 10**6
    root = math.isqrt(int(round(quotient * 10**12))) / 10**6
    text = f"{root:.6f}"
    return text[1:] if text.startswith("0.") else text


def _int(env: dict, name: str, default) -> int:
    value = _get(env, name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name}={value!r} is not an integer") from None


def upstream_grad_accum_dtype(zero_stage: int, pp: int) -> "str | None":
    """data_types.grad_accum_dtype in the DeepSpeed config upstream's generateDSconfig writes: fp32 at ZeRO 1/2
    with pipeline parallelism (pp > 1), otherwise none (DeepSpeed's default: the model's dtype)."""
    return "fp32" if zero_stage in (1, 2) and pp > 1 else None


def fp32_accumulation(dtype: str, zero_stage: int, pp: int, cpu_optimizer: bool) -> bool:
    """Whether upstream's run accumulates gradients in fp32: its DeepSpeed config decides (its
    --accumulate-allreduce-grads-in-fp32 never reaches DeepSpeed), and DeepSpeed uses that config's fp32 only for
    bf16 at ZeRO stage 1 without CPU offload (its BF16 optimizer); elsewhere the run's dtype, here as there."""
    return (upstream_grad_accum_dtype(zero_stage, pp) == "fp32" and dtype == "bf16" and zero_stage == 1
            and not cpu_optimizer)


def upstream_model_arch(preset: str, nlayers: int) -> str:
    """The MODEL_ARCH that upstream's get_model_arch_* exports (it names the run directory)."""
    return {"auroragpt-7b": "AuroraGPT-7B", "auroragpt-2b": "AuroraGPT-2B", "auroragpt-70b": "AuroraGPT-70B",
            "auroragpt-33b": "AuroraGPT-33B", "llama3-3b": f"llama3-3B-nLayers{nlayers}",
            "smollm3-3b": f"smollm3-nLayers{nlayers}", "phi4-mini": f"phi4-mini-nLayers{nlayers}"}[preset]


def output_prefix(env: dict, preset: str, model: dict, *, world, zero, micro, global_batch, sp, pp, tp, dtype,
                  opt) -> str:
    """Upstream's get_output_prefix (ALCF/helpers.sh), character for character: it names the checkpoint directory
    (checkpoints/<prefix>, the --load and --save of a relaunch) and the log directory (logs/<prefix>/...).
    TRAIN_TOKENS counts only when given or defaulted (TRAIN_ITERS alone: upstream's _ntok0B); _tok and _tm only when
    TOKENIZER_TYPE / TOKENIZER_MODEL are in the environment (upstream names the run before it defaults them)."""
    pre = (f"ws{world}-ds-stage{zero}-nl{model['NLAYERS']}-hs{model['HIDDEN']}-mb{micro}-seq{model['SEQ']}"
           f"-gb{global_batch}-sp{sp}-pp{pp}-tp{tp}-{dtype}-opt{opt}"
           f"-lr{_get(env, 'LR', '0.0002')}-lwf{_get(env, 'LR_WARMUP_FRAC', '0.05')}")
    pre = f"{upstream_model_arch(preset, model['NLAYERS'])}-{pre}"
    if _get(env, "TRAIN_TOKENS") or not (_get(env, "TRAIN_ITERS") or _get(env, "TRAIN_ITER")):
        tokens = _int(env, "TRAIN_TOKENS", 4673780159710)
    else:
        tokens = 0  # upstream's $((TRAIN_TOKENS / 10 ** 9)) of an unset TRAIN_TOKENS
    pre += f"_ntok{tokens // 10**9}B"
    if _get(env, "TOKENIZER_TYPE"):
        pre += "_tok" + env["TOKENIZER_TYPE"].replace("Tokenizer", "")
    if _get(env, "TOKENIZER_MODEL"):
        pre += "_tm" + env["TOKENIZER_MODEL"].replace("/", "_")
    if _get(env, "LR_DECAY_ITERS"):
        pre += f"_ldi{env['LR_DECAY_ITERS']}"
    if not _get(env, "NO_FLASH_ATTN"):
        pre += "_flash"
    return pre


def output_dir(prefix: str, world_size: int, now=None, host=None) -> str:
    """Upstream's setOutput: logs/<prefix>/<%Y%m%d-%H%M%S>_<WORLD_SIZE>_<HOSTNAME>; output.log goes in it."""
    import datetime
    import socket

    now = now or datetime.datetime.now()
    return str(Path("logs") / prefix / f"{now:%Y%m%d-%H%M%S}_{world_size}_{host or socket.gethostname()}")


def resolve(machine: str, env: dict, extra: list[str]) -> dict:
    """The run upstream's knobs describe: {'flags', 'launch', 'env', 'world_size'}; RecipeError lists problems."""
    from megatron.config.presets import PRESETS

    if machine not in MACHINES:
        raise RecipeError(f"unknown machine {machine!r}; one of {', '.join(MACHINES)}")
    mc = MACHINES[machine]
    errors = check_knobs(env)
    arch_name = _get(env, "MODEL_ARCH", "7B")
    preset = ARCHS.get(arch_name)
    if preset is None:
        errors.append(f"MODEL_ARCH={arch_name} is not one of upstream's architectures: {', '.join(sorted(ARCHS))}")
        preset = "auroragpt-7b"
    shape = dict(PRESETS[preset])
    if preset in _NLAYERS_DEFAULT:
        shape["num_layers"] = _NLAYERS_DEFAULT[preset]
    aliases = {"HEADS": ("HEADS", "NHEADS"), "NLAYERS": ("NLAYERS", "NUM_LAYERS")}
    model = {}
    for knob, field in _MODEL_KNOBS.items():
        given = next((_get(env, n) for n in aliases.get(knob, (knob,)) if _get(env, n) is not None), None)
        if given is None:
            model[knob] = shape[field]
        elif knob in _OVERRIDABLE.get(preset, set()):
            model[knob] = int(given)
        elif int(given) != shape[field]:
            errors.append(f"{knob}={given} disagrees with MODEL_ARCH={arch_name} ({knob}={shape[field]}); upstream "
                          f"fixes it for this architecture: drop {knob} or use MODEL_ARCH=7B with explicit sizes")
        else:
            model[knob] = shape[field]
    run_env = dict(env)
    for knob, value in _ARCH_RUN.get(preset, {}).items():
        if _get(env, knob) not in (None, value):
            errors.append(f"{knob}={env[knob]} disagrees with MODEL_ARCH={arch_name} ({knob}={value})")
        run_env[knob] = value
    if errors:
        raise RecipeError("the recipe's knobs have problems (nothing was launched):\n  - " + "\n  - ".join(errors))

    nhosts = _num_hosts(env)
    ngpu = _int(env, "NGPU_PER_HOST", mc["ngpu_per_host"])
    world = _int(env, "WORLD_SIZE", nhosts * ngpu)
    tp, pp, sp = _int(run_env, "TP", 1), _int(run_env, "PP", 1), _int(run_env, "SP", 1)
    if world % (tp * pp * sp):
        raise RecipeError(f"WORLD_SIZE {world} is not divisible by TP {tp} × PP {pp} × SP {sp}")
    dp = world // (tp * pp * sp)
    micro = _int(run_env, "MICRO_BATCH", 1)
    gas_default = aurora_grad_acc_steps(nhosts) if machine == "aurora" else 8
    gas = _int(run_env, "GRAD_ACC_STEPS", gas_default)
    global_batch = _int(env, "GLOBAL_BATCH", dp * micro * gas)
    if _get(env, "GLOBAL_BATCH") and _get(run_env, "GRAD_ACC_STEPS") and global_batch != dp * micro * gas:
        raise RecipeError(f"GLOBAL_BATCH={global_batch} disagrees with MICRO_BATCH {micro} × DP {dp} × "
                          f"GRAD_ACC_STEPS {gas} = {dp * micro * gas}: give one of GLOBAL_BATCH and GRAD_ACC_STEPS")
    seq = model["SEQ"]
    if _get(env, "TRAIN_ITERS") or _get(env, "TRAIN_ITER"):
        train_iters = _int(env, "TRAIN_ITERS" if _get(env, "TRAIN_ITERS") else "TRAIN_ITER", None)
    else:
        train_iters = _int(env, "TRAIN_TOKENS", 4673780159710) // seq // global_batch
    opt = _get(env, "OPT") or _get(env, "OPTIMIZER") or _get(env, "OPTIM") or "adamw"
    dtype = _get(env, "DTYPE", mc["dtype"])
    if dtype not in ("bf16", "fp16", "fp32"):
        raise RecipeError(f"DTYPE={dtype} is not one of bf16, fp16, fp32")
    prefix = output_prefix(env, preset, model, world=world, zero=_int(run_env, 'ZERO_STAGE', 1), micro=micro,
                           global_batch=global_batch, sp=sp, pp=pp, tp=tp, dtype=dtype, opt=opt)
    ckpt_dir = _get(env, "CKPT_DIR") or str(Path("checkpoints") / prefix)
    hidden = model["HIDDEN"]

    f: list[str] = []
    f += ["--lr", _get(env, "LR", "0.0002"), "--lr-decay-style", _get(env, "LR_DECAY_STYLE", "cosine"),
          "--lr-warmup-fraction", _get(env, "LR_WARMUP_FRAC", "0.05")]
    if _get(env, "LR_DECAY_ITERS"):
        f += ["--lr-decay-iters", env["LR_DECAY_ITERS"]]
    if not _get(env, "OVERRIDE_CKPT_OPT_PARAM"):
        f += ["--use-checkpoint-opt_param-scheduler"]
    if not _get(env, "NO_LLAMA"):
        f += ["--swiglu", "--hidden-dropout", "0", "--attention-dropout", "0", "--normalization", "rmsnorm",
              "--disable-bias-linear", "--no-query-key-layer-scaling", "--use-rotary-position-embeddings",
              "--untie-embeddings-and-output-weights", "--num-key-value-heads", str(model["NUM_KV_HEAD"]),
              "--ffn-hidden-size", str(model["FFN_HIDDEN_SIZE"])]
    if not _get(env, "NO_FLASH_ATTN"):
        f += [mc["flash"]]
    if _get(env, "MOCK_DATA") == "1":
        f += ["--mock-data", "--vocab-size", _get(env, "VOCAB_SIZE", "32000"), "--tokenizer-type", "NullTokenizer"]
    else:
        if not _get(env, "DATA_FILE_LIST"):
            raise RecipeError("DATA_FILE_LIST is not set: give the data file list (lines 'weight prefix "
                              "[corpus]'), or MOCK_DATA=1 for random tokens")
        f += ["--tokenizer-type", _get(env, "TOKENIZER_TYPE", "HFTokenizer"),
              "--tokenizer-model", _get(env, "TOKENIZER_MODEL", "google/gemma-7B")]
    if not _get(env, "NO_TENSORBOARD"):
        f += ["--log-timers-to-tensorboard", "--log-optimizer-states-to-tensorboard",
              "--tensorboard-dir", str(Path(ckpt_dir) / "tensorboard")]
    f += ["--deepspeed"]
    if pp == 1:
        f += ["--no-pipeline-parallel"]
    f += [f"--zero-stage={_int(run_env, 'ZERO_STAGE', 1)}"]
    if _get(env, "USE_ACTIVATION_CHECKPOINTING") in ("1", "true"):
        f += ["--deepspeed-activation-checkpointing", "--checkpoint-activations",
              f"--checkpoint-num-layers={_get(env, 'ACT_CKPT_NUM_LAYERS', '1')}"]
    if dtype != "fp32":
        f += [f"--{dtype}"]
    backend = _get(env, mc["backend_knob"], mc["backend"])
    if fp32_accumulation(dtype, _int(run_env, "ZERO_STAGE", 1), pp, _get(env, "CPU_OPTIMIZER") == "1"):
        f += ["--accumulate-allreduce-grads-in-fp32"]
    f += ["--adjust-word-embedding-init",
          f"--adam-beta1={_get(env, 'ADAM_BETA1', '0.9')}", f"--adam-beta2={_get(env, 'ADAM_BETA2', '0.95')}",
          f"--adam-eps={_get(env, 'ADAM_EPS', '0.00001')}", f"--clip-grad={_get(env, 'CLIP_GRAD', '1.0')}"]
    if _get(env, "MOCK_DATA") != "1":
        f += [f"--data-cache-path={Path(ckpt_dir) / _get(env, 'DATA_CACHE_PATH', 'index-cache')}",
              f"--data-file-list={env['DATA_FILE_LIST']}"]
    f += [f"--distributed-backend={backend}", f"--ds-sequence-parallel-size={sp}",
          f"--eval-interval={_get(env, 'EVAL_INTERVAL', '100')}", f"--eval-iters={_get(env, 'EVAL_ITERS', '20')}",
          f"--global-batch-size={global_batch}", f"--hidden-size={hidden}",
          f"--init-method-std={bc_init_method_std(hidden)}", f"--log-interval={_get(env, 'LOG_INTERVAL', '1')}",
          f"--load={_get(env, 'LOAD', ckpt_dir)}", f"--max-position-embeddings={16 * seq}",
          f"--micro-batch-size={micro}", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
          "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", f"--num-layers={model['NLAYERS']}",
          f"--num-attention-heads={model['HEADS']}", f"--optimizer={opt}", f"--pipeline-model-parallel-size={pp}",
          f"--rotary-position-embeddings-theta={_get(env, 'ROPE_THETA', '50000')}",
          f"--save={_get(env, 'SAVE', ckpt_dir)}", f"--seq-length={seq}",
          f"--split={_get(env, 'TRAIN_SPLIT', '990')},{_get(env, 'VAL_SPLIT', '10')},{_get(env, 'TEST_SPLIT', '0')}",
          "--shuffle-sample-in-corpus", f"--save-interval={_get(env, 'SAVE_INTERVAL', '50')}",
          f"--train-iters={train_iters}", f"--tensor-model-parallel-size={tp}",
          f"--timing-log-level={_get(env, 'TIMING_LOG_LEVEL', '1')}",
          f"--weight-decay={_get(env, 'WEIGHT_DECAY', '0.1')}", "--word-embedding-init-std=0.632455532"]
    if _get(env, "CPU_OPTIMIZER") == "1":
        f += ["--cpu-optimizer"]
    if _get(env, "WANDB_PROJECT"):
        f += ["--wandb-project", env["WANDB_PROJECT"]]
    f += ["--peak-tflops", _get(env, "PEAK_TFLOPS", mc["peak_tflops"])]
    f += list(extra)

    hostfile = _get(env, "HOSTFILE") or _get(env, "PBS_NODEFILE")
    launch = ["mpiexec", "--envall", f"--np={world}", f"--ppn={ngpu}"]
    if hostfile:
        launch.append(f"--hostfile={hostfile}")
    launch_env = {}
    if machine == "aurora":
        launch += ["--no-vni", f"--cpu-bind={_get(env, 'CPU_BIND', AURORA_CPU_BIND)}", "--line-buffer"]
        launch_env = {k: v for k, v in AURORA_ENV.items() if k not in env}
    else:
        launch += [f"--cpu-bind={_get(env, 'CPU_BIND', 'depth')}", "--depth=8"]
    launch += [sys.executable, str(REPO / "pretrain_gpt_alcf.py")]
    return {"flags": f, "launch": launch, "env": launch_env, "world_size": world, "output_prefix": prefix,
            "ckpt_dir": ckpt_dir, "machine": machine,
            "knobs": f"OPT={opt} DTYPE={dtype} ZERO_STAGE={_int(run_env, 'ZERO_STAGE', 1)} PP={pp} TP={tp}"}


def run_errors(r: dict) -> list[str]:
    """What the engine would refuse about the resolved run's optimizer and precision on its machine's accelerator
    (megatron/optimizer optimizer_errors, megatron/training/ds_config precision_errors), each naming the flag;
    ConfigError when the flags themselves are refused."""
    from megatron.config.arguments import parse_args
    from megatron.optimizer import optimizer_errors
    from megatron.training.ds_config import precision_errors

    run = parse_args(r["flags"])
    device = MACHINES[r["machine"]]["device"]
    return precision_errors(run, device) + optimizer_errors(run, device, r["world_size"])


def save_dotenv(ckpt_dir: str, environ: dict) -> Path:
    """Upstream's save_dotenv: the environment (printenv without LS_COLORS) in CKPT_DIR/.env."""
    path = Path(ckpt_dir) / ".env"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in environ.items() if k != "LS_COLORS"))
    return path


def run_teed(command: list[str], env: dict, log_path: Path) -> int:
    """Run the launch line with its stdout and stderr to the terminal and appended to `log_path` (upstream's
    `bash -c "${run_cmd[*]}" |& tee -a "${OUTPUT_LOG}"`); SIGINT/SIGTERM reach mpiexec; mpiexec's exit status."""
    import signal
    import subprocess

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
        out = sys.stdout.buffer
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            out.write(chunk)
            out.flush()
            log.write(chunk)
            log.flush()
        return proc.wait()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: recipe.py aurora|polaris [extra pretrain_gpt.py flags...]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    try:
        r = resolve(argv[0], dict(os.environ), argv[1:])
    except RecipeError as e:
        print(f"ALCF recipe: {e}", file=sys.stderr)
        return 2
    command = r["launch"] + r["flags"]
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in r["env"].items())
    line = (line + " " if line else "") + shlex.join(command)
    out_dir = Path(output_dir(r["output_prefix"], r["world_size"]))
    log_path = out_dir / "output.log"
    from megatron.config.arguments import ConfigError, parse_args

    try:
        refused = run_errors(r)
    except ConfigError as e:
        print(f"ALCF recipe: the flags it builds are refused (nothing was launched):\n{e}", file=sys.stderr)
        return 2
    if refused:
        device = MACHINES[r["machine"]]["device"]
        print(f"ALCF recipe: {r['knobs']} cannot run on {r['machine']} ({device}) (nothing was launched):\n  - "
              + "\n  - ".join(refused), file=sys.stderr)
        return 2
    if _get(os.environ, "DRY_RUN") == "1":
        from megatron.training.dry_run import dry_run_report

        try:
            report = dry_run_report(parse_args(r["flags"]), r["world_size"], launch_line=line)
        except ConfigError as e:
            print(f"ALCF recipe: the flags it builds are refused (nothing was launched):\n{e}", file=sys.stderr)
            return 2
        print(f"== run directory\ncheckpoints: {r['ckpt_dir']}\nlog: {log_path}\n", flush=True)
        print(report, flush=True)
        return 0
    # upstream's setOutput, save_dotenv and train_alcf.sh: the log directory, logs/latest, CKPT_DIR/.env, then the
    # launch line, where the output goes, and the whole run's output, all appended to output.log
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(Path("logs") / "latest", "a") as latest:
        latest.write(f"{log_path}\n")
    save_dotenv(r["ckpt_dir"], dict(os.environ))
    with open(log_path, "a") as log:
        for text in (line, f"Output will be saved to {log_path}"):
            print(text, flush=True)
            log.write(text + "\n")
    return run_teed(command, {**os.environ, **r["env"]}, log_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
