"""The feed-forward block: fc1 (column-parallel) -> GeLU or SwiGLU -> fc2 (row-parallel).

GeLU follows config.gelu_approximation: "tanh" (GPT-2's "gelu_new"; upstream's default fused bias-GeLU and
its --openai-gelu) or "none", the exact erf form (upstream's F.gelu, chosen by --no-bias-gelu-fusion or
--disable-bias-linear). For SwiGLU fc1 holds [gate | up]
(per tp rank: [its gate | its up]) and the output is fc2(silu(gate) * up), as in Llama; `swiglu` is one
autograd node whose backward writes the [gate | up] gradient into one buffer (no concatenation).

With --tiled-mlp (ALST's TiledMLP) the block runs `config.sequence_tile_length(b)` sequence positions at a time:
forward keeps only its input, backward recomputes each tile and back-propagates through it at once, so the
[s, ffn/tp] intermediates exist for one tile only (the price: the MLP's forward runs once more). The MLP is
per-token, so tiles are exact (to float reordering of the weight gradients, summed tile by tile). DeepSpeed
0.19.8's TiledMLP does the same but its backward flattens [b, s, h] to [b·s, h] tiles, which our Megatron
sequence-parallel fc1 (all-gather along dim 1) and fc2 (reduce-scatter along dim 1) cannot take; ours tiles
along dim 1 in both passes, so under Megatron sp each tile is gathered over tp from every rank's local shard and
scattered back. Every tp (and Ulysses) rank runs the same tiles, as the collectives need. Parameters' gradients
accumulate tile by tile; DeepSpeed's ZeRO is told (`ds_grad_is_ready`, the attribute its TiledMLP sets) to
reduce them only after the last tile.
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


_ZERO_GRAD_READY = "ds_grad_is_ready"  # DeepSpeed ZeRO 1-3 skip their gradient hook while False (0.19.8)


class _SequenceTiled(torch.autograd.Function):
    """out = fn(x) for a per-token fn, computed `tile` positions of dim 1 at a time; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, fn, tile, params, x):
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for lo in range(0, x.shape[1], tile):
                part = fn(x[:, lo:lo + tile])
                if out is None:
                    out = part.new_empty((part.shape[0], x.shape[1]) + tuple(part.shape[2:]))
                out[:, lo:lo + part.shape[1]] = part
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        starts = range(0, x.shape[1], ctx.tile)
        try:
            for i, lo in enumerate(starts):
                last = i == len(starts) - 1
                for p in ctx.params:
                    setattr(p, _ZERO_GRAD_READY, last)
                part = x[:, lo:lo + ctx.tile].detach().requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    out = ctx.fn(part)
                torch.autograd.backward(out, grad_out[:, lo:lo + part.shape[1]])
                if grad_x is not None:
                    grad_x[:, lo:lo + part.shape[1]] = part.grad
        finally:
            for p in ctx.params:
                setattr(p, _ZERO_GRAD_READY, True)
        return None, None, None, grad_x


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, ps: ParallelState, seed: int, prefix: str):
        super().__init__()
        self.config = config
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
        if self.config.tiled_mlp:
            params = [p for p in self.parameters() if p.requires_grad]
            return _SequenceTiled.apply(self._dense, self.config.sequence_tile_length(hidden.shape[0]), params, hidden)
        return self._dense(hidden)

    def _dense(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.fc1(hidden)
        if self.swiglu:
            x = swiglu(x)
        elif self.squared_relu:
            x = F.relu(x).square()
        else:
            x = F.gelu(x, approximate=self.gelu_approximation)
        return self.fc2(x)
