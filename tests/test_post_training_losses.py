"""DPO's loss and metrics equal TRL's DPOTrainer computation (its own `_compute_loss`, run on fixed per-token
log-probabilities), for each loss type; the log-probabilities' sign is checked against an independent log-softmax."""

import types
from collections import defaultdict

import pytest
import torch

from megatron.post_training.losses import DPO_METRICS, dpo_metric_sums, dpo_pair_losses, sequence_logps, split_pairs

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _FixedLogProbs(torch.nn.Module):
    """Stands in for the policy inside TRL's _compute_loss: returns the given per-token log-probabilities (zero
    outside the completion, as TRL's fused head gives for labels -100) and neutral extras for its other metrics."""

    def __init__(self, per_token_logps):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, use_cache=False, **_):
        shape = self.per_token_logps.shape
        return types.SimpleNamespace(log_probs=self.per_token_logps, entropy=torch.zeros(shape),
                                     mean_logits=torch.zeros(shape), is_top1=torch.zeros(shape, dtype=torch.bool))


def _trl_trainer(loss_types, loss_weights, beta, label_smoothing, model):
    """A DPOTrainer with only what `_compute_loss` reads (precomputed reference log-probs, one process)."""
    trainer = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    identity = lambda t: t  # noqa: E731  (one process: gather is the identity)
    trainer.__dict__.update(
        model=model, accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                                       gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    return trainer


def _fixed_batch(n=4, s=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * n, s, dtype=torch.long)
    for row in range(2 * n):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, s + 1, (1,), generator=g))
        completion[row, start:end] = 1
    shift_mask = completion[:, 1:].float()
    per_token = -torch.rand(2 * n, s - 1, generator=g, dtype=torch.float64).float() * 3 * shift_mask
    ref = -torch.rand(2 * n, generator=g).float() * 10
    return completion, shift_mask, per_token, ref


def _ours(per_token, shift_mask, ref, beta, loss_type, label_smoothing, rpo_alpha=0.0):
    nll = -per_token  # what the model's cross entropy gives
    logps = sequence_logps(nll, shift_mask)
    pc, pr = split_pairs(logps)
    rc, rr = split_pairs(ref)
    tc, tr = split_pairs(shift_mask.sum(-1))
    per_pair = dpo_pair_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                               chosen_tokens=tc, rejected_tokens=tr)
    loss = per_pair.mean()
    if rpo_alpha:
        chosen_nll, _ = split_pairs(nll * shift_mask)
        loss = loss + rpo_alpha * chosen_nll.sum() / tc.sum()
    sums = dpo_metric_sums(pc, pr, rc, rr, beta)
    return loss, dict(zip(DPO_METRICS, (sums / pc.shape[0]).tolist()))


@pytest.mark.parametrize("loss_types,weights,ls,rpo", [
    (["sigmoid"], [1.0], 0.0, 0.0), (["hinge"], [1.0], 0.0, 0.0), (["ipo"], [1.0], 0.0, 0.0),
    (["robust"], [1.0], 0.1, 0.0), (["sigmoid", "sft"], [1.0, 0.5], 0.0, 0.5),
    (["robust", "sft"], [1.0, 2.0], 0.2, 2.0), (["hinge", "sft"], [1.0, 1.0], 0.0, 1.0)])
def test_dpo_loss_and_metrics_equal_trls(loss_types, weights, ls, rpo):
    completion, shift_mask, per_token, ref = _fixed_batch()
    beta = 0.3
    trl_loss, trl_metrics = _trl_loss_and_metrics(loss_types, weights, beta, ls, per_token, completion, ref)
    loss, metrics = _ours(per_token, shift_mask, ref, beta, loss_types[0], ls, rpo)
    assert loss.item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-7)
    for name in DPO_METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-7), name


def _trl_loss_and_metrics(loss_types, weights, beta, ls, per_token, completion, ref):
    trainer = _trl_trainer(loss_types, weights, beta, ls, _FixedLogProbs(per_token))
    rc, rr = ref.chunk(2)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss.item(), {name: trainer._metrics["train"][name][-1] for name in DPO_METRICS}


@pytest.mark.parametrize("rpo", [0.0, 0.7])
def test_conservative_dpo_equals_trls_label_smoothed_loss_pair_by_pair(rpo):
    """cDPO (--dpo-loss sigmoid --label-smoothing e [--rpo-alpha a]) against TRL 1.16's own code. TRL 1.16's
    `sigmoid` dropped label smoothing, but its `aot` loss is -(1-e) logsigmoid(beta delta) - e logsigmoid(-beta
    delta) of the batch's sorted log-ratios, and sorting one pair is the identity: on each pair alone TRL's `aot`
    (with `sft` weighted a for RPO) is the cDPO loss. Ours on each pair alone must equal it, loss and metrics."""
    completion, shift_mask, per_token, ref = _fixed_batch(n=5, seed=4)
    beta, e, n = 0.4, 0.15, 5
    for pair in range(n):
        rows = [pair, n + pair]  # the pair's chosen row, then its rejected row
        types, weights = (["aot", "sft"], [1.0, rpo]) if rpo else (["aot"], [1.0])
        trl_loss, trl_metrics = _trl_loss_and_metrics(types, weights, beta, e, per_token[rows], completion[rows],
                                                      ref[rows])
        loss, metrics = _ours(per_token[rows], shift_mask[rows], ref[rows], beta, "sigmoid", e, rpo)
        assert loss.item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-7), pair
        for name in DPO_METRICS:
            assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-7), (pair, name)
    # and the smoothing is not a no-op here: the same pairs without it give another loss
    unsmoothed, _ = _ours(per_token, shift_mask, ref, beta, "sigmoid", 0.0)
    smoothed, _ = _ours(per_token, shift_mask, ref, beta, "sigmoid", e)
    assert abs(unsmoothed.item() - smoothed.item()) > 1e-3


def test_sequence_logps_are_negative_nll_sums_from_the_model():
    """The log-probability of a sequence equals the sum of log_softmax at the labels, computed independently;
    a flipped sign (NLL taken as a log-probability) fails here."""
    from megatron.core.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 11, generator=g)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    nll = vocab_parallel_cross_entropy(logits, labels)
    expected = (torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    got = sequence_logps(nll, mask)
    torch.testing.assert_close(got, expected)
    assert (got <= 0).all()


def test_a_flipped_sign_changes_the_dpo_loss_and_rewards():
    """The policy prefers the chosen response (higher log-probability than the reference): the sigmoid loss is
    below log 2 and rewards/chosen > rewards/rejected; with the NLL taken as the log-probability both flip."""
    nll = torch.tensor([[0.5, 0.5], [2.0, 2.0]])  # chosen row: likely, rejected row: unlikely
    mask = torch.ones(2, 2)
    ref = torch.tensor([-3.0, -3.0])
    for logps, better in ((sequence_logps(nll, mask), True), ((nll * mask).sum(-1), False)):
        pc, pr = split_pairs(logps)
        rc, rr = split_pairs(ref)
        loss = dpo_pair_losses(pc, pr, rc, rr, beta=0.1).mean().item()
        sums = dpo_metric_sums(pc, pr, rc, rr, 0.1)
        assert (loss < torch.log(torch.tensor(2.0)).item()) is better
        assert (sums[0] > sums[1]).item() is better


def test_unknown_loss_is_refused_by_name():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss 'nca'"):
        dpo_pair_losses(z, z, z, z, beta=0.1, loss_type="nca")
