"""Causal self-attention: fused QKV (column-parallel), RoPE, GQA, SDPA, output (row-parallel).

A tensor-parallel rank owns nq/tp query heads and nkv/tp key/value heads; its rows of the
fused qkv weight are [its q | its k | its v]. Under Ulysses (sp > 1) those heads are split
again over the sp group by an all-to-all, so attention sees the whole sequence (kv heads fewer than
sp are replicated first, as DeepSpeed does: megatron/core/ulysses.py). RoPE rotates each rank's q, k
shard with its own positions before the exchange; a document mask is built from the whole sequence's
document ids, which is what attention sees after the exchange.

Attention is causal. With --reset-attention-mask it is causal *within each document* (upstream's
get_ltor_masks_and_position_ids): `document_attention_mask(document_ids)` builds the boolean mask
[b, 1, s, s] from per-token document numbers, and SDPA takes it instead of is_causal.

MuonClip's QK-clip needs each head's largest attention logit. `record_max_logits()` turns on a no-grad
reduction in training forwards: max over batch and causal (i, j) of q_i·k_j/sqrt(d) per tp-local head,
taken from the same rotated q, k that SDPA sees (one extra QKᵀ, in query blocks, outside autograd).
Under Ulysses this rank sees only its sp slice of the heads; the others stay -inf until the optimizer takes
the max over the sp × dp group (megatron/optimizer/muon_clip.py). With a document mask only the pairs
the mask allows count.

Generation passes a `KVCache` (kv_cache.py): the new keys/values are written into it and the queries attend,
through SDPA, to every cached key the cache's mask allows (in any dtype: the cached path does not take
upstream's unfused bf16/fp16 CoreAttention). Training never passes one, so its path is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.random import checkpoint, derive_seed, tensor_parallel_rng
from megatron.core.ulysses import heads_to_sequence, kv_sequence_to_heads, sequence_to_heads
from megatron.distributed.parallel_state import ParallelState
from megatron.model.kv_cache import KVCache
from megatron.model.rotary import Rotary, rotary_cos_sin, split_qkv_rotary


def document_ids_from_tokens(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Per-token document number [b, s]: how many EOD tokens come strictly before it (an EOD token ends,
    and belongs to, the document before it)."""
    is_eod = (tokens == eod_token).to(torch.int32)
    return (torch.cumsum(is_eod, dim=1) - is_eod).to(torch.int32)


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [b, 1, s, s], True where query i may attend key j: j <= i and both in the same document."""
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return (same_document & causal).unsqueeze(1)


def gqa_by_repeated_heads(device_type: str, dtype: torch.dtype) -> bool:
    """Whether SDPA gets GQA as key/value heads repeated for their query groups rather than enable_gqa: on an
    accelerator in fp32. torch (2.13) takes enable_gqa only in its flash kernel (fp16/bf16) and its math kernel
    there, so fp32 GQA would fall to the math kernel and hold [s, s] scores; with the heads repeated (s × h
    more key/value memory) the memory-efficient kernel takes it. On CPU the flash kernel takes enable_gqa."""
    return device_type != "cpu" and dtype == torch.float32


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, ps: ParallelState, seed: int, prefix: str, layer_number: int = 0):
        """`layer_number`: the layer's 0-based index in the whole model (query-key layer scaling uses it + 1)."""
        super().__init__()
        self.config, self.ps = config, ps
        self.layer_number = max(1, layer_number + 1)  # upstream's 1-based ParallelTransformerLayer number
        self.layer_index = layer_number  # its key in a KVCache
        tp = ps.tp_size
        d = config.head_dim
        self.heads_per_rank = config.num_attention_heads // tp
        self.kv_heads_per_rank = config.num_key_value_heads // tp
        if config.num_attention_heads % tp or config.num_key_value_heads % tp:
            raise ValueError(
                f"attention heads {config.num_attention_heads} and kv heads {config.num_key_value_heads} must "
                f"both be divisible by --tensor-model-parallel-size {tp}"
            )
        q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
        sequence_parallel = config.sequence_parallel and tp > 1
        self.qkv = ColumnParallelLinear(
            config.hidden_size, q_size + 2 * kv_size, tp_group=ps.tp_group, bias=config.add_bias_linear,
            segments=[q_size, kv_size, kv_size], sequence_parallel=sequence_parallel,
            init_std=config.init_method_std, init_seed=derive_seed(seed, prefix + "qkv.weight"),
            init_method=config.init_method,
        )
        self.dense = RowParallelLinear(
            q_size, config.hidden_size, tp_group=ps.tp_group, bias=config.add_bias_linear,
            sequence_parallel=sequence_parallel,
            init_std=config.init_method_std / math.sqrt(2.0 * config.num_layers),
            init_seed=derive_seed(seed, prefix + "dense.weight"), init_method=config.init_method,
        )
        self.max_logits: Optional[torch.Tensor] = None  # [heads_per_rank] while recording (MuonClip)
        self._recording = False

    def record_max_logits(self, on: bool = True) -> None:
        """From now on, training forwards keep in `max_logits` the running max logit of each tp-local head
        (reset it to None to start a new window)."""
        self._recording = on
        self.max_logits = None

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> None:
        """Running max of q_i·k_j / sqrt(d) over batch and causal pairs j <= i (and, with a document mask
        [b, 1, s, s], only the pairs it allows), per head (q, k: [b, s, h, d])."""
        group = q.shape[2] // k.shape[2]
        qf = q.float().transpose(1, 2)  # [b, h, s, d]
        kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
        s, scale = qf.shape[2], 1.0 / math.sqrt(qf.shape[-1])
        local = torch.full((qf.shape[1],), float("-inf"), device=q.device)
        block = max(1, (1 << 22) // max(1, qf.shape[0] * qf.shape[1] * s))  # query rows per block
        for start in range(0, s, block):
            end = min(s, start + block)
            scores = torch.matmul(qf[:, :, start:end], kf.transpose(-1, -2)) * scale  # [b, h, rows, s]
            rows = torch.arange(start, end, device=q.device).unsqueeze(1)
            future = torch.arange(s, device=q.device).unsqueeze(0) > rows
            scores.masked_fill_(future, float("-inf"))
            if attention_mask is not None:
                scores.masked_fill_(~attention_mask[:, :, start:end], float("-inf"))
            local = torch.maximum(local, scores.amax(dim=(0, 2, 3)))
        full = torch.full((self.heads_per_rank,), float("-inf"), device=q.device)
        offset = self.ps.sp_rank * local.numel() if self.ps.sp_size > 1 else 0
        full[offset:offset + local.numel()] = local
        self.max_logits = full if self.max_logits is None else torch.maximum(self.max_logits, full)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                rotary: Optional[Rotary] = None, attention_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """`rotary`: cos/sin from rotary_cos_sin(position_ids, ...) computed once per forward (RoPE only;
        computed here when not given). `attention_mask`: document_attention_mask(...) of the whole sequence
        (None: plain causal attention). `kv_cache`: generation's cache (the tokens are its next columns)."""
        config, d = self.config, self.config.head_dim
        qkv = self.qkv(hidden)  # [b, s, (nq + 2 nkv) d / tp], full (local) sequence
        b, s = qkv.shape[:2]
        if config.position_embedding_type == "rope" and rotary is None:
            rotary = rotary_cos_sin(position_ids, config.rotary_dim, config.rope_theta)
        elif config.position_embedding_type != "rope":
            rotary = None
        q, k, v = split_qkv_rotary(qkv, self.heads_per_rank, self.kv_heads_per_rank, d, rotary)
        if kv_cache is not None:
            return self.dense(self._attend_cached(q, k, v, kv_cache).reshape(b, s, self.heads_per_rank * d))
        sp_group, sp = self.ps.sp_group, self.ps.sp_size
        q = sequence_to_heads(q, sp_group)
        k, v = (kv_sequence_to_heads(t, sp_group, sp) for t in (k, v))  # kv heads replicated when fewer than sp
        if attention_mask is not None and attention_mask.shape[-1] != q.shape[1]:
            raise ValueError(f"the document attention mask covers {attention_mask.shape[-1]} tokens but attention "
                             f"sees {q.shape[1]}: under Ulysses give the document ids of the whole sequence")
        if self._recording and self.training:
            self._record(q, k, attention_mask)
        if config.recompute_core_attention and self.training and torch.is_grad_enabled():
            out = checkpoint(self._attend, q, k, v, attention_mask)  # selective recomputation: keep no scores
        else:
            out = self._attend(q, k, v, attention_mask)
        out = heads_to_sequence(out, sp_group)
        return self.dense(out.reshape(b, s, self.heads_per_rank * d))

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Store k, v [b, s, kv heads, d] in the cache, attend q [b, s, heads, d] to every allowed cached key."""
        if self.ps.sp_size > 1:
            raise ValueError("generation with a KV cache does not support Ulysses (--ds-sequence-parallel-size > 1)")
        keys, values = kv_cache.store(self.layer_index, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=kv_cache.mask,
                                             is_causal=kv_cache.causal, enable_gqa=keys.shape[1] != q.shape[2])
        return out.transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal attention on [b, s, heads, d] (or masked by `attention_mask` [b, 1, s, s], True = attend);
        dropout draws from the tp stream (heads differ per rank).

        bf16/fp16 without flash attention: upstream's CoreAttention (`_attend_unfused`). Otherwise torch SDPA:
        fp32 runs, and flash attention, whose kernels compute the softmax in fp32 whatever the layer-scaling
        flags (as upstream's flash path ignores them)."""
        if q.dtype in (torch.bfloat16, torch.float16) and not self.config.flash_attention:
            return self._attend_unfused(q, k, v, attention_mask)
        dropout = self.config.attention_dropout if self.training else 0.0
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        group = q.shape[1] // k.shape[1]
        if group > 1 and gqa_by_repeated_heads(q.device.type, q.dtype):
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        with tensor_parallel_rng(self.ps.tp_size, needed=dropout > 0):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=attention_mask is None,
                enable_gqa=k.shape[1] != q.shape[1]
            )
        return out.transpose(1, 2)

    def _attend_unfused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Upstream's CoreAttention with FusedScaleMaskSoftmax's torch path (megatron/model/transformer.py,
        fused_softmax.py), op for op: scores = baddbmm(q, kᵀ, alpha = 1/norm_factor) in the activations' dtype,
        norm_factor = √d × L with query-key layer scaling (L = the layer number), else √d; the softmax in fp32
        when layer scaling or --attention-softmax-in-fp32 (scores upcast, × L, masked with -10000, softmax,
        probabilities back to the activations' dtype), else in the activations' dtype; dropout on the
        probabilities; their product with v in the activations' dtype."""
        config = self.config
        dtype = q.dtype
        b, s, heads, d = q.shape
        group = heads // k.shape[2]
        if group > 1:  # GQA: upstream repeats each key/value head for its group of query heads
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scaling = config.apply_query_key_layer_scaling
        coeff = self.layer_number if scaling else None
        norm_factor = math.sqrt(d) * (coeff or 1)
        softmax_in_fp32 = config.attention_softmax_in_fp32 or scaling
        qb = q.permute(0, 2, 1, 3).reshape(b * heads, s, d)
        kb = k.permute(0, 2, 3, 1).reshape(b * heads, d, s)
        buffer = torch.empty(b * heads, s, s, dtype=dtype, device=q.device)
        scores = torch.baddbmm(buffer, qb, kb, beta=0.0, alpha=1.0 / norm_factor).view(b, heads, s, s)
        if softmax_in_fp32:
            scores = scores.float()
        if coeff is not None:
            scores = scores * coeff
        if attention_mask is None:
            masked = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        else:
            masked = ~attention_mask
        probs = torch.softmax(scores.masked_fill(masked, -10000.0), dim=-1)
        if softmax_in_fp32:
            probs = probs.to(dtype)
        dropout = config.attention_dropout if self.training else 0.0
        if dropout > 0:
            with tensor_parallel_rng(self.ps.tp_size):
                probs = F.dropout(probs, p=dropout, training=True)
        vb = v.permute(0, 2, 1, 3).reshape(b * heads, s, d)
        out = torch.bmm(probs.view(b * heads, s, s), vb).view(b, heads, s, d)
        return out.transpose(1, 2)
