"""Cross entropy over logits whose vocabulary is split over tensor-parallel ranks.

Never gathers the logits: max, target logit and sum of exponentials are all-reduced over the
tp group (three small all-reduces of [b, s] tensors). Columns at or beyond the real vocabulary
(padding) are excluded, so a padding column can never win. Computed in float32.
The [*, V/tp] float32 work buffer is allocated once per call and owned by the autograd Function:
forward turns it into the softmax in place and backward turns that into the gradient in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

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
