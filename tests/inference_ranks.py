"""Small models and a fixed workload for the inference engine's tests (single rank and tp/pp ranks)."""

from __future__ import annotations

from megatron.checkpoint.layout import StateDictSource
from megatron.config.model import TransformerConfig
from megatron.model import GPTModel

VOCAB = 100
EOD = VOCAB - 1  # NullTokenizer's eod
TOKENIZER_ARGS = {"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB - 1}  # VOCAB tokens, EOD VOCAB - 1


def llama_config(**changes) -> TransformerConfig:
    """Llama style: RMSNorm, SwiGLU, RoPE, GQA 4/2 heads, untied, no biases; a larger init so greedy choices are
    clear (no near-ties for float rounding to flip)."""
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=96,
                seq_length=64, vocab_size=VOCAB, make_vocab_size_divisible_by=8, normalization="rmsnorm",
                swiglu=True, position_embedding_type="rope", rope_theta=10000.0,
                untie_embeddings_and_output_weights=True, add_bias_linear=False, attention_dropout=0.0,
                hidden_dropout=0.0, norm_epsilon=1e-6, init_method_std=0.08)
    base.update(changes)
    return TransformerConfig(**base)


def gpt_config(**changes) -> TransformerConfig:
    """GPT-2 style: layernorm, GeLU, learned positions, tied embeddings, biases."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=VOCAB,
                make_vocab_size_divisible_by=8, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.08)
    base.update(changes)
    return TransformerConfig(**base)


def model_and_source(config: TransformerConfig, seed: int = 3):
    model = GPTModel(config, seed=seed).eval()
    return model, StateDictSource(model.state_dict(), config, tokenizer_args=TOKENIZER_ARGS)


PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [60], [33, 34, 35, 36, 37]]


def workload(engine):
    """What the layouts must agree on: greedy in a mixed batch, seeded sampling, scores, beam search."""
    from megatron.inference import SamplingParams

    greedy = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=10, greedy=True, ignore_eos=True,
                                                      return_logprobs=True)] * len(PROMPTS))
    sampled = engine.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=10, seed=11, top_k=20),
                                            SamplingParams(max_new_tokens=10, seed=12, top_p=0.9)])
    scores = engine.score(PROMPTS)
    beams = engine.beam_search(PROMPTS[0], beam_width=3, max_new_tokens=6, stop_token=EOD, length_penalty=1.0)
    return {"greedy": [r.tokens for r in greedy], "greedy_logprobs": [r.logprobs for r in greedy],
            "sampled": [r.tokens for r in sampled], "scores": scores, "beams": beams,
            "layout": (engine.ps.tp_size, engine.ps.pp_size, engine.stage.layer_indices)}


def layout_rank(rank: int, world_size: int, config_name: str, tp: int, pp: int):
    """One rank of an engine at tp × pp: the workload's results on this rank."""
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer

    config = {"llama": llama_config, "gpt": gpt_config}[config_name]()
    _, source = model_and_source(config)
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    engine = InferenceEngine.from_source(source, tokenizer, tp=tp, pp=pp, device="cpu")
    return workload(engine)


def continuous_schedule():
    """Requests that join a running batch of 3 slots at different steps (join step, request id, prompt, params),
    one invalid and one cancelled: what continuous batching must give each request as it gets alone."""
    from megatron.inference import SamplingParams

    def greedy(n, **changes):
        return SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True, **changes)

    long_prompt = [(7 * i) % (VOCAB - 1) for i in range(1, 31)]
    return [
        (0, "a", PROMPTS[1], greedy(12, return_logprobs=True, top_logprobs=3)),
        (0, "b", PROMPTS[0], SamplingParams(max_new_tokens=8, seed=5, top_k=20, return_logprobs=True)),
        (2, "cancelled", PROMPTS[3], greedy(20)),
        (3, "c", PROMPTS[2], greedy(5, return_logprobs=True)),
        (4, "invalid", PROMPTS[2], SamplingParams(max_new_tokens=4, temperature=-1.0)),
        (5, "d", PROMPTS[3], SamplingParams(max_new_tokens=9, seed=6, top_p=0.8, temperature=0.7,
                                             return_logprobs=True)),
        (5, "e", long_prompt, greedy(4, return_logprobs=True, top_logprobs=2)),
        (6, "scored", PROMPTS[1], greedy(0, return_logprobs=True)),
    ]


CANCEL_AT = (7, "cancelled")


def run_schedule(engine, schedule) -> dict:
    """Drive engine.running_batch() through `schedule` (collective: every rank the same joins and leaves):
    {request id: (tokens, logprobs, top_logprobs, finish_reason) or the error's text}, and the steps at which a
    request joined a batch that was already running."""
    from megatron.inference.batching import Request

    batch = engine.running_batch()
    waiting = list(schedule)
    out, joined_running, step = {}, [], 0
    while waiting or batch.active:
        due = [item for item in waiting if item[0] <= step][:batch.free]
        waiting = [item for item in waiting if item not in due]
        if due and batch.active:
            joined_running.append(step)
        leaves = [CANCEL_AT[1]] if step == CANCEL_AT[0] else []
        for done in batch.step([Request(rid, prompt, params) for _, rid, prompt, params in due], leaves):
            r = done.result
            out[done.id] = str(done.error) if done.error is not None else (
                r.tokens, r.logprobs, r.top_logprobs, r.finish_reason)
        step += 1
    return {"results": out, "joined_running": joined_running}


def continuous_rank(rank: int, world_size: int, layouts):
    """The continuous schedule on an engine at each (tp, pp) of `layouts` in turn, on this rank."""
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer

    _, source = model_and_source(llama_config())
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    out = []
    for tp, pp in layouts:
        engine = InferenceEngine.from_source(source, tokenizer, tp=tp, pp=pp, device="cpu", max_batch_size=3)
        out.append(run_schedule(engine, continuous_schedule()))
    return out
