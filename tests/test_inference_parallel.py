"""The inference engine at tp = 2 and pp = 2 (gloo, 2 ranks each) gives exactly tp = 1's tokens: greedy in a
mixed batch, seeded sampling and beam search; scores and log-probs within float rounding."""

import pytest

from inference_ranks import layout_rank, llama_config, model_and_source, workload
from multirank import run_ranks


@pytest.fixture(scope="module")
def single():
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer

    _, source = model_and_source(llama_config())
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=100))
    return workload(InferenceEngine.from_source(source, tokenizer, device="cpu"))


def _close(a, b, tol):
    return all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_generate_exactly_what_one_rank_generates(single, tp, pp):
    results = run_ranks(2, layout_rank, "llama", tp, pp, timeout=300)
    stages = [[0, 1, 2, 3]] * 2 if pp == 1 else [[0, 1], [2, 3]]
    assert [r["layout"] for r in results] == [(tp, pp, layers) for layers in stages]
    for rank, result in enumerate(results):
        assert result["greedy"] == single["greedy"], f"rank {rank}"
        assert result["sampled"] == single["sampled"], f"rank {rank}"
        assert result["beams"][0] == single["beams"][0], f"rank {rank}"
        assert result["beams"][1] == pytest.approx(single["beams"][1], abs=1e-5)
        assert _close(result["scores"], single["scores"], 1e-5)
        assert _close(result["greedy_logprobs"], single["greedy_logprobs"], 1e-5)
