"""The OpenAI-compatible API: request models (pydantic, unknown fields refused by name), their mapping onto the
engine's SamplingParams, and the reply objects of /v1/completions and /v1/chat/completions.

    req = parse_request(CompletionRequest, body)                 # RequestError naming the field
    prompts = completion_prompts(req, tokenizer)                 # token ids, one list per prompt
    params = completion_params(req, prompt_lengths, max_len)     # n SamplingParams per prompt
    choice = completion_choice(...)                              # text cut at `stop`, logprobs, finish_reason

Stop strings are applied to the text: generation runs to `max_tokens` (or eod), and the reply is cut where a
stop string first appears (finish_reason "stop"). `n` > 1 gives choice j of a prompt the seed `seed + j`, so a
seeded request is reproducible and its choices differ. `logprobs` k gives the log-probability of each token and
of the k most likely tokens at each position (k <= 5, as OpenAI's legacy completions allow).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megatron.errors import MegatronError
from megatron.inference.engine import GenerationResult, SamplingParams
from megatron.inference.request_error import RequestError

MAX_LOGPROBS = 5
MAX_STOP = 4
MAX_N = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class CompletionRequest(_Strict):
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    seed: Optional[int] = None
    stream: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Strict):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False


def parse_request(model_class, body):
    """The request model from the decoded JSON body; RequestError naming the first field at fault."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", field="body")
    try:
        req = model_class.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            known = ", ".join(model_class.model_fields)
            raise RequestError(f"unknown field {where!r}: this endpoint takes {known}", field=where) from None
        if first["type"] == "missing":
            raise RequestError(f"{where}: required field missing", field=where) from None
        raise RequestError(f"{where}: {first['msg']} (got {first.get('input')!r})", field=where) from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(s == "" for s in stop):
        raise RequestError(f"stop: at most {MAX_STOP} non-empty strings", field="stop")
    return req


def check_model(name: Optional[str], served: str) -> None:
    if name is not None and name != served:
        raise RequestError(f"model: {name!r} is not served here; GET /v1/models lists {served!r}", field="model",
                           status=404)


def stop_strings(req) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def completion_prompts(req: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids per prompt: strings are tokenized, ids are checked against the vocabulary."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.tokenize(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.tokenize(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RequestError("prompt: empty; give at least one token of text", field="prompt")
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               field="prompt")
    return [list(p) for p in prompts]


def check_context(prompts: list[list[int]], max_new_tokens: int, max_sequence_length: int, field: str) -> None:
    """A prompt longer than the context, or `field` (the new-token budget) past it: RequestError naming it."""
    for ids in prompts:
        if len(ids) > max_sequence_length:
            raise RequestError(f"prompt: {len(ids)} tokens, longer than the model's context of "
                               f"{max_sequence_length} tokens", field="prompt" if field == "max_tokens" else "messages")
        if len(ids) + max_new_tokens > max_sequence_length:
            raise RequestError(f"{field}: {max_new_tokens} new tokens after a prompt of {len(ids)} tokens pass the "
                               f"model's context of {max_sequence_length} tokens; ask for at most "
                               f"{max_sequence_length - len(ids)}", field=field)


def new_token_budget(asked: Optional[int], prompts: list[list[int]], max_sequence_length: int, cap: int) -> int:
    """`asked`, or (None) as many as the context leaves after the longest prompt, at most `cap`."""
    if asked is not None:
        return asked
    return max(0, min(cap, max_sequence_length - max(len(p) for p in prompts)))


def sampling_params(req, max_new_tokens: int, logprobs: Optional[int] = None) -> list[SamplingParams]:
    """The `n` SamplingParams of one prompt (choice j seeded seed + j); temperature 0 is greedy."""
    return [SamplingParams(max_new_tokens=max_new_tokens, greedy=req.temperature == 0.0,
                           temperature=req.temperature if req.temperature > 0 else 1.0,
                           top_p=0.0 if req.top_p >= 1.0 else req.top_p,
                           seed=None if req.seed is None else req.seed + j,
                           return_logprobs=logprobs is not None, top_logprobs=logprobs or 0)
            for j in range(req.n)]


def cut_at_stop(text: str, stops: list[str]) -> Optional[int]:
    """Where the first stop string starts in `text` (None when none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _logprobs_block(result: GenerationResult, first: int, end: int, tokenizer) -> dict:
    """OpenAI's legacy logprobs object for result.tokens[first:end]: each token's text, its log-prob (None for
    the sequence's first token), the k most likely tokens there (the engine's result.top_logprobs; empty dicts
    with logprobs 0) and its offset in the reply's text."""
    tops = result.top_logprobs
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for position in range(first, end):
        piece = tokenizer.detokenize([result.tokens[position]])
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if position == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(float(result.logprobs[position - 1]))
        top = tops[position - 1] if tops else {}
        out["top_logprobs"].append({tokenizer.detokenize([t]): float(v) for t, v in top.items()})
    return out


def kept_tokens(result: GenerationResult, tokenizer, text_length: int) -> int:
    """How many generated tokens the reply keeps when its text is cut to `text_length` characters."""
    generated = result.tokens[result.prompt_length:]
    for n in range(len(generated) + 1):
        if len(tokenizer.detokenize(generated[:n])) >= text_length:
            return n
    return len(generated)


def completion_choice(index: int, result: GenerationResult, req: CompletionRequest, tokenizer) -> dict:
    """One choice: the generated text (after the prompt's text when echo) cut at a stop string."""
    generated = result.tokens[result.prompt_length:]
    text = tokenizer.detokenize(generated)
    finish = result.finish_reason
    cut = cut_at_stop(text, stop_strings(req))
    kept = len(generated)
    if cut is not None:
        text, finish = text[:cut], "stop"
        kept = kept_tokens(result, tokenizer, cut)
    prompt_text = tokenizer.detokenize(result.tokens[:result.prompt_length]) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        first = 0 if req.echo else result.prompt_length
        logprobs = _logprobs_block(result, first, result.prompt_length + kept, tokenizer)
    return {"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": finish}


def usage(results: list[GenerationResult], prompt_results: list[GenerationResult]) -> dict:
    prompt_tokens = sum(r.prompt_length for r in prompt_results)
    completion = sum(len(r.tokens) - r.prompt_length for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_reply(model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def chat_prompt(req: ChatRequest, tokenizer) -> list[int]:
    """The conversation through the tokenizer's chat template (with the assistant's turn opened)."""
    try:
        return list(tokenizer.apply_chat_template([m.model_dump() for m in req.messages]))
    except MegatronError as error:
        raise RequestError(f"messages: {error}", field="messages") from None


def chat_choice(index: int, result: GenerationResult, req: ChatRequest, tokenizer) -> dict:
    text = tokenizer.detokenize(result.tokens[result.prompt_length:])
    finish = result.finish_reason
    cut = cut_at_stop(text, stop_strings(req))
    if cut is not None:
        text, finish = text[:cut], "stop"
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def chat_reply(model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def models_reply(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "megatron"}]}


class StreamText:
    """Turns one choice's token stream into text deltas: holds back bytes that are not whole characters yet and
    any tail that could be the start of a stop string; `finished` once a stop string appears."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0
        self.finished = False

    def push(self, token: int) -> str:
        if self.finished:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.detokenize(self.tokens)
        cut = cut_at_stop(text, self.stops)
        if cut is not None:
            self.finished = True
            return self._emit(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        hold = max((len(s) - 1 for s in self.stops), default=0)
        for keep in range(min(hold, len(text)), 0, -1):  # the longest tail that starts a stop string
            if any(s.startswith(text[-keep:]) for s in self.stops):
                return self._emit(text[:-keep])
        return self._emit(text)

    def flush(self) -> str:
        """What is left once generation ended (the held-back tail, which did not become a stop string)."""
        if self.finished:
            return ""
        text = self.tokenizer.detokenize(self.tokens)
        cut = cut_at_stop(text, self.stops)
        return self._emit(text if cut is None else text[:cut])

    def _emit(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
