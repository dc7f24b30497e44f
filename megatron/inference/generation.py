"""Upstream's generation semantics, one row at a time: sampling filters, stop rules, beam hypotheses.

Read from argonne-lcf/Megatron-DeepSpeed megatron/text_generation/{sampling,generation,beam_utils}.py:
- top_k == 1 is greedy (argmax); otherwise the logits are divided by the temperature, then top-k keeps the
  logits >= the k-th largest, or top-p keeps the smallest prefix of the sorted distribution whose mass
  reaches top_p (a token stays when the mass before it is <= top_p; the top token always stays), and one
  token is drawn from the softmax. top_k > 1 and top_p > 0 together are refused, as upstream asserts.
- top_p_decay: after each token top_p becomes top_p · decay, but not below top_p_bound (when > 0).
- stop_on_eol ends a row at "\\n" or "\\n\\n"; stop_on_double_eol at "\\n\\n", or at "\\n" right after "\\n"
  (upstream hard-codes GPT-2's ids 198 and 628; we ask the tokenizer for its ids of those strings).
- prevent_newline_after_colon: after a ":" token, the "\\n" token's logit is set to -1e10 (before the logprob).
- Beam search: BeamHypotheses keeps the beam_width best finished hypotheses scored sum_logprobs /
  length ** length_penalty (length = tokens generated, the stop token included).

Each row has its own torch.Generator (seeded from SamplingParams.seed), so a seeded request draws the same
tokens whatever batch it shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.errors import MegatronError


class GenerationError(MegatronError, ValueError):
    """A generation request that cannot run as asked; the message names the field and what is allowed."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 0          # 0: score only (upstream's tokens_to_generate = 0)
    greedy: bool = False             # argmax (also when top_k == 1, or temperature == 0)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0               # upstream's convention: 0.0 = off
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    seed: Optional[int] = None       # the row's own generator: reproducible whatever the batch
    stop_token_ids: tuple = ()       # end the row when generated (eod is added unless ignore_eos)
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    return_logprobs: bool = False    # log-prob of every token after the first (prompt included), as upstream
    ignore_eos: bool = False
    top_logprobs: int = 0            # k > 0: also the k most likely tokens at each of those positions (OpenAI's)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.top_k == 1 or self.temperature == 0.0

    def problems(self) -> list[str]:
        """Every invalid field, named (empty: valid)."""
        out = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            out.append(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.is_greedy and not 0.0 < self.temperature <= 100.0:
            out.append(f"temperature must be in (0, 100] (0 or greedy for argmax), got {self.temperature!r}")
        if not isinstance(self.top_logprobs, int) or self.top_logprobs < 0:
            out.append(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            out.append(f"top_p must be in [0, 1] (0: off), got {self.top_p}")
        if self.top_k > 1 and self.top_p > 0.0 and not self.greedy:
            out.append("top_k and top_p cannot both be set (upstream's rule): pick one")
        if not 0.0 <= self.top_p_decay <= 1.0:
            out.append(f"top_p_decay must be in [0, 1], got {self.top_p_decay}")
        if not 0.0 <= self.top_p_bound <= 1.0:
            out.append(f"top_p_bound must be in [0, 1], got {self.top_p_bound}")
        if (self.top_p_decay > 0.0 or self.top_p_bound > 0.0) and self.top_p == 0.0:
            out.append("top_p_decay and top_p_bound need top_p > 0")
        return out


@dataclass
class GenerationResult:
    tokens: list                     # prompt + generated
    prompt_length: int
    logprobs: Optional[list]         # len(tokens) - 1 entries when asked
    finish_reason: str               # "stop" | "length"
    top_logprobs: Optional[list] = None  # with SamplingParams.top_logprobs k: {token id: log-prob} of the k most
    #                                      likely tokens at each position of `logprobs`


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Upstream's sample() before the draw: logits [..., V] / temperature, then top-k or top-p (-inf outside)."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    if top_k > 1:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    elif top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # the mass before a token already exceeds top_p
        outside[..., 0] = False
        logits.masked_fill_(outside.scatter(-1, order, outside), float("-inf"))
    return logits


class RowSampler:
    """One row's sampling state: its generator and its (decaying) top_p."""

    def __init__(self, params: SamplingParams, device):
        self.params = params
        self.top_p = params.top_p
        self.generator = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed))
            else:
                self.generator.seed()

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V] (float32, already masked by the stop rules)."""
        p = self.params
        if p.is_greedy:
            return int(torch.argmax(logits))
        filtered = filter_logits(logits, p.temperature, p.top_k, self.top_p)
        token = int(torch.multinomial(filtered.softmax(dim=-1), 1, generator=self.generator))
        if self.top_p > 0.0 and p.top_p_decay > 0.0:
            self.top_p *= p.top_p_decay
            if p.top_p_bound > 0.0:
                self.top_p = max(self.top_p, p.top_p_bound)
        return token


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids the stop rules need (None where the tokenizer has no single token for it)."""
    eod: Optional[int]
    newline: Optional[int]           # "\n"
    double_newline: Optional[int]    # "\n\n"
    colon: Optional[int]             # ":"


def stop_reason(params: SamplingParams, special: SpecialTokens, previous: int, token: int) -> bool:
    """Whether `token` (generated after `previous`) ends the row."""
    if token in params.stop_token_ids:
        return True
    if not params.ignore_eos and special.eod is not None and token == special.eod:
        return True
    if params.stop_on_double_eol:
        return (special.double_newline is not None and token == special.double_newline) or (
            special.newline is not None and token == special.newline == previous)
    if params.stop_on_eol:
        return token in (special.newline, special.double_newline)
    return False


class BeamHypotheses:
    """Upstream's n-best list of finished beams (beam_utils.BeamHypotheses, early_stopping False)."""

    def __init__(self, num_beams: int, length_penalty: float = 1.0):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list = []  # (score, tokens)
        self.worst_score = 1e9

    def add(self, tokens: list, sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / length ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty
