"""The server's pure pieces, without a model: upstream's request rules and defaults, the OpenAI request models'
field-naming refusals, and the streamed text's stop-string hold-back (on the real NullTokenizer)."""

import pytest

from megatron.data.tokenizers import NullTokenizer
from megatron.inference import api_openai as oai
from megatron.inference import api_upstream as up
from megatron.inference.request_error import RequestError


def test_upstream_defaults_come_from_the_server_flags_and_fields_override_them():
    defaults = up.UpstreamDefaults(temperature=0.7, top_k=5, top_p=0.0)
    req = up.parse_upstream_request({"prompts": ["a"]}, defaults)
    assert (req.tokens_to_generate, req.temperature, req.top_k, req.random_seed) == (64, 0.7, 5, -1)
    req = up.parse_upstream_request({"prompts": ["a"], "top_k": 0, "top_p": 0.9, "temperature": 2}, defaults)
    assert (req.top_k, req.top_p, req.temperature) == (0, 0.9, 2.0)


def test_upstream_sampling_params_pad_every_prompt_to_the_longest():
    req = up.parse_upstream_request({"prompts": ["1 2 3", "4"], "tokens_to_generate": 4, "top_k": 1})
    prompts = up.tokenize_prompts(req, NullTokenizer(10))
    padded = up.check_lengths(req, prompts, 16, None)
    params = up.sampling_params(req, prompts, padded)
    assert padded == 7 and [p.max_new_tokens for p in params] == [4, 6] and all(p.is_greedy for p in params)
    with pytest.raises(RequestError, match="Too many tokens.  14 is greater than 10"):
        up.check_lengths(req, prompts, 16, 10)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "best_of": 2}, "best_of"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 3}, "prompt"),
])
def test_openai_requests_are_refused_naming_the_field(body, field):
    with pytest.raises(RequestError) as caught:
        oai.parse_request(oai.CompletionRequest, body)
    assert caught.value.field == field and field in caught.value.message


def test_streamed_text_holds_back_a_possible_stop_string_and_ends_at_it():
    stream = oai.StreamText(NullTokenizer(100), ["7 8"])
    deltas = [stream.push(t) for t in (1, 2, 7, 8, 9)]
    assert deltas[:2] == ["1", " 2"]
    assert "".join(deltas) == "1 2 " and stream.finished  # "7" waited for "8"; the text ends before "7 8"
    stream = oai.StreamText(NullTokenizer(100), ["7 8"])
    text = "".join(stream.push(t) for t in (1, 7, 9)) + stream.flush()
    assert text == "1 7 9" and not stream.finished


def test_the_server_refuses_bad_generation_flags_by_name(capsys):
    from tools.run_text_generation_server import main

    assert main(["--load", "unused", "--top_k", "5", "--top_p", "0.5", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--top_p: cannot set both top-k and top-p samplings." in err and "--max-batch-size must be >= 1" in err
