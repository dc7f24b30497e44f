"""Input embedding (vocab-parallel words + learned positions) and the output projection to the vocabulary.

The vocabulary is padded to config.padded_vocab_size(tp); padding rows start at zero and the
loss ignores their logits. Under Megatron sequence parallelism the embedding returns this tp
rank's sequence shard, and the output projection all-gathers the shards first. With
--fp32-residual-connection the embedding's output (the start of the residual stream) is fp32.
With --tiled-logits-loss the projection and the loss are one tiled step (core/cross_entropy.py
tiled_vocab_parallel_cross_entropy): `language_model_loss` never holds a whole sequence's logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core import mappings
from megatron.core.cross_entropy import tiled_vocab_parallel_cross_entropy
from megatron.core.layers import VocabParallelEmbedding, full_init, mark_partition, shard_tensor
from megatron.core.random import derive_seed
from megatron.distributed.parallel_state import ParallelState
from megatron.model.transformer import hidden_dropout


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig, ps: ParallelState, seed: int):
        super().__init__()
        self.config, self.ps = config, ps
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_group=ps.tp_group,
            padded_num_embeddings=config.padded_vocab_size(ps.tp_size), sequence_parallel=self.sequence_parallel,
            init_std=config.word_embedding_init_std or config.init_method_std,
            init_seed=derive_seed(seed, "embedding.word_embeddings.weight"),
            # --adjust-word-embedding-init's std wins over the model's init method (upstream's core embedding)
            init_method="normal" if config.word_embedding_init_std else config.init_method,
        )
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            with torch.no_grad():
                self.position_embeddings.weight.copy_(full_init(
                    self.position_embeddings.weight.shape, config.init_method_std,
                    derive_seed(seed, "embedding.position_embeddings.weight"), config.init_method))
            # Under sequence parallelism each rank adds positions of its own shard: partial grads.
            self.position_embeddings.weight.sequence_parallel = self.sequence_parallel
        else:
            self.position_embeddings = None

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Embedding: tokens must be an integer tensor [batch, seq], got {tokens.dtype}")
        hidden = self.word_embeddings(tokens)  # [b, s, h], or [b, s/tp, h] under sequence parallelism
        if self.position_embeddings is not None:
            if position_ids.device.type == "cpu" and int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position id {int(position_ids.max())} is beyond --max-position-embeddings "
                                 f"{self.config.max_position_embeddings}")
            if self.sequence_parallel:
                position_ids = position_ids.chunk(self.ps.tp_size, dim=1)[self.ps.tp_rank]
            hidden = hidden + self.position_embeddings(position_ids)
        if self.config.fp32_residual_connection:  # the residual stream starts here (upstream casts before dropout)
            hidden = hidden.float()
        return hidden_dropout(hidden, self.config.hidden_dropout, self.training, self.sequence_parallel,
                              self.ps.tp_size)


def output_projection_input(hidden: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Hidden states as every vocabulary shard's projection takes them: the whole (local) sequence, gathered
    from Megatron's sequence shards, or entering the tensor-parallel region (backward: all-reduce)."""
    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(hidden, tp_group)
    return mappings.copy_to_tensor_parallel_region(hidden, tp_group)


def language_model_logits(hidden: torch.Tensor, weight: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """This rank's vocabulary logits [b, s, V/tp] from hidden states (full, or sequence shards)."""
    return F.linear(output_projection_input(hidden, tp_group, sequence_parallel), weight)


def language_model_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, config: TransformerConfig,
                        tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Per-token loss [b, s] of the logits hidden Wᵀ, tiled along the sequence (--tiled-logits-loss)."""
    hidden = output_projection_input(hidden, tp_group, sequence_parallel)
    return tiled_vocab_parallel_cross_entropy(hidden, weight, labels, config.sequence_tile_length(labels.shape[0]),
                                              tp_group, config.loss_vocab_size)


class OutputLayer(nn.Module):
    """Untied output projection: weight [padded_vocab/tp, h], padding rows zero."""

    def __init__(self, config: TransformerConfig, ps: ParallelState, seed: int):
        super().__init__()
        self.config, self.ps = config, ps
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        full = torch.zeros(config.padded_vocab_size(ps.tp_size), config.hidden_size)
        full[: config.vocab_size] = full_init((config.vocab_size, config.hidden_size), config.init_method_std,
                                              derive_seed(seed, "output_layer.weight"), config.init_method)
        self.weight = nn.Parameter(shard_tensor(full, 0, ps.tp_size, ps.tp_rank))
        mark_partition(self.weight, 0)

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, s, V/tp]; with `labels`, the tiled per-token loss instead (--tiled-logits-loss)."""
        if labels is not None:
            return language_model_loss(hidden, self.weight, labels, self.config, self.ps.tp_group,
                                       self.sequence_parallel)
        return language_model_logits(hidden, self.weight, self.ps.tp_group, self.sequence_parallel)


def gather_logits(logits: torch.Tensor, ps: ParallelState, vocab_size: Optional[int] = None) -> torch.Tensor:
    """All-gather vocab-parallel logits to [b, s, padded_vocab]; keep the first `vocab_size` columns if given."""
    full = mappings.gather_from_tensor_parallel_region(logits, ps.tp_group)
    return full if vocab_size is None else full[..., :vocab_size]
