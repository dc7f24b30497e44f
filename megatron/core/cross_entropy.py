"""Cross entropy over logits whose vocabulary is split over tensor-parallel ranks.

Never gathers the logits: max, target logit and sum of exponentials are all-reduced over the
tp group (three small all-reduces of [b, s] tensors). Columns at or beyond the real vocabulary
(padding) are excluded, so a padding column can never win. Computed in float32.
The [*, V/tp] float32 work buffer is allocated once per call and owned by the autograd Function:
forward turns it into the softmax in place and backward turns that into the gradient in place.

`tiled_vocab_parallel_cross_entropy(hidden, weight, target, ...)` fuses the output projection with the loss
and walks the sequence in tiles, so no [s, V/tp] tensor exists at once, in forward or backward:

    forward, per tile t of tokens:   z_t = h_t Wᵀ (this rank's vocabulary columns, float32)
                                     m = max_v z_t (all-reduced MAX over tp), S = Σ_v exp(z_t - m) (SUM over tp)
                                     lse_t = m + log S;  loss_t = lse_t - z_t[target] (the target's rank holds it)
                                     keep lse_t ([t] floats), drop z_t
    backward, per tile t:            z_t = h_t Wᵀ again (one extra projection), p_t = exp(z_t - lse_t)
                                     g_t = (p_t - onehot(target)) · dloss_t
                                     dh_t = g_t W (partial over the vocabulary: the caller's copy-to-tp region
                                     all-reduces it), dW += g_tᵀ h_t (accumulated in float32, cast once)

The cost is one more projection matmul per step; the memory is one tile's [b, t, V/tp] float32 logits plus
the [b, s] log-sum-exp. It returns per-token losses like `vocab_parallel_cross_entropy`, so the loss mask, the
post-training reductions and any loss scale act on it unchanged (unlike DeepSpeed 0.19.8's
TiledFusedLogitsLoss, which returns one reduced scalar, runs its backward inside forward with an assumed
incoming gradient, and scales only the hidden states' gradient by the real one: the weight's gradient would
miss a loss scale or the 1/gradient-accumulation factor). The two agree to float reordering: same per-token
math, the sums taken in another order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import mappings


def _float32_work_buffer(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(float32 logits, whether that tensor is a fresh copy the Function may overwrite)."""
    if logits.dtype == torch.float32:
        return logits, False
    return logits.float(), True


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        ctx.input_dtype = logits.dtype
        tp_size, tp_rank = mappings.group_size(group), mappings.group_rank(group)
        per_rank = logits.shape[-1]
        start = tp_rank * per_rank
        # Columns [0, real) of this shard are real vocabulary, [real, per_rank) padding.
        real = per_rank if vocab_size is None else max(0, min(per_rank, vocab_size - start))
        if real == per_rank and tp_size == 1:
            return _VocabParallelCrossEntropy._forward_single_rank(ctx, logits, target)

        work, owned = _float32_work_buffer(logits)
        if real > 0:
            local_max = work[..., :real].amax(dim=-1)
        else:  # the whole shard is padding: another rank holds the maximum
            local_max = torch.full(work.shape[:-1], float("-inf"), dtype=torch.float32, device=work.device)
        if tp_size > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        # work <- logits - max, in the buffer we own (a fresh one when logits are the caller's float32 tensor)
        work = work.sub_(local_max.unsqueeze(-1)) if owned else work - local_max.unsqueeze(-1)

        outside = (target < start) | (target >= start + real)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = work.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        work.exp_()
        if real < per_rank:
            work[..., real:] = 0.0  # padding columns: probability (and gradient) exactly zero
        sum_exp = work.sum(dim=-1)
        if tp_size > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = work.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.log_probs = False
        return loss

    @staticmethod
    def _forward_single_rank(ctx, logits, target):
        """tp == 1 and no padding: torch's fused log-softmax (one pass, one buffer)."""
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        loss = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        outside = torch.zeros_like(target, dtype=torch.bool)
        ctx.save_for_backward(log_probs, target, outside)
        ctx.log_probs = True
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved buffer is ours alone: overwrite it with the gradient (a second backward through
        # this graph is refused by autograd, since the saved tensor was modified in place).
        saved, local_target, outside = ctx.saved_tensors
        grad = saved.exp_() if ctx.log_probs else saved  # softmax
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [*] (float32) from this rank's logits [*, V_padded/tp] and targets [*].

    `vocab_size`: the real vocabulary; logit columns >= vocab_size are padding and ignored.
    Targets must lie in [0, vocab_size).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and targets "
                         f"{tuple(target.shape)} disagree on the leading dims")
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size)


def _vocab_shard(per_rank: int, group, vocab_size: Optional[int]) -> tuple[int, int]:
    """(first vocabulary id of this rank's columns, how many of them are real vocabulary, the rest padding)."""
    start = mappings.group_rank(group) * per_rank
    real = per_rank if vocab_size is None else max(0, min(per_rank, vocab_size - start))
    return start, real


class _TiledVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_size, tile):
        per_rank = weight.shape[0]
        start, real = _vocab_shard(per_rank, group, vocab_size)
        tp_size = mappings.group_size(group)
        b, s = target.shape
        loss = torch.empty(b, s, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)
        for lo in range(0, s, tile):
            hi = min(s, lo + tile)
            logits = F.linear(hidden[:, lo:hi], weight).float()  # [b, t, V/tp]
            if real < per_rank:
                logits[..., real:] = float("-inf")  # padding columns: probability exactly zero
            top = logits.amax(dim=-1) if real > 0 else torch.full(logits.shape[:-1], float("-inf"),
                                                                   device=logits.device)
            if tp_size > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            local = target[:, lo:hi] - start
            outside = (local < 0) | (local >= real)
            picked = logits.gather(-1, local.masked_fill(outside, 0).unsqueeze(-1)).squeeze(-1)
            sums = torch.stack([logits.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1),
                                (picked - top).masked_fill(outside, 0.0)])
            if tp_size > 1:
                dist.all_reduce(sums, group=group)
            log_sum = sums[0].log()
            lse[:, lo:hi] = log_sum + top
            loss[:, lo:hi] = log_sum - sums[1]
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.shard, ctx.tile = (start, real), tile
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        (start, real), tile = ctx.shard, ctx.tile
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        s = target.shape[1]
        for lo in range(0, s, tile):
            hi = min(s, lo + tile)
            h = hidden[:, lo:hi]
            grad = F.linear(h, weight).float().sub_(lse[:, lo:hi].unsqueeze(-1)).exp_()  # softmax [b, t, V/tp]
            if real < grad.shape[-1]:
                grad[..., real:] = 0.0
            local = target[:, lo:hi] - start
            inside = ((local >= 0) & (local < real))
            grad.scatter_add_(-1, local.masked_fill(~inside, 0).unsqueeze(-1),
                              -inside.to(grad.dtype).unsqueeze(-1))
            grad.mul_(grad_loss[:, lo:hi].unsqueeze(-1))
            grad = grad.to(weight.dtype)
            if want_hidden:
                grad_hidden[:, lo:hi] = torch.matmul(grad, weight)
            if want_weight:
                grad_weight.addmm_(grad.reshape(-1, grad.shape[-1]).t().float(), h.reshape(-1, h.shape[-1]).float())
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None)


def tiled_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                       tile: int, tp_group=None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [b, s] (float32) of the logits hidden Wᵀ, computed `tile` sequence positions at a time.

    `hidden` [b, s, h]: the whole (local) sequence, already through the copy-to-tp region (or gathered from
    Megatron's sequence shards); `weight` [V_padded/tp, h]: this rank's vocabulary rows; `target` [b, s].
    Equal, to float reordering, to vocab_parallel_cross_entropy(F.linear(hidden, weight), target, ...).
    """
    if hidden.dim() != 3 or target.shape != hidden.shape[:2]:
        raise ValueError(f"tiled_vocab_parallel_cross_entropy: hidden {tuple(hidden.shape)} must be [b, s, h] and "
                         f"targets {tuple(target.shape)} [b, s]")
    if tile < 1:
        raise ValueError(f"tiled_vocab_parallel_cross_entropy: tile must be >= 1 (got {tile})")
    return _TiledVocabParallelCrossEntropy.apply(hidden, weight, target, tp_group, vocab_size, tile)
