"""GPTModel: embedding -> L transformer layers -> final norm -> vocab-parallel logits or loss.

    model = GPTModel(config, ps, seed=1234)          # ParallelState.single() without torch.distributed
    logits = model(tokens)                           # [b, s, padded_vocab / tp]; gather_logits() for all
    loss = model(tokens, labels=labels)              # per-token float32 loss [b, s]
    model(tokens, document_ids=ids)                  # attention causal within documents (--reset-attention-mask)

Tokens are the full sequence under Megatron sequence parallelism and this rank's shard (with
its position ids) under Ulysses. After backward with sequence parallelism, call
allreduce_sequence_parallel_grads(model, ps) (or register_sequence_parallel_grad_hooks once).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.random import activation_checkpoint_function
from megatron.distributed.parallel_state import ParallelState
from megatron.model.attention import document_attention_mask
from megatron.model.embedding import Embedding, OutputLayer, language_model_logits, language_model_loss
from megatron.model.norms import build_norm
from megatron.model.rotary import rotary_cos_sin
from megatron.model.transformer import TransformerLayer

DEFAULT_SEED = 1234


def default_position_ids(tokens: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """0..s-1 per row; under Ulysses the positions of this sp rank's contiguous shard."""
    b, s = tokens.shape
    start = ps.sp_rank * s if ps.sp_size > 1 else 0
    return torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)


class GPTModel(nn.Module):
    def __init__(self, config: TransformerConfig, ps: Optional[ParallelState] = None, seed: int = DEFAULT_SEED):
        super().__init__()
        ps = ps or ParallelState.single()
        if ps.pp_size > 1:
            raise ValueError(
                f"GPTModel holds every layer and cannot run with --pipeline-model-parallel-size {ps.pp_size}; "
                "use megatron.model.pipeline.build_pipeline_module for pipeline parallelism"
            )
        if config.vocab_size <= 0:
            raise ValueError("TransformerConfig.vocab_size must be set (the tokenizer's vocabulary size)")
        self.config, self.ps = config, ps
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1
        self.embedding = Embedding(config, ps, seed)
        self.layers = nn.ModuleList(TransformerLayer(config, ps, i, seed) for i in range(config.num_layers))
        self.final_norm = build_norm(config, self.sequence_parallel)
        if config.untie_embeddings_and_output_weights:
            self.output_layer = OutputLayer(config, ps, seed)
        else:
            self.output_layer = None
        # recomputation, keeping each chunk's input on the CPU / split over tp as the flags ask
        self._checkpoint = activation_checkpoint_function(
            config.checkpoint_in_cpu, ps.tp_group if config.partition_activations else None)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`document_ids` [b, s] (attention.document_ids_from_tokens): each token attends only to earlier
        tokens of its own document; None: plain causal attention."""
        if tokens.dim() != 2:
            raise ValueError(f"GPTModel: tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(tokens, self.ps)
        hidden = self.embedding(tokens, position_ids)
        rotary = None
        if self.config.position_embedding_type == "rope":  # once per forward, shared by every layer
            rotary = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)
        mask = None if document_ids is None else document_attention_mask(document_ids)
        hidden = self.final_norm(self._run_layers(hidden, position_ids, rotary, mask))
        if labels is not None and self.config.tiled_logits_loss:  # no [s, V/tp] logits, forward or backward
            return self.tiled_loss(hidden, labels)
        logits = self.logits(hidden)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.ps.tp_group, self.config.loss_vocab_size)

    def tiled_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer(hidden, labels)  # through the module: ZeRO-3 gathers its weight
        return language_model_loss(hidden, self.embedding.word_embeddings.weight, labels, self.config,
                                   self.ps.tp_group, self.sequence_parallel)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer(hidden)
        return language_model_logits(hidden, self.embedding.word_embeddings.weight, self.ps.tp_group,
                                     self.sequence_parallel)

    def _run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, rotary, mask) -> torch.Tensor:
        recompute = self.config.checkpoint_activations and self.training and torch.is_grad_enabled()
        if not recompute:
            for layer in self.layers:
                hidden = layer(hidden, position_ids, rotary, mask)
            return hidden
        group = self.config.checkpoint_num_layers
        cos, sin = rotary if rotary is not None else (None, None)
        if self.config.recompute_method == "block":  # the first `group` layers recomputed one by one, then the rest
            chunks = [self.layers[i:i + 1] for i in range(min(group, len(self.layers)))]
            rest = self.layers[len(chunks):]
        else:
            chunks = [self.layers[start:start + group] for start in range(0, len(self.layers), group)]
            rest = []
        for chunk in chunks:

            def run_chunk(x, pos, cos, sin, mask, chunk=chunk):
                for layer in chunk:
                    x = layer(x, pos, None if cos is None else (cos, sin), mask)
                return x

            hidden = self._checkpoint(run_chunk, hidden, position_ids, cos, sin, mask)
        for layer in rest:
            hidden = layer(hidden, position_ids, rotary, mask)
        return hidden


# ---- gradients of replicated params in the sequence-parallel region ---------------------------
def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def allreduce_sequence_parallel_grads(model: nn.Module, ps: ParallelState) -> None:
    """Sum over tp the grads of params that saw only this rank's sequence shard.

    Under Megatron sequence parallelism, norms, row-parallel biases and learned position
    embeddings are replicated over tp but each rank computes only its tokens' part of their
    gradient. Call after backward and before the optimizer step (and before any data-parallel
    reduction); a no-op when tp == 1 or nothing is marked. Use register_sequence_parallel_grad_hooks
    instead where gradients are consumed during backward (ZeRO-2/3 bucket hooks).
    """
    if ps.tp_size == 1:
        return
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    if not grads:
        return
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, group=ps.tp_group)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def register_sequence_parallel_grad_hooks(model: nn.Module, ps: ParallelState) -> list:
    """All-reduce over tp each sequence-parallel param's gradient as autograd produces it.

    Each gradient contribution is summed over tp before it is accumulated into .grad, so hooks
    that consume .grad during backward (DeepSpeed ZeRO) see the full gradient. Returns the
    hook handles. Do not also call allreduce_sequence_parallel_grads.
    """
    if ps.tp_size == 1:
        return []

    def summed_over_tp(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ps.tp_group)
        return grad

    return [p.register_hook(summed_over_tp) for p in sequence_parallel_params(model)]
