"""Megatron's parallel building blocks, knowing nothing of models.

mappings (autograd collectives), layers (Vocab/Column/Row-parallel), cross_entropy (vocab-parallel
loss), random (RNG streams per tp rank, RNG-replaying activation checkpointing), ulysses
(DeepSpeed-Ulysses all-to-all around attention).
"""

from megatron.core.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, merge_shards,
                                  shard_tensor)
from megatron.core.random import (RNGStatesTracker, checkpoint, derive_seed, get_rng_tracker,
                                  seed_model_parallel_rng)
from megatron.core.ulysses import heads_to_sequence, kv_sequence_to_heads, sequence_to_heads

__all__ = [
    "vocab_parallel_cross_entropy", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "merge_shards", "shard_tensor", "RNGStatesTracker", "checkpoint", "derive_seed", "get_rng_tracker",
    "seed_model_parallel_rng", "heads_to_sequence", "kv_sequence_to_heads", "sequence_to_heads",
]
