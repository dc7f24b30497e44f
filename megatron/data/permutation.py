"""A keyed bijection on [0, n): shuffles a file's samples without storing a permutation.

A balanced Feistel network on the smallest even number of bits covering n, with cycle walking
(re-encrypt until the value falls below n), so `permute(i)` is a permutation of [0, n) for every key.
Used by the blend (megatron/data/blend.py) to order each file's samples per epoch; vectorised in numpy.

`shuffled_range(n, key)`: a materialised keyed shuffle of [0, n), for documents mode's per-file orders.
"""

from __future__ import annotations

import threading

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
FEISTEL_ROUNDS = 6


def mix64(values) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values (elementwise)."""
    z = np.array(values, dtype=np.uint64, copy=True, ndmin=1)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _MIX_1
        z ^= z >> np.uint64(27)
        z *= _MIX_2
        z ^= z >> np.uint64(31)
    return z


_MASK64 = (1 << 64) - 1


def _mix64_int(z: int) -> int:
    """mix64 of one value in Python integers (the same bits, without numpy's per-call overhead)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_key(seed, *parts) -> np.ndarray:
    """A 64-bit key from a seed and further integers (scalars or equal-shape arrays), e.g. (file, epoch).

    Scalars (one key per document index or window offset, thousands per batch) take a pure-integer path
    that gives the same bits as the vectorised one."""
    if all(isinstance(value, (int, np.integer)) for value in (seed, *parts)):
        key = _mix64_int(int(seed) & _MASK64)
        for part in parts:
            key = _mix64_int(key ^ _mix64_int(int(part) & _MASK64))
        return np.array([key], dtype=np.uint64)
    key = mix64(np.asarray(seed, dtype=np.int64).astype(np.uint64))
    for part in parts:
        key = mix64(key ^ mix64(np.asarray(part, dtype=np.int64).astype(np.uint64)))
    return key


def _half_bits(sizes: np.ndarray) -> np.ndarray:
    """Bits per Feistel half: the smallest h with 4**h >= size (at least 1)."""
    bits = np.ceil(np.log2(np.maximum(sizes, 2).astype(np.float64))).astype(np.int64)
    # float log2 can be off by one for huge sizes: correct it exactly
    bits = np.where((np.uint64(1) << bits.astype(np.uint64)) < sizes.astype(np.uint64), bits + 1, bits)
    return np.maximum((bits + 1) // 2, 1).astype(np.uint64)


def _encrypt(x: np.ndarray, half: np.ndarray, keys: np.ndarray) -> np.ndarray:
    mask = (np.uint64(1) << half) - np.uint64(1)
    left, right = x >> half, x & mask
    with np.errstate(over="ignore"):
        for round_number in range(FEISTEL_ROUNDS):
            round_key = keys + np.uint64(round_number + 1) * _GOLDEN
            left, right = right, left ^ (mix64(right ^ round_key) & mask)
    return (left << half) | right


def permute(indices, sizes, keys) -> np.ndarray:
    """The keyed permutation of [0, size) applied to `indices` (elementwise; arrays broadcast).

    indices[i] must lie in [0, sizes[i]); the result does too, and for a fixed (size, key) distinct
    indices give distinct results. Cost: FEISTEL_ROUNDS mixes per element and fewer than 4 walks on average.
    """
    indices, sizes, keys = np.broadcast_arrays(np.asarray(indices, dtype=np.int64),
                                               np.asarray(sizes, dtype=np.int64),
                                               np.asarray(keys, dtype=np.uint64))
    shape = indices.shape
    indices, sizes, keys = indices.ravel(), sizes.ravel(), keys.ravel()
    if indices.size and (np.any(indices < 0) or np.any(indices >= sizes)):
        bad = int(np.flatnonzero((indices < 0) | (indices >= sizes))[0])
        raise IndexError(f"permute: index {int(indices[bad])} outside [0, {int(sizes[bad])})")
    half = _half_bits(sizes)
    out = indices.astype(np.uint64)
    limit = sizes.astype(np.uint64)
    pending = np.arange(out.size)
    while pending.size:  # cycle walking: re-encrypt values that land outside [0, size)
        out[pending] = _encrypt(out[pending], half[pending], keys[pending])
        pending = pending[out[pending] >= limit[pending]]
    return out.astype(np.int64).reshape(shape)


class KeyedPermutation:
    """One permutation of [0, n): `perm[i]` or `perm(array)`; `perm.materialize()` for small n (tests)."""

    def __init__(self, n: int, key):
        if n < 1:
            raise ValueError(f"KeyedPermutation needs n >= 1, got {n}")
        self.n = int(n)
        self.key = np.uint64(np.asarray(key, dtype=np.uint64).reshape(-1)[0])

    def __call__(self, indices) -> np.ndarray:
        return permute(indices, self.n, self.key)

    def __getitem__(self, index: int) -> int:
        return int(permute([index], self.n, self.key)[0])

    def materialize(self) -> np.ndarray:
        return self(np.arange(self.n))


# PCG64's increment: any odd 128-bit number selects a stream (this one is PCG's 128-bit default multiplier)
_PCG64_INCREMENT = 0x2360ED051FC65DA44385DF649FCCF645 | 1
_generators = threading.local()


def shuffled_range(n: int, key: int) -> np.ndarray:
    """A permutation of [0, n) (int64) drawn from numpy's PCG64 with its 128-bit state set from the 64-bit
    `key` (two splitmix64 mixes), the same for the same (n, key) on every machine and numpy >= 1.17.

    The state is set directly (`bit_generator.state`, numpy's public API) on one generator per thread:
    `np.random.default_rng(key)` hashes the key through a SeedSequence first, which costs more than
    shuffling a few thousand documents, and documents mode shuffles ~1,000 files for a first batch."""
    generator = getattr(_generators, "generator", None)
    if generator is None:
        generator = _generators.generator = np.random.Generator(np.random.PCG64(0))
    key = int(key) & _MASK64
    state = (_mix64_int(key) << 64) | _mix64_int(key ^ 0x5EED)
    generator.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": _PCG64_INCREMENT},
                                     "has_uint32": 0, "uinteger": 0}
    return generator.permutation(int(n))
