"""Normalisation layers: LayerNorm (GPT) and RMSNorm (Llama, computed in float32 like Hugging Face).

Norm weights are replicated over tensor-parallel ranks; under Megatron sequence parallelism
each rank normalises its own sequence shard, so their gradients are partial and the params
are marked `sequence_parallel` (see gpt_model.allreduce_sequence_parallel_grads).

A norm whose input is fp32 while its weights are bf16/fp16 (--fp32-residual-connection: the residual
stream stays fp32) normalises in fp32 and returns the weights' dtype, as upstream's mixed-dtype fused norms
do, so the layers after it compute in the run's precision.
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
        if _mixed(x, self.weight):  # fp32 residual stream: scale in fp32, hand on the weights' dtype
            return (self.weight.float() * x32).to(self.weight.dtype)
        return self.weight * x32.to(dtype)


def _mixed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and weight.dtype != torch.float32


def _layer_norm(x: torch.Tensor, shape, weight: torch.Tensor, bias, eps: float) -> torch.Tensor:
    if _mixed(x, weight):
        out = torch.nn.functional.layer_norm(x, shape, weight.float(), None if bias is None else bias.float(), eps)
        return out.to(weight.dtype)
    return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (weight, bias), with the config's epsilon."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm1P(nn.LayerNorm):
    """--apply-layernorm-1p: the weight is stored centred on zero (initialised to 0) and applied as 1 + weight,
    so weight decay pulls the gain towards 1 instead of 0 (Megatron's zero-centred gamma)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


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
