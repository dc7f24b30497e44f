"""Split a full GPTModel state dict over tensor-parallel ranks and merge it back (pure functions).

The one description of GPTModel's tensor-parallel layout, used by tests, checkpoints and converters:

    parameter (suffix)                         split             how
    embedding.word_embeddings.weight          dim 0 (vocab)     re-padded to padded_vocab_size(tp), then chunks
    output_layer.weight                        dim 0 (vocab)     same as the word embedding
    attention.qkv.weight / .bias               dim 0             q, k, v split separately: rank r = [q_r | k_r | v_r]
    mlp.fc1.weight / .bias                     dim 0             SwiGLU: gate, up split separately: [gate_r | up_r]
    attention.dense.weight, mlp.fc2.weight     dim 1             chunks
    everything else                            replicated        norms (+bias), dense/fc2 biases, position embeddings

Merged tensors keep the vocabulary padding of the layout they came from; `shard_state_dict`
accepts any padding >= vocab_size (rows beyond the vocabulary are dropped, then zero-padded; kept with
config.loss_over_padded_vocab, the loss that trains them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from megatron.config.model import TransformerConfig
from megatron.core.layers import merge_shards, shard_tensor

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
REPLICATED_SUFFIXES = (
    "input_norm.weight", "input_norm.bias", "post_attention_norm.weight", "post_attention_norm.bias",
    "attention.dense.bias", "mlp.fc2.bias",
)
REPLICATED_NAMES = ("embedding.position_embeddings.weight", "final_norm.weight", "final_norm.bias")


@dataclass(frozen=True)
class Partition:
    dim: Optional[int]  # None: replicated
    segments: Optional[tuple] = None  # full sizes of separately-split parts along dim
    vocab: bool = False  # rows are the padded vocabulary


def partition_of(name: str, config: TransformerConfig) -> Partition:
    """How parameter `name` of GPTModel is laid out over tensor-parallel ranks."""
    if name in VOCAB_PARAMS:
        return Partition(dim=0, vocab=True)
    if name in REPLICATED_NAMES:
        return Partition(dim=None)
    if name.startswith("layers."):
        suffix = name.split(".", 2)[2] if name.count(".") >= 2 else ""
        if suffix in REPLICATED_SUFFIXES:
            return Partition(dim=None)
        if suffix in ("attention.qkv.weight", "attention.qkv.bias"):
            q = config.num_attention_heads * config.head_dim
            kv = config.num_key_value_heads * config.head_dim
            return Partition(dim=0, segments=(q, kv, kv))
        if suffix in ("mlp.fc1.weight", "mlp.fc1.bias"):
            f = config.ffn_hidden_size
            return Partition(dim=0, segments=(f, f) if config.swiglu else None)
        if suffix in ("attention.dense.weight", "mlp.fc2.weight"):
            return Partition(dim=1)
    raise KeyError(f"{name!r} is not a GPTModel parameter name (see megatron/model/sharding.py for the layout)")


def repad_vocab(name: str, tensor: torch.Tensor, config: TransformerConfig, tp_size: int) -> torch.Tensor:
    """`tensor` (vocabulary rows first, any padding) with the rows padded_vocab_size(tp_size) gives: the real
    vocabulary (and, with config.loss_over_padded_vocab, the trained padding rows that fit), zeros after."""
    if tensor.shape[0] < config.vocab_size:
        raise ValueError(f"{name}: {tensor.shape[0]} rows, fewer than the vocabulary size {config.vocab_size}; "
                         "is this state dict from a different tokenizer / --vocab-size?")
    padded = config.padded_vocab_size(tp_size)
    out = tensor.new_zeros((padded,) + tuple(tensor.shape[1:]))
    # --loss-over-padded-vocab trains the padding rows: they are kept (those a smaller padding has no room for
    # must be zero); otherwise only the real vocabulary's rows are, and the padding starts at zero
    rows = min(tensor.shape[0], padded) if config.loss_over_padded_vocab else config.vocab_size
    if config.loss_over_padded_vocab and tensor.shape[0] > padded and bool(tensor[padded:].any()):
        raise ValueError(f"{name}: {tensor.shape[0]} rows with trained padding rows beyond the {padded} this layout "
                         f"pads the vocabulary {config.vocab_size} to (--make-vocab-size-divisible-by "
                         f"{config.make_vocab_size_divisible_by} × tp {tp_size}); use the checkpoint's tp / "
                         "--make-vocab-size-divisible-by, or --no-loss-over-padded-vocab to drop the padding rows")
    out[:rows] = tensor[:rows]
    return out


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], config: TransformerConfig, tp_size: int,
                     tp_rank: int) -> dict:
    """The state dict of tp rank `tp_rank` of `tp_size`, from an unsharded (tp=1) GPTModel state dict."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    out = {}
    for name, tensor in full_sd.items():
        part = partition_of(name, config)
        if part.dim is None:
            out[name] = tensor.clone()
            continue
        if part.vocab:
            tensor = repad_vocab(name, tensor, config, tp_size)
        try:
            out[name] = shard_tensor(tensor, part.dim, tp_size, tp_rank, part.segments)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return out


def merge_state_dicts(tp_sds: Sequence[Mapping[str, torch.Tensor]], config: TransformerConfig) -> dict:
    """The unsharded state dict from the state dicts of tp ranks 0..tp-1 (replicated params from rank 0)."""
    if not tp_sds:
        raise ValueError("merge_state_dicts needs at least one state dict")
    names = list(tp_sds[0].keys())
    for rank, sd in enumerate(tp_sds):
        if set(sd.keys()) != set(names):
            missing = set(names) ^ set(sd.keys())
            raise ValueError(f"merge_state_dicts: tp rank {rank} has different keys from rank 0: {sorted(missing)[:5]}")
    out = {}
    for name in names:
        part = partition_of(name, config)
        if part.dim is None:
            out[name] = tp_sds[0][name].clone()
        else:
            out[name] = merge_shards([sd[name] for sd in tp_sds], part.dim, part.segments)
    return out
