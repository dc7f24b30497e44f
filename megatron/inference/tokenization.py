"""The tokenizer side of generation: upstream's add_BOS, the ids the stop rules need, and chat templates.

`tokenize_prompt(tokenizer, text, add_BOS)` is upstream's _tokenize_prompts_and_batch for one prompt:
with add_BOS the prompt starts with the tokenizer's *eod* token (upstream prepends `tokenizer.eod`, not a
separate bos). `InferenceTokenizer` wraps a megatron.data tokenizer (every attribute passes through) and
adds `chat_template` and `apply_chat_template(messages)`, taken from the Hugging Face tokenizer underneath
where there is one, refused by name where there is none.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron.errors import MegatronError
from megatron.inference.generation import SpecialTokens


class ChatTemplateError(MegatronError, ValueError):
    """The tokenizer has no chat template; the message names it."""


def tokenize_prompt(tokenizer, text: str, add_BOS: bool = False) -> list[int]:
    """Upstream's prompt tokenization: tokenize(text), preceded by eod when add_BOS."""
    ids = list(tokenizer.tokenize(text))
    return [tokenizer.eod] + ids if add_BOS else ids


def _single_token(tokenizer, text: str) -> Optional[int]:
    try:
        ids = tokenizer.tokenize(text)
    except ValueError:  # e.g. NullTokenizer: text is integers only
        return None
    bos = getattr(tokenizer, "bos", None)
    ids = [i for i in ids if i != bos] if bos is not None and len(ids) > 1 else list(ids)
    return ids[0] if len(ids) == 1 else None


def special_tokens(tokenizer) -> SpecialTokens:
    """The tokenizer's eod and its single-token ids of "\\n", "\\n\\n" and ":" (None where it has none)."""
    if tokenizer is None:
        return SpecialTokens(None, None, None, None)
    return SpecialTokens(eod=tokenizer.eod, newline=_single_token(tokenizer, "\n"),
                         double_newline=_single_token(tokenizer, "\n\n"), colon=_single_token(tokenizer, ":"))


class InferenceTokenizer:
    """A megatron.data tokenizer plus chat templates (every other attribute is the wrapped tokenizer's)."""

    def __init__(self, tokenizer):
        self._inner = tokenizer

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return repr(self._inner)

    @property
    def _hf(self):
        return getattr(self._inner, "_tokenizer", None)

    @property
    def chat_template(self) -> Optional[str]:
        hf = self._hf
        return getattr(hf, "chat_template", None) if hf is not None else None

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}]) in the tokenizer's chat template."""
        if not self.chat_template:
            raise ChatTemplateError(f"the tokenizer {self._inner!r} has no chat template; use a tokenizer whose "
                                    "tokenizer_config.json has one (a Hugging Face chat model's) or send a plain "
                                    "completion")
        ids = self._hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                           tokenize=True, return_dict=False)
        return [int(i) for i in ids]
