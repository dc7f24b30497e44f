"""Post-training examples (one JSON line each) -> token ids + a loss mask, and the names of the files they go to.

An example is tokenized into one sequence (SFT) or two (DPO: chosen, then rejected) with a mask per token:
1 where the token is a response (assistant) token the model learns to predict, 0 for prompt, system and user
tokens. The accepted forms, and where the prompt ends (TRL 1.16's rule, so that our loss and log-probabilities
cover exactly the tokens TRL's SFTTrainer / DPOTrainer train on):

    SFT  {"messages": [{"role", "content"}, ...]}          the tokenizer's chat template; every assistant turn
                                                          carries loss, system and user turns do not
         {"prompt": "...", "response": "..."}               plain text (also "completion", TRL's key): the
                                                          sequence is tokenize(prompt + response) + [EOD]
         {"prompt": [messages], "response": [messages]}    TRL's conversational prompt-completion form
    DPO  {"prompt": "...", "chosen": "...", "rejected": "..."}            standard form: + [EOD] each
         {"prompt": [messages], "chosen": [messages], "rejected": [...]}  conversational form
         {"chosen": ..., "rejected": ...}  either, with TRL's implicit prompt: their common beginning

Plain text: the prompt ends after the longest common prefix of tokenize(prompt) and tokenize(prompt + response)
(TRL's `common_prefix_length`: a token merging across the boundary belongs to the response), and EOD is
appended unless the text already ends with it (TRL appends the eos token's text); the EOD carries loss, so the
model learns to stop. DPO takes the shorter of the two pairs' common prefixes for both sequences, as TRL does.
Chat: the prompt is rendered with the generation prompt, the conversation without; the response runs from their
common prefix to the end, and nothing is appended (the template closes the turn with its own end token, which
carries loss). For a multi-turn conversation, assistant turn k's tokens run from the common prefix of the
conversation with messages[:k] rendered with the generation prompt, to the common prefix with messages[:k + 1]
(the end, for the last turn): the last turn's boundary is exactly TRL's prompt-completion one.

A line that is not such an example raises ExampleError with what is wrong; the caller adds the file and line.
"""

from __future__ import annotations

import json
from typing import Optional

from megatron.data.tokenizers import TokenizerError
from megatron.errors import MegatronError

TASKS = ("sft", "dpo")
ROLES = ("system", "user", "assistant")
FORMAT_VERSION = 1


class ExampleError(MegatronError, ValueError):
    """One bad example; the message says what is wrong (the caller names the file and line, and reports every
    bad line together)."""


# ------------------------------------------------------------------------------------------------ file names
def data_prefix(output_prefix: str) -> str:
    """The token file's prefix (what --data-path takes), as pretraining names the "text" key's output."""
    return f"{output_prefix}_text_document"


def loss_mask_prefix(prefix: str) -> str:
    """The loss-mask sidecar beside the token file `prefix`: uint8, the same document sizes."""
    return f"{prefix}_loss_mask"


def metadata_path(prefix: str) -> str:
    return f"{prefix}.post_training.json"


# ---------------------------------------------------------------------------------------------- validation
def _text(value, key: str, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise ExampleError(f"{key!r} holds {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise ExampleError(f"{key!r} is empty")
    return value


def _messages(value, key: str) -> list[dict]:
    """A non-empty list of {"role": system|user|assistant, "content": str}; only those two keys are kept."""
    if not isinstance(value, list) or not value:
        raise ExampleError(f"{key!r} must be a non-empty list of {{\"role\", \"content\"}} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ExampleError(f"{where} must be an object with \"role\" and \"content\"")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ExampleError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ExampleError(f"{where}: content holds {type(content).__name__}, not a string")
        if role == "assistant" and not content.strip():
            raise ExampleError(f"{where}: empty assistant response")
        messages.append({"role": role, "content": content})
    return messages


def _prompt_messages(value, key: str = "prompt") -> list[dict]:
    messages = _messages(value, key)
    if messages[-1]["role"] == "assistant":
        raise ExampleError(f"{key!r} ends with an assistant message; the prompt must end with a user (or system) "
                           "message, and the response follows it")
    _system_first(messages, key)
    return messages


def _response_messages(value, key: str) -> list[dict]:
    messages = _messages(value, key)
    wrong = [i for i, message in enumerate(messages) if message["role"] != "assistant"]
    if wrong:
        raise ExampleError(f"{key}[{wrong[0]}]: role {messages[wrong[0]]['role']!r} in a response; a response "
                           "holds assistant messages only")
    return messages


def _system_first(messages: list[dict], key: str) -> None:
    late = [i for i, message in enumerate(messages) if message["role"] == "system" and i > 0]
    if late:
        raise ExampleError(f"{key}[{late[0]}]: a system message may only come first")


def _object(record) -> dict:
    if not isinstance(record, dict):
        raise ExampleError(f"the line is JSON but not an object ({type(record).__name__})")
    return record


def parse_example(record, task: str) -> tuple[str, tuple]:
    """(form, fields) of one decoded JSON line for `task`; ExampleError naming what is wrong.

    Forms: "messages" (messages,), "text" (prompt, response) and "chat" (prompt, response) for SFT;
    "text" (prompt, chosen, rejected) and "chat" (prompt, chosen, rejected) for DPO."""
    record = _object(record)
    if task == "sft":
        if "messages" in record:
            if "prompt" in record:
                raise ExampleError('both "messages" and "prompt": give one form per line')
            messages = _messages(record["messages"], "messages")
            if messages[0]["role"] == "assistant":
                raise ExampleError("messages[0] is an assistant message; a conversation starts with a system "
                                   "or user message")
            if messages[-1]["role"] != "assistant":
                raise ExampleError(f"the last message is a {messages[-1]['role']} message, not the assistant's "
                                   "response")
            _system_first(messages, "messages")
            return "messages", (messages,)
        keys = [key for key in ("response", "completion") if key in record]
        if "prompt" not in record or not keys:
            missing = "prompt" if "prompt" not in record else "response"
            raise ExampleError(f'missing key "{missing}" (an SFT line holds "messages", or "prompt" and '
                               '"response")')
        if len(keys) == 2:
            raise ExampleError('both "response" and "completion": give one')
        prompt, response = record["prompt"], record[keys[0]]
        if isinstance(prompt, list) or isinstance(response, list):
            _same_form(prompt, {keys[0]: response})
            return "chat", (_prompt_messages(prompt), _response_messages(response, keys[0]))
        return "text", (_text(prompt, "prompt", allow_empty=True), _text(response, keys[0], allow_empty=False))
    if task == "dpo":
        missing = [key for key in ("chosen", "rejected") if key not in record]
        if missing:
            raise ExampleError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                               '(a DPO line holds "prompt", "chosen" and "rejected", or an implicit prompt: '
                               '"chosen" and "rejected" that start alike)')
        if "prompt" in record:
            prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        else:
            prompt, chosen, rejected = _extract_prompt(record["chosen"], record["rejected"])
        if any(isinstance(value, list) for value in (prompt, chosen, rejected)):
            _same_form(prompt, {"chosen": chosen, "rejected": rejected})
            return "chat", (_prompt_messages(prompt), _response_messages(chosen, "chosen"),
                            _response_messages(rejected, "rejected"))
        return "text", (_text(prompt, "prompt", allow_empty=True), _text(chosen, "chosen", allow_empty=False),
                        _text(rejected, "rejected", allow_empty=False))
    raise ValueError(f"task {task!r} is not one of {TASKS}")


def _extract_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) of TRL's implicit-prompt form: the prompt is the longest common prefix of the
    two (whole messages for lists; characters for strings, less a space just before the difference, as TRL's
    extract_prompt does)."""
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise ExampleError('"chosen" and "rejected" must both be strings or both message lists')
    if chosen == rejected:
        raise ExampleError('"chosen" and "rejected" are identical')
    length = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and length and chosen[length - 1] == " ":
        length -= 1
    if length == 0:
        raise ExampleError('no "prompt", and "chosen" and "rejected" share no beginning to take as the prompt')
    return chosen[:length], chosen[length:], rejected[length:]


def _same_form(prompt, responses: dict) -> None:
    if not isinstance(prompt, list) or not all(isinstance(value, list) for value in responses.values()):
        names = ", ".join(["prompt", *responses])
        raise ExampleError(f"{names} must all be strings (standard form) or all message lists (conversational "
                           "form), not a mix")


# ------------------------------------------------------------------------------------------------ tokenizing
def common_prefix_length(ids, other_ids) -> int:
    """How many leading tokens two id lists share (TRL's rule for where the prompt ends)."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TokenizerError:
        raise  # no chat template: the whole input is refused, not this line
    except Exception as error:  # noqa: BLE001 - a template's own checks raise jinja errors (e.g. role order)
        raise ExampleError(f"the chat template refused the messages ({type(error).__name__}: {error})") from None


def _with_eod(ids: list[int], eod: int) -> list[int]:
    return ids if ids and ids[-1] == eod else ids + [eod]


def _masked(ids: list[int], start: int, what: str) -> tuple[list[int], list[int]]:
    if start >= len(ids):
        raise ExampleError(f"the {what} has no tokens after the prompt")
    return ids, [0] * start + [1] * (len(ids) - start)


def encode_example(form: str, fields: tuple, task: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    """[(ids, loss_mask)] of one parsed example: one sequence for SFT, (chosen, rejected) for DPO."""
    if form == "messages":
        return [_encode_conversation(fields[0], tokenizer)]
    if form == "text":
        prompt, *responses = fields
        prompt_ids = tokenizer.tokenize(prompt)
        full = [tokenizer.tokenize(prompt + response) for response in responses]
        start = min(common_prefix_length(prompt_ids, ids) for ids in full)
        for ids, name in zip(full, ("chosen", "rejected") if task == "dpo" else ("response",)):
            if start >= len(ids):  # nothing of the response survived tokenization
                raise ExampleError(f"the {name} has no tokens after the prompt")
        return [_masked(_with_eod(ids, tokenizer.eod), start, "response") for ids in full]
    if form == "chat":
        prompt, *responses = fields
        prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
        full = [_render(tokenizer, prompt + response) for response in responses]
        start = min(common_prefix_length(prompt_ids, ids) for ids in full)
        names = ("chosen", "rejected") if task == "dpo" else ("response",)
        return [_masked(ids, start, name) for ids, name in zip(full, names)]
    raise ValueError(f"unknown example form {form!r}")


def _encode_conversation(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    full = _render(tokenizer, messages)
    mask = [0] * len(full)
    last = len(messages) - 1
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = common_prefix_length(_render(tokenizer, messages[:k], add_generation_prompt=True), full)
        end = len(full) if k == last else common_prefix_length(_render(tokenizer, messages[:k + 1]), full)
        if end <= start:
            raise ExampleError(f"messages[{k}]: the chat template renders this assistant turn as no tokens "
                               "apart from the rest of the conversation")
        mask[start:end] = [1] * (end - start)
    return full, mask


def encode_line(line: bytes, task: str, tokenizer) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """(form, sequences) of one JSON line; ExampleError for a bad one."""
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ExampleError(f"invalid JSON ({error})") from None
    form, fields = parse_example(record, task)
    return form, encode_example(form, fields, task, tokenizer)


def tokenizer_record(tokenizer_type: str, tokenizer_model: Optional[str], vocab_file: Optional[str],
                     merge_file: Optional[str], vocab_size: Optional[int], tokenizer) -> dict:
    """The tokenizer flags as a checkpoint records them, plus what the data depends on (eod, vocabulary size)."""
    return {"tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model, "vocab_file": vocab_file,
            "merge_file": merge_file, "vocab_size": vocab_size, "eod": int(tokenizer.eod),
            "pad": None if tokenizer.pad is None else int(tokenizer.pad),
            "tokenizer_vocab_size": int(tokenizer.vocab_size)}
