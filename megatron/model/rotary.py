"""Rotary position embeddings (RoPE) in the rotate-half convention of Llama / Hugging Face.

cos/sin are computed in float32 from the position ids (so any shard of a sequence, e.g. under
Ulysses, gets its true positions), once per forward (GPTModel) or per pipe micro-batch and stage
(`cached_rotary`), and applied to q and k laid out [b, s, heads, head_dim]. Weights taken from
Hugging Face's LlamaForCausalLM need no permutation. `split_qkv_rotary` splits a fused qkv
projection and rotates q and k in one autograd node whose backward writes one gradient buffer
(no concatenation).

Partial rotary (--rotary-percent p < 1, as upstream and GPT-NeoX): cos/sin are computed for
rotary_dim = int(head_dim · p) dims (frequencies theta^(-2i/rotary_dim)); the first rotary_dim dims of
each head are rotated (rotate-half within them) and the remaining dims pass through unchanged. The
rotated width is read from cos/sin's last dim (rotary_dim / 2).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

# Rotate-half's two halves use the same angles, so cos/sin are kept half-width: [b, s, 1, head_dim/2].
Rotary = tuple[torch.Tensor, torch.Tensor]


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """cos, sin of shape [b, s, 1, head_dim/2] (float32) for integer positions [b, s]; `head_dim` is the
    rotated width (config.rotary_dim, smaller than the head under --rotary-percent).

    Full-width Hugging Face cos/sin are cat((cos, cos), -1) of these (and the same for sin).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim (hidden size / heads), got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = (position_ids.float().unsqueeze(-1) * inv_freq).unsqueeze(2)
    return angles.cos(), angles.sin()


_last_rotary: dict = {}


def cached_rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """rotary_cos_sin, reused while the same position-ids tensor comes back (pipe layers of one micro-batch)."""
    if position_ids.is_inference():  # no version counter to check a cached entry against
        return rotary_cos_sin(position_ids, head_dim, theta)
    key = (head_dim, float(theta), position_ids.device)
    hit = _last_rotary.get(key)
    if hit is not None:
        ref, version, rotary = hit
        if ref() is position_ids and version == position_ids._version:
            return rotary
    rotary = rotary_cos_sin(position_ids, head_dim, theta)
    _last_rotary[key] = (weakref.ref(position_ids), position_ids._version, rotary)
    return rotary


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out = x·cos + rotate_half(x)·sin, with x, out [b, s, h, d] (any strides) and cos/sin [b, s, 1, r/2]:
    the first r dims are rotated, the other d - r copied (partial rotary).

    With sin negated this is the inverse rotation, i.e. the backward of the forward rotation.
    """
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        out[..., rot:].copy_(x[..., rot:])
        out, x = out[..., :rot], x[..., :rot]
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


class _SplitQKVRotary(torch.autograd.Function):
    """qkv [b, s, (nq + 2 nkv)·d] -> q [b, s, nq, d] and k [b, s, nkv, d] rotated by cos/sin, v [b, s, nkv, d]."""

    @staticmethod
    def forward(ctx, qkv, nq, nkv, head_dim, cos, sin):
        b, s = qkv.shape[:2]
        q_in, k_in, v_in = qkv.split([nq * head_dim, nkv * head_dim, nkv * head_dim], dim=-1)
        shapes = [(b, s, nq, head_dim), (b, s, nkv, head_dim), (b, s, nkv, head_dim)]
        q_in, k_in, v_in = (t.view(shape) for t, shape in zip((q_in, k_in, v_in), shapes))
        ctx.sizes = (nq, nkv, head_dim)
        v = v_in.clone(memory_format=torch.contiguous_format)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        q, k = torch.empty(shapes[0], dtype=qkv.dtype, device=qkv.device), torch.empty(
            shapes[1], dtype=qkv.dtype, device=qkv.device)
        _rotate_into(q, q_in, cos, sin)
        _rotate_into(k, k_in, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        nq, nkv, d = ctx.sizes
        reference = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        b, s = reference.shape[:2]
        grad = torch.empty(b, s, (nq + 2 * nkv) * d, dtype=reference.dtype, device=reference.device)
        parts = grad.split([nq * d, nkv * d, nkv * d], dim=-1)
        parts = [p.view(b, s, n, d) for p, n in zip(parts, (nq, nkv, nkv))]
        cos, sin = ctx.saved_tensors
        neg_sin = sin.neg()
        for part, g, rotated in zip(parts, (grad_q, grad_k, grad_v), (True, True, False)):
            if g is None:
                part.zero_()
            elif rotated:
                _rotate_into(part, g, cos, neg_sin)
            else:
                part.copy_(g)
        return grad, None, None, None, None, None


def split_qkv_rotary(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
                     rotary: Optional[Rotary] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection [b, s, (nq + 2 nkv)·d] into q [b, s, nq, d], k and v [b, s, nkv, d],
    rotating q and k by `rotary` (cos, sin from rotary_cos_sin) when given."""
    expected = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[-1] != expected:
        raise ValueError(f"split_qkv_rotary: last dim {qkv.shape[-1]} is not (nq {num_q_heads} + 2·nkv "
                         f"{num_kv_heads})·head_dim {head_dim} = {expected}")
    if rotary is None:  # plain views (no rotation to fuse the split with)
        b, s = qkv.shape[:2]
        q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        return (q.view(b, s, num_q_heads, head_dim), k.view(b, s, num_kv_heads, head_dim),
                v.view(b, s, num_kv_heads, head_dim))
    return _SplitQKVRotary.apply(qkv, num_q_heads, num_kv_heads, head_dim, *rotary)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first r dims of x [b, s, heads, d] by half-width cos/sin [b, s, 1, r/2], the rest unchanged
    (reference formula, autograd-friendly)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = 2 * cos.shape[-1]
    x, rest = x[..., :rot], x[..., rot:]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
