"""How the run goes: batch sizes, schedule length, optimizer, LR schedule, precision, ZeRO and run control.

The optimizer, precision and ZeRO settings here are what the DeepSpeed config is generated
from (training/ds_config.py); a user's `--deepspeed_config` file must agree with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    initial_loss_scale: float = 2.0**32
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
