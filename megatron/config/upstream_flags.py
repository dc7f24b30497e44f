"""Upstream's flags that this framework does not implement: each is refused with one line saying why, or
(only when it truly changes nothing in training here) accepted with no effect.

argonne-lcf/Megatron-DeepSpeed's `megatron/arguments.py` defines ~350 flags. Those that matter for GPT
pretraining are implemented in `arguments.py` with upstream's meaning; this file holds the rest, by theme, so
that a recipe written for upstream gets the run it asked for or an error naming the flag, never a silently
different run. tests/test_flag_audit.py checks every upstream name against these tables and the parser.
"""

from __future__ import annotations

# ---- refused: features outside this framework, by theme ----------------------------------------------------
_MOE = "mixture-of-experts layers are not supported (dense GPT/Llama models only)"
_FP8 = "fp8 / Transformer Engine training is not supported; use --bf16"
_RETRO = "RETRO (retrieval-augmented) models are not supported"
_VISION = "vision models are not supported (GPT pretraining only)"
_ENC_DEC = "BERT/T5 encoder(-decoder) models are not supported (decoder-only GPT only)"
_BIENCODER = "biencoder/ICT retriever models are not supported"
_DISTILL = "knowledge distillation (teacher models) is not supported"
_INFERENCE = "inference servers are not part of this framework; see tools/generate.py"
_MEMOPT = "DeepSpeed's tiled-linear / scattered-embedding memory optimisations are not supported"
_DATA_EFF = "DeepSpeed data-efficiency (curriculum learning, random-LTD) is not supported"
_IDX = "precomputed Megatron index files are not used: the blended index is computed from the file list"
_PIPE = "only DeepSpeed's 1F1B pipeline schedule is supported"
_LOCAL_DDP = "data parallelism and gradient reduction are DeepSpeed's here (Megatron's local DDP is not used)"

OUT_OF_SCOPE: dict[str, str] = {}
for _theme, _flags in (
    (_MOE, ["--num-experts", "--mlp-type", "--topk", "--expert-interval", "--num-experts-switch",
            "--disable-moe-token-dropping", "--moe-train-capacity-factor", "--moe-eval-capacity-factor",
            "--moe-min-capacity", "--moe-loss-coeff", "--create-moe-param-group",
            "--disable-moe-top2-2nd-expert-sampling", "--use-tutel", "--enable-expert-tensor-parallelism",
            "--moe-expert-parallel-size"]),
    (_FP8, ["--fp8-e4m3", "--fp8-hybrid", "--no-fp8-wgrad", "--fp8-margin", "--fp8-interval", "--transformer-impl",
            "--fp8-amax-history-len", "--fp8-amax-compute-algo"]),
    (_RETRO, ["--retro-workdir", "--retro-add-retriever", "--retro-cyclic-train-iters", "--retro-encoder-layers",
              "--retro-encoder-hidden-dropout", "--retro-encoder-attention-dropout", "--retro-num-neighbors",
              "--retro-num-retrieved-chunks", "--retro-return-doc-ids", "--retriever-seq-length"]),
    (_VISION, ["--num-classes", "--img-h", "--img-w", "--num-channels", "--patch-dim", "--classes-fraction",
               "--data-per-class-fraction", "--no-data-sharding", "--head-lr-mult", "--vision-pretraining",
               "--vision-pretraining-type", "--vision-backbone-type", "--swin-backbone-type", "--mask-type",
               "--mask-factor", "--iter-per-epoch", "--dino-local-img-size", "--dino-local-crops-number",
               "--dino-head-hidden-size", "--dino-bottleneck-size", "--dino-freeze-last-layer",
               "--dino-norm-last-layer", "--dino-warmup-teacher-temp", "--dino-teacher-temp",
               "--dino-warmup-teacher-temp-epochs"]),
    (_ENC_DEC, ["--encoder-num-layers", "--decoder-num-layers", "--encoder-seq-length", "--decoder-seq-length",
                "--bert-no-binary-head", "--vocab-extra-ids", "--mask-prob", "--short-seq-prob", "--sample-rate",
                "--output-bert-embeddings", "--bert-embedder-type", "--bert-load",
                "--pipeline-model-parallel-split-rank"]),
    (_BIENCODER, ["--ict-head-size", "--biencoder-projection-dim", "--biencoder-shared-query-context-model",
                  "--ict-load", "--titles-data-path", "--query-in-block-prob", "--use-one-sent-docs",
                  "--evidence-data-path", "--retriever-report-topk-accuracies", "--retriever-score-scaling",
                  "--block-data-path", "--embedding-path", "--indexer-batch-size", "--indexer-log-interval"]),
    (_DISTILL, ["--num-layers-teacher", "--num-experts-teacher", "--hidden-size-teacher",
                "--num-attention-heads-teacher", "--mos", "--kd", "--kd-alpha-ce", "--kd-beta-ce", "--kd-temp",
                "--load-teacher", "--reset-iteration"]),
    (_INFERENCE, ["--inference-batch-times-seqlen-threshold", "--max-tokens-to-oom", "--ds-inference",
                  "--inference"]),
    (_MEMOPT, ["--scattered-embeddings", "--split-transformers", "--memory-centric-tiled-linear",
               "--tile-factor"]),
    (_DATA_EFF, ["--random-ltd", "--data-efficiency-curriculum-learning", "--train-data-exact-num-epochs",
                 "--return-data-index"]),
    (_IDX, ["--train-idx-path", "--train-desc-path", "--train-doc-idx-path", "--train-sample-idx-path",
            "--train-shuffle-idx-path"]),
    (_PIPE, ["--num-layers-per-virtual-pipeline-stage", "--enable-zbh1-pipeline", "--enable-zbh1-exact-semantics",
             "--overlap-p2p-communication", "--use-ring-exchange-p2p", "--standalone-embedding-stage",
             "--no-scatter-gather-tensors-in-pipeline"]),
    (_LOCAL_DDP, ["--DDP-impl", "--no-contiguous-buffers-in-local-ddp", "--lazy-mpu-init"]),
):
    for _flag in _flags:
        OUT_OF_SCOPE[_flag] = _theme

# ---- refused: GPT-relevant, but not implemented here; the message names what to use instead ------------------
NOT_IMPLEMENTED: dict[str, str] = {
    "--use-mics": "MiCS sharding is not supported; use --zero-stage 3",
    "--use-distributed-optimizer": "Megatron's distributed optimizer is ZeRO-1 here: use --zero-stage 1",
    "--model-parallel-size": "removed upstream too: use --tensor-model-parallel-size",
    "--batch-size": "removed upstream too: use --micro-batch-size",
    "--force-ds-sequence-parallel": "Ulysses runs only with --ds-sequence-parallel-size > 1",
    "--use-dataset-only": "building the dataset without a model is not supported; see tools/ and benchmarks/",
    "--onnx-safe": "ONNX export is not supported",
    "--embedding-weights-in-fp32": "word embeddings are kept in the run's dtype; drop the flag",
    "--fp16-lm-cross-entropy": "the cross entropy is always computed in fp32; drop the flag",
    "--apply-residual-connection-post-layernorm": "only pre-norm layers (residual before the norm) are built",
    "--log-num-zeros-in-grad": "counting zero gradients is not supported (ZeRO partitions them)",
    "--adlr-autoresume": "NVIDIA ADLR auto-resume is not supported; use --exit-duration-in-mins or "
                         "--exit-signal-handler and resubmit with --load",
    "--adlr-autoresume-interval": "NVIDIA ADLR auto-resume is not supported; use --exit-duration-in-mins",
    "--aml-data-download-path": "Azure ML data mounts are not supported; give --data-path/--data-file-list",
    "--mmap-warmup": "index files are read lazily by design; drop the flag",
    "--distribute-saved-activations": "recomputed activations are not partitioned over tp; drop the flag "
                                      "(or lower --micro-batch-size)",
    "--distribute-checkpointed-activations": "recomputed activations are not partitioned over tp; drop the flag "
                                             "(or lower --micro-batch-size)",
    # DeepSpeed's activation-checkpointing options: recomputation here is this framework's own checkpoint (it
    # replays the tensor-parallel RNG streams; core/random.py), which implements --checkpoint-in-cpu and
    # --partition-activations (config/training.py) but not these two.
    "--contigious-checkpointing": "DeepSpeed's contiguous checkpoint buffers (preallocated per layer, against "
                                  "fragmentation) are not used: recomputation here is this framework's own "
                                  "checkpoint; drop the flag (--checkpoint-in-cpu and --partition-activations work)",
    "--synchronize-each-layer": "a device synchronisation around each recomputed layer is a profiling aid of "
                                "DeepSpeed's checkpoint, which is not used here (this framework's own checkpoint "
                                "replays its RNG streams); drop the flag",
    "--profile-backward": "DeepSpeed's checkpointed-layer profiler is not used; use --profile pt instead",
}

# Not implemented yet (this list shrinks as they are): refused rather than accepted and ignored.
NOT_YET: dict[str, str] = {
}
# Upstream's own refusal: its validate_args asserts that the old --warmup is unset.
NOT_IMPLEMENTED["--warmup"] = ("upstream's old warmup flag, which upstream refuses too; use --lr-warmup-iters, "
                               "--lr-warmup-samples or --lr-warmup-fraction")

REFUSED: dict[str, str] = {**OUT_OF_SCOPE, **NOT_IMPLEMENTED, **NOT_YET}

# Values a refused flag may take and still mean "off" (recipes pass --num-experts 1 for dense models).
REFUSED_OFF_VALUES = {"--num-experts": {"1"}}

# ---- accepted, no effect: flags that change nothing in training here ------------------------------------------
# (flag, kind, why): kind "flag" (no value) or a type for a value.
NO_EFFECT = [
    ("--deepscale", "flag", "DeepSpeed's old name for --deepspeed: the engine is always DeepSpeed"),
    ("--deepspeed-activation-checkpointing", "flag", "upstream's switch to DeepSpeed's recompute implementation; "
                                                     "recomputation here is always this framework's (same result): "
                                                     "turn it on with --checkpoint-activations or --recompute-*"),
    ("--disable-mem-efficient-ln", "flag", "kernel choice only: no fused LayerNorm kernels here"),
    ("--no-barrier-with-level-1-timing", "flag", "timers never add barriers here (they time the step's phases "
                                                 "as each rank sees them)"),
    ("--use-cpu-initialization", "flag", "weights are always initialised on the CPU (identical on every layout)"),
    ("--no-initialization", "flag", "start-up only: weights are initialised, then a loaded checkpoint "
                                    "overwrites them"),
    ("--zero-reduce-scatter", "flag", "ZeRO always reduce-scatters gradients here"),
    ("--zero-contigious-gradients", "flag", "ZeRO always uses contiguous gradients here"),
    ("--use-pin-memory", "flag", "offloaded ZeRO state is always pinned on accelerators"),
]
