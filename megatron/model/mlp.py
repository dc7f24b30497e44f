"""The feed-forward block: fc1 (column-parallel) -> GeLU or SwiGLU -> fc2 (row-parallel).

GeLU follows config.gelu_approximation: "tanh" (GPT-2's "gelu_new"; upstream's default fused bias-GeLU and
its --openai-gelu) or "none", the exact erf form (upstream's F.gelu, chosen by --no-bias-gelu-fusion or
--disable-bias-linear). For SwiGLU fc1 holds [gate | up]
(per tp rank: [its gate | its up]) and the output is fc2(silu(gate) * up), as in Llama; `swiglu` is one
autograd node whose backward writes the [gate | up] gradient into one buffer (no concatenation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.random import derive_seed
from megatron.distributed.parallel_state import ParallelState


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        gate, up = x.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad_out):
        x, activated = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim {x.shape[-1]} must be even ([gate | up])")
    return _SwiGLU.apply(x)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, ps: ParallelState, seed: int, prefix: str):
        super().__init__()
        self.swiglu, self.squared_relu = config.swiglu, config.squared_relu
        self.gelu_approximation = config.gelu_approximation
        f = config.ffn_hidden_size
        if f % ps.tp_size:
            raise ValueError(f"--ffn-hidden-size {f} is not divisible by --tensor-model-parallel-size {ps.tp_size}")
        sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * f if self.swiglu else f, tp_group=ps.tp_group, bias=config.add_bias_linear,
            segments=[f, f] if self.swiglu else None, sequence_parallel=sequence_parallel,
            init_std=config.init_method_std, init_seed=derive_seed(seed, prefix + "fc1.weight"),
            init_method=config.init_method,
        )
        self.fc2 = RowParallelLinear(
            f, config.hidden_size, tp_group=ps.tp_group, bias=config.add_bias_linear,
            sequence_parallel=sequence_parallel,
            init_std=config.init_method_std / math.sqrt(2.0 * config.num_layers),
            init_seed=derive_seed(seed, prefix + "fc2.weight"), init_method=config.init_method,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.fc1(hidden)
        if self.swiglu:
            x = swiglu(x)
        elif self.squared_relu:
            x = F.relu(x).square()
        else:
            x = F.gelu(x, approximate=self.gelu_approximation)
        return self.fc2(x)
