"""Normalisation layers: LayerNorm (GPT) and RMSNorm (Llama, computed in float32 like Hugging Face).

Norm weights are replicated over tensor-parallel ranks; under Megatron sequence parallelism
each rank normalises its own sequence shard, so their gradients are partial and the params
are marked `sequence_parallel` (see gpt_model.allreduce_sequence_parallel_grads).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.config.model import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (weight, bias), with the config's epsilon."""


class LayerNorm1P(nn.LayerNorm):
    """--apply-layernorm-1p: the weight is stored centred on zero (initialised to 0) and applied as 1 + weight,
    so weight decay pulls the gain towards 1 instead of 0 (Megatron's zero-centred gamma)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def build_norm(config: TransformerConfig, sequence_parallel: bool) -> nn.Module:
    if config.normalization == "rmsnorm":
        norm = RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    elif config.apply_layernorm_1p:
        norm = LayerNorm1P(config.hidden_size, eps=config.norm_epsilon)
    else:
        norm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
    mark_sequence_parallel(norm, sequence_parallel)
    return norm


def mark_sequence_parallel(module: nn.Module, sequence_parallel: bool) -> None:
    for param in module.parameters():
        param.sequence_parallel = sequence_parallel
