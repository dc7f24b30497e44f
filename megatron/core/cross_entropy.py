"""Cross entropy over logits whose vocabulary is split over tensor-parallel ranks.

Never gathers the logits: max, target logit and sum of exponentials are all-reduced over the
tp group (three small all-reduces of [b, s] tensors). Columns at or beyond the real vocabulary
(padding) are excluded, so a padding column can never win. Computed in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import mappings


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        tp_size, tp_rank = mappings.group_size(group), mappings.group_rank(group)
        per_rank = logits.shape[-1]
        start = tp_rank * per_rank
        if vocab_size is not None and vocab_size < start + per_rank:
            column = torch.arange(start, start + per_rank, device=logits.device)
            logits = logits.masked_fill(column >= vocab_size, float("-inf"))

        local_max = logits.max(dim=-1).values
        if tp_size > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)

        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if tp_size > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
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
