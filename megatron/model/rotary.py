"""Rotary position embeddings (RoPE) in the rotate-half convention of Llama / Hugging Face.

cos/sin are computed in float32 from the position ids (so any shard of a sequence, e.g. under
Ulysses, gets its true positions) and applied to q and k laid out [b, s, heads, head_dim].
Weights taken from Hugging Face's LlamaForCausalLM need no permutation.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [b, s, head_dim] (float32) for integer positions [b, s]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, heads, d] by cos/sin [b, s, d]."""
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin
