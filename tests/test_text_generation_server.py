"""tools/run_text_generation_server.py at tp = pp = 1, driven by real clients: curl for upstream's PUT /api (as
upstream's users script it) and the openai package for /v1; the answers checked against Hugging Face
transformers on the exported model; the 4xx cases; and the scheduler's batching and failure isolation on the
real engine in-process. One server serves the whole module."""

import concurrent.futures
import json
import subprocess

import pytest
import torch

from tests.serve_fixtures import build_tiny_served_model, start_server, stop_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    paths = build_tiny_served_model(str(root))
    url, procs = start_server(paths["ckpt"], log_dir=str(root), extra=("--out-seq-length", "200"))
    yield {**paths, "url": url}
    assert stop_server(procs) == [0]


@pytest.fixture(scope="module")
def tokenizer(served):
    from megatron.data.tokenizers import build_tokenizer

    return build_tokenizer("GPT2BPETokenizer", vocab_file=served["tokenizer"] + "/vocab.json",
                           merge_file=served["tokenizer"] + "/merges.txt")


@pytest.fixture(scope="module")
def hf_model(served):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served["hf"], torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def curl(method: str, url: str, body=None, raw: str | None = None):
    """(status, decoded JSON reply) of one curl call."""
    data = raw if raw is not None else json.dumps(body)
    out = subprocess.run(["curl", "-s", "-X", method, url, "-H", "Content-Type: application/json", "-d", data,
                          "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=300, check=True).stdout
    text, code = out.rsplit("\n", 1)
    return int(code), json.loads(text)


def hf_greedy(hf_model, ids: list[int], new_tokens: int, eod: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False, eos_token_id=eod, pad_token_id=eod)
    return out[0].tolist()


def hf_logprobs(hf_model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


PROMPTS = ["def area(r):", "import json\nfrom textwrap import"]


def test_upstream_api_greedy_equals_hf_generate_in_a_mixed_batch(served, tokenizer, hf_model):
    status, reply = curl("PUT", served["url"] + "/api", {"prompts": PROMPTS, "tokens_to_generate": 10, "top_k": 1})
    assert status == 200 and set(reply) == {"text", "segments", "logprobs"} and reply["logprobs"] is None
    ids = [tokenizer.tokenize(p) for p in PROMPTS]
    longest = max(len(i) for i in ids)
    for prompt_ids, text, segments in zip(ids, reply["text"], reply["segments"]):
        # upstream pads each prompt to the longest + tokens_to_generate: a shorter prompt generates more
        expected = hf_greedy(hf_model, prompt_ids, longest + 10 - len(prompt_ids), tokenizer.eod)
        assert text == tokenizer.detokenize(expected)
        assert segments == [tokenizer.detokenize([t]) for t in expected]


def test_upstream_api_scores_the_prompt_as_hf_does(served, tokenizer, hf_model):
    status, reply = curl("PUT", served["url"] + "/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 0,
                                                         "logprobs": True})
    assert status == 200 and reply["text"] == PROMPTS[:1]
    expected = hf_logprobs(hf_model, tokenizer.tokenize(PROMPTS[0]))
    assert len(reply["logprobs"][0]) == len(expected)
    assert max(abs(a - b) for a, b in zip(reply["logprobs"][0], expected)) < 1e-4


def test_upstream_api_beam_search_replies_with_scores(served):
    status, reply = curl("PUT", served["url"] + "/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 4,
                                                         "beam_width": 2})
    assert status == 200 and set(reply) == {"text", "segments", "scores"}
    assert len(reply["text"]) == 2 and reply["scores"] == sorted(reply["scores"], reverse=True)
    assert all(t.startswith(PROMPTS[0]) for t in reply["text"])


@pytest.mark.parametrize("body, message", [
    ({}, "prompts argument required"),
    ({"prompts": ["a"], "max_len": 3}, "max_len is no longer used.  Replace with tokens_to_generate"),
    ({"prompts": "a"}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a"] * 129}, "Maximum number of prompts is 128"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate must be an integer greater than or equal to 0"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True"),
    ({"prompts": ["a"], "temperature": 0}, "temperature must be a positive number less than or equal to 100.0"),
    ({"prompts": ["a"], "top_k": 5, "top_p": 0.5}, "cannot set both top-k and top-p samplings."),
    ({"prompts": ["a"], "top_p_decay": 0.5}, "top_p_decay cannot be set without top_p"),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ({"prompts": ["a"], "random_seed": -2}, "random_seed must be a positive integer"),
    ({"prompts": ["a", "b"], "beam_width": 2}, "When doing beam_search, batch size must be 1"),
    ({"prompts": ["a"], "length_penalty": 1}, "length_penalty must be a float"),
    ({"prompts": ["a"], "tokens_to_generate": 220}, "tokens_to_generate: 220 is more than the server's "
                                                    "--out-seq-length 200"),
    ({"prompts": ["a " * 100], "tokens_to_generate": 200},
     "Length of prompt + tokens_to_generate longer than allowed"),
    ({"prompts": ["a"], "colour": 1}, "unknown field 'colour'"),
])
def test_upstream_api_refuses_with_400_and_upstreams_message(served, body, message):
    status, reply = curl("PUT", served["url"] + "/api", body)
    assert status == 400 and reply.startswith(message), reply


def test_malformed_json_is_a_400_on_both_apis(served):
    status, reply = curl("PUT", served["url"] + "/api", raw='{"prompts": [')
    assert status == 400 and "not valid JSON" in reply
    status, reply = curl("POST", served["url"] + "/v1/completions", raw="{nope")
    assert status == 400 and reply["error"]["param"] == "body"


def test_openai_client_completions_match_the_upstream_api(served, client, tokenizer, hf_model):
    assert [m.id for m in client.models.list().data] == ["ckpt"]
    completion = client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    ids = tokenizer.tokenize(PROMPTS[0])
    expected = hf_greedy(hf_model, ids, 8, tokenizer.eod)
    assert completion.choices[0].text == tokenizer.detokenize(expected[len(ids):])
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == len(expected) - len(ids)
    # token ids as the prompt give the same answer
    by_ids = client.completions.create(model="ckpt", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == completion.choices[0].text


def test_openai_echo_logprobs_equal_hf_and_name_the_top_tokens(served, client, tokenizer, hf_model):
    reply = client.completions.create(model="ckpt", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPTS[1]
    expected = hf_logprobs(hf_model, tokenizer.tokenize(PROMPTS[1]))
    assert choice.logprobs.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs[1:], expected)) < 1e-4
    for token_logprob, top in zip(choice.logprobs.token_logprobs[1:], choice.logprobs.top_logprobs[1:]):
        assert len(top) <= 2 and max(top.values()) >= token_logprob - 1e-5


def test_openai_seeded_sampling_is_reproducible_and_stop_cuts_the_text(served, client):
    kwargs = dict(model="ckpt", prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.95, n=2, seed=7)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    greedy = client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0]
    stop = greedy.text[3:6]
    cut = client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[:greedy.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_openai_streaming_sends_the_same_text(served, client):
    whole = client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0]
    chunks = list(client.completions.create(model="ckpt", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_openai_streaming_keeps_each_choice_apart(served, client):
    kwargs = dict(model="ckpt", prompt=PROMPTS, max_tokens=8, temperature=0.8, n=2, seed=3)
    whole = client.completions.create(**kwargs).choices
    texts = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in sorted(whole, key=lambda c: c.index)]


def test_chat_without_a_template_is_refused_by_name(served, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}])
    assert "GPT2BPETokenizer" in str(caught.value) and "chat template" in str(caught.value)


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "a", "colour": 1}, 400, "colour"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a " * 300, "max_tokens": 1}, 400, "prompt"),
    ({"prompt": "a " * 100, "max_tokens": 200}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 220}, 400, "max_tokens"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"prompt": [10 ** 6]}, 400, "prompt"),
    ({"prompt": "a", "stream": True, "logprobs": 1}, 400, "logprobs"),
])
def test_openai_refusals_name_the_field(served, body, status, field):
    code, reply = curl("POST", served["url"] + "/v1/completions", body)
    assert code == status and reply["error"]["param"] == field, reply
    assert field in reply["error"]["message"]


def test_eight_concurrent_clients_each_get_what_they_get_alone(served, client):
    prompts = [f"def f{i}(x):" for i in range(8)]
    alone = [client.completions.create(model="ckpt", prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model="ckpt", prompt=p, max_tokens=16, temperature=0).choices[0].text, prompts))
    assert together == alone
    code, health = curl("GET", served["url"] + "/health", raw="")
    assert code == 200 and health["status"] == "ok"


def test_the_scheduler_batches_queued_jobs_and_isolates_a_failing_one(served, tokenizer):
    from megatron.inference import InferenceEngine, SamplingParams
    from megatron.inference.generation import GenerationError
    from megatron.inference.server import Job, Scheduler

    engine = InferenceEngine.from_checkpoint(served["ckpt"])
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    prompts = [tokenizer.tokenize(p) for p in PROMPTS + ["class A:"]]
    alone = [engine.generate([p], [greedy])[0].tokens for p in prompts]

    scheduler = Scheduler(engine, max_batch_size=8, start=False)
    futures = [scheduler.submit(Job("generate", [p], [greedy])) for p in prompts]
    scheduler.start()
    assert [f.result(timeout=300)[0].tokens for f in futures] == alone
    assert scheduler.largest_batch == 3  # the three queued jobs joined the first step together
    assert scheduler.joined_running == 0
    scheduler.stop()

    scheduler = Scheduler(engine, max_batch_size=8, start=False)
    bad = SamplingParams(max_new_tokens=6, temperature=-1.0)  # the engine refuses it, failing the whole batch
    futures = [scheduler.submit(Job("generate", [p], [bad if i == 1 else greedy])) for i, p in enumerate(prompts)]
    scheduler.start()
    assert futures[0].result(timeout=300)[0].tokens == alone[0]
    assert futures[2].result(timeout=300)[0].tokens == alone[2]
    with pytest.raises(GenerationError, match="temperature"):
        futures[1].result(timeout=300)
    scheduler.stop()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_completions_use_the_tokenizers_chat_template(served, tmp_path):
    import shutil

    from megatron.inference import InferenceEngine, SamplingParams
    from tests.serve_fixtures import serve_in_thread

    chat_tokenizer = tmp_path / "chat_tokenizer"
    shutil.copytree(served["hf"], chat_tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = json.loads((chat_tokenizer / "tokenizer_config.json").read_text())
    (chat_tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    engine = InferenceEngine.from_checkpoint(served["ckpt"], tokenizer_args={
        "tokenizer_type": "HFTokenizer", "tokenizer_model": str(chat_tokenizer)})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def area(r):"}]
    prompt = engine.tokenizer.apply_chat_template(messages)
    assert engine.tokenizer.detokenize(prompt).endswith("<|assistant|>")
    [expected] = engine.generate([prompt], [SamplingParams(max_new_tokens=6, greedy=True)])
    expected_text = engine.tokenizer.detokenize(expected.tokens[len(prompt):])
    url, stop = serve_in_thread(engine)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="ckpt", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected_text
        assert reply.usage.prompt_tokens == len(prompt)
        chunks = list(client.chat.completions.create(model="ckpt", messages=messages, max_tokens=6, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    finally:
        stop()
