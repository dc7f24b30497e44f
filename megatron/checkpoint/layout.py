"""The layout-free model every converter speaks: GPTModel names at tp=1, vocabulary padding removed.

A `FullModelSource` yields the model one layer group at a time (embedding, layers.0 ... layers.L-1,
final_norm, output_layer) so conversions hold one layer, never the whole model twice. This file
also knows the expected names and shapes (to name what is missing or different) and how to
recover a run's TransformerConfig from a checkpoint's saved state.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch

from megatron.config.model import TransformerConfig
from megatron.errors import MegatronError


class ConversionError(MegatronError, ValueError):
    """Inputs that cannot be converted; the message names the file/flag and what differs."""


# ---- names and shapes -----------------------------------------------------------------------------------

def layer_prefixes(config: TransformerConfig) -> list[str]:
    """The layer groups of the full model, in the order sources stream them."""
    prefixes = ["embedding."] + [f"layers.{i}." for i in range(config.num_layers)] + ["final_norm."]
    if config.untie_embeddings_and_output_weights:
        prefixes.append("output_layer.")
    return prefixes


def expected_shapes(config: TransformerConfig, prefix: str) -> dict[str, tuple]:
    """Full (tp=1, unpadded vocabulary) shapes of the parameters under `prefix`."""
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    bias = config.add_bias_linear
    norm_bias = config.normalization == "layernorm"
    if prefix == "embedding.":
        shapes = {"embedding.word_embeddings.weight": (config.vocab_size, h)}
        if config.position_embedding_type == "learned_absolute":
            shapes["embedding.position_embeddings.weight"] = (config.max_position_embeddings, h)
        return shapes
    if prefix == "final_norm.":
        return {"final_norm.weight": (h,), **({"final_norm.bias": (h,)} if norm_bias else {})}
    if prefix == "output_layer.":
        return {"output_layer.weight": (config.vocab_size, h)}
    if not prefix.startswith("layers."):
        raise KeyError(f"unknown layer group {prefix!r}")
    fc1 = 2 * f if config.swiglu else f
    shapes = {}
    for norm in ("input_norm", "post_attention_norm"):
        shapes[f"{prefix}{norm}.weight"] = (h,)
        if norm_bias:
            shapes[f"{prefix}{norm}.bias"] = (h,)
    for name, out_dim, in_dim in (("attention.qkv", qkv, h), ("attention.dense", h, config.num_attention_heads * d),
                                  ("mlp.fc1", fc1, h), ("mlp.fc2", h, f)):
        shapes[f"{prefix}{name}.weight"] = (out_dim, in_dim)
        if bias:
            shapes[f"{prefix}{name}.bias"] = (out_dim,)
    return shapes


def full_parameter_names(config: TransformerConfig) -> list[str]:
    return [name for prefix in layer_prefixes(config) for name in expected_shapes(config, prefix)]


VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")  # rows: the (padded) vocabulary


def strip_vocab_padding(name: str, tensor: torch.Tensor, config: TransformerConfig, source: str,
                        keep: bool = False) -> torch.Tensor:
    """The real vocabulary's rows of an embedding / output weight (all its rows, padding included, with `keep`:
    a source read for a run whose loss trains the padding rows, or for an export back to upstream's format)."""
    if name in VOCAB_ROWS:
        if tensor.shape[0] < config.vocab_size:
            raise ConversionError(
                f"{source}: {name} has {tensor.shape[0]} rows but the run's vocabulary has {config.vocab_size} "
                "tokens; the checkpoint and the configuration come from different tokenizers")
        return tensor if keep else tensor[: config.vocab_size]
    return tensor


def check_group(prefix: str, tensors: Mapping[str, torch.Tensor], config: TransformerConfig, source: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped tensor of one layer group."""
    expected = expected_shapes(config, prefix)
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    for name, shape in expected.items():
        if name in VOCAB_ROWS and name in tensors and tensors[name].shape[0] >= shape[0] \
                and tuple(tensors[name].shape[1:]) == tuple(shape[1:]):
            continue  # the vocabulary's padding rows kept (FullModelSource.keep_vocab_padding)
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    if problems:
        raise ConversionError(f"{source}: layer group {prefix!r} does not match the model configuration: "
                              + "; ".join(problems))


# ---- sources --------------------------------------------------------------------------------------------

class FullModelSource:
    """Streams the full model layer group by layer group. Subclasses implement `load_group`."""

    config: TransformerConfig
    description: str = "model"
    # The run's tokenizer flags (tokenizer_type, tokenizer_model, vocab_file, merge_file, vocab_size), if known.
    tokenizer_args: Optional[dict] = None
    # Where a Hugging Face tokenizer can be copied from (a HF model directory), if any.
    hf_tokenizer_dir: Optional[str] = None
    # Readers that honour it (ours, upstream's) return the vocabulary padding rows too when this is set (resume
    # with --loss-over-padded-vocab, to-argonne); the Hugging Face export leaves it off.
    keep_vocab_padding: bool = False

    def load_group(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def iter_groups(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for prefix in layer_prefixes(self.config):
            tensors = self.load_group(prefix)
            check_group(prefix, tensors, self.config, self.description)
            yield prefix, tensors

    def full_weight(self, name: str) -> torch.Tensor:
        """One full (tp=1, unpadded) weight, read with its layer group (the last group read is kept, so a
        caller walking the parameters in order reads each group once)."""
        cached = getattr(self, "_group_cache", None)
        if cached is None or name not in cached[1]:
            prefix = next((p for p in layer_prefixes(self.config) if name in expected_shapes(self.config, p)), None)
            if prefix is None:
                raise ConversionError(f"{self.description}: {name} is not a weight of the saved model")
            cached = self._group_cache = (prefix, self.load_group(prefix))
        return cached[1][name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in memory (small models and tests only)."""
        out = {}
        for _, tensors in self.iter_groups():
            out.update(tensors)
        return out


class StateDictSource(FullModelSource):
    """A full GPTModel state dict in memory (padding allowed: it is stripped)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: TransformerConfig,
                 description: str = "state dict", tokenizer_args: Optional[dict] = None):
        self.sd, self.config, self.description, self.tokenizer_args = state_dict, config, description, tokenizer_args

    def load_group(self, prefix):
        return {name: strip_vocab_padding(name, self.sd[name], self.config, self.description)
                for name in expected_shapes(self.config, prefix) if name in self.sd}


# ---- the run's configuration from a checkpoint ----------------------------------------------------------

TOKENIZER_KEYS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def config_from_client_state(client_state: Mapping, source: str) -> TransformerConfig:
    """The run's TransformerConfig from what our checkpoints save (model_config, else the run's args)."""
    if client_state.get("model_config"):
        config = TransformerConfig.from_dict(dict(client_state["model_config"]))
    else:
        args = client_state.get("args") or {}
        if not args.get("num_layers"):
            raise ConversionError(f"{source}: the checkpoint holds neither 'model_config' nor the run's arguments; "
                                  "it was not written by this framework's pretrain_gpt.py")
        values = {k: v for k, v in args.items() if v is not None}
        values["vocab_size"] = _vocab_size_from_args(args, source)
        values.update(sequence_parallel=False, checkpoint_activations=False)
        config = TransformerConfig.from_dict(values)
    if config.vocab_size <= 0:
        raise ConversionError(f"{source}: the saved model configuration has no vocabulary size")
    return config.replace(sequence_parallel=False, checkpoint_activations=False)


def _vocab_size_from_args(args: Mapping, source: str) -> int:
    if args.get("tokenizer_type") not in (None, "NullTokenizer"):
        from megatron.data.tokenizers import build_tokenizer

        try:
            return build_tokenizer(args["tokenizer_type"], args.get("tokenizer_model"), args.get("vocab_file"),
                                   args.get("merge_file"), args.get("vocab_size")).vocab_size
        except (OSError, ValueError) as err:
            raise ConversionError(f"{source}: the run's tokenizer cannot be rebuilt to learn the vocabulary size "
                                  f"({err}); pass --vocab-size") from err
    if args.get("vocab_size"):
        return int(args["vocab_size"])
    raise ConversionError(f"{source}: the run's arguments do not say the vocabulary size; pass --vocab-size")


def tokenizer_args_from(args: Optional[Mapping]) -> Optional[dict]:
    if not args or not args.get("tokenizer_type"):
        return None
    return {k: args.get(k) for k in TOKENIZER_KEYS}
