"""Continuous batching (inference/batching.py, the server's Scheduler): requests that join a running batch while
others decode, leave it when they finish or are cancelled, or fail, give each request exactly what it gives alone
(greedy token for token, seeded sampling identical, log-probs and top-k log-probs within 1e-5), on one rank, at
tp = 2 and pp = 2; a row whose draw raises ends alone; the scheduler feeds the batch from its queue while a
request streams."""


import pytest
import torch

from inference_ranks import (VOCAB, continuous_rank, continuous_schedule, llama_config, model_and_source,
                             run_schedule)
from multirank import run_ranks


def _engine(max_batch_size=3):
    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer

    model, source = model_and_source(llama_config())
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    return model, InferenceEngine.from_source(source, tokenizer, device="cpu", max_batch_size=max_batch_size)


def _alone(engine) -> dict:
    """Each valid request of the schedule run by itself."""
    out = {}
    for _, rid, prompt, params in continuous_schedule():
        if rid not in ("invalid", "cancelled"):
            [r] = engine.generate([prompt], [params])
            out[rid] = (r.tokens, r.logprobs, r.top_logprobs, r.finish_reason)
    return out


def _close(a, b, tol=1e-5):
    return (a is None and b is None) or (len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)))


def _tops_close(a, b, tol=1e-5):
    return (a is None and b is None) or (len(a) == len(b) and all(
        x.keys() == y.keys() and all(abs(x[k] - y[k]) <= tol for k in x) for x, y in zip(a, b)))


def _check_schedule(got: dict, alone: dict, where: str) -> None:
    results = got["results"]
    assert got["joined_running"], f"{where}: no request joined a running batch: the schedule tested nothing"
    assert "temperature" in results["invalid"] and "cancelled" in results["cancelled"], where
    for rid, (tokens, logprobs, tops, finish) in alone.items():
        ours = results[rid]
        assert ours[0] == tokens and ours[3] == finish, f"{where}: request {rid}"
        assert _close(ours[1], logprobs), f"{where}: request {rid}'s log-probs"
        assert _tops_close(ours[2], tops), f"{where}: request {rid}'s top log-probs"


@pytest.fixture(scope="module")
def engine_and_alone():
    model, engine = _engine()
    return model, engine, _alone(engine)


def test_requests_joining_and_leaving_a_running_batch_get_what_they_get_alone(engine_and_alone):
    model, engine, alone = engine_and_alone
    _check_schedule(run_schedule(engine, continuous_schedule()), alone, "tp 1")
    # the top-k log-probs are the model's: the k best of a full recompute's log-softmax at every position
    tokens, logprobs, tops, _ = alone["a"]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([tokens]))[0, :-1, :VOCAB], dim=-1)
    values, ids = torch.topk(full, 3, dim=-1)
    assert [sorted(t) for t in tops] == [sorted(i) for i in ids.tolist()]
    assert max(abs(t[i] - v) for t, row_i, row_v in zip(tops, ids.tolist(), values.tolist())
               for i, v in zip(row_i, row_v)) <= 1e-5
    assert _close(logprobs, full.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1).tolist())


def test_the_scheduler_lets_requests_join_while_one_streams_and_isolates_a_failing_one(engine_and_alone):
    from megatron.inference import SamplingParams
    from megatron.inference.generation import GenerationError
    from megatron.inference.server import Job, Scheduler

    _, engine, _ = engine_and_alone
    greedy = SamplingParams(max_new_tokens=16, greedy=True, ignore_eos=True)
    short = SamplingParams(max_new_tokens=5, seed=9, top_k=10, ignore_eos=True, return_logprobs=True)
    prompts = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7, 8], [60], [33, 34, 35, 36, 37]]
    alone_long = engine.generate([prompts[0]], [greedy])[0]
    alone_short = [engine.generate([p], [short])[0] for p in prompts]

    scheduler = Scheduler(engine, max_batch_size=3)
    streamed, later = [], {}

    def on_token(_index, token):  # the third streamed token sends the other requests: they join mid-decode
        streamed.append(token)
        if len(streamed) == 3:
            later["four"] = scheduler.submit(Job("generate", prompts, [short] * 4))  # more than the free slots
            later["bad"] = scheduler.submit(Job("generate", [prompts[1], prompts[2]],
                                                [short, SamplingParams(max_new_tokens=4, temperature=-1.0)]))

    try:
        first = scheduler.submit(Job("generate", [prompts[0]], [greedy], on_token=on_token))
        [long_result] = first.result(timeout=300)
        four = later["four"].result(timeout=300)
        with pytest.raises(GenerationError, match="temperature"):
            later["bad"].result(timeout=300)
    finally:
        scheduler.stop()
    assert long_result.tokens == alone_long.tokens
    assert streamed == alone_long.tokens[len(prompts[0]):]
    for ours, theirs in zip(four, alone_short):
        assert ours.tokens == theirs.tokens and _close(ours.logprobs, theirs.logprobs)
    assert scheduler.joined_running >= 2 and scheduler.largest_batch == 3


def test_continuous_batching_at_tp2_and_pp2_gives_what_one_rank_gives_alone(engine_and_alone):
    _, _, alone = engine_and_alone
    results = run_ranks(2, continuous_rank, [(2, 1), (1, 2)], timeout=300)
    for rank, per_layout in enumerate(results):
        for (tp, pp), got in zip([(2, 1), (1, 2)], per_layout):
            _check_schedule(got, alone, f"tp {tp} pp {pp} rank {rank}")


def test_a_row_whose_draw_raises_ends_alone_with_its_error(engine_and_alone, monkeypatch):
    from megatron.inference import SamplingParams
    from megatron.inference.batching import Request
    from megatron.inference.generation import RowSampler

    _, engine, _ = engine_and_alone
    draw = RowSampler.next_token

    def failing(self, logits):
        if self.params.seed == 666:
            raise RuntimeError("probability tensor contains nan")
        return draw(self, logits)

    greedy = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True, return_logprobs=True)
    seeded = SamplingParams(max_new_tokens=6, seed=4, top_k=10, ignore_eos=True)
    [alone_greedy] = engine.generate([[5, 17, 42]], [greedy])
    [alone_seeded] = engine.generate([[60, 61]], [seeded])
    monkeypatch.setattr(RowSampler, "next_token", failing)
    batch = engine.running_batch()
    done = {f.id: f for f in batch.step([Request("greedy", [5, 17, 42], greedy), Request("seeded", [60, 61], seeded),
                                         Request("bad", [7, 8, 9], SamplingParams(max_new_tokens=6, seed=666))])}
    while batch.active:
        done.update({f.id: f for f in batch.step()})
    assert "sampling failed: RuntimeError: probability tensor contains nan" in str(done["bad"].error)
    assert done["greedy"].result.tokens == alone_greedy.tokens
    assert _close(done["greedy"].result.logprobs, alone_greedy.logprobs)
    assert done["seeded"].result.tokens == alone_seeded.tokens


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_go_on(engine_and_alone):
    """What the server does when a streaming client goes away: Scheduler.cancel."""
    from megatron.inference import SamplingParams
    from megatron.inference.request_error import RequestError
    from megatron.inference.server import Job, Scheduler

    _, engine, _ = engine_and_alone
    long = SamplingParams(max_new_tokens=30, greedy=True, ignore_eos=True)
    other = SamplingParams(max_new_tokens=8, seed=2, top_p=0.9, ignore_eos=True)
    [alone] = engine.generate([[33, 34, 35]], [other])
    scheduler = Scheduler(engine, max_batch_size=3, start=False)
    streamed = []

    def on_token(_index, token):
        streamed.append(token)
        if len(streamed) == 3:
            scheduler.cancel(job)

    job = Job("generate", [[5, 17, 42]], [long], on_token=on_token)
    scheduler.submit(job)
    kept = scheduler.submit(Job("generate", [[33, 34, 35]], [other]))
    scheduler.start()
    try:
        with pytest.raises(RequestError, match="cancelled"):
            job.future.result(timeout=300)
        assert kept.result(timeout=300)[0].tokens == alone.tokens
    finally:
        scheduler.stop()
    assert len(streamed) == 3 and scheduler.running == 0  # no token after the step that asked


def test_a_streaming_client_that_goes_away_frees_its_slot():
    import time

    import httpx

    from megatron.data.tokenizers import build_tokenizer
    from megatron.inference import InferenceEngine, SamplingParams
    from megatron.inference.tokenization import InferenceTokenizer
    from tests.serve_fixtures import serve_in_thread

    _, source = model_and_source(llama_config(seq_length=512, max_position_embeddings=512))
    tokenizer = InferenceTokenizer(build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    engine = InferenceEngine.from_source(source, tokenizer, device="cpu")
    [alone] = engine.generate([[5, 6, 7]], [SamplingParams(max_new_tokens=300, greedy=True)])
    assert alone.finish_reason == "length", "the request must not end on its own before the client leaves"
    url, stop = serve_in_thread(engine)
    try:
        with httpx.Client(timeout=300) as client:
            body = {"model": "model", "prompt": [5, 6, 7], "max_tokens": 300, "temperature": 0, "stream": True}
            with client.stream("POST", url + "/v1/completions", json=body) as reply:
                for count, _ in enumerate(line for line in reply.iter_lines() if line):
                    if count == 2:
                        break  # the client goes away after three chunks
            health = client.get(url + "/health").json()
            for _ in range(600):  # a wait for the server to notice, not a timing
                if health["running"] == 0 and health["in_flight"] == 0:
                    break
                time.sleep(0.1)
                health = client.get(url + "/health").json()
    finally:
        stop()
    assert health["running"] == 0 and health["in_flight"] == 0, health
    assert health["steps"] < 300, f"the request ran to its end: {health}"
