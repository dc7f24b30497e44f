"""The key/value cache of generation: every layer's keys and values, preallocated once for a batch.

    cache = KVCache(batch=2, capacity=12, layers=[0, 1], kv_heads=2, head_dim=8)
    hidden = stage(tokens[:, :5], positions[:, :5], kv_cache=cache)     # prefill: columns 0..4
    hidden = stage(next_tokens[:, None], positions_of_next, kv_cache=cache)  # one column per step after

Every row has the same length (beam search: the beams of one prompt), so all rows write the same column each
step and the cache keeps a single length. The first prefill is plain causal attention and one-token steps
attend to every cached key, without a mask; only a later chunk of several columns needs one (a query at column
i attends to the keys j <= i). Rows of different lengths are model/slot_cache.py's job.

Keys and values are stored [batch, kv heads, capacity, head dim] (SDPA's layout), so a forward reads the
filled columns as a view, and `reorder` (beam search) permutes the rows in place of the buffers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class KVCache:
    def __init__(self, batch: int, capacity: int, layers: Sequence[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        """`layers`: the (global) indices of the layers this rank runs; `kv_heads`: this tp rank's kv heads."""
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = {i: torch.empty(shape, dtype=dtype, device=device) for i in layers}
        self.values = {i: torch.empty(shape, dtype=dtype, device=device) for i in layers}
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.device = device
        self.mask: Optional[torch.Tensor] = None  # [b, 1, s, length + s] for the forward under way
        self.causal = False
        self._step = 0  # columns the forward under way adds

    def begin(self, s: int) -> None:
        """Prepare a forward of `s` new columns (called once per forward, before the layers)."""
        if self.length + s > self.capacity:
            raise ValueError(f"KVCache: {self.length} + {s} columns exceed its capacity {self.capacity}")
        self._step = s
        end = self.length + s
        if self.length == 0 or s == 1:
            self.mask, self.causal = None, self.length == 0 and s > 1
            return
        queries = torch.arange(self.length, end, device=self.device).view(s, 1)
        keys = torch.arange(end, device=self.device).view(1, end)
        self.mask, self.causal = (keys <= queries).view(1, 1, s, end), False

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values [b, s, kv heads, d] of `layer`; return all its keys/values so far as
        views [b, kv heads, length + s, d]."""
        end = self.length + self._step
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length:end].copy_(k.transpose(1, 2))
        values[:, :, self.length:end].copy_(v.transpose(1, 2))
        return keys[:, :, :end], values[:, :, :end]

    def advance(self) -> None:
        """The forward under way is done: its columns are now part of the cache."""
        self.length += self._step
        self._step = 0
        self.mask = None

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam search keeps the beams it extends)."""
        rows = rows.to(self.device)
        for buffers in (self.keys, self.values):
            for layer, buffer in buffers.items():
                buffer[:, :, :self.length] = buffer[rows, :, :self.length]
