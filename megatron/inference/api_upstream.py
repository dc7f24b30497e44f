"""Upstream Megatron-DeepSpeed's text generation API (`PUT /api`), field for field: validation and replies.

    request = parse_upstream_request(body, defaults)          # RequestError(message) on a bad request
    batch = upstream_batch(request, tokenizer, max_sequence_length, max_tokens_to_oom)
    reply = upstream_reply(request, results, tokenizer)        # {text, segments, logprobs}

The rules and messages are upstream's (megatron/text_generation_server.py, text_generation/api.py and
tokenization.py): where upstream answers a bad request with a plain string and status 200, we answer 400 with the
same string. Beyond upstream: a field it does not know, or a prompt that is not a string, is refused by name.
Upstream pads every prompt of a request to the longest one plus `tokens_to_generate`, so a shorter prompt may
generate more tokens than asked; `upstream_batch` gives each prompt the same budget (max prompt length +
tokens_to_generate - its own length), so the replies match upstream's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron.inference.engine import GenerationResult, SamplingParams
from megatron.inference.request_error import RequestError

UPSTREAM_FIELDS = ("prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p", "top_p_decay",
                   "top_p_bound", "add_BOS", "stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon",
                   "random_seed", "beam_width", "stop_token", "length_penalty", "no_log")
MAX_PROMPTS = 128  # upstream's limit per request


@dataclass
class UpstreamDefaults:
    """What a request gets for the fields it leaves out (upstream's values; the server's --temperature, --top_p,
    --top_k flags set the sampling ones)."""

    tokens_to_generate: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0


@dataclass
class UpstreamRequest:
    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int = -1
    no_log: bool = False
    beam_width: int | None = None
    stop_token: int | None = None  # None: the tokenizer's end of document (upstream's default 50256 is GPT-2's)
    length_penalty: float = 1.0
    raw: dict = field(default_factory=dict, repr=False)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def parse_upstream_request(body: Any, defaults: UpstreamDefaults | None = None) -> UpstreamRequest:
    """Check `body` (the decoded JSON) with upstream's rules, in upstream's order; RequestError with upstream's
    message for the first problem."""
    defaults = defaults or UpstreamDefaults()
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a 'prompts' field", field="body")
    if "prompts" not in body:
        raise RequestError("prompts argument required", field="prompts")
    if "max_len" in body:
        raise RequestError("max_len is no longer used.  Replace with tokens_to_generate", field="max_len")
    if "sentences" in body:
        raise RequestError("sentences is no longer used.  Replace with prompts", field="sentences")
    unknown = sorted(set(body) - set(UPSTREAM_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: PUT /api takes {', '.join(UPSTREAM_FIELDS)}",
                           field=unknown[0])
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings", field="prompts")
    if len(prompts) == 0:
        raise RequestError("prompts is empty", field="prompts")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}", field="prompts")
    req = UpstreamRequest(prompts=prompts, tokens_to_generate=defaults.tokens_to_generate,
                          temperature=defaults.temperature, top_k=defaults.top_k, top_p=defaults.top_p, raw=body)

    def check(name, ok, message):
        if not ok:
            raise RequestError(message, field=name)

    if "tokens_to_generate" in body:
        value = body["tokens_to_generate"]
        check("tokens_to_generate", _is_int(value), "tokens_to_generate must be an integer greater than 0")
        check("tokens_to_generate", value >= 0, "tokens_to_generate must be an integer greater than or equal to 0")
        req.tokens_to_generate = value
    if "logprobs" in body:
        check("logprobs", isinstance(body["logprobs"], bool), "logprobs must be a boolean value")
        req.logprobs = body["logprobs"]
    check("tokens_to_generate", req.tokens_to_generate != 0 or req.logprobs,
          "tokens_to_generate=0 implies logprobs should be True")
    if "temperature" in body:
        value = body["temperature"]
        message = "temperature must be a positive number less than or equal to 100.0"
        check("temperature", _is_number(value), message)
        check("temperature", 0.0 < value <= 100.0, message)
        req.temperature = float(value)
    if "top_k" in body:
        value = body["top_k"]
        check("top_k", _is_int(value),
              "top_k must be an integer equal to or greater than 0 and less than or equal to 1000")
        check("top_k", 0 <= value <= 1000, "top_k must be equal to or greater than 0 and less than or equal to 1000")
        req.top_k = value
    if "top_p" in body:
        value = body["top_p"]
        check("top_p", isinstance(value, float), "top_p must be a positive float less than or equal to 1.0")
        check("top_p", not (value > 0.0 and req.top_k > 0), "cannot set both top-k and top-p samplings.")
        check("top_p", 0 <= value <= 1.0, "top_p must be less than or equal to 1.0")
        req.top_p = value
    if "top_p_decay" in body:
        value = body["top_p_decay"]
        check("top_p_decay", isinstance(value, float),
              "top_p_decay must be a positive float less than or equal to 1.0")
        check("top_p_decay", req.top_p != 0.0, "top_p_decay cannot be set without top_p")
        check("top_p_decay", 0 <= value <= 1.0, "top_p_decay must be less than or equal to 1.0")
        req.top_p_decay = value
    if "top_p_bound" in body:
        value = body["top_p_bound"]
        check("top_p_bound", isinstance(value, float),
              "top_p_bound must be a positive float less than or equal to top_p")
        check("top_p_bound", req.top_p != 0.0, "top_p_bound cannot be set without top_p")
        check("top_p_bound", 0.0 < value <= req.top_p, "top_p_bound must be greater than 0 and less than top_p")
        req.top_p_bound = value
    for name in ("add_BOS", "stop_on_double_eol", "stop_on_eol", "prevent_newline_after_colon", "no_log"):
        if name in body:
            check(name, isinstance(body[name], bool), f"{name} must be a boolean value")
            setattr(req, name, body[name])
        if name == "add_BOS":
            check("prompts", req.add_BOS or all(len(p) > 0 for p in prompts), "Empty prompts require add_BOS=true")
    if "random_seed" in body:
        value = body["random_seed"]
        check("random_seed", _is_int(value), "random_seed must be integer")
        check("random_seed", value >= 0, "random_seed must be a positive integer")
        req.random_seed = value
    if "beam_width" in body:
        value = body["beam_width"]
        check("beam_width", _is_int(value), "beam_width must be integer")
        check("beam_width", value >= 1, "beam_width must be an integer > 1")
        check("beam_width", len(prompts) == 1, "When doing beam_search, batch size must be 1")
        req.beam_width = value
    if "stop_token" in body:
        check("stop_token", _is_int(body["stop_token"]), "stop_token must be an integer")
        req.stop_token = body["stop_token"]
    if "length_penalty" in body:
        check("length_penalty", isinstance(body["length_penalty"], float), "length_penalty must be a float")
        req.length_penalty = body["length_penalty"]
    return req


def tokenize_prompts(req: UpstreamRequest, tokenizer) -> list[list[int]]:
    """Upstream's tokenization: add_BOS puts the tokenizer's end-of-document token first."""
    prefix = [tokenizer.eod] if req.add_BOS else []
    return [prefix + list(tokenizer.tokenize(p)) for p in req.prompts]


def check_lengths(req: UpstreamRequest, prompts: list[list[int]], max_sequence_length: int,
                  max_tokens_to_oom: int | None) -> int:
    """Upstream's two checks on the padded batch; the padded length (longest prompt + tokens_to_generate)."""
    padded = max(len(p) for p in prompts) + req.tokens_to_generate
    if padded > max_sequence_length:
        raise RequestError("Length of prompt + tokens_to_generate longer than allowed", field="tokens_to_generate")
    if max_tokens_to_oom is not None and padded * len(prompts) > max_tokens_to_oom:
        raise RequestError(f"Too many tokens.  {padded * len(prompts)} is greater than {max_tokens_to_oom}",
                           field="prompts")
    return padded


def sampling_params(req: UpstreamRequest, prompts: list[list[int]], padded_length: int) -> list[SamplingParams]:
    """One SamplingParams per prompt, in upstream's meaning: top_k 1 is greedy; each prompt fills the padded
    length (upstream pads to the longest prompt + tokens_to_generate); eod ends a sequence."""
    seed = None if req.random_seed == -1 else req.random_seed
    return [SamplingParams(max_new_tokens=padded_length - len(p) if req.tokens_to_generate else 0,
                           greedy=req.top_k == 1, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                           top_p_decay=req.top_p_decay, top_p_bound=req.top_p_bound, seed=seed,
                           stop_on_eol=req.stop_on_eol, stop_on_double_eol=req.stop_on_double_eol,
                           prevent_newline_after_colon=req.prevent_newline_after_colon,
                           return_logprobs=req.logprobs)
            for p in prompts]


def segments(tokens: list[int], tokenizer) -> list[str]:
    """Each token's own text, as upstream's `segments` (bytes that are not whole characters become U+FFFD)."""
    return [tokenizer.detokenize([t]) for t in tokens]


def upstream_reply(req: UpstreamRequest, results: list[GenerationResult], tokenizer) -> dict:
    """{text, segments, logprobs}: prompt + generation for each prompt; logprobs (len(tokens) - 1 each) or null."""
    return {"text": [tokenizer.detokenize(r.tokens) for r in results],
            "segments": [segments(r.tokens, tokenizer) for r in results],
            "logprobs": [list(r.logprobs) for r in results] if req.logprobs else None}


def upstream_beam_reply(sequences: list[list[int]], scores: list[float], tokenizer) -> dict:
    """{text, segments, scores}: the whole beam, best first, as upstream returns it."""
    return {"text": [tokenizer.detokenize(s) for s in sequences],
            "segments": [segments(s, tokenizer) for s in sequences],
            "scores": [float(s) for s in scores]}
