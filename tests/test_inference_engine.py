"""The inference engine on one rank: KV cache vs full recompute, greedy vs Hugging Face generate on the exported
model, a mixed-length batch vs each prompt alone, seeded sampling, upstream's sampling/stop/beam semantics, the
context limit, and loading from our checkpoints and HF folders."""

import math

import pytest
import torch

from megatron.convert.ds_writer import write_checkpoint
from megatron.convert.hf_io import export_to_hf
from megatron.data.tokenizers import build_tokenizer
from megatron.inference import GenerationError, InferenceEngine, SamplingParams
from megatron.inference.generation import BeamHypotheses, SpecialTokens, filter_logits, stop_reason
from megatron.inference.tokenization import ChatTemplateError, InferenceTokenizer, tokenize_prompt
from megatron.model.kv_cache import KVCache
from megatron.model.stage import stage_layer_bounds

from inference_ranks import EOD, PROMPTS, TOKENIZER_ARGS, VOCAB, gpt_config, llama_config, model_and_source

CONFIGS = {"llama": llama_config, "gpt": gpt_config}


def _engine(config, **kwargs):
    model, source = model_and_source(config)
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    return model, InferenceEngine.from_source(source, tokenizer, device="cpu", **kwargs)


def _greedy(n, **changes):
    return SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True, **changes)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_kv_cache_logits_equal_a_full_recompute_step_by_step(name):
    model, engine = _engine(CONFIGS[name]())
    stage = engine.stage
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    cache = KVCache(1, tokens.shape[1], stage.layer_indices, stage.config.num_key_value_heads, stage.config.head_dim)
    with torch.no_grad():
        full = model(tokens)[0, :, :VOCAB]
        pieces = [stage.logits(stage(tokens[:, :4], torch.arange(4).unsqueeze(0), kv_cache=cache))[0, :, :VOCAB]]
        chunk = stage(tokens[:, 4:7], torch.arange(4, 7).unsqueeze(0), kv_cache=cache)  # a later chunk: causal mask
        pieces.append(stage.logits(chunk)[0, :, :VOCAB])
        for i in range(7, tokens.shape[1]):
            hidden = stage(tokens[:, i:i + 1], torch.tensor([[i]]), kv_cache=cache)
            pieces.append(stage.logits(hidden)[0, :, :VOCAB])
    torch.testing.assert_close(torch.cat(pieces), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_greedy_equals_hugging_face_generate_alone_and_in_a_mixed_length_batch(name, tmp_path):
    from transformers import AutoModelForCausalLM

    config = CONFIGS[name]()
    model, engine = _engine(config)
    _, source = model_and_source(config)
    export_to_hf(source, str(tmp_path / "hf"), save_tokenizer_files=False, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    n = 12
    ours = [r.tokens for r in engine.generate(PROMPTS, [_greedy(n)] * len(PROMPTS))]
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, **kwargs)
        alone = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)[0]
                 for p in PROMPTS]
    for row, prompt in enumerate(PROMPTS):
        assert ours[row] == alone[row].tolist(), f"row {row}: HF alone differs"
        assert ours[row] == prompt + batched[row, width:].tolist(), f"row {row}: HF's batch differs"


def test_a_mixed_length_batch_gives_each_prompt_what_it_gives_alone():
    _, engine = _engine(llama_config())
    params = [_greedy(9, return_logprobs=True),
              SamplingParams(max_new_tokens=7, seed=5, top_k=30, return_logprobs=True),
              _greedy(0, return_logprobs=True), SamplingParams(max_new_tokens=12, seed=6, top_p=0.8, temperature=0.7)]
    batch = engine.generate(PROMPTS, params)
    for prompt, p, together in zip(PROMPTS, params, batch):
        [alone] = engine.generate([prompt], [p])
        assert together.tokens == alone.tokens and together.finish_reason == alone.finish_reason
        assert len(together.tokens) == len(prompt) + p.max_new_tokens
        if p.return_logprobs:
            assert len(together.logprobs) == len(together.tokens) - 1
            assert max([abs(a - b) for a, b in zip(together.logprobs, alone.logprobs)] or [0.0]) <= 1e-5
    batched = engine.score(PROMPTS + [[7, 8]])
    for sequence, scores in zip(PROMPTS + [[7, 8]], batched):
        [single] = engine.score([sequence])
        assert len(scores) == len(sequence) - 1
        assert max([abs(a - b) for a, b in zip(scores, single)] or [0.0]) <= 1e-6


def test_logprobs_are_the_models_log_softmax_of_each_next_token():
    model, engine = _engine(llama_config())
    [result] = engine.generate([PROMPTS[1]], [SamplingParams(max_new_tokens=5, seed=3, return_logprobs=True)])
    with torch.no_grad():
        logits = model(torch.tensor([result.tokens]))[0, :-1, :VOCAB]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(result.tokens[1:]).unsqueeze(1)).squeeze(1)
    assert max(abs(a - b) for a, b in zip(result.logprobs, expected.tolist())) <= 1e-5


def test_seeded_sampling_is_reproducible_whatever_the_batch_and_differs_between_seeds():
    _, engine = _engine(llama_config())
    p = SamplingParams(max_new_tokens=10, seed=42, temperature=1.5)
    [alone] = engine.generate([PROMPTS[0]], [p])
    other_seed = SamplingParams(max_new_tokens=10, seed=43, temperature=1.5)
    shared = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[0]], [_greedy(4), p, other_seed])
    assert shared[1].tokens == alone.tokens
    assert shared[2].tokens != alone.tokens


def test_stop_tokens_end_a_row_with_finish_reason_stop_and_eod_unless_ignored():
    _, engine = _engine(llama_config())
    [free] = engine.generate([PROMPTS[0]], [_greedy(10)])
    stop = free.tokens[len(PROMPTS[0]) + 3]
    first = free.tokens.index(stop, len(PROMPTS[0]))
    [stopped] = engine.generate([PROMPTS[0]], [_greedy(10, stop_token_ids=(stop,))])
    assert stopped.tokens == free.tokens[:first + 1] and stopped.finish_reason == "stop"
    assert free.finish_reason == "length"
    special = SpecialTokens(eod=EOD, newline=10, double_newline=11, colon=12)
    assert stop_reason(SamplingParams(), special, 1, EOD)
    assert not stop_reason(SamplingParams(ignore_eos=True), special, 1, EOD)
    assert stop_reason(SamplingParams(stop_on_eol=True), special, 1, 10)
    assert stop_reason(SamplingParams(stop_on_eol=True), special, 1, 11)
    assert not stop_reason(SamplingParams(stop_on_double_eol=True), special, 1, 10)
    assert stop_reason(SamplingParams(stop_on_double_eol=True), special, 10, 10)
    assert stop_reason(SamplingParams(stop_on_double_eol=True), special, 1, 11)


def test_upstream_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 0.0)).tolist() == [[True, True, False, False]]
    # upstream keeps a token while the mass before it is <= top_p: 0.5 <= 0.6 keeps the second, 0.8 > 0.6 drops
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.4)).tolist() == [[True, False, False, False]]
    scaled = filter_logits(logits, 2.0, 0, 0.0)
    torch.testing.assert_close(scaled, logits / 2.0)


def test_top_p_decays_to_its_bound_after_each_token():
    from megatron.inference.generation import RowSampler

    sampler = RowSampler(SamplingParams(top_p=0.9, top_p_decay=0.5, top_p_bound=0.3, seed=1), "cpu")
    seen = []
    for _ in range(3):
        sampler.next_token(torch.zeros(8))
        seen.append(sampler.top_p)
    assert seen == pytest.approx([0.45, 0.3, 0.3])


def test_prevent_newline_after_colon_masks_the_newline_token():
    _, engine = _engine(llama_config())
    engine._special = SpecialTokens(eod=EOD, newline=None, double_newline=None, colon=None)
    [free] = engine.generate([PROMPTS[2]], [_greedy(1)])
    newline = free.tokens[-1]  # pretend the greedy choice after token 60 is "\n" and 60 is ":"
    engine._special = SpecialTokens(eod=EOD, newline=newline, double_newline=None, colon=PROMPTS[2][-1])
    [masked] = engine.generate([PROMPTS[2]], [_greedy(1, prevent_newline_after_colon=True)])
    assert masked.tokens[-1] != newline


def test_invalid_requests_and_the_context_limit_are_refused_by_name():
    _, engine = _engine(llama_config(), max_sequence_length=20)
    with pytest.raises(GenerationError, match="max_new_tokens 15 exceed the context of 20"):
        engine.generate([PROMPTS[1]], [_greedy(15)])
    with pytest.raises(GenerationError, match="top_k and top_p"):
        engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=2, top_k=5, top_p=0.5)])
    with pytest.raises(GenerationError, match="temperature"):
        engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=2, temperature=-1.0)])
    with pytest.raises(GenerationError, match=r"token ids in \[0, 100\)"):
        engine.generate([[5, 100]], [_greedy(2)])
    with pytest.raises(GenerationError, match="newline token"):
        engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=2, stop_on_eol=True)])
    with pytest.raises(GenerationError, match="exceed the context"):
        engine.score([list(range(21))])
    # beam search stops at the limit instead (upstream clips tokens_to_generate there)
    sequences, _ = engine.beam_search(PROMPTS[1], beam_width=2, max_new_tokens=30, stop_token=EOD)
    assert all(len(s) <= 20 for s in sequences)


def _upstream_beam_search(model, prompt, beam, n, stop, penalty):
    """Upstream's beam_search_and_return_on_first_stage with a full recompute per step (no cache)."""
    hyps = BeamHypotheses(beam, penalty)
    tokens = [list(prompt) for _ in range(beam)]
    scores = torch.zeros(beam, 1)
    done = False
    for context in range(len(prompt), len(prompt) + n):
        with torch.no_grad():
            logits = model(torch.tensor(tokens))[:, -1, :VOCAB]
        new_scores = torch.log_softmax(logits, -1) + scores
        flat = new_scores[0] if context == len(prompt) else new_scores.view(-1)
        values, indices = torch.sort(flat, descending=True)
        chosen = []
        for rank, (index, value) in enumerate(zip(indices[:2 * beam].tolist(), values[:2 * beam])):
            b, word = index // VOCAB, index % VOCAB
            if word == stop:
                if rank < beam:
                    hyps.add(tokens[b] + [word], float(value), context + 1 - len(prompt))
            else:
                chosen.append((word, value, b))
            if len(chosen) == beam:
                break
        if hyps.is_done(float(values[:2 * beam].max()), context + 1 - len(prompt)):
            done = True
            break
        tokens = [tokens[b] + [w] for w, _, b in chosen]
        scores = torch.stack([v for _, v, _ in chosen]).unsqueeze(1)
    if not done:
        for b in range(beam):
            hyps.add(tokens[b], float(scores[b, 0]), context + 1 - len(prompt))
    ranked = sorted(hyps.beams, key=lambda item: item[0], reverse=True)
    return [t for _, t in ranked], [s for s, _ in ranked]


@pytest.mark.parametrize("stop_rank", [None, 1])
def test_beam_search_follows_upstreams_algorithm_and_scores(stop_rank):
    model, engine = _engine(llama_config())
    prompt = PROMPTS[3]
    stop = EOD
    if stop_rank is not None:  # make a likely token the stop token, so hypotheses end early
        with torch.no_grad():
            stop = int(torch.argsort(model(torch.tensor([prompt]))[0, -1, :VOCAB], descending=True)[stop_rank])
    sequences, scores = engine.beam_search(prompt, beam_width=3, max_new_tokens=6, stop_token=stop,
                                           length_penalty=0.8)
    expected_sequences, expected_scores = _upstream_beam_search(model, prompt, 3, 6, stop, 0.8)
    assert sequences == expected_sequences
    assert scores == pytest.approx(expected_scores, abs=1e-5)
    for sequence, score in zip(sequences, scores):  # a score is the sequence's mean log-prob, length-penalised
        generated = engine.score([sequence])[0][len(prompt) - 1:]
        assert score == pytest.approx(sum(generated) / len(generated) ** 0.8, abs=1e-4)
    [greedy] = engine.generate([prompt], [_greedy(6)])
    one, _ = engine.beam_search(prompt, beam_width=1, max_new_tokens=6, stop_token=EOD)
    if EOD not in greedy.tokens[len(prompt):]:
        assert one[0] == greedy.tokens


def test_on_token_streams_every_new_token_and_a_failing_callback_does_not_stop_generation():
    _, engine = _engine(llama_config())
    seen = []

    def on_token(index, token):
        seen.append((index, token))
        if len(seen) == 2:
            raise RuntimeError("client went away")

    results = engine.generate(PROMPTS[:2], [_greedy(3), _greedy(2)], on_token=on_token)
    for index, result in enumerate(results):
        assert [t for i, t in seen if i == index] == result.tokens[len(PROMPTS[index]):]


def test_add_bos_prepends_eod_as_upstream_and_chat_templates_are_refused_by_name():
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    assert tokenize_prompt(tokenizer, "5 6", add_BOS=True) == [EOD, 5, 6]
    assert tokenize_prompt(tokenizer, "5 6") == [5, 6]
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="NullTokenizer.*no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_stage_bounds_split_layers_evenly():
    assert stage_layer_bounds(4, 2) == [0, 2, 4]
    assert stage_layer_bounds(5, 2) == [0, 3, 5]
    assert stage_layer_bounds(3, 3) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot split 2 layers over 3"):
        stage_layer_bounds(2, 3)


def test_from_checkpoint_loads_our_checkpoint_at_another_layout_and_its_hf_export(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = llama_config()
    _, source = model_and_source(config)
    write_checkpoint(source, str(tmp_path / "ckpt"), tp=2, pp=2, progress=False)
    ours = InferenceEngine.from_checkpoint(str(tmp_path / "ckpt"), device="cpu")
    assert (ours.vocab_size, ours.max_sequence_length, ours.model_name) == (VOCAB, 64, "ckpt")
    assert type(ours.tokenizer._inner).__name__ == "NullTokenizer"
    export_to_hf(source, str(tmp_path / "hf"), save_tokenizer_files=False, progress=False)
    words = Tokenizer(models.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=str(EOD)).save_pretrained(str(tmp_path / "hf"))
    hf = InferenceEngine.from_checkpoint(str(tmp_path / "hf"), device="cpu")
    assert hf.tokenizer.eod == EOD
    p = [_greedy(8)] * 2
    assert [r.tokens for r in ours.generate(PROMPTS[:2], p)] == [r.tokens for r in hf.generate(PROMPTS[:2], p)]
    with pytest.raises(GenerationError, match="tp 2 × pp 1 needs torch.distributed"):
        InferenceEngine.from_checkpoint(str(tmp_path / "ckpt"), tp=2, pp=1, device="cpu")


def test_a_checkpoint_without_a_tokenizer_is_refused_unless_one_is_given(tmp_path):
    config = llama_config()
    model, _ = model_and_source(config)
    from megatron.checkpoint.layout import StateDictSource

    write_checkpoint(StateDictSource(model.state_dict(), config), str(tmp_path / "ckpt"), progress=False)
    with pytest.raises(GenerationError, match="does not record its tokenizer"):
        InferenceEngine.from_checkpoint(str(tmp_path / "ckpt"), device="cpu")
    engine = InferenceEngine.from_checkpoint(str(tmp_path / "ckpt"), tokenizer_args=TOKENIZER_ARGS, device="cpu")
    assert engine.tokenizer.vocab_size == VOCAB and not math.isnan(engine.score([[1, 2, 3]])[0][0])


def test_from_checkpoint_loads_an_argonne_checkpoint_resharded(tmp_path):
    import argonne_files as af
    from megatron.checkpoint.layout import StateDictSource

    config = llama_config(init_method_std=0.05)
    state = af.random_state(config, seed=4)
    af.write_argonne_checkpoint(state, config, str(tmp_path / "mds"), tp=2, pp=2, pipeline=True)
    theirs = InferenceEngine.from_checkpoint(str(tmp_path / "mds"), device="cpu")
    assert theirs.vocab_size == VOCAB and theirs.tokenizer.eod == EOD
    fp32 = StateDictSource({name: tensors["fp32"] for name, tensors in state.items()}, config)
    reference = InferenceEngine.from_source(fp32, theirs.tokenizer, device="cpu")
    p = [SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True, return_logprobs=True)] * 2
    got, expected = theirs.generate(PROMPTS[:2], p), reference.generate(PROMPTS[:2], p)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert max(abs(a - b) for r, s in zip(got, expected) for a, b in zip(r.logprobs, s.logprobs)) <= 1e-5


def test_from_checkpoint_scores_upstreams_own_checkpoint_as_upstreams_own_forward(tmp_path):
    """argonne-lcf/Megatron-DeepSpeed's own tp 2 checkpoint (tests/data/upstream), served at tp 1: the engine's
    log-probabilities are those of upstream's own forward logits (logits/tp2_fp32.npy) over the real vocabulary."""
    import numpy as np
    from upstream_fixtures import FIXTURES, copy_checkpoint

    engine = InferenceEngine.from_checkpoint(str(copy_checkpoint("tp2_fp32", tmp_path / "argonne")), device="cpu")
    assert engine.vocab_size == 257  # NullTokenizer --vocab-size 256 (EOD 256), padded to 512 for tp 2 upstream
    tokens = np.load(FIXTURES / "logits" / "tokens.npy")
    theirs = torch.from_numpy(np.load(FIXTURES / "logits" / "tp2_fp32.npy")).double()[..., :257]
    expected = torch.log_softmax(theirs, -1)[:, :-1].gather(-1, torch.from_numpy(tokens[:, 1:]).long()[..., None])
    got = torch.tensor(engine.score([[int(t) for t in row] for row in tokens]), dtype=torch.float64)
    torch.testing.assert_close(got, expected.squeeze(-1), rtol=0, atol=1e-5)


def test_a_hugging_face_tokenizer_with_a_chat_template_applies_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "user:", "assistant:", "hi", "</s>"])},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    hf.save_pretrained(str(tmp_path / "tok"))
    tokenizer = InferenceTokenizer(build_tokenizer("HFTokenizer", str(tmp_path / "tok")))
    assert tokenizer.chat_template and tokenizer.eod == 4
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == [1, 3, 2]


def test_dtype_by_name_and_an_unknown_one_refused():
    _, engine = _engine(llama_config(), dtype="bf16")
    assert engine.dtype == torch.bfloat16 and engine.stage.layers["0"].attention.qkv.weight.dtype == torch.bfloat16
    [result] = engine.generate([PROMPTS[0]], [_greedy(4, return_logprobs=True)])
    assert len(result.tokens) == 7 and len(result.logprobs) == 6
    with pytest.raises(GenerationError, match="dtype 'int8' is not one of"):
        _engine(llama_config(), dtype="int8")
