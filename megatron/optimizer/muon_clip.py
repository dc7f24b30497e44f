"""MuonClip: Muon (whole matrices, full_matrix.py) followed by a per-head QK-clip of the attention weights.

After each optimizer step, for every attention head h whose largest logit S_h = max q_i·k_j / sqrt(d) seen in
this step's training forwards exceeds the threshold t (`--muonclip-t`), the head's query and key
projections are scaled down so that the logit falls to t (Kimi K2's QK-clip, with upstream's split exponent
alpha = `--muonclip-alpha`):

    eta_h = min(1, t / S_h),   W_q[h] <- eta_h^alpha W_q[h],   W_k[g] <- (min_{h in g} eta_h)^(1 - alpha) W_k[g]

where g is the key/value head that head h reads (grouped-query attention: a key head is shared by its group,
so it takes the smallest eta of the group and every head's logit still ends at or below t). RoPE is linear,
so scaling the projection rows scales the rotated q and k alike; a projection bias (--add-bias-linear) is
scaled with its rows. Value rows are untouched, and Muon's momentum is not rescaled (as in Kimi K2).

Where the logits come from: upstream's MuonClip recomputes x W_qᵀ (x W_kᵀ)ᵀ over all heads' dimensions at once
from a recorded input and registers no attention module in its build (so its clip never runs). Here the
attention layer itself records each head's max logit from the q, k that SDPA uses (model/attention.py), so S_h
is the true per-head attention logit, causal mask included, of every micro-batch of the step.

Under parallelism: a tensor-parallel rank owns whole heads (its rows of the fused qkv weight are
[its q | its k | its v]), so each rank computes its heads' eta without tp communication; the maxima are reduced
(max) over the sp × dp group, so every data-parallel replica (and, under Ulysses, every sp rank that saw only a
slice of the heads) applies the same scales. The owner of each weight (ZeRO-1/2, full_matrix.py) scales what
Muon stepped, before it is written back and all-gathered: the parameter (fp32), its fp32 master (bf16 / fp16), or
its full-matrix copy under tp (in the single-rank row order [all q | all k | all v]), by the row scales
all-gathered over tp and merged like the weight's shards. One all-reduce and (tp > 1) one all-gather of
a vector of heads per step; one extra QKᵀ per attention forward, without autograd.

A step skipped for a non-finite gradient does not clip; its maxima join the next step's window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.layers import merge_shards
from megatron.optimizer.full_matrix import FullMatrixOptimizer


def attention_modules(model: torch.nn.Module) -> list:
    from megatron.model.attention import SelfAttention

    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def head_scales(max_logits: torch.Tensor, threshold: float, alpha: float, kv_heads: int):
    """(query-head scales [h], key-head scales [kv_heads]) from one layer's per-head max logits [h]."""
    finite = torch.isfinite(max_logits) & (max_logits > threshold)
    eta = torch.where(finite, threshold / max_logits.clamp(min=threshold), torch.ones_like(max_logits))
    q_scale = eta.pow(alpha)
    k_scale = eta.view(kv_heads, -1).amin(dim=1).pow(1.0 - alpha)
    return q_scale, k_scale


class MuonClip(FullMatrixOptimizer):
    """FullMatrixOptimizer (Muon on whole matrices, AdamW elsewhere) plus QK-clip after every step."""

    def __init__(self, *args, attention: list, threshold: float, alpha: float, sdp_group=None,
                 sdp_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if threshold <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"MuonClip needs --muonclip-t > 0 and --muonclip-alpha in [0, 1] "
                             f"(got {threshold}, {alpha})")
        self.attention = attention
        self.threshold, self.alpha = float(threshold), float(alpha)
        self.sdp_group, self.sdp_size = sdp_group, sdp_size
        self.clipped_heads = 0  # heads clipped at the last step (all layers of this stage, this tp rank)
        self.max_logit = None  # largest logit seen at the last step (this stage, this tp rank)
        for module in attention:
            module.record_max_logits(True)

    @torch.no_grad()
    def _after_update(self) -> None:
        """QK-clip on what the inner optimizers stepped (the owned parameters, or their fp32 masters and full
        copies), before they are written back and all-gathered by the other dp ranks."""
        if not self.attention:
            return
        device = self.attention[0].qkv.weight.device
        maxima = torch.cat([m.max_logits if m.max_logits is not None
                            else torch.full((m.heads_per_rank,), float("-inf"), device=device)
                            for m in self.attention])
        if self.sdp_size > 1:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.sdp_group)
        finite = maxima[torch.isfinite(maxima)]
        self.max_logit = float(finite.max()) if finite.numel() else None
        self.clipped_heads = int((maxima > self.threshold).sum())
        row_scales, start = [], 0
        for module in self.attention:
            heads, kv_heads, d = module.heads_per_rank, module.kv_heads_per_rank, module.config.head_dim
            q_scale, k_scale = head_scales(maxima[start:start + heads], self.threshold, self.alpha, kv_heads)
            start += heads
            row_scales.append(torch.cat([q_scale.repeat_interleave(d), k_scale.repeat_interleave(d),
                                         torch.ones(kv_heads * d, device=device)]))
            module.max_logits = None
        gathered = None
        if self.tp_size > 1 and any(id(m.qkv.weight) in self._gathered for m in self.attention):
            flat = torch.cat(row_scales)
            parts = [torch.empty_like(flat) for _ in range(self.tp_size)]
            dist.all_gather(parts, flat, group=self.tp_group)
            gathered = parts
        offset = 0
        for module, scale in zip(self.attention, row_scales):
            weight, bias = module.qkv.weight, module.qkv.bias
            if id(weight) in self._owned:
                full = scale
                if id(weight) in self._gathered:
                    # the copy is the single-rank weight: the ranks' row scales merged like its shards
                    full = merge_shards([part[offset:offset + scale.numel()] for part in gathered], 0,
                                        weight.partition_segments)
                self._copies.get(id(weight), weight).mul_(full.unsqueeze(1))
            if bias is not None and id(bias) in self._owned:
                self._copies.get(id(bias), bias).mul_(scale)
            offset += scale.numel()
