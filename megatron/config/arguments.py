"""The Megatron-DeepSpeed command line: the flag names users already type, mapped onto config/'s dataclasses.

`parse_args(argv) -> RunConfig` parses and checks everything that does not need the world size;
`validate_run(run, world_size)` checks the rest once ranks are known. Derived values (gradient
accumulation, batch ramp-up, number of train iterations) are small functions of (run, dp size) below.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron.config import upstream_flags
from megatron.config.argtypes import non_negative_int, pos_float, pos_int
from megatron.config.checkpoint import CheckpointConfig
from megatron.config.data import DataConfig
from megatron.config.logging import LoggingConfig, ProfilingConfig
from megatron.config.model import TransformerConfig
from megatron.config.optimizer_args import add_optimizer_arguments, optimizer_config_values, optimizer_flag_errors
from megatron.config.parallel import ParallelConfig, layout_errors
from megatron.config.presets import preset
from megatron.config.reliability import ReliabilityConfig, add_reliability_arguments, reliability_from_args
from megatron.config.training import OptimizerConfig, PrecisionConfig, TrainingConfig, ZeroConfig
from megatron.errors import ConfigError


@dataclass
class RunConfig:
    model: TransformerConfig  # vocab_size may be 0 until the tokenizer is built
    parallel: ParallelConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    args: dict  # every flag's final value: what checkpoints save as "the run's arguments"
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)  # config/reliability.py
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)  # config/logging.py
    notices: list = field(default_factory=list)  # what the flags resolved to, said once by rank 0


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "wsd", "infinite-cosine",
                   "infinite-inv-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential")

# Flags Megatron-DeepSpeed recipes pass that change nothing in training here (kernel-fusion toggles and flags
# that ask for what is always done here); accepted so recipes run unchanged, and `--help` says so.
# (flag, kind, why) with kind "flag" (no value) or a type for a value. More in upstream_flags.NO_EFFECT.
COMPAT_NO_EFFECT = [
    ("--deepspeed", "flag", "the engine is always DeepSpeed"),
    ("--deepspeed-mpi", "flag", "rank discovery is automatic (megatron.distributed)"),
    ("--local-rank", int, "the local rank is read from the launcher's environment (megatron.distributed)"),
    ("--no-query-key-layer-scaling", "flag", "attention is computed in fp32-accumulating SDPA"),
    ("--apply-query-key-layer-scaling", "flag", "attention is computed in fp32-accumulating SDPA"),
    ("--no-bias-dropout-fusion", "flag", "no fused kernels to turn off"),
    ("--no-masked-softmax-fusion", "flag", "no fused kernels to turn off"),
    ("--no-gradient-accumulation-fusion", "flag", "no fused kernels to turn off"),
    ("--no-persist-layer-norm", "flag", "no fused kernels to turn off"),
    ("--no-async-tensor-model-parallel-allreduce", "flag", "tp all-reduces are synchronous"),
    ("--use-flash-attn", "flag", "attention always uses torch SDPA, which picks flash kernels itself"),
    ("--use-flash-attn-v1", "flag", "attention always uses torch SDPA, which picks flash kernels itself"),
    ("--use-flash-attn-v2", "flag", "attention always uses torch SDPA, which picks flash kernels itself"),
    ("--use-flash-attn-triton", "flag", "attention always uses torch SDPA, which picks flash kernels itself"),
    ("--use-flash-attn-builder", "flag", "attention always uses torch SDPA, which picks flash kernels itself"),
    ("--blend-sample-in-corpus", "flag", "the blended index always blends per sample"),
    ("--log-memory-to-tensorboard", "flag", "memory in use is always logged (memory/in_use_mb)"),
    ("--log-validation-ppl-to-tensorboard", "flag", "validation perplexity is always logged"),
    ("--log-batch-size-to-tensorboard", "flag", "the batch size is always logged"),
]

# Megatron features we do not have, refused flag by flag with the reason (megatron/config/upstream_flags.py).
REFUSED = dict(upstream_flags.REFUSED)


# Flags other frameworks use for what a Megatron-DeepSpeed flag here does; named in the unknown-flag error.
OTHER_NAMES = {
    "--cpu-offload": "--cpu-optimizer (optimizer state) and --remote-device cpu (ZeRO-3 parameters)",
    "--offload-optimizer": "--cpu-optimizer",
    "--offload-param": "--remote-device cpu",
    "--gradient-accumulation-steps": "--global-batch-size (= micro batch × dp × accumulation steps)",
    "--batch-size": "--micro-batch-size (per rank) or --global-batch-size",
    "--lr-warmup-steps": "--lr-warmup-iters",
}


# DeepSpeed's BF16 optimizer (fp32 master weights and fp32 gradient accumulation, its fp32 state sharded over the
# data-parallel ranks) is what older DeepSpeed, upstream's, runs without ZeRO for bf16 with
# data_types.grad_accum_dtype fp32. DeepSpeed 0.19.8 selects the same class only through zero_optimization.stage 1
# and raises NotImplementedError ("unsupported mix of model_dtype") at stage 0, so --zero-stage 0 asks for it as 1.
ZERO0_FP32_ACCUMULATION_NOTICE = (
    "--accumulate-allreduce-grads-in-fp32 with --bf16 at --zero-stage 0: gradients accumulate in fp32 in "
    "DeepSpeed's BF16 optimizer (what upstream's DeepSpeed runs without ZeRO for this mix), which this DeepSpeed "
    "selects as ZeRO stage 1 (its fp32 state sharded over data-parallel ranks; the same updates); drop the flag "
    "for a ZeRO-0 run with bf16 accumulation")
ZERO0_FP32_ACCUMULATION = (
    "--accumulate-allreduce-grads-in-fp32 with --bf16 cannot run at ZeRO stage 0 as the DeepSpeed config file "
    "states it: DeepSpeed accumulates bf16 gradients in fp32 only in its BF16 optimizer, which it selects at "
    "zero_optimization.stage 1. Set the stage to 1 in the file (or leave it out), or drop the flag for bf16 "
    "accumulation")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's messages already name the flag ("argument --lr: invalid ...")
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped by concern. Model and batch flags default to None so presets and files can fill them."""
    p = _Parser(prog="pretrain_gpt.py", allow_abbrev=False, exit_on_error=False, usage="%(prog)s [flags]   (--help lists them by concern)",
                description="Pretrain a GPT/Llama model with DeepSpeed (Megatron-DeepSpeed flag names; "
                            "'--a_b' spellings are accepted for every '--a-b').")

    g = p.add_argument_group("model (explicit flags win over --model-preset)")
    g.add_argument("--model-preset", help="named shape from megatron/config/presets.py (tiny, llama2-7b, ...)")
    g.add_argument("--num-layers", type=pos_int)
    g.add_argument("--hidden-size", type=pos_int)
    g.add_argument("--ffn-hidden-size", type=pos_int,
                   help="default 4h, or with --swiglu Megatron's int(8h/3/64)*64")
    g.add_argument("--num-attention-heads", type=pos_int)
    g.add_argument("--num-key-value-heads", "--num-query-groups", dest="num_key_value_heads", type=pos_int,
                   help="fewer than heads: grouped-query attention")
    g.add_argument("--seq-length", type=pos_int, help="required (a --model-preset fills it)")
    g.add_argument("--max-position-embeddings", type=pos_int, help="default --seq-length")
    g.add_argument("--make-vocab-size-divisible-by", type=pos_int, help="default 128")
    g.add_argument("--normalization", choices=("layernorm", "rmsnorm"))
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=pos_float)
    g.add_argument("--swiglu", action="store_const", const=True)
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--no-position-embedding", action="store_true", help="no learned absolute positions")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"))
    g.add_argument("--rotary-position-embeddings-theta", "--rope-theta", dest="rope_theta", type=pos_float)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_const", const=True)
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_const", const=False)
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--kv-channels", type=pos_int, help="attention head size; default hidden / heads")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="LayerNorm weights centred on zero: the gain is 1 + weight (weight starts at 0)")
    g.add_argument("--squared-relu", action="store_true", help="MLP activation relu(x)² instead of GeLU")
    g.add_argument("--openai-gelu", action="store_true",
                   help="GeLU MLP: the tanh approximation (OpenAI's GPT-2 GeLU), even where --no-bias-gelu-fusion "
                        "or --disable-bias-linear would select the exact one")
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="GeLU MLP: the exact (erf) GeLU, upstream's unfused F.gelu. Without it (and with biases) "
                        "the GeLU is upstream's fused bias-GeLU, the tanh approximation; --disable-bias-linear "
                        "turns the fusion off too. SwiGLU and squared-ReLU MLPs are unaffected")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="RoPE rotates only the first int(head dim × this) dims of each head (even), the rest "
                        "pass through (partial rotary, as GPT-NeoX); default 1.0. Hugging Face export refuses "
                        "values < 1 (LlamaForCausalLM rotates whole heads)")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="compute attention (scores, softmax, weighted sum) in fp32 under --bf16/--fp16")

    g = p.add_argument_group("initialization")
    g.add_argument("--init-method-std", type=pos_float, help="std of the normal init of weights; default 0.02")
    g.add_argument("--adjust-word-embedding-init", action="store_true",
                   help="initialise the word embeddings with --word-embedding-init-std instead")
    g.add_argument("--word-embedding-init-std", type=pos_float, default=0.02,
                   help="with --adjust-word-embedding-init (default 0.02)")
    g.add_argument("--init-method-xavier-uniform", action="store_true",
                   help="initialise every weight matrix (qkv, attention output, MLP, word and position embeddings, "
                        "untied output layer) Xavier-uniform over its full shape instead of normal(0, "
                        "--init-method-std) (output projections unscaled); --adjust-word-embedding-init still "
                        "sets the word embeddings' std")
    g.add_argument("--data-parallel-random-init", action="store_true",
                   help="seed each data-parallel rank's torch generators (dropout) with seed + 10 × dp rank "
                        "(upstream's offset), so replicas draw different dropout masks; the weights stay identical "
                        "on every dp rank (as upstream's broadcast from dp rank 0 leaves them)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=pos_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=pos_int, default=1)
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="train without DeepSpeed's pipeline engine (set for you with --zero-stage 2/3)")
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs tp > 1)")
    g.add_argument("--ds-sequence-parallel-size", type=pos_int, default=1, help="DeepSpeed-Ulysses group size")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo", "ccl", "xccl", "mpi", "hccl"),
                   help="default: picked from the device")

    g = p.add_argument_group("DeepSpeed (a --deepspeed_config file and these flags must agree)")
    g.add_argument("--deepspeed-config", "--deepscale-config", dest="deepspeed_config",
                   help="JSON file; values for flags you do not give are taken from it")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default 1 (as upstream)")
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
    g.add_argument("--universal-checkpoint", action="store_true",
                   help="--load names a DeepSpeed universal checkpoint folder (or a directory whose latest_universal "
                        "names one; make it with tools/convert_checkpoint.py to-universal) and resumes it at any "
                        "tp / pp / dp / ZeRO stage through DeepSpeed's loader (checkpoint.load_universal)")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=pos_int, help="per data-parallel rank; default 1")
    g.add_argument("--global-batch-size", type=pos_int, help="default micro batch × dp")
    g.add_argument("--rampup-batch-size", type=pos_int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples")

    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--train-iters", type=pos_int)
    g.add_argument("--train-samples", type=pos_int)
    g.add_argument("--train-tokens", type=pos_int)
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

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_const", const=True)
    g.add_argument("--fp16", action="store_const", const=True)
    g.add_argument("--loss-scale", type=pos_float, help="fp16: fixed loss scale; default dynamic")
    g.add_argument("--initial-loss-scale", type=pos_float, default=2.0**32,
                   help="fp16 dynamic scaling start (a power of 2)")
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
                        "--cpu-optimizer, which accumulate in bf16)")

    g = p.add_argument_group("run control, evaluation and checkpoints")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=pos_int, default=100)
    g.add_argument("--eval-interval", type=pos_int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="0 disables evaluation")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=pos_int)
    g.add_argument("--load")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and optimizer")
    g.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints hold no optimizer state (no DeepSpeed optimizer/ZeRO files); resuming one "
                        "needs --no-load-optim (or --finetune). Refused at --zero-stage 3, whose weights live in "
                        "the optimizer shards")
    g.add_argument("--no-save-rng", action="store_true",
                   help="checkpoints hold no RNG states (no rng_state_rank_*.pt); resuming one needs --no-load-rng")
    g.add_argument("--no-load-lr-state", action="store_true",
                   help="do not load the checkpoint's LR scheduler state: the schedule the flags describe starts "
                        "over from its step 0 (warmup included) at the resumed iteration")
    g.add_argument("--load-tag", help="the checkpoint under --load to resume (e.g. iter_0000100), instead of the one "
                                      "latest_checkpointed_iteration.txt / latest names; verified, no fallback")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape (layers, hidden, heads, seq length, ...), tp and pp sizes from the "
                        "arguments saved in the --load checkpoint, as upstream's load_args_from_checkpoint does "
                        "(shape flags you give yourself win for num-layers/hidden/ffn/heads/seq/positions)")
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
    g.add_argument("--profile", choices=("pt", "pt-full"),
                   help="torch.profiler trace of --profile_steps (pt-full: with stacks and shapes)")
    g.add_argument("--profile-steps", default="2,3", metavar="START,END",
                   help="steps of this launch to profile (1-based, inclusive; default 2,3)")
    g.add_argument("--profile-ranks", type=int, nargs="+", help="ranks to profile (default all)")
    g.add_argument("--trace-dir", default="./trace/", help="where --profile writes its Chrome traces")
    g.add_argument("--dry-run", nargs="?", type=int, const=0, default=None, metavar="WORLD_SIZE",
                   help="print the resolved run (layout, DeepSpeed config, blend summary, parameters, memory per "
                        "device) for WORLD_SIZE ranks (default: the launcher's) and exit without training")

    g = p.add_argument_group("tracking")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the --timing-log-level timers (max over ranks) to TensorBoard/wandb")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir", help="wandb's directory; default: --tensorboard-dir, else the working "
                                            "directory")
    g.add_argument("--tensorboard-queue-size", type=pos_int, default=1000,
                   help="events TensorBoard queues before writing to disk")
    g.add_argument("--tensorboard-log-interval", type=pos_int, default=1,
                   help="write the per-iteration scalars every N iterations (default 1)")
    g.add_argument("--no-log-learnig-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard",
                   action="store_false", help="do not log the learning rate (upstream's spelling)")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false", help="do not log the fp16 loss scale")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true", help="log the number of ranks")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="log L2/L1 norms and max of Adam's moments and of the weights (optimizer/*), every "
                        "--tensorboard-log-interval iterations")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="0: iteration time only; 1: + forward-backward, optimizer, batch-generator, "
                        "grads-all-reduce; 2: + per-micro-batch forward-compute, backward-compute")
    g.add_argument("--timing-log-option", choices=("max", "minmax", "all"), default="minmax",
                   help="report each timer's max, (min, max) or every rank's value across ranks")
    g.add_argument("--log-params-norm", action="store_true",
                   help="compute the L2 norm of all parameters (each counted once over tp/pp/ZeRO) every "
                        "--log-interval iterations: ' params norm: X |' in the log line, train/params_norm in "
                        "TensorBoard/wandb")
    g.add_argument("--peak-tflops", type=pos_float, help="one device's peak dense TFLOPS, for MFU")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--data-file-list", help="file of 'weight prefix [corpus]' lines")
    g.add_argument("--split", default=DataConfig.split)
    g.add_argument("--sample-mode", choices=("samples", "documents"), default="samples")
    g.add_argument("--document-shuffle-block", type=non_negative_int, default=DataConfig.document_shuffle_block,
                   metavar="N",
                   help="--sample-mode documents: a file with more than N documents in a split is shuffled each "
                        "epoch in blocks of N consecutive documents (cut at a new place each epoch), the blocks in "
                        "a shuffled order and the documents in a shuffled order inside each block, so that a "
                        "sample costs O(N + documents / N) to place, not a shuffle of the whole file. 0: one "
                        "shuffle of all the file's documents, Megatron's distribution (a full index per file and "
                        "epoch). Files of at most N documents get that one shuffle either way")
    g.add_argument("--mock-data", action="store_true", help="random tokens, no corpus (needs --vocab-size)")
    g.add_argument("--tokenizer-type")
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=pos_int)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--multiprocessing-context", choices=("fork", "spawn", "forkserver"), default="fork",
                   help="how DataLoader workers (--num-workers > 0) start (default fork, as upstream)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="HFTokenizer: let transformers run Python code shipped with the tokenizer directory "
                        "(custom tokenizer classes); off by default")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention is causal within each document: a token never attends to tokens before the "
                        "last EOD preceding it (needs a tokenizer with an EOD token; not with "
                        "--ds-sequence-parallel-size > 1). SDPA then takes an explicit [b, 1, s, s] mask, which "
                        "rules out its flash kernel")
    g.add_argument("--data-impl", choices=("mmap", "infer", "lazy", "cached"), default="infer",
                   help="the only format is MMIDIDX (.bin/.idx): mmap or infer")
    g.add_argument("--dataloader-type", choices=("single", "cyclic"), default="single",
                   help="single: one pass over the blended index (cyclic is not supported)")

    add_reliability_arguments(p)

    # ---- data: per-split blends, corpus mixing, index sharing, the blend report (issue #11) ----
    g = p.add_argument_group("data: per-split blends and the blend report")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=[],
                       help=f"the {split} split's own blend (PREFIX, or W1 PREFIX1 ...), whole files; replaces "
                            "--data-path/--data-file-list and --split")
    g.add_argument("--shuffle-sample-in-corpus", action="store_true",
                   help="always on here: the blend interleaves every corpus's files sample by sample over the "
                        "whole run (upstream without this flag reads a corpus's files one after another)")
    g.add_argument("--repeated-dataloader", action="store_true",
                   help="always on here: each split's dataset holds every sample the run asks for, repeating "
                        "files in new orders as needed, so the data iterator never runs out")
    g.add_argument("--data-cache-path",
                   help="no index cache is needed: the blend is arithmetic (computed from the file list, seed "
                        "and seq length in milliseconds). With --sample-mode documents this directory holds the "
                        "per-file document indices the ranks share (default: node-local /dev/shm)")
    g.add_argument("--blend-epochs-warning", type=pos_float, default=4.0,
                   help="the start-up blend report warns about every corpus repeated more than this many "
                        "times (default 4)")

    known = {option for action in p._actions for option in action.option_strings}
    g = p.add_argument_group("accepted for Megatron-DeepSpeed recipes, no effect here (kernel-fusion toggles, "
                             "and flags asking for what is always done here)")
    for flag, kind, why in COMPAT_NO_EFFECT + upstream_flags.NO_EFFECT:
        if flag in known:  # implemented by a flag above: that one wins
            continue
        known.add(flag)
        if kind == "flag":
            g.add_argument(flag, action="store_true", help=f"no effect: {why}")
        else:
            g.add_argument(flag, type=kind, help=f"no effect: {why}")
    g = p.add_argument_group("refused (not supported here)")
    for flag, why in REFUSED.items():
        if flag in known:
            continue
        known.add(flag)
        g.add_argument(flag, nargs="*", default=None, metavar="ARG", dest=_refused_dest(flag), help=why)
    return p


def _refused_dest(flag: str) -> str:
    return "refused__" + flag[2:].replace("-", "_")


def _normalize(argv: list[str]) -> list[str]:
    """'--a_b[=v]' → '--a-b[=v]' so both spellings reach the same flag; values are left alone."""
    out = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = name.replace("_", "-") + eq + value
        out.append(token)
    return out


_NEGATIONS = ("--no-", "--disable-", "--dont-", "--skip-")


def _negated(flag: str) -> bool:
    return flag.startswith(_NEGATIONS)


def _did_you_mean(name: str, known: list[str]) -> Optional[str]:
    """The nearest known flag of the same polarity (never --no-x for --x or the reverse)."""
    if name in OTHER_NAMES:
        return OTHER_NAMES[name]
    same_polarity = [k for k in known if _negated(k) == _negated(name)]
    close = difflib.get_close_matches(name, same_polarity, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_flag_lines(parser: argparse.ArgumentParser, unknown: list[str], typed: dict) -> list[str]:
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    lines, after_flag = [], False
    for token in unknown:
        if not token.startswith("-"):
            if after_flag:  # the value of the unknown flag just reported
                after_flag = False
                continue
            lines.append(f"unexpected value {token!r} (is a flag before it misspelled or missing a value?)")
            continue
        name = token.split("=", 1)[0]
        close = _did_you_mean(name, known)
        hint = f"; did you mean {close}?" if close else "; see --help"
        lines.append(f"unknown flag {typed.get(name, name)}{hint}")
        after_flag = "=" not in token
    return lines


def _drop_option(parser: argparse.ArgumentParser, argv: list[str], options: set[str]) -> list[str]:
    """argv without every occurrence of `options` and the values that follow them."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, _ = token.partition("=")
        if token.startswith("--") and name in options:
            i += 1
            if not eq:
                nargs = parser._option_string_actions[name].nargs
                count = 1 if nargs is None else nargs if isinstance(nargs, int) else None  # None: all values
                while i < len(argv) and not argv[i].startswith("--") and (count is None or count > 0):
                    i += 1
                    if count is not None:
                        count -= 1
            continue
        out.append(token)
        i += 1
    return out


def _parse_collecting(parser: argparse.ArgumentParser, argv: list[str], typed: dict):
    """(namespace, errors): every bad value and every unknown flag, each named as the user typed it."""
    errors = []
    for _ in range(len(argv) + 1):
        try:
            ns, unknown = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:
            options = set((e.argument_name or "").split("/"))
            used = next((t.split("=", 1)[0] for t in argv if t.split("=", 1)[0] in options), None)
            if used is None:  # not tied to one flag: report it as argparse says it
                raise ConfigError(f"{e} (see --help)") from None
            errors.append(f"{typed.get(used, used)}: {e.message}")
            argv = _drop_option(parser, argv, options)
            continue
        break
    return ns, errors + _unknown_flag_lines(parser, unknown, typed)


def read_deepspeed_config(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object at the top level")
    return ds


def deepspeed_file_values(ds: dict) -> dict:
    """The flag-dest → value pairs a DeepSpeed config states (batch sizes, ZeRO stage, precision, clipping)."""
    values = {}
    for key, dest in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                      ("train_batch_size", "global_batch_size"), ("gradient_clipping", "clip_grad")):
        if isinstance(ds.get(key), (int, float)) and not isinstance(ds.get(key), bool):
            values[dest] = ds[key]
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        if "stage" in zero:
            values["zero_stage"] = int(zero["stage"])
        offload = zero.get("offload_optimizer")
        values["cpu_optimizer"] = isinstance(offload, dict) and offload.get("device") == "cpu"
    bf16 = ds.get("bf16", ds.get("bfloat16"))
    if isinstance(bf16, dict):
        values["bf16"] = bool(bf16.get("enabled", False))
    if isinstance(ds.get("fp16"), dict):
        values["fp16"] = bool(ds["fp16"].get("enabled", False))
    return values


# dest -> (flag, DeepSpeed key) of the settings a --deepspeed_config file and the flags must agree on.
DEEPSPEED_AGREEMENT = {
    "micro_batch_size": ("--micro-batch-size", "train_micro_batch_size_per_gpu"),
    "global_batch_size": ("--global-batch-size", "train_batch_size"),
    "clip_grad": ("--clip-grad", "gradient_clipping"),
    "zero_stage": ("--zero-stage", "zero_optimization.stage"),
    "cpu_optimizer": ("--cpu-optimizer", "zero_optimization.offload_optimizer.device == 'cpu'"),
    "bf16": ("--bf16", "bf16.enabled"),
    "fp16": ("--fp16", "fp16.enabled"),
}


def _adopt_deepspeed_file(ns: argparse.Namespace) -> None:
    """Fill flags not given from the --deepspeed_config file; a given flag that disagrees is an error."""
    path = ns.deepspeed_config
    file_values = deepspeed_file_values(read_deepspeed_config(path))
    errors = []
    for dest, file_value in file_values.items():
        given = getattr(ns, dest)
        if given is None:
            setattr(ns, dest, file_value)
        elif given != file_value:
            flag, key = DEEPSPEED_AGREEMENT[dest]
            errors.append(f"{flag} {given} disagrees with {path}: {key} = {file_value}")
    if errors:
        raise ConfigError("the flags and the --deepspeed_config file disagree; make them match:\n  - "
                          + "\n  - ".join(errors))


# --use-checkpoint-args, as upstream's load_args_from_checkpoint: these take the checkpoint's value when the flag
# is not given (upstream's list, plus this framework's shape settings upstream has no flag for) ...
_CHECKPOINT_ARGS_IF_UNSET = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                             "num_key_value_heads", "kv_channels", "max_position_embeddings", "tokenizer_type",
                             "vocab_size", "make_vocab_size_divisible_by", "normalization", "norm_epsilon",
                             "rope_theta")
# ... and these always take it (upstream's force=True).
_CHECKPOINT_ARGS_ALWAYS = ("position_embedding_type", "rotary_percent", "add_bias_linear", "swiglu",
                           "untie_embeddings_and_output_weights", "apply_layernorm_1p", "tensor_model_parallel_size",
                           "pipeline_model_parallel_size")


def _adopt_checkpoint_args(ns: argparse.Namespace, notices: list) -> None:
    """--use-checkpoint-args: fill the model shape and the tp/pp sizes from the arguments saved in the --load
    checkpoint (--load-tag's, else the pointer's); a --load without a checkpoint yet keeps the flags, as upstream."""
    from megatron.errors import CheckpointError
    from megatron.checkpoint.saved_args import checkpoint_directory, read_saved_args

    try:
        directory = checkpoint_directory(ns.load, ns.load_tag)
        saved = read_saved_args(directory) if directory else None
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if saved is None:
        notices.append(f"--use-checkpoint-args: --load {ns.load} holds no checkpoint yet; the flags given are used")
        return
    if "position_embedding_type" not in saved and "use_rotary_position_embeddings" in saved:  # upstream's args
        saved["position_embedding_type"] = "rope" if saved["use_rotary_position_embeddings"] else (
            "learned_absolute" if saved.get("add_position_embedding", True) else "none")
    if "add_bias_linear" not in saved and "disable_bias_linear" in saved:
        saved["add_bias_linear"] = not saved["disable_bias_linear"]
    if saved.get("padded_vocab_size") and not saved.get("vocab_size"):
        saved["vocab_size"] = saved["padded_vocab_size"]
    taken = []
    for dest in _CHECKPOINT_ARGS_IF_UNSET + _CHECKPOINT_ARGS_ALWAYS:
        value = saved.get(dest)
        if value is None or not hasattr(ns, dest):
            continue
        if dest in _CHECKPOINT_ARGS_IF_UNSET and getattr(ns, dest) is not None:
            continue
        if getattr(ns, dest) != value:
            setattr(ns, dest, value)
            taken.append(f"--{dest.replace('_', '-')} {value}")
    if "position_embedding_type" in saved:  # the checkpoint's type, not the flags that would choose another
        ns.use_rotary_position_embeddings = ns.no_position_embedding = False
    notices.append(f"--use-checkpoint-args: from {directory}: " + (", ".join(taken) if taken else
                                                                  "the flags already match the checkpoint"))


def _resolve_model(ns: argparse.Namespace) -> TransformerConfig:
    base = preset(ns.model_preset) if ns.model_preset else {}
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads",
              "seq_length", "max_position_embeddings", "make_vocab_size_divisible_by", "normalization",
              "norm_epsilon", "swiglu", "rope_theta", "untie_embeddings_and_output_weights", "add_bias_linear",
              "attention_dropout", "hidden_dropout", "init_method_std", "kv_channels")
    values = dict(base)
    values.update({k: getattr(ns, k) for k in fields if getattr(ns, k) is not None})
    if ns.use_rotary_position_embeddings:
        values["position_embedding_type"] = "rope"  # Megatron-DS: rotary turns learned positions off
    elif ns.no_position_embedding:
        values["position_embedding_type"] = "none"
    elif ns.position_embedding_type:
        values["position_embedding_type"] = ns.position_embedding_type
    missing = [f"--{k.replace('_', '-')}" for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
               if k not in values]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or give --model-preset NAME)")
    values["vocab_size"] = ns.vocab_size or 0
    values["sequence_parallel"] = ns.sequence_parallel
    values["attention_softmax_in_fp32"] = ns.attention_softmax_in_fp32
    values["apply_layernorm_1p"] = ns.apply_layernorm_1p
    values["squared_relu"] = ns.squared_relu
    values["rotary_percent"] = ns.rotary_percent
    values["fp32_residual_connection"] = ns.fp32_residual_connection
    values["init_method"] = "xavier_uniform" if ns.init_method_xavier_uniform else "normal"
    # Upstream's MLP: --openai-gelu's tanh GeLU; else the fused bias-GeLU (tanh) unless --no-bias-gelu-fusion or
    # --disable-bias-linear turn the fusion off, leaving F.gelu (exact, erf).
    fused = ns.bias_gelu_fusion and values.get("add_bias_linear", True)
    values["gelu_approximation"] = "tanh" if ns.openai_gelu or fused else "none"
    if ns.adjust_word_embedding_init:
        values["word_embedding_init_std"] = ns.word_embedding_init_std
    values.update(_recompute_settings(ns))
    try:
        model = TransformerConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k in fields + ("position_embedding_type", "gelu_approximation", "init_method"):  # the run's final values
        setattr(ns, k, getattr(model, k))
    return model


def _recompute_settings(ns: argparse.Namespace) -> dict:
    """Megatron's recompute flags and the older --checkpoint-activations as the model's recompute fields."""
    granularity = "selective" if ns.recompute_activations else ns.recompute_granularity
    if granularity == "selective":
        return dict(recompute_core_attention=True)
    if granularity == "full":
        return dict(checkpoint_activations=True, checkpoint_num_layers=ns.recompute_num_layers,
                    recompute_method=ns.recompute_method or "uniform")
    return dict(checkpoint_activations=ns.checkpoint_activations, checkpoint_num_layers=ns.checkpoint_num_layers)


def _check_flags(ns: argparse.Namespace, typed: Optional[dict] = None) -> list[str]:
    typed = typed or {}
    errors = []
    for flag, why in REFUSED.items():
        value = getattr(ns, _refused_dest(flag), None)
        if value is None:
            continue
        off = upstream_flags.REFUSED_OFF_VALUES.get(flag)
        if off and value and set(value) <= off:  # e.g. --num-experts 1: a dense model, as here
            continue
        errors.append(f"{typed.get(flag, flag)}: {why}")
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 both given; pick one")
    granularity = "selective" if ns.recompute_activations else ns.recompute_granularity
    if ns.checkpoint_activations and granularity is not None:
        errors.append("--checkpoint-activations and --recompute-activations/--recompute-granularity both given; "
                      "give one (--checkpoint-activations is --recompute-granularity full --recompute-method uniform)")
    if ns.recompute_method and granularity != "full":
        errors.append("--recompute-method needs --recompute-granularity full")
    if ns.recompute_method == "block" and ns.pipeline_model_parallel_size > 1:
        errors.append("--recompute-method block is supported with --pipeline-model-parallel-size 1 only; use "
                      "uniform")
    if ns.openai_gelu and (ns.swiglu or ns.squared_relu):
        errors.append(f"--openai-gelu selects the GeLU of the MLP; it cannot be combined with "
                      f"{'--swiglu' if ns.swiglu else '--squared-relu'} (pick one activation)")
    if ns.reset_attention_mask and ns.ds_sequence_parallel_size > 1:
        errors.append("--reset-attention-mask is not supported with --ds-sequence-parallel-size "
                      f"{ns.ds_sequence_parallel_size} (Ulysses); drop one")
    if ns.accumulate_allreduce_grads_in_fp32 and ns.fp16:
        errors.append("--accumulate-allreduce-grads-in-fp32 is supported with --bf16 (and fp32) only, not --fp16")
    if ns.train_range_to_skip and len(ns.train_range_to_skip) % 2:
        errors.append(f"--train-range-to-skip takes pairs START END (got {len(ns.train_range_to_skip)} values)")
    elif any(a > b for a, b in zip((ns.train_range_to_skip or [])[::2], (ns.train_range_to_skip or [])[1::2])):
        errors.append("--train-range-to-skip: each START must be <= its END")
    steps = ns.profile_steps.split(",")
    if len(steps) != 2 or not all(s.strip().isdigit() and int(s) >= 1 for s in steps) or int(steps[0]) > int(steps[1]):
        errors.append(f"--profile_steps {ns.profile_steps!r} must be START,END with 1 <= START <= END")
    if ns.data_impl in ("lazy", "cached"):
        errors.append(f"--data-impl {ns.data_impl}: the only format is MMIDIDX (.bin/.idx); use mmap or infer")
    if ns.dataloader_type == "cyclic":
        errors.append("--dataloader-type cyclic is not supported: the run makes one pass over the blended index "
                      "(single); size the blend with --train-samples/--train-iters instead")
    if ns.universal_checkpoint and not ns.load:
        errors.append("--universal-checkpoint loads the universal folder that --load names; give --load")
    for dest in ("load_tag", "use_checkpoint_args", "no_load_lr_state"):
        if getattr(ns, dest) and not ns.load:
            flag = "--" + dest.replace("_", "-")
            errors.append(f"{typed.get(flag, flag)} concerns the checkpoint --load names; give --load")
    if ns.load_tag is not None and (not ns.load_tag.strip() or "/" in ns.load_tag or ns.load_tag in (".", "..")):
        errors.append(f"--load-tag {ns.load_tag!r} must be the name of one checkpoint directory under --load "
                      "(e.g. iter_0000100)")
    lengths = [f for f in ("train_iters", "train_samples", "train_tokens") if getattr(ns, f) is not None]
    if len(lengths) > 1:
        errors.append(f"give only one of {', '.join('--' + f.replace('_', '-') for f in lengths)}")
    if ns.rampup_batch_size:
        start, increment, _ = ns.rampup_batch_size
        if ns.train_iters is not None:
            errors.append("--rampup-batch-size needs --train-samples or --train-tokens, not --train-iters")
        if ns.global_batch_size is None:
            errors.append("--rampup-batch-size needs --global-batch-size (the batch it ramps up to)")
        elif start > ns.global_batch_size or (ns.global_batch_size - start) % increment:
            errors.append(f"--rampup-batch-size START {start} must be <= --global-batch-size "
                          f"{ns.global_batch_size} and reach it in steps of INCREMENT {increment}")
        if ns.lr_decay_iters is not None or ns.lr_warmup_iters:
            errors.append("with --rampup-batch-size the LR schedule counts samples: use --lr-decay-samples, "
                          "--lr-warmup-samples or --lr-warmup-fraction instead of --lr-*-iters")
    elif (ns.lr_decay_samples is not None or ns.lr_warmup_samples) and (ns.lr_decay_iters is not None
                                                                     or ns.lr_warmup_iters):
        errors.append("give the LR schedule's lengths in samples (--lr-decay-samples/--lr-warmup-samples) or in "
                      "iterations (--lr-decay-iters/--lr-warmup-iters), not both")
    if ns.lr < 0 or ns.min_lr < 0 or ns.min_lr > ns.lr:
        errors.append(f"need 0 <= --min-lr ({ns.min_lr}) <= --lr ({ns.lr})")
    if ns.lr_warmup_fraction is not None:
        if not 0.0 <= ns.lr_warmup_fraction < 1.0:
            errors.append(f"--lr-warmup-fraction must be in [0, 1) (got {ns.lr_warmup_fraction})")
        if ns.lr_warmup_iters or ns.lr_warmup_samples:
            errors.append("give only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
    for flag in ("lr_warmup_iters", "lr_warmup_samples", "num_workers", "eval_iters"):
        if (getattr(ns, flag) or 0) < 0:
            errors.append(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(ns, flag)})")
    if not 0.0 < ns.lr_wsd_decay_fraction <= 1.0:
        errors.append(f"--lr-wsd-decay-fraction must be in (0, 1] (got {ns.lr_wsd_decay_fraction})")
    if not (0.0 <= ns.adam_beta1 < 1.0 and 0.0 <= ns.adam_beta2 < 1.0):
        errors.append(f"--adam-beta1 ({ns.adam_beta1}) and --adam-beta2 ({ns.adam_beta2}) must be in [0, 1)")
    if ns.weight_decay < 0 or (ns.clip_grad or 0) < 0:
        errors.append("--weight-decay and --clip-grad must be >= 0")
    if ns.initial_loss_scale and not math.log2(ns.initial_loss_scale).is_integer():
        errors.append(f"--initial-loss-scale {ns.initial_loss_scale} must be a power of 2 (DeepSpeed's "
                      "initial_scale_power)")
    zero = ns.zero_stage or 0
    if zero >= 2 and ns.pipeline_model_parallel_size > 1:
        errors.append(f"--zero-stage {zero} does not work with DeepSpeed's pipeline engine "
                      f"(--pipeline-model-parallel-size {ns.pipeline_model_parallel_size}); use --zero-stage <= 1")
    if ns.cpu_optimizer and zero == 0:
        errors.append("--cpu-optimizer offloads ZeRO optimizer state: it needs --zero-stage >= 1")
    if ns.remote_device == "nvme":
        errors.append("--remote-device nvme is not supported; use cpu or none")
    elif ns.remote_device == "cpu" and zero != 3:
        errors.append("--remote-device cpu offloads ZeRO-3 parameters: it needs --zero-stage 3")
    if ns.save and ns.save_interval is None:
        errors.append("--save needs --save-interval (how many iterations between checkpoints)")
    if ns.mock_data and (ns.data_path or ns.data_file_list):
        errors.append("--mock-data and --data-path/--data-file-list both given; drop one")
    if ns.data_path and ns.data_file_list:
        errors.append("--data-path and --data-file-list both given; drop one")
    split_paths = [f"--{split}-data-path" for split in ("train", "valid", "test")
                   if getattr(ns, f"{split}_data_path")]
    if split_paths and (ns.data_path or ns.data_file_list or ns.mock_data):
        errors.append(f"{', '.join(split_paths)} and --data-path/--data-file-list/--mock-data both given: per-split "
                      "blends replace the single blend; drop one")
    elif split_paths and not ns.train_data_path:
        errors.append(f"{', '.join(split_paths)} without --train-data-path: give the train split's blend too")
    if ns.mock_data and not ns.vocab_size and not ns.tokenizer_type:
        errors.append("--mock-data needs --vocab-size (or a --tokenizer-type to take the size from)")
    errors += optimizer_flag_errors(ns)
    return errors


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
    """Parse Megatron-DeepSpeed flags into a RunConfig; raises ConfigError naming the flag and the fix.

    Every problem is reported at once (unknown flags, bad values, refused flags, conflicts), each flag
    spelled as the user typed it."""
    parser = build_parser()
    typed_argv = list(sys.argv[1:] if argv is None else argv)
    argv = _normalize(typed_argv)
    typed = {}
    for before, after in zip(typed_argv, argv):
        if before.startswith("--"):
            typed.setdefault(after.split("=", 1)[0], before.split("=", 1)[0])
    ns, errors = _parse_collecting(parser, argv, typed)
    notices = []
    if ns.use_checkpoint_args and ns.load and not errors:
        _adopt_checkpoint_args(ns, notices)
    errors += _check_flags(ns, typed)
    if errors:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(errors))
    if ns.deepspeed_config:
        _adopt_deepspeed_file(ns)
    # Defaults for the flags that a preset or a DeepSpeed file may fill, then the final values.
    for dest, default in (("micro_batch_size", 1), ("zero_stage", 1), ("cpu_optimizer", False),
                          ("bf16", False), ("fp16", False), ("clip_grad", 1.0)):
        if getattr(ns, dest) is None:
            setattr(ns, dest, default)
    file_states_zero = bool(ns.deepspeed_config) and \
        "zero_stage" in deepspeed_file_values(read_deepspeed_config(ns.deepspeed_config))
    if ns.bf16 and ns.accumulate_allreduce_grads_in_fp32 and ns.zero_stage == 0:
        if file_states_zero:
            raise ConfigError(ZERO0_FP32_ACCUMULATION)
        ns.zero_stage = 1
        notices.append(ZERO0_FP32_ACCUMULATION_NOTICE)
    if ns.no_save_optim and ns.zero_stage == 3:
        raise ConfigError("--no-save-optim with --zero-stage 3: a ZeRO-3 checkpoint holds the weights only in its "
                          "optimizer shards (DeepSpeed saves no gathered weights), so it would hold no weights at "
                          "all; drop --no-save-optim, or use --zero-stage 1 or 2")
    if ns.zero_stage >= 2 and ns.pipeline_model_parallel_size == 1:
        ns.no_pipeline_parallel = True
    if ns.fp32_residual_connection and not (ns.bf16 or ns.fp16):
        raise ConfigError("invalid arguments:\n  - --fp32-residual-connection keeps the residual stream in fp32 "
                          "under --bf16 or --fp16 (as upstream requires); this run is fp32 already: drop the flag "
                          "or add --bf16")
    model = _resolve_model(ns)
    parallel = ParallelConfig(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size, sequence_parallel=ns.sequence_parallel,
        ds_sequence_parallel_size=ns.ds_sequence_parallel_size, no_pipeline_parallel=ns.no_pipeline_parallel,
        distributed_backend=ns.distributed_backend)
    data = DataConfig(
        data_path=list(ns.data_path), data_file_list=ns.data_file_list, split=ns.split,
        sample_mode=ns.sample_mode, document_shuffle_block=ns.document_shuffle_block, mock_data=ns.mock_data, tokenizer_type=ns.tokenizer_type,
        tokenizer_model=ns.tokenizer_model, vocab_file=ns.vocab_file, merge_file=ns.merge_file,
        vocab_size=ns.vocab_size, num_workers=ns.num_workers, multiprocessing_context=ns.multiprocessing_context,
        trust_remote_code=ns.trust_remote_code, reset_position_ids=ns.reset_position_ids,
        eod_mask_loss=ns.eod_mask_loss, reset_attention_mask=ns.reset_attention_mask,
        train_data_path=list(ns.train_data_path),
        valid_data_path=list(ns.valid_data_path), test_data_path=list(ns.test_data_path),
        data_cache_path=ns.data_cache_path, blend_epochs_warning=ns.blend_epochs_warning)
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
    training = TrainingConfig(
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
    checkpoint = CheckpointConfig(save=ns.save, save_interval=ns.save_interval, load=ns.load,
                                  no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng, finetune=ns.finetune,
                                  no_save_optim=ns.no_save_optim, no_save_rng=ns.no_save_rng,
                                  no_load_lr_state=ns.no_load_lr_state, load_tag=ns.load_tag,
                                  use_checkpoint_args=ns.use_checkpoint_args)
    logging = LoggingConfig(log_interval=ns.log_interval, tensorboard_dir=ns.tensorboard_dir,
                            log_timers_to_tensorboard=ns.log_timers_to_tensorboard,
                            wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name,
                            wandb_save_dir=ns.wandb_save_dir, peak_tflops=ns.peak_tflops,
                            log_params_norm=ns.log_params_norm,
                            tensorboard_queue_size=ns.tensorboard_queue_size,
                            tensorboard_log_interval=ns.tensorboard_log_interval,
                            log_learning_rate_to_tensorboard=ns.log_learning_rate_to_tensorboard,
                            log_loss_scale_to_tensorboard=ns.log_loss_scale_to_tensorboard,
                            log_world_size_to_tensorboard=ns.log_world_size_to_tensorboard,
                            log_optimizer_states_to_tensorboard=ns.log_optimizer_states_to_tensorboard,
                            timing_log_level=ns.timing_log_level, timing_log_option=ns.timing_log_option)
    profiling = ProfilingConfig(profile=ns.profile, profile_steps=ns.profile_steps, profile_ranks=ns.profile_ranks,
                                trace_dir=ns.trace_dir)
    return RunConfig(model=model, parallel=parallel, data=data, training=training, checkpoint=checkpoint,
                     logging=logging, args=dict(vars(ns)), reliability=reliability_from_args(ns),
                     profiling=profiling, notices=notices)


# ---- derived values ------------------------------------------------------------------------------
def global_batch_size(run: RunConfig, dp_size: int) -> int:
    """The final global batch in samples: --global-batch-size, else micro batch × dp."""
    return run.training.global_batch_size or run.training.micro_batch_size * dp_size


def gradient_accumulation_steps(run: RunConfig, dp_size: int, global_batch: Optional[int] = None) -> int:
    """global / (micro × dp); a remainder is an error naming the three numbers."""
    micro = run.training.micro_batch_size
    batch = global_batch_size(run, dp_size) if global_batch is None else global_batch
    if batch % (micro * dp_size):
        raise ConfigError(
            f"--global-batch-size {batch} is not divisible by --micro-batch-size {micro} × data-parallel size "
            f"{dp_size} = {micro * dp_size}; choose a global batch that is a multiple of {micro * dp_size}")
    return batch // (micro * dp_size)


def global_batch_size_at(run: RunConfig, consumed_samples: int, dp_size: int) -> int:
    """Megatron's ramp-up: START + INCREMENT per (SAMPLES / number of increments) consumed samples, capped
    at the global batch and rounded down to a multiple of micro batch × dp."""
    final = global_batch_size(run, dp_size)
    if not run.training.rampup_batch_size:
        return final
    start, increment, ramp_samples = run.training.rampup_batch_size
    increments = (final - start) // increment
    if increments == 0 or consumed_samples >= ramp_samples:
        batch = final
    else:
        samples_per_increment = ramp_samples / increments
        batch = min(final, start + int(consumed_samples / samples_per_increment) * increment)
    unit = run.training.micro_batch_size * dp_size
    if batch < unit:
        raise ConfigError(f"--rampup-batch-size START {start} is smaller than --micro-batch-size "
                          f"{run.training.micro_batch_size} × data-parallel size {dp_size}")
    return batch // unit * unit


def train_samples(run: RunConfig, dp_size: int) -> int:
    """Samples the run trains on: --train-samples, --train-tokens / seq length, or iters × global batch."""
    t = run.training
    if t.train_samples is not None:
        return t.train_samples
    if t.train_tokens is not None:
        return t.train_tokens // run.model.seq_length
    if t.train_iters is not None:
        return t.train_iters * global_batch_size(run, dp_size)
    raise ConfigError("the run length is not set: give --train-iters, --train-samples or --train-tokens")


def train_iters(run: RunConfig, dp_size: int) -> int:
    """Optimizer steps: --train-iters, or the samples (from --train-samples / --train-tokens) walked
    through the batch ramp-up. Every step is a whole global batch: a remainder smaller than one batch is not
    trained on (Megatron's update_train_iters rounds down likewise), so the last iteration and the final save
    always have their data."""
    if run.training.train_iters is not None:
        return run.training.train_iters
    samples = train_samples(run, dp_size)
    final = global_batch_size(run, dp_size)
    consumed, iters = 0, 0
    while run.training.rampup_batch_size:
        batch = global_batch_size_at(run, consumed, dp_size)
        if batch == final or consumed + batch > samples:
            break
        consumed += batch
        iters += 1
    iters += (samples - consumed) // final
    if iters == 0:
        flag = "--train-samples" if run.training.train_samples is not None else "--train-tokens"
        raise ConfigError(f"{flag} gives {samples} samples, fewer than one global batch ({final}): the run would "
                          "train 0 iterations")
    return iters


def validate_run(run: RunConfig, world_size: int) -> None:
    """Checks that need the world size: the layout, batch divisibility, run length and data source."""
    errors = layout_errors(world_size, run.parallel, run.model)
    if not errors:
        dp = run.parallel.data_parallel_size(world_size)
        for check in (lambda: gradient_accumulation_steps(run, dp), lambda: train_iters(run, dp),
                      lambda: global_batch_size_at(run, 0, dp)):
            try:
                check()
            except ConfigError as e:
                errors.append(str(e))
    if not (run.data.mock_data or run.data.data_path or run.data.data_file_list or run.data.train_data_path):
        errors.append("no training data: give --data-path, --data-file-list, --train-data-path, or --mock-data "
                      "with --vocab-size")
    if errors:
        raise ConfigError(f"invalid run for world size {world_size}:\n  - " + "\n  - ".join(errors))
