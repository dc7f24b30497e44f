"""The post-training losses on sequence log-probabilities, and TRL's metrics of them.

A sequence's log-probability under a model is the SUM over its response tokens (loss mask 1) of the per-token
log-probabilities, and a per-token log-probability is the NEGATIVE of the per-token cross entropy that the model
returns (megatron/core/cross_entropy.py, vocab-parallel under tp):

    logp(y | x) = sum_t mask_t * log p(y_t | y_<t, x) = - sum_t mask_t * nll_t

Packed (--packing), a row holds several sequences, each its own document (the model's document mask keeps them
apart): the sum runs over each document's tokens separately (`pair_logps`), giving the same numbers as padding.

DPO (Rafailov et al. 2023) with TRL 1.16's definitions (trl/trainer/dpo_trainer.py, `_compute_loss`):

    chosen_logratio   = logp_policy(chosen)   - logp_ref(chosen)
    rejected_logratio = logp_policy(rejected) - logp_ref(rejected)
    delta             = chosen_logratio - rejected_logratio
    sigmoid  -logsigmoid(beta * delta)
             with --label-smoothing e (conservative DPO, cDPO):  -(1-e) logsigmoid(beta delta) - e logsigmoid(-beta delta)
             (TRL 1.16's sigmoid has no smoothing; its `aot` loss computes this formula on the batch's sorted
             log-ratios, which on one pair is exactly cDPO: tests/test_post_training_losses.py checks it so)
    robust   (-(1-e) logsigmoid(beta delta) + e logsigmoid(-beta delta)) / (1 - 2e)        (TRL's "robust")
    hinge    relu(1 - beta * delta)
    ipo      (delta_avg - 1 / (2 beta))^2, delta_avg: each log-ratio divided by its response's token count
    RPO      + rpo_alpha * (mean NLL over the chosen responses' tokens)                    (TRL's "sft" term)

The metrics (TRL's names): rewards/chosen = mean beta*chosen_logratio, rewards/rejected likewise,
rewards/accuracies = mean [chosen reward > rejected reward], rewards/margins = mean reward difference,
logps/chosen and logps/rejected = mean policy log-probabilities. Every function here is per pair; the engine
sums over the micro-batches and data-parallel ranks of a global batch and divides by its pair count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def sequence_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] log-probabilities of each row's masked tokens from the per-token cross entropy [b, s] (its negative)."""
    return -(per_token_nll.float() * loss_mask.float()).sum(dim=-1)


def pair_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor, pair_ids: torch.Tensor,
               document_ids: torch.Tensor | None = None) -> tuple:
    """A DPO micro-batch's sequences, pair by pair: (chosen logps [m], rejected logps [m], chosen response token
    counts [m], rejected ones [m], pair ids [m]).

    Padded (document_ids None, pair_ids [n]): row i < n is pair i's chosen sequence, row n + i its rejected one.
    Packed (document_ids [2n, s], pair_ids [n, k], -1 for no pair): document d of row i < n is pair
    pair_ids[i, d]'s chosen sequence and document d of row n + i its rejected one; a document's log-probability
    is the sum over its own tokens (documents >= k, the padding, carry no loss and are dropped)."""
    if document_ids is None:
        chosen, rejected = split_pairs(sequence_logps(per_token_nll, loss_mask))
        tokens_chosen, tokens_rejected = split_pairs(loss_mask.float().sum(-1))
        return chosen, rejected, tokens_chosen, tokens_rejected, pair_ids
    slots = pair_ids.shape[1]
    index = document_ids.long().clamp(max=slots).to(per_token_nll.device)
    masked = per_token_nll.float() * loss_mask.float()
    rows = per_token_nll.shape[0]
    logps = -(torch.zeros(rows, slots + 1, device=masked.device).scatter_add(1, index, masked)[:, :slots])
    counts = torch.zeros(rows, slots + 1, device=masked.device).scatter_add(1, index, loss_mask.float())[:, :slots]
    valid = (pair_ids >= 0).to(masked.device)
    (chosen, rejected), (tokens_chosen, tokens_rejected) = split_pairs(logps), split_pairs(counts)
    return (chosen[valid], rejected[valid], tokens_chosen[valid], tokens_rejected[valid],
            pair_ids.to(valid.device)[valid])


def dpo_pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """[n] DPO loss of each pair from its four sequence log-probabilities (see the module docstring).
    chosen_tokens / rejected_tokens [n]: the response token counts (IPO's length normalisation)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    delta = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        if label_smoothing:
            return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
        return -F.logsigmoid(beta * delta)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the response token counts (chosen_tokens, rejected_tokens)")
        avg = chosen_logratio / chosen_tokens.clamp(min=1.0) - rejected_logratio / rejected_tokens.clamp(min=1.0)
        return (avg - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}: one of {', '.join(DPO_LOSSES)}")


def dpo_metric_sums(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """[len(DPO_METRICS)] sums over these pairs of TRL's per-pair metrics (divide by the pair count for means)."""
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen - ref_chosen).float()
        rejected_rewards = beta * (policy_rejected - ref_rejected).float()
        return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(),
                            (chosen_rewards > rejected_rewards).float().sum(),
                            (chosen_rewards - rejected_rewards).sum(),
                            policy_chosen.detach().float().sum(), policy_rejected.detach().float().sum()])


def split_pairs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a DPO micro-batch [2n, ...] -> (chosen [n, ...], rejected [n, ...]): chosen rows come first."""
    if rows.shape[0] % 2:
        raise ValueError(f"a DPO micro-batch holds chosen then rejected rows (an even count), got {rows.shape[0]}")
    return rows.chunk(2, dim=0)
