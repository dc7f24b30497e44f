"""DeepSpeed-Ulysses sequence parallelism: all-to-all around attention over the sp group.

Each sp rank holds a sequence shard [b, s/sp, heads, d]. Before attention an all-to-all turns
it into all of the sequence for a slice of the heads [b, s, heads/sp, d]; after attention the
inverse all-to-all returns [b, s/sp, heads, d]. The heads given here are already this tensor-
parallel rank's heads, so heads are split first by tp, then by sp. q and k/v may have different
head counts (GQA): each is exchanged separately.

GQA with fewer key/value heads than sp ranks (DeepSpeed's rule, deepspeed/runtime/sequence_parallel/
ulysses_sp.py `kv_replication_factor`): when sp is a multiple of the kv heads n, each kv head is repeated
r = sp / n times in place (head i becomes heads i·r .. i·r + r - 1) before the all-to-all, so every sp rank
receives one kv head. Worked example, 8 query heads, 2 kv heads (group of 4), sp = 4: sp rank j gets query
heads 2j, 2j+1 and kv copy j, i.e. kv head j // 2 -- exactly the kv head of its query heads (head h uses kv
head h // 4). The backward of the repeat sums the copies' gradients, which is the gradient of the shared head.
Neither count dividing the other is refused by the layout check (megatron/config/parallel.py).
"""

from __future__ import annotations

import torch

from megatron.core import mappings

SEQ_DIM, HEAD_DIM = 1, 2  # [batch, sequence, heads, head_dim]


def kv_replication(kv_heads: int, sp_size: int) -> int:
    """How many times each of `kv_heads` key/value heads is repeated before the all-to-all over `sp_size` ranks:
    1 when sp divides them, sp / kv_heads when they divide sp."""
    if kv_heads % sp_size == 0:
        return 1
    if sp_size % kv_heads == 0:
        return sp_size // kv_heads
    raise ValueError(f"Ulysses: {kv_heads} key/value heads per tensor-parallel rank and "
                     f"--ds-sequence-parallel-size {sp_size}: neither divides the other")


def sequence_to_heads(x: torch.Tensor, sp_group) -> torch.Tensor:
    """[b, s/sp, h, d] sequence shard -> [b, s, h/sp, d] head shard (identity for one sp rank)."""
    return mappings.all_to_all(x, sp_group, scatter_dim=HEAD_DIM, gather_dim=SEQ_DIM)


def kv_sequence_to_heads(x: torch.Tensor, sp_group, sp_size: int) -> torch.Tensor:
    """sequence_to_heads for keys/values, replicating each head first when there are fewer than sp_size."""
    repeat = kv_replication(x.shape[HEAD_DIM], sp_size) if sp_size > 1 else 1
    if repeat > 1:
        x = x.repeat_interleave(repeat, dim=HEAD_DIM)
    return sequence_to_heads(x, sp_group)


def heads_to_sequence(x: torch.Tensor, sp_group) -> torch.Tensor:
    """[b, s, h/sp, d] head shard -> [b, s/sp, h, d] sequence shard (identity for one sp rank)."""
    return mappings.all_to_all(x, sp_group, scatter_dim=SEQ_DIM, gather_dim=HEAD_DIM)

