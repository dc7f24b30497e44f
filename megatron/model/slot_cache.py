"""The KV cache of continuous batching: one slot per running sequence, each with its own length.

    cache = SlotKVCache(slots=8, layers=[0, 1], kv_heads=2, head_dim=8)
    cache.reserve(20)                                                  # columns per slot (grows, keeps the rows)
    cache.prefill(rows=range(3, 5), lengths=[4, 2])                    # rows 3, 4 join: right-padded to 4 columns
    hidden = stage(tokens[3:5], positions, kv_cache=cache)             # writes columns 0..3 of slots 3 and 4
    cache.decode(count=5)                                              # rows 0..4: one token each, at its own column
    hidden = stage(next_tokens[:5, None], lengths_as_positions, kv_cache=cache)
    cache.move(4, 1)                                                   # row 1 left: row 4 takes its slot

Why not model/kv_cache.py's KVCache: that cache keeps one length for a whole batch (every row writes the same
column), which fits the beams of one prompt. Here rows join while others decode, so each slot keeps its own
length:
- a prefill writes the joining rows' prompts right-padded from column 0 (row r's real tokens are columns
  0 .. n_r - 1); a query at column i attends to keys j <= i with j < n_r, and a padding query (i >= n_r) to
  those and itself, so no softmax is empty; its output is discarded and its columns are overwritten later,
  since the row's length is n_r, not the padded width;
- a decode step writes row r's one new key at column length[r] and attends to columns 0 .. length[r]; rows of
  different lengths share one SDPA call through a [rows, 1, 1, longest + 1] mask (no mask when all are equal).
Positions are each row's own (column = position), so a row gets what it gets alone. The running rows are kept
in slots 0 .. count - 1: when a row leaves, the engine moves the last row into its slot (`move`), so a decode
step is one contiguous slice of the buffers. The buffers are zeroed when allocated (a masked column must hold a
finite value: SDPA adds the mask to q·k, and NaN + -inf is NaN) and grow to the longest capacity asked for.

The interface the layers use (`begin`, `store`, `mask`, `causal`, `advance`) is KVCache's, so attention needs no
second path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class SlotKVCache:
    def __init__(self, slots: int, layers: Sequence[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        """`slots`: the most rows at once; `layers`: the (global) indices of this rank's layers; `kv_heads`: this
        tp rank's kv heads. No memory is held until a prefill asks for a capacity."""
        self.slots, self.layers, self.kv_heads, self.head_dim = slots, list(layers), kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.keys: dict = {}
        self.values: dict = {}
        self.lengths = [0] * slots          # filled columns of each slot
        self.mask: Optional[torch.Tensor] = None
        self.causal = False
        self._rows = slice(0, 0)             # the slots of the forward under way
        self._new: list = []                 # its new length for each of those rows
        self._columns: Optional[torch.Tensor] = None  # decode: the column each row writes
        self._width = 0                      # columns the forward under way writes (prefill) or 1 (decode)
        self._decoding = False

    # ---- memory ----------------------------------------------------------------------------------------
    def reserve(self, capacity: int) -> None:
        """Room for `capacity` columns in every slot (the filled columns of the running rows are kept)."""
        if capacity <= self.capacity:
            return
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for buffers in (self.keys, self.values):
            for layer in self.layers:
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer in buffers:
                    grown[:, :, :self.capacity].copy_(buffers[layer])
                buffers[layer] = grown
        self.capacity = capacity

    def release(self) -> None:
        """Drop the buffers (no row is running)."""
        self.keys, self.values, self.capacity = {}, {}, 0
        self.lengths = [0] * self.slots

    def move(self, source: int, target: int) -> None:
        """Slot `target` takes slot `source`'s row (its filled columns and length)."""
        if source == target:
            return
        length = self.lengths[source]
        for buffers in (self.keys, self.values):
            for buffer in buffers.values():
                buffer[target, :, :length].copy_(buffer[source, :, :length])
        self.lengths[target] = length
        self.lengths[source] = 0

    # ---- the forward under way -----------------------------------------------------------------------------
    def prefill(self, rows: range, lengths: Sequence[int]) -> None:
        """The next forward writes the prompts of the (empty) slots `rows`, of `lengths` tokens each, from
        column 0, right-padded to the longest."""
        if len(rows) != len(lengths) or not rows or rows.step != 1:
            raise ValueError("SlotKVCache.prefill: one length for each of a contiguous run of rows")
        width = max(lengths)
        if width > self.capacity:
            raise ValueError(f"SlotKVCache: a prompt of {width} tokens exceeds the capacity {self.capacity}")
        self._rows, self._new, self._decoding = slice(rows.start, rows.stop), list(lengths), False
        if min(lengths) == width:
            self._mask, self._causal = None, width > 1
            return
        device = self.device
        queries = torch.arange(width, device=device).view(1, width, 1)
        keys = torch.arange(width, device=device).view(1, 1, width)
        real = torch.tensor(list(lengths), device=device).view(-1, 1, 1)
        allowed = ((keys <= queries) & (keys < real)) | (keys == queries)
        self._mask, self._causal = allowed.unsqueeze(1), False

    def decode(self, count: int) -> None:
        """The next forward feeds one token to each of rows 0 .. count - 1, at its own next column."""
        lengths = self.lengths[:count]
        end = max(lengths) + 1
        if end > self.capacity:
            raise ValueError(f"SlotKVCache: column {end - 1} is beyond the capacity {self.capacity}")
        self._rows, self._new, self._decoding = slice(0, count), [n + 1 for n in lengths], True
        self._columns = torch.tensor(lengths, device=self.device)
        if min(lengths) == end - 1:
            self._mask, self._causal = None, False
            return
        keys = torch.arange(end, device=self.device).view(1, end)
        self._mask, self._causal = (keys <= self._columns.view(-1, 1)).view(count, 1, 1, end), False

    # ---- what the layers call (KVCache's interface) ---------------------------------------------------------
    def begin(self, s: int) -> None:
        self._width = s
        if self._decoding and s != 1:
            raise ValueError(f"SlotKVCache: a decode step feeds one token per row, got {s}")
        self.mask, self.causal = self._mask, self._causal

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values [b, s, kv heads, d] of `layer`; return the rows' keys/values so far as
        [b, kv heads, columns, d] (columns: the longest row's, the others masked)."""
        keys, values = self.keys[layer][self._rows], self.values[layer][self._rows]
        if self._decoding:
            rows = torch.arange(k.shape[0], device=k.device)
            keys[rows, :, self._columns] = k[:, 0]
            values[rows, :, self._columns] = v[:, 0]
            end = max(self._new)
        else:
            end = self._width
            keys[:, :, :end].copy_(k.transpose(1, 2))
            values[:, :, :end].copy_(v.transpose(1, 2))
        return keys[:, :, :end], values[:, :, :end]

    def advance(self) -> None:
        """The forward under way is done: each of its rows now holds its new length."""
        for row, length in zip(range(self._rows.start, self._rows.stop), self._new):
            self.lengths[row] = length
        self.mask, self._mask, self._columns, self._new = None, None, None, []
