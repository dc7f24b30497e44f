"""How the run goes: batch sizes, schedule length, optimizer, LR schedule, precision, ZeRO and run control.

The optimizer, precision and ZeRO settings here are what the DeepSpeed config is generated
from (training/ds_config.py); a user's `--deepspeed_config` file must agree with them.

The flags of the DeepSpeed, batch, schedule and optimizer (with config/optimizer_args.py), precision and run
control groups are declared at the end (`add_*_arguments`), with `training_from_args` building TrainingConfig.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from megatron.config.argtypes import pos_float, pos_int
from megatron.config.checkpoint import add_checkpoint_arguments
from megatron.config.logging import add_profiling_arguments
from megatron.config.optimizer_args import add_optimizer_arguments, optimizer_config_values


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"  # one of config.optimizer_args.OPTIMIZER_CHOICES; adam is Adam with L2 decay
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    # LR schedule: constant, linear, cosine, inverse-square-root, wsd (warmup-stable-decay)
    lr_decay_style: str = "linear"
    lr_decay_iters: Optional[int] = None  # None: train iters
    lr_warmup_iters: int = 0
    # The schedule counts samples (Megatron's sample-based runs) when either is given, or with a batch ramp-up.
    lr_decay_samples: Optional[int] = None  # None: the run's train samples
    lr_warmup_samples: Optional[int] = None  # None or 0: no warmup in samples
    lr_warmup_fraction: Optional[float] = None  # wins over lr_warmup_iters when set
    lr_wsd_decay_fraction: float = 0.1  # wsd: the final fraction of decay iters spent cooling down
    lr_wsd_decay_style: str = "linear"  # wsd cooldown shape: linear, cosine, exponential
    # ---- upstream's other optimizers and schedules (flags in config/optimizer_args.py) ----
    cpu_torch_adam: bool = False  # --cpu-optimizer steps with torch.optim.AdamW instead of DeepSpeedCPUAdam
    ds_fused_adam: bool = False  # --optimizer adam steps with DeepSpeed's FusedAdam (decoupled decay, as upstream)
    schedulefree_for_each: bool = False
    start_weight_decay: Optional[float] = None  # with weight_decay_incr_style linear/cosine
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    sophiag_beta1: float = 0.9
    sophiag_beta2: float = 0.95
    sophiag_rho: float = 0.01
    dshampooadamw_max_preconditioner_dim: int = 8192
    dshampooadamw_precondition_freq: int = 100
    dshampooadamw_use_decoupled_weight_decay: bool = True
    dshampooadamw_eps: float = 1e-12
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 6
    muonadamw_beta1: float = 0.9
    muonadamw_beta2: float = 0.999
    muonadamw_eps: float = 1e-12
    muonclip_t: float = 100.0
    muonclip_alpha: float = 0.5
    lr_decay_tokens: Optional[int] = None  # token-based lengths win over iters/samples
    lr_warmup_tokens: Optional[int] = None
    lr_constant_tokens: Optional[int] = None  # infinite-*: plateau length in tokens
    lr_constant_fraction: float = 0.001  # infinite-*: plateau as a fraction of the decay length
    lr_cooldown_tokens: Optional[int] = None
    lr_cooldown_fraction: float = 0.65
    lr_constant_plus_cooldown: bool = False
    lr_constant_plus_cooldown_frac: float = 0.05
    constant_lr: float = 0.00011
    timescale: float = 10.0
    lr_finder: bool = False
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp16: bool = False
    loss_scale: Optional[float] = None  # fp16: fixed scale; None: dynamic
    # Upstream's --initial-loss-scale (default 2**32) never reaches DeepSpeed, so its fp16 runs start at DeepSpeed's
    # 2**16; the flag is honoured here when given, and its default is that effective start.
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    accumulate_allreduce_grads_in_fp32: bool = False  # bf16: DeepSpeed's data_types.grad_accum_dtype = fp32


@dataclass
class ZeroConfig:
    deepspeed: bool = True
    deepspeed_config: Optional[str] = None  # a user's JSON file; generated from the flags when None
    zero_stage: int = 1
    cpu_optimizer: bool = False  # ZeRO optimizer-state offload to CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU
    universal_checkpoint: bool = False
    reduce_bucket_size: Optional[int] = None  # --zero-reduce-bucket-size; None: ds_config.DEFAULT_BUCKET_SIZE
    allgather_bucket_size: Optional[int] = None  # --zero-allgather-bucket-size (stages 1-2); None: the default


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro batch × dp
    rampup_batch_size: Optional[list[int]] = None  # [start, increment, ramp samples]
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None
    train_tokens: Optional[int] = None
    eval_interval: int = 1000
    eval_iters: int = 100
    seed: int = 1234
    # --data-parallel-random-init: the torch generators (dropout) of data-parallel rank r are seeded from
    # seed + 10·r (upstream's offset); the weights stay those of dp rank 0 (what upstream's broadcast gives).
    data_parallel_random_init: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False
    empty_unused_memory_level: int = 0  # 1: release the device's cached memory after each step; 2: also after eval
    train_iters_to_skip: Optional[list[int]] = None  # iterations whose batch is read but not trained on
    train_range_to_skip: Optional[list[int]] = None  # [start1, end1, start2, end2, ...], inclusive
    skip_train: bool = False  # evaluate the (loaded) model on the validation and test splits, no training
    kill_switch_file: Optional[str] = None  # save (with --save) and exit once this file exists
    dry_run: Optional[int] = None  # --dry-run: None trains; 0: report for the launcher's world size; N: for N
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "wsd", "infinite-cosine",
                   "infinite-inv-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential")


# ---- flags (config/arguments.py's build_parser calls these in --help's order) ----------------------
def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DeepSpeed (a --deepspeed_config file and these flags must agree)")
    g.add_argument("--deepspeed-config", "--deepscale-config", dest="deepspeed_config",
                   help="JSON file; values for flags you do not give are taken from it")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3),
                   help="default 1 (as upstream). muon, muonclip, dshampooadamw, galoreadamw, adam8bit and "
                        "galoreadamw8bit partition by whole parameters at 1 and 2 (state, fp32 masters, and at 2 the "
                        "reduced gradients) over DeepSpeed's stage 0, and refuse 3: the gathers an exact update "
                        "needs were measured as cheap as ZeRO-2's (benchmarks/bench_zero3_gather.py), but the step "
                        "would replace DeepSpeed's stage-3 optimizer, which is not built (docs/OPTIMIZERS.md)")
    g.add_argument("--cpu-optimizer", action="store_const", const=True,
                   help="offload optimizer state to CPU (DeepSpeedCPUAdam; ZeRO stage >= 1)")
    g.add_argument("--remote-device", choices=("none", "cpu", "nvme"), default="none",
                   help="ZeRO-3 parameter offload target")
    g.add_argument("--zero-reduce-bucket-size", type=pos_int)
    g.add_argument("--zero-allgather-bucket-size", type=pos_int)
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute layers in backward (= --recompute-granularity full --recompute-method uniform)")
    g.add_argument("--checkpoint-num-layers", type=pos_int, default=1, help="layers per recomputed chunk")
    g.add_argument("--recompute-activations", action="store_true",
                   help="= --recompute-granularity selective (as upstream)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="full: recompute whole layers; selective: recompute only the core attention")
    g.add_argument("--recompute-method", choices=("uniform", "block"),
                   help="full granularity: uniform (chunks of --recompute-num-layers layers) or block (the first "
                        "--recompute-num-layers layers of each pipeline stage)")
    g.add_argument("--recompute-num-layers", type=pos_int, default=1)
    # Upstream's DeepSpeed activation-checkpointing flags (deepspeed.checkpointing.configure), and sequence tiling
    # (ALST's tiled MLP and tiled logits + loss). What each saves: docs/LONG_SEQUENCES.md.
    g.add_argument("--checkpoint-in-cpu", action="store_true",
                   help="keep each recomputed chunk's input on the CPU until its backward (upstream's flag; "
                        "DeepSpeed's activation_checkpointing.cpu_checkpointing); needs full recomputation")
    g.add_argument("--partition-activations", action="store_true",
                   help="keep 1/tp of each recomputed chunk's input per tensor-parallel rank, all-gathered for its "
                        "backward (upstream's flag; DeepSpeed's activation_checkpointing.partition_activations); "
                        "needs full recomputation")
    g.add_argument("--tiled-mlp", action="store_true",
                   help="run the MLP --sequence-tile-size tokens at a time, recomputing each tile in backward "
                        "(ALST's TiledMLP): no [sequence, ffn-hidden] tensor is whole")
    g.add_argument("--tiled-logits-loss", action="store_true",
                   help="compute the output projection and the cross entropy --sequence-tile-size tokens at a time "
                        "(ALST's TiledFusedLogitsLoss; backward recomputes each tile's logits): no [sequence, "
                        "vocabulary] tensor is whole")
    g.add_argument("--sequence-tile-size", type=pos_int,
                   help="tokens per tile of --tiled-mlp and --tiled-logits-loss (default: --hidden-size, so a "
                        "tile's intermediate is no larger than the weight it multiplies; ALST tiles the same way)")
    g.add_argument("--universal-checkpoint", action="store_true",
                   help="--load names a DeepSpeed universal checkpoint folder (or a directory whose latest_universal "
                        "names one; make it with tools/convert_checkpoint.py to-universal) and resumes it at any "
                        "tp / pp / dp / ZeRO stage through DeepSpeed's loader (checkpoint.load_universal); the "
                        "whole-matrix optimizers' folders (muon, muonclip, dshampooadamw, galoreadamw, adam8bit, "
                        "written by to-universal) through this framework's (docs/OPTIMIZERS.md)")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=pos_int, help="per data-parallel rank; default 1")
    g.add_argument("--global-batch-size", type=pos_int, help="default micro batch × dp")
    g.add_argument("--rampup-batch-size", type=pos_int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("schedule and optimizer")
    g.add_argument("--train-iters", type=pos_int, help="run length in iterations; this or --train-samples is required")
    g.add_argument("--train-samples", type=pos_int, help="run length in samples (whole global batches)")
    g.add_argument("--train-tokens", type=pos_int,
                   help="token budget over all runs (as upstream): training also stops once it has consumed this "
                        "many tokens; needs --train-iters or --train-samples, which set the run length")
    g.add_argument("--lr", type=float, default=OptimizerConfig.lr)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", type=str.lower, choices=LR_DECAY_STYLES, default="linear")
    g.add_argument("--lr-decay-iters", type=pos_int, help="default --train-iters")
    g.add_argument("--lr-decay-samples", type=pos_int, help="with --rampup-batch-size; default --train-samples")
    g.add_argument("--lr-warmup-iters", type=int)
    g.add_argument("--lr-warmup-samples", type=int, help="with --rampup-batch-size")
    g.add_argument("--lr-warmup-fraction", type=float, help="of the decay iters")
    g.add_argument("--lr-wsd-decay-fraction", "--lr-decay-fraction", dest="lr_wsd_decay_fraction", type=float,
                   default=0.1, help="wsd: final fraction of the decay iters spent cooling down to --min-lr")
    g.add_argument("--lr-wsd-decay-style", type=str.lower, choices=WSD_DECAY_STYLES, default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, help="default 1.0; 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=pos_float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    add_optimizer_arguments(g)  # --optimizer, its hyperparameters, token/infinite/cooldown schedules


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_const", const=True)
    g.add_argument("--fp16", action="store_const", const=True)
    g.add_argument("--loss-scale", type=pos_float, help="fp16: fixed loss scale; default dynamic")
    g.add_argument("--initial-loss-scale", type=pos_float,
                   help="fp16 dynamic scaling start (a power of 2); default 2**16, where upstream's runs start: "
                        "its flag (default 2**32) never reaches DeepSpeed, whose default initial_scale_power is 16")
    g.add_argument("--loss-scale-window", type=pos_int, default=1000)
    g.add_argument("--hysteresis", type=pos_int, default=2)
    g.add_argument("--min-loss-scale", type=pos_float, default=1.0)
    g.add_argument("--fp32-residual-connection", action="store_true",
                   help="keep the residual stream (embedding output, every residual sum, the input of each norm "
                        "and of the next pipeline stage) in fp32 under --bf16/--fp16; norms hand the sublayers "
                        "the run's dtype. Needs --bf16 or --fp16 (as upstream)")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="--bf16: accumulate and all-reduce gradients in fp32 (DeepSpeed's "
                        "data_types.grad_accum_dtype: its BF16 optimizer, which this DeepSpeed selects at ZeRO "
                        "stage 1, so --zero-stage 0 runs as 1, with a notice; refused with ZeRO-2/3 and "
                        "--cpu-optimizer, which accumulate in bf16). The whole-matrix optimizers (muon, "
                        "muonclip, dshampooadamw, galoreadamw, adam8bit) accumulate and reduce in fp32 themselves at "
                        "ZeRO 1 or 2, the tied embedding's sum over pipeline stages included "
                        "(megatron/optimizer/mixed_precision.py). With --deepspeed_config the file's "
                        "data_types.grad_accum_dtype decides, as upstream (a notice when it overrides this flag)")


def add_run_control_arguments(parser: argparse.ArgumentParser) -> None:
    """One group: run length control, evaluation, the checkpoint flags (config/checkpoint.py), skipping,
    the profiler (config/logging.py) and --dry-run. --log-interval fills LoggingConfig but is listed in this group."""
    g = parser.add_argument_group("run control, evaluation and checkpoints")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=pos_int, default=100)
    g.add_argument("--eval-interval", type=pos_int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="0 disables evaluation")
    add_checkpoint_arguments(g)  # --save ... --use-checkpoint-args
    g.add_argument("--exit-interval", type=pos_int)
    g.add_argument("--exit-duration-in-mins", type=pos_float)
    g.add_argument("--exit-signal-handler", action="store_true", help="save and exit on SIGTERM")
    g.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0,
                   help="release the accelerator's cached, unused memory (torch's empty_cache on cuda/xpu/mps) to "
                        "reduce fragmentation: 1 after each step's forward-backward and each evaluation batch, 2 also "
                        "after each optimizer step; 0 never. On CPU there is no cache to release: a genuine no-op")
    g.add_argument("--train-iters-to-skip", action="extend", nargs="+", type=pos_int, metavar="N",
                   help="iterations (as the log numbers them) whose batch is read but not trained on; the LR "
                        "schedule advances")
    g.add_argument("--train-range-to-skip", action="extend", nargs="+", type=pos_int, metavar="A B",
                   help="inclusive iteration ranges to skip like --train-iters-to-skip (pairs)")
    g.add_argument("--skip-train", action="store_true",
                   help="no training: evaluate the (loaded) model on the validation and test splits and exit")
    g.add_argument("--kill-switch-file", help="save (with --save) and exit once this file exists")
    add_profiling_arguments(g)  # --profile ... --trace-dir
    g.add_argument("--dry-run", nargs="?", type=int, const=0, default=None, metavar="WORLD_SIZE",
                   help="print the resolved run (layout, DeepSpeed config, blend summary, parameters, memory per "
                        "device) for WORLD_SIZE ranks (default: the launcher's) and exit without training")


def training_from_args(ns: argparse.Namespace) -> TrainingConfig:
    """The run-length, batch, optimizer/LR-schedule, precision, ZeRO and run-control settings."""
    optimizer = OptimizerConfig(
        optimizer=ns.optimizer, lr=ns.lr, min_lr=ns.min_lr, weight_decay=ns.weight_decay, clip_grad=ns.clip_grad,
        adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2, adam_eps=ns.adam_eps, sgd_momentum=ns.sgd_momentum,
        lr_decay_style=ns.lr_decay_style, lr_decay_iters=ns.lr_decay_iters, lr_warmup_iters=ns.lr_warmup_iters or 0,
        lr_warmup_fraction=ns.lr_warmup_fraction, lr_wsd_decay_fraction=ns.lr_wsd_decay_fraction,
        lr_wsd_decay_style=ns.lr_wsd_decay_style, lr_decay_samples=ns.lr_decay_samples,
        lr_warmup_samples=ns.lr_warmup_samples, **optimizer_config_values(ns))
    precision = PrecisionConfig(
        bf16=ns.bf16, fp16=ns.fp16, loss_scale=ns.loss_scale, initial_loss_scale=ns.initial_loss_scale,
        loss_scale_window=ns.loss_scale_window, hysteresis=ns.hysteresis, min_loss_scale=ns.min_loss_scale,
        accumulate_allreduce_grads_in_fp32=ns.accumulate_allreduce_grads_in_fp32)
    zero = ZeroConfig(
        deepspeed=True, deepspeed_config=ns.deepspeed_config, zero_stage=ns.zero_stage,
        cpu_optimizer=ns.cpu_optimizer, offload_param=ns.remote_device == "cpu",
        universal_checkpoint=ns.universal_checkpoint, reduce_bucket_size=ns.zero_reduce_bucket_size,
        allgather_bucket_size=ns.zero_allgather_bucket_size)
    return TrainingConfig(
        micro_batch_size=ns.micro_batch_size, global_batch_size=ns.global_batch_size,
        rampup_batch_size=list(ns.rampup_batch_size) if ns.rampup_batch_size else None,
        train_iters=ns.train_iters, train_samples=ns.train_samples, train_tokens=ns.train_tokens,
        eval_interval=ns.eval_interval, eval_iters=ns.eval_iters, seed=ns.seed,
        data_parallel_random_init=ns.data_parallel_random_init, exit_interval=ns.exit_interval,
        exit_duration_in_mins=ns.exit_duration_in_mins, exit_signal_handler=ns.exit_signal_handler,
        empty_unused_memory_level=ns.empty_unused_memory_level,
        train_iters_to_skip=list(ns.train_iters_to_skip) if ns.train_iters_to_skip else None,
        train_range_to_skip=list(ns.train_range_to_skip) if ns.train_range_to_skip else None,
        skip_train=ns.skip_train, kill_switch_file=ns.kill_switch_file, dry_run=ns.dry_run,
        optimizer=optimizer, precision=precision, zero=zero)
