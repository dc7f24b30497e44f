"""DeepSpeed-Ulysses sequence parallelism: all-to-all around attention over the sp group.

Each sp rank holds a sequence shard [b, s/sp, heads, d]. Before attention an all-to-all turns
it into all of the sequence for a slice of the heads [b, s, heads/sp, d]; after attention the
inverse all-to-all returns [b, s/sp, heads, d]. The heads given here are already this tensor-
parallel rank's heads, so heads are split first by tp, then by sp. q and k/v may have different
head counts (GQA): each is exchanged separately, and sp must divide both.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.core import mappings

SEQ_DIM, HEAD_DIM = 1, 2  # [batch, sequence, heads, head_dim]


def sequence_to_heads(x: torch.Tensor, sp_group) -> torch.Tensor:
    """[b, s/sp, h, d] sequence shard -> [b, s, h/sp, d] head shard (identity for one sp rank)."""
    return mappings.all_to_all(x, sp_group, scatter_dim=HEAD_DIM, gather_dim=SEQ_DIM)


def heads_to_sequence(x: torch.Tensor, sp_group) -> torch.Tensor:
    """[b, s, h/sp, d] head shard -> [b, s/sp, h, d] sequence shard (identity for one sp rank)."""
    return mappings.all_to_all(x, sp_group, scatter_dim=SEQ_DIM, gather_dim=HEAD_DIM)


class UlyssesAttention(torch.nn.Module):
    """Wrap a local attention `fn(q, k, v) -> out` on [b, s, heads, d] tensors with the all-to-alls.

    q, k, v arrive as sequence shards [b, s/sp, heads, d] (k, v may have fewer heads); the
    output is a sequence shard [b, s/sp, q_heads, d].
    """

    def __init__(self, local_attention: Callable, sp_group):
        super().__init__()
        self.local_attention = local_attention
        self.sp_group = sp_group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (sequence_to_heads(t, self.sp_group) for t in (q, k, v))
        return heads_to_sequence(self.local_attention(q, k, v), self.sp_group)
