"""The transformer's shape and numerics: one dataclass, read by model/ and by the converters.

`TransformerConfig` holds what defines the weights (sizes, norm, MLP kind, positions,
attention layout) and the per-run numerics that the model itself applies (dropout,
init std, Megatron sequence parallelism, activation recomputation).

The model's command-line flags (`add_model_arguments`) and the flags → TransformerConfig builder
(`model_from_args`, presets included) are at the end; config/arguments.py calls them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron.config.argtypes import pos_float, pos_int
from megatron.config.presets import preset
from megatron.errors import ConfigError

NORMALIZATIONS = ("layernorm", "rmsnorm")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
GELU_APPROXIMATIONS = ("tanh", "none")  # torch's F.gelu(approximate=...): tanh formula, or exact (erf)
INIT_METHODS = ("normal", "xavier_uniform")


def swiglu_default_ffn_hidden_size(hidden_size: int, multiple_of: int = 64) -> int:
    """Megatron-DeepSpeed's rule for --swiglu without --ffn-hidden-size: 2/3 of 4h, rounded DOWN to a
    multiple of 64 (so checkpoints match theirs), and at least one multiple."""
    return max(multiple_of, int(8 * hidden_size / 3 / multiple_of) * multiple_of)


@dataclass
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None  # None: 4h (GeLU) or Megatron-DS's 2/3·4h rule (SwiGLU)
    num_key_value_heads: Optional[int] = None  # None: MHA (= num_attention_heads); fewer: GQA
    seq_length: int = 1024
    max_position_embeddings: Optional[int] = None  # None: seq_length
    vocab_size: int = 0  # the tokenizer's size, unpadded; padded_vocab_size() adds the padding
    make_vocab_size_divisible_by: int = 128
    normalization: str = "layernorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"
    rope_theta: float = 10000.0
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    word_embedding_init_std: Optional[float] = None  # None: init_method_std (--adjust-word-embedding-init sets it)
    kv_channels: Optional[int] = None  # attention head size; None: hidden_size // num_attention_heads
    # Under bf16/fp16 without flash attention, upstream's CoreAttention: scores QKᵀ/(√d·L) in the activations'
    # dtype (L = the 1-based layer number with query-key layer scaling, else 1), softmax in fp32 (after × L) when
    # apply_query_key_layer_scaling or attention_softmax_in_fp32, else in the activations' dtype, probabilities
    # back to that dtype for the weighted sum. With flash attention (--use-flash-attn*): SDPA (fp32 softmax inside).
    attention_softmax_in_fp32: bool = False
    apply_query_key_layer_scaling: bool = True  # upstream's default; --no-query-key-layer-scaling turns it off
    flash_attention: bool = False  # --use-flash-attn, -v1, -v2, -triton, -builder
    apply_layernorm_1p: bool = False  # LayerNorm weight stored zero-centred: y = norm(x) * (1 + w) + b
    squared_relu: bool = False  # MLP activation relu(x)² instead of GeLU
    # The GeLU of a non-gated MLP: "tanh" (upstream's fused bias-GeLU and --openai-gelu) or "none", the exact
    # erf form (upstream's F.gelu with --no-bias-gelu-fusion or --disable-bias-linear).
    gelu_approximation: str = "tanh"
    rotary_percent: float = 1.0  # RoPE rotates the first int(head_dim × this) dims of each head (even), not the rest
    fp32_residual_connection: bool = False  # residual stream (embeddings → final norm) in fp32 under bf16/fp16
    # "normal": N(0, init_method_std) (output projections /sqrt(2L)); "xavier_uniform": every weight matrix,
    # embeddings included, U(±sqrt(6 / (fan_in + fan_out))) of its full (unsharded) shape.
    init_method: str = "normal"
    # Megatron sequence parallelism (activations outside attention/MLP sharded along the sequence over tp).
    sequence_parallel: bool = False
    # Full activation recomputation: "uniform" recomputes chunks of `checkpoint_num_layers` layers, "block" only
    # the first `checkpoint_num_layers` layers (Megatron's --recompute-method); the rest keep their activations.
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    recompute_method: str = "uniform"
    # Selective recomputation (Megatron's --recompute-granularity selective): only the core attention.
    recompute_core_attention: bool = False
    # Long sequences (docs/LONG_SEQUENCES.md). The input kept for each recomputed chunk of layers: on the CPU
    # (upstream's --checkpoint-in-cpu), and/or split over the tp ranks (--partition-activations).
    checkpoint_in_cpu: bool = False
    partition_activations: bool = False
    # Sequence tiling: the MLP (--tiled-mlp) and the output projection + loss (--tiled-logits-loss) run
    # `sequence_tile_size` tokens at a time (None: hidden_size tokens, so a tile's [tokens, ffn/tp] or
    # [tokens, vocab/tp] is no larger than the weight it multiplies).
    tiled_mlp: bool = False
    tiled_logits_loss: bool = False
    sequence_tile_size: Optional[int] = None
    # The loss's softmax runs over the padded vocabulary (upstream's: its padding rows get gradients and train),
    # instead of the real vocabulary only (--loss-over-padded-vocab; on by default when resuming a checkpoint
    # trained that way, e.g. any of argonne-lcf/Megatron-DeepSpeed's: checkpoint/resume.py).
    loss_over_padded_vocab: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = (
                swiglu_default_ffn_hidden_size(self.hidden_size) if self.swiglu else 4 * self.hidden_size
            )
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def loss_vocab_size(self) -> Optional[int]:
        """The vocabulary the loss's softmax spans (cross_entropy's vocab_size): None, all padded columns, with
        loss_over_padded_vocab; else the real vocabulary."""
        return None if self.loss_over_padded_vocab else self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Head dims RoPE rotates (upstream: int(kv_channels × rotary_percent) when the percent is < 1)."""
        return int(self.head_dim * self.rotary_percent) if self.rotary_percent < 1.0 else self.head_dim

    @property
    def recomputed_layers(self) -> int:
        """Layers whose forward runs twice under full recomputation (for hardware FLOPs)."""
        if not self.checkpoint_activations:
            return 0
        return min(self.num_layers, self.checkpoint_num_layers) if self.recompute_method == "block" \
            else self.num_layers

    def sequence_tile_length(self, batch: int) -> int:
        """Sequence positions per tile for a micro-batch of `batch` rows: the tile's tokens shared by the rows."""
        return max(1, (self.sequence_tile_size or self.hidden_size) // max(1, batch))

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by × tp (Megatron's rule)."""
        multiple = max(1, self.make_vocab_size_divisible_by) * tensor_parallel_size
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the unsharded model (padding excluded), used for FLOPs and reports."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        bias = 1 if self.add_bias_linear else 0
        norm = h * (2 if self.normalization == "layernorm" else 1)
        attn = h * (q + 2 * kv) + bias * (q + 2 * kv) + q * h + bias * h
        mlp = (2 if self.swiglu else 1) * (h * f + bias * f) + f * h + bias * h
        per_layer = attn + mlp + 2 * norm
        total = L * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * h
            if self.untie_embeddings_and_output_weights:
                total += self.vocab_size * h
            if self.position_embedding_type == "learned_absolute":
                total += self.max_position_embeddings * h
        return total

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        errors = []
        if self.normalization not in NORMALIZATIONS:
            errors.append(f"--normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            errors.append(
                f"position embedding type {self.position_embedding_type!r} is not one of {POSITION_EMBEDDING_TYPES}"
            )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) <= 0:
                errors.append(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads and not self.kv_channels:
            errors.append(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            errors.append(
                f"--num-attention-heads {self.num_attention_heads} is not a multiple of "
                f"--num-key-value-heads {self.num_key_value_heads}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            errors.append(f"rotary embeddings need an even head dim (hidden/heads = {self.head_dim})")
        if not 0.0 < self.rotary_percent <= 1.0:
            errors.append(f"--rotary-percent must be in (0, 1] (got {self.rotary_percent})")
        elif self.position_embedding_type == "rope" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            errors.append(f"--rotary-percent {self.rotary_percent} of head dim {self.head_dim} rotates "
                          f"{self.rotary_dim} dims; rotary embeddings need an even number >= 2")
        elif self.rotary_percent < 1.0 and self.position_embedding_type != "rope":
            errors.append(f"--rotary-percent {self.rotary_percent} needs rotary position embeddings "
                          "(--use-rotary-position-embeddings)")
        if self.gelu_approximation not in GELU_APPROXIMATIONS:
            errors.append(f"gelu_approximation {self.gelu_approximation!r} is not one of {GELU_APPROXIMATIONS}")
        if self.init_method not in INIT_METHODS:
            errors.append(f"init_method {self.init_method!r} is not one of {INIT_METHODS}")
        if self.max_position_embeddings < self.seq_length and self.position_embedding_type == "learned_absolute":
            errors.append(
                f"--max-position-embeddings {self.max_position_embeddings} is smaller than --seq-length "
                f"{self.seq_length}"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(self, name)})")
        if self.apply_layernorm_1p and self.normalization != "layernorm":
            errors.append("--apply-layernorm-1p applies to LayerNorm (upstream's meaning); it cannot be combined "
                          "with --normalization rmsnorm")
        if self.squared_relu and self.swiglu:
            errors.append("--squared-relu and --swiglu both given; pick one MLP activation")
        if self.recompute_method not in ("uniform", "block"):
            errors.append(f"--recompute-method {self.recompute_method!r} is not one of uniform, block")
        if self.checkpoint_num_layers < 1:
            errors.append(f"--checkpoint-num-layers must be >= 1 (got {self.checkpoint_num_layers})")
        for name in ("checkpoint_in_cpu", "partition_activations"):
            if getattr(self, name) and not self.checkpoint_activations:
                errors.append(f"--{name.replace('_', '-')} acts on the inputs kept for recomputed layers: it needs "
                              "--checkpoint-activations or --recompute-granularity full")
        if self.sequence_tile_size is not None and self.sequence_tile_size < 1:
            errors.append(f"--sequence-tile-size must be >= 1 (got {self.sequence_tile_size})")
        if errors:
            raise ValueError("invalid model configuration:\n  - " + "\n  - ".join(errors))

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- flags (config/arguments.py's build_parser calls these in --help's order) ----------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The "model" and "initialization" groups. Shape flags default to None so --model-preset can fill them."""
    g = parser.add_argument_group("model (explicit flags win over --model-preset)")
    g.add_argument("--model-preset", help="named shape from megatron/config/presets.py (tiny, llama2-7b, ...)")
    g.add_argument("--num-layers", type=pos_int, help="required (a --model-preset fills it)")
    g.add_argument("--hidden-size", type=pos_int, help="required (a --model-preset fills it)")
    g.add_argument("--ffn-hidden-size", type=pos_int,
                   help="default 4h, or with --swiglu Megatron's int(8h/3/64)*64")
    g.add_argument("--num-attention-heads", type=pos_int, help="required (a --model-preset fills it)")
    g.add_argument("--num-key-value-heads", "--num-query-groups", dest="num_key_value_heads", type=pos_int,
                   help="fewer than heads: grouped-query attention")
    g.add_argument("--seq-length", type=pos_int, help="required (a --model-preset fills it)")
    g.add_argument("--max-position-embeddings", type=pos_int, help="default --seq-length")
    g.add_argument("--make-vocab-size-divisible-by", type=pos_int, help="default 128")
    g.add_argument("--loss-over-padded-vocab", action=argparse.BooleanOptionalAction, default=None,
                   help="softmax of the loss over the padded vocabulary, padding rows trained (upstream's loss); "
                        "default: on when resuming a checkpoint trained so (any upstream one), else off")
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
                   help="under --bf16/--fp16 without flash attention: the attention softmax (masking and softmax) "
                        "in fp32; scores and weighted sum stay in the run's dtype. Already so unless "
                        "--no-query-key-layer-scaling (as upstream)")
    g.add_argument("--no-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_false",
                   default=True,
                   help="do not scale QKᵀ by 1 / layer number (upstream's default scales it and then computes the "
                        "softmax in fp32 under --bf16/--fp16; without scaling the softmax is in the run's dtype "
                        "unless --attention-softmax-in-fp32). Flash attention is unaffected")
    g.add_argument("--apply-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_true",
                   help="scale QKᵀ by 1 / layer number (the default)")
    for flag in ("--use-flash-attn", "--use-flash-attn-v1", "--use-flash-attn-v2", "--use-flash-attn-triton",
                 "--use-flash-attn-builder"):
        g.add_argument(flag, dest="use_flash_attn", action="store_true",
                       help="flash attention (torch SDPA's fused kernels: softmax in fp32 inside, whatever the "
                            "layer-scaling flags); without it, under --bf16/--fp16, upstream's unfused attention")

    g = parser.add_argument_group("initialization")
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


def model_from_args(ns: argparse.Namespace) -> TransformerConfig:
    """The TransformerConfig the flags (over --model-preset) describe; sets the final values back on `ns`, so the
    run's saved arguments hold them rather than the None a flag defaulted to."""
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
    # NullTokenizer (no --tokenizer-type, or that one): --vocab-size V gives V + 1 tokens, the EOD id V (upstream's
    # _NullTokenizer); another tokenizer's own size replaces this once it is built
    null = getattr(ns, "tokenizer_type", None) in (None, "NullTokenizer")
    values["vocab_size"] = (ns.vocab_size + (1 if null else 0)) if ns.vocab_size else 0
    values["sequence_parallel"] = ns.sequence_parallel
    values["loss_over_padded_vocab"] = bool(getattr(ns, "loss_over_padded_vocab", None))
    values["attention_softmax_in_fp32"] = ns.attention_softmax_in_fp32
    values["apply_query_key_layer_scaling"] = ns.apply_query_key_layer_scaling
    values["flash_attention"] = ns.use_flash_attn
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
    for name in ("checkpoint_in_cpu", "partition_activations", "tiled_mlp", "tiled_logits_loss",
                 "sequence_tile_size"):
        values[name] = getattr(ns, name)
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
