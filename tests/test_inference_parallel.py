"""The inference engine at tp = 2 and pp = 2 (gloo, 2 ranks each) gives exactly tp = 1's tokens: greedy in a
mixed batch, seeded sampling and beam search; scores and log-probs within float rounding."""

import pytest

from inference_ranks import gpt_config, layout_rank, llama_config, model_and_source, workload
from multirank import run_ranks


def single(name):
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer

    _, source = model_and_source(CONFIGS[name]())
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=100))
    return workload(InferenceEngine.from_source(source, tokenizer, device="cpu"))


CONFIGS = {"llama": llama_config, "gpt": gpt_config}


def _close(a, b, tol):
    return len(a) == len(b) and all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("name,tp,pp", [("llama", 2, 1), ("llama", 1, 2), ("gpt", 1, 2)])
def test_tp2_and_pp2_generate_exactly_what_one_rank_generates(name, tp, pp):
    """llama: GQA, RoPE, an untied output layer on the last stage; gpt: learned positions on the first stage and
    the tied word embedding copied to the last."""
    reference = single(name)
    results = run_ranks(2, layout_rank, name, tp, pp, timeout=300)
    layers = list(range(CONFIGS[name]().num_layers))
    half = len(layers) // 2
    stages = [layers] * 2 if pp == 1 else [layers[:half], layers[half:]]
    assert [r["layout"] for r in results] == [(tp, pp, held) for held in stages]
    for rank, result in enumerate(results):
        assert result["greedy"] == reference["greedy"], f"rank {rank}"
        assert result["sampled"] == reference["sampled"], f"rank {rank}"
        assert result["beams"][0] == reference["beams"][0], f"rank {rank}"
        assert result["beams"][1] == pytest.approx(reference["beams"][1], abs=1e-5)
        assert _close(result["scores"], reference["scores"], 1e-5)
        assert _close(result["greedy_logprobs"], reference["greedy_logprobs"], 1e-5)
