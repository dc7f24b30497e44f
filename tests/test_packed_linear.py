"""core/packed_linear.py: the oneDNN-packed weights the inference engine's layers use on CPU give F.linear's
results (to float rounding) at decode and prefill sizes, fall back to F.linear where they must, and the engine
packs every linear layer and the logits (untied and tied) with the same greedy tokens as without packing."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import packed_linear
from megatron.data.tokenizers import build_tokenizer
from megatron.inference import InferenceEngine, SamplingParams
from megatron.inference.tokenization import InferenceTokenizer

from inference_ranks import PROMPTS, VOCAB, gpt_config, llama_config, model_and_source

needs_onednn = pytest.mark.skipif(not packed_linear.packable(torch.zeros(2, 2)), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_gives_f_linear_at_decode_and_prefill_sizes(dtype):
    g = torch.Generator().manual_seed(0)
    weight, bias = (torch.randn(96, 40, generator=g) * 0.1).to(dtype), torch.randn(96, generator=g).to(dtype)
    packed = packed_linear.pack(weight, batch_hint=8)
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        for shape in [(1, 40), (8, 1, 40), (3, 17, 40)]:
            x = torch.randn(*shape, generator=g).to(dtype)
            out = packed_linear.linear(x, weight, bias, packed)
            assert out.shape == (*shape[:-1], 96) and out.dtype == dtype
            torch.testing.assert_close(out, F.linear(x, weight, bias), **tolerance)
        strided = torch.randn(4, 3, 80, generator=g).to(dtype)[..., ::2]  # a non-contiguous input
        torch.testing.assert_close(packed_linear.linear(strided, weight, None, packed), F.linear(strided, weight),
                                   **tolerance)


@needs_onednn
def test_packed_linear_runs_f_linear_with_autograd_on_and_refuses_what_it_cannot_pack():
    weight = torch.randn(6, 4, requires_grad=True)
    packed = packed_linear.pack(weight, batch_hint=2)
    x = torch.randn(2, 4)
    out = packed_linear.linear(x, weight, None, packed)  # autograd on: the plain path, so gradients flow
    assert torch.equal(out, F.linear(x, weight)) and out.requires_grad
    assert not packed_linear.packable(torch.zeros(3, 2, dtype=torch.float64))
    assert not packed_linear.packable(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot be packed"):
        packed_linear.pack(torch.zeros(3, 2, dtype=torch.float64), 1)


@needs_onednn
@pytest.mark.parametrize("name", ["llama", "gpt"])  # untied logits, tied (the word embedding's packed copy)
def test_the_engine_packs_every_linear_and_generates_what_it_generates_unpacked(name):
    config = {"llama": llama_config, "gpt": gpt_config}[name]()
    _, source = model_and_source(config)
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    packed = InferenceEngine.from_source(source, tokenizer, device="cpu")
    plain_stage = type(packed.stage)(packed.stage.config, packed.stage.ps)
    plain_stage.load_state_dict(packed.stage.state_dict())
    plain = InferenceEngine(plain_stage.eval(), tokenizer, pack_weights=False)
    assert plain.packed_weights == 0
    assert packed.packed_weights == 4 * config.num_layers + 1  # qkv, dense, fc1, fc2 per layer + the logits
    params = [SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True, return_logprobs=True)] * len(PROMPTS)
    ours, reference = packed.generate(PROMPTS, params), plain.generate(PROMPTS, params)
    assert [r.tokens for r in ours] == [r.tokens for r in reference]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
