"""One pre-norm transformer layer: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).

Used as is by GPTModel and (through a thin subclass) by the pipeline, so a layer's state dict
is the same in both. Hidden dropout acts on replicated activations (same mask on every tp
rank) unless Megatron sequence parallelism shards them, in which case it draws from the tp stream.
With --fp32-residual-connection `hidden` is fp32: the norms hand the sublayers the weights' dtype and
the residual sums (fp32 + bf16/fp16) stay fp32.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core.random import tensor_parallel_rng
from megatron.distributed.parallel_state import ParallelState
from megatron.model.attention import SelfAttention
from megatron.model.kv_cache import KVCache
from megatron.model.mlp import MLP
from megatron.model.norms import build_norm
from megatron.model.rotary import Rotary


def hidden_dropout(x: torch.Tensor, p: float, training: bool, sequence_parallel: bool, tp_size: int) -> torch.Tensor:
    """Dropout on the residual stream; sequence shards (different tokens per tp rank) use the tp stream."""
    if not training or p == 0.0:
        return x
    ctx = tensor_parallel_rng(tp_size) if sequence_parallel else contextlib.nullcontext()
    with ctx:
        return F.dropout(x, p=p, training=True)


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, ps: ParallelState, layer_number: int, seed: int):
        super().__init__()
        self.config, self.ps, self.layer_number = config, ps, layer_number
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        prefix = f"layers.{layer_number}."
        self.input_norm = build_norm(config, self.sequence_parallel)
        self.attention = SelfAttention(config, ps, seed, prefix + "attention.", layer_number)
        self.post_attention_norm = build_norm(config, self.sequence_parallel)
        self.mlp = MLP(config, ps, seed, prefix + "mlp.")

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                rotary: Optional[Rotary] = None, attention_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """`rotary`: RoPE cos/sin of position_ids (rotary_cos_sin), shared by all layers of one forward;
        `attention_mask`: attention.document_attention_mask (--reset-attention-mask), None: causal;
        `kv_cache`: generation's KVCache (model/kv_cache.py), None in training."""
        p, sp, tp = self.config.hidden_dropout, self.sequence_parallel, self.ps.tp_size
        attention = self.attention(self.input_norm(hidden), position_ids, rotary, attention_mask, kv_cache)
        hidden = hidden + hidden_dropout(attention, p, self.training, sp, tp)
        return hidden + hidden_dropout(self.mlp(self.post_attention_norm(hidden)), p, self.training, sp, tp)
