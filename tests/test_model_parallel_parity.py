"""Multi-rank parity: tensor-, Megatron-sequence-, Ulysses- and pipeline-parallel GPT/Llama equal one rank.

One gloo launch per world size (2 and 4 CPU ranks) runs every layout; each test below asserts
on its part of the results. Relative errors are ||parallel - tp1|| / ||tp1|| per tensor.
"""

import pytest

import model_parity_ranks as ranks
from multirank import run_ranks

TOLERANCE = 1e-5
TWO_RANK_LAYOUTS = [  # (model, tp, Ulysses sp, Megatron sequence parallel)
    ("gpt", 2, 1, False), ("llama", 2, 1, False), ("gpt", 2, 1, True), ("llama", 2, 1, True),
    ("gpt", 1, 2, False), ("llama", 1, 2, False),
]
FOUR_RANK_LAYOUTS = [
    ("gpt", 4, 1, False), ("llama", 4, 1, False), ("gpt", 4, 1, True), ("llama", 4, 1, True),
    ("llama", 2, 2, True),
]


def _two_rank_checks(rank, world_size):
    results = {}
    for layout in TWO_RANK_LAYOUTS:
        ranks.parity_case(*layout, world_size, results)
    ranks.cross_entropy_case(world_size, results)
    ranks.rng_tracker_case(world_size, results)
    ranks.checkpointing_case(world_size, results)
    ranks.pipeline_case("gpt", world_size, results)
    ranks.pipeline_case("llama", world_size, results, checkpoint_activations=True)
    return results


def _four_rank_checks(rank, world_size):
    results = {}
    for layout in FOUR_RANK_LAYOUTS:
        ranks.parity_case(*layout, world_size, results)
    ranks.cross_entropy_case(world_size, results, padded=128, prefix="ce-tp4")
    return results


def _merge(per_rank: list) -> dict:
    """Worst value over ranks: max for errors, all() for flags."""
    merged = {}
    for results in per_rank:
        for key, value in results.items():
            if isinstance(value, bool):
                merged[key] = merged.get(key, True) and value
            else:
                merged[key] = max(merged.get(key, 0.0), value)
    return merged


@pytest.fixture(scope="module")
def two_rank_results():
    return _merge(run_ranks(2, _two_rank_checks, timeout=300))


@pytest.fixture(scope="module")
def four_rank_results():
    return _merge(run_ranks(4, _four_rank_checks, timeout=300))


def _errors(results: dict, prefix: str, tolerance: float = TOLERANCE) -> dict:
    selected = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert selected, f"no results under {prefix!r}"
    return {k: v for k, v in selected.items() if v > tolerance}


def _label(model, tp, sp, seqpar):
    return f"{model}/tp{tp}/sp{sp}/{'seqpar' if seqpar else 'noseqpar'}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=lambda l: _label(*l))
def test_two_rank_layouts_match_single_rank_init_logits_loss_and_every_grad(two_rank_results, layout):
    assert _errors(two_rank_results, _label(*layout) + "/") == {}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=lambda l: _label(*l))
def test_four_rank_layouts_match_single_rank_init_logits_loss_and_every_grad(four_rank_results, layout):
    assert _errors(four_rank_results, _label(*layout) + "/") == {}


def test_vocab_parallel_cross_entropy_matches_torch_and_ignores_padding(two_rank_results):
    assert two_rank_results["ce/loss"] <= 1e-6 and two_rank_results["ce/grad"] <= 1e-6
    assert two_rank_results["ce/padding_grad_is_zero"] and two_rank_results["ce/logits_untouched"]


def test_vocab_parallel_cross_entropy_at_tp4_with_a_shard_that_is_all_padding(four_rank_results):
    assert four_rank_results["ce-tp4/loss"] <= 1e-6 and four_rank_results["ce-tp4/grad"] <= 1e-6
    assert four_rank_results["ce-tp4/padding_grad_is_zero"] and four_rank_results["ce-tp4/logits_untouched"]


def test_rng_tracker_tp_dropout_differs_across_tp_and_replicated_dropout_matches(two_rank_results):
    assert two_rank_results["rng/tp_masks_differ_across_tp"]
    assert two_rank_results["rng/default_masks_match_across_tp"]
    assert two_rank_results["rng/fork_keeps_default_state"]


def test_activation_checkpointing_with_dropout_gives_identical_loss_and_grads(two_rank_results):
    assert two_rank_results["ckpt/dropout_changes_loss"], "dropout was not active, the check would be vacuous"
    assert two_rank_results["ckpt/loss_identical"]
    assert two_rank_results["ckpt/grads_identical"]


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_deepspeed_pipeline_two_stages_match_gptmodel_weights_loss_and_grads(two_rank_results, model):
    """gpt: tied embedding across the two stages; llama: untied, with activation recomputation."""
    assert _errors(two_rank_results, f"pipe-{model}/init:", tolerance=0.0) == {}
    assert two_rank_results[f"pipe-{model}/loss"] <= TOLERANCE
    # grads are recovered from one SGD step (w_before - w_after) / lr, hence the looser tolerance
    assert _errors(two_rank_results, f"pipe-{model}/grad:", tolerance=1e-4) == {}
