"""Continuous batching: a running batch of sequences that requests join and leave at every decode step.

    batch = engine.running_batch()                                  # on every rank of the model's groups
    done = batch.step(joins=[Request(7, prompt, SamplingParams(max_new_tokens=20, greedy=True))])
    while batch.active:
        done += batch.step(joins=[...requests that came meanwhile...], leaves=[...ids to drop...])
    # done: Finished(request_id, result or error) for each request, in the step it ended

One step, on every rank with the same `joins` and `leaves` (a caller on one rank, the server's scheduler, decides
them and tells the others before the step):
  1. `leaves` are dropped (their request ends with an error saying so);
  2. each joining request is checked (an invalid one ends at once with its GenerationError; the others go on) and
     the valid ones are prefilled together into free slots of the KV cache (model/slot_cache.py: right-padded,
     each row its own length), which gives each its first next-token logits and its prompt's log-probs;
  3. every running row draws its next token from its logits (one rank samples, with each row's own generator,
     and broadcasts the tokens over the model-parallel group); a row whose draw raised ends with that error;
  4. rows that stop (a stop token, the stop rules, max_new_tokens) leave: their results are complete, and the
     last row moves into each freed slot so the running rows stay contiguous;
  5. one decode forward feeds each remaining row its new token at its own position, for the next step.
Which rows stop follows from the broadcast tokens, so every rank removes the same rows without being told.
A row's computation never depends on its neighbours (its own positions, its own keys through the mask, its own
generator), so each request gets what it gets alone: the same tokens and log-probs up to the float rounding of
batched matmuls, whatever joins or leaves beside it.

engine.generate() is this loop with every request queued at once (joining as slots free up); the server feeds it
from its queue (megatron/inference/server.py). Beam search and the pipeline's point-to-point sends stay as the
engine defines them: every rank knows each forward's shape from the rows it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.inference.generation import GenerationError, GenerationResult, RowSampler, SamplingParams, stop_reason
from megatron.model.slot_cache import SlotKVCache

_FAILED = -1  # the token the sampler broadcasts for a row whose draw raised


@dataclass
class Request:
    id: Hashable
    prompt: list
    params: SamplingParams
    on_token: Optional[Callable[[int], None]] = None  # called with each new token on the replica's first rank


@dataclass
class Finished:
    id: Hashable
    result: Optional[GenerationResult] = None
    error: Optional[GenerationError] = None


class _Row:
    __slots__ = ("id", "params", "tokens", "prompt_length", "logprobs", "tops", "sampler", "on_token", "error")

    def __init__(self, request: Request, sampler: Optional[RowSampler]):
        self.id, self.params, self.on_token = request.id, request.params, request.on_token
        self.tokens = list(request.prompt)
        self.prompt_length = len(request.prompt)
        self.logprobs = [] if request.params.return_logprobs else None
        self.tops = [] if request.params.top_logprobs else None
        self.sampler = sampler
        self.error: Optional[str] = None


class RunningBatch:
    """The rows being generated, on one rank; every method is collective over the model's groups."""

    def __init__(self, engine, log=None):
        self.engine = engine
        self.log = log
        self.slots = engine.max_batch_size
        config = engine.config
        self.cache = SlotKVCache(self.slots, engine.stage.layer_indices,
                                 config.num_key_value_heads // engine.ps.tp_size, config.head_dim,
                                 dtype=engine.dtype, device=engine.device)
        self.rows: list[_Row] = []
        self.last: Optional[torch.Tensor] = None  # [rows, V] next-token logits (last stage only)
        self.steps = 0
        self.rows_sampled = 0  # rows that drew a token in the last step

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def ids(self) -> list:
        return [row.id for row in self.rows]

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, joins: Sequence[Request] = (), leaves: Sequence[Hashable] = ()) -> list[Finished]:
        finished: list[Finished] = []
        if leaves:
            dropped = set(leaves)
            for index in reversed(range(len(self.rows))):
                if self.rows[index].id in dropped:
                    finished.append(Finished(self.rows[index].id, error=GenerationError(
                        f"request {self.rows[index].id}: cancelled")))
                    self._remove(index)
        valid = []
        for request in joins:
            problem = self.engine.request_problem(f"request {request.id}", request.prompt, request.params)
            if problem:
                finished.append(Finished(request.id, error=GenerationError(problem)))
            else:
                valid.append(request)
        if len(valid) > self.free:
            raise GenerationError(f"{len(valid)} requests join a batch with {self.free} free slots of {self.slots}")
        if valid:
            finished += self._join(valid)
        self.rows_sampled = len(self.rows)
        if self.rows:
            finished += self._sample_and_advance()
        if not self.rows:
            self.cache.release()
            self.last = None
        self.steps += 1
        return finished

    # ---- joining: one prefill of the new rows ---------------------------------------------------------------
    def _join(self, requests: list[Request]) -> list[Finished]:
        engine = self.engine
        needed = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
        if needed > self.cache.capacity:
            self.cache.reserve(max(needed, min(2 * self.cache.capacity, engine.max_sequence_length)))
        first = len(self.rows)
        lengths = [len(r.prompt) for r in requests]
        width = max(lengths)
        pad = engine.pad_token
        tokens = torch.full((len(requests), width), pad, dtype=torch.long)
        for row, request in enumerate(requests):
            tokens[row, :lengths[row]] = torch.tensor(request.prompt, dtype=torch.long)
        tokens = tokens.to(engine.device)
        positions = torch.arange(width, device=engine.device).unsqueeze(0).expand(len(requests), -1)
        self.cache.prefill(range(first, first + len(requests)), lengths)
        hidden = engine._run_stage(tokens, positions, self.cache)
        rows = [_Row(r, RowSampler(r.params, engine.device) if engine.is_sampler else None) for r in requests]
        if hidden is not None:
            for row, (request, state) in enumerate(zip(requests, rows)):  # the prompt's log-probs, row by row
                p = request.params
                if (p.return_logprobs or p.top_logprobs) and lengths[row] > 1:
                    logp = F.log_softmax(engine._logits(hidden[row:row + 1, :lengths[row] - 1])[0], dim=-1)
                    if p.return_logprobs:
                        targets = tokens[row, 1:lengths[row]].unsqueeze(1)
                        state.logprobs = logp.gather(1, targets).squeeze(1).tolist()
                    if p.top_logprobs:
                        state.tops = _top(logp, p.top_logprobs)
            ends = torch.tensor([n - 1 for n in lengths], device=engine.device)
            new_last = engine._logits(hidden[torch.arange(len(requests), device=engine.device), ends].unsqueeze(1))
            new_last = new_last[:, 0]
            self.last = new_last if self.last is None else torch.cat([self.last, new_last])
        self.rows += rows
        scored = [first + i for i, r in enumerate(requests) if r.params.max_new_tokens == 0]
        return self._finish(scored, {i: "length" for i in scored})

    # ---- sampling, stopping, the next forward ---------------------------------------------------------------
    def _sample_and_advance(self) -> list[Finished]:
        engine, special = self.engine, self.engine.special
        n = len(self.rows)
        new = torch.full((n,), engine.pad_token, dtype=torch.long, device=engine.device)
        if engine.is_sampler:
            last = self.last
            masked = [i for i, row in enumerate(self.rows) if row.params.prevent_newline_after_colon
                      and special.colon is not None and special.newline is not None
                      and row.tokens[-1] == special.colon]
            if masked:
                last = last.clone()
                last[masked, special.newline] = -1e10
            greedy = [row.params.is_greedy for row in self.rows]
            chosen = last.argmax(dim=-1).tolist() if any(greedy) else None  # one call for every greedy row
            wants_logp = [i for i, row in enumerate(self.rows) if row.logprobs is not None or row.tops is not None]
            logp = F.log_softmax(last[wants_logp], dim=-1) if wants_logp else None
            values = []
            for i, row in enumerate(self.rows):
                try:
                    token = chosen[i] if greedy[i] else row.sampler.next_token(last[i])
                except Exception as error:  # noqa: BLE001 - one row's failure ends that row, not the batch
                    row.error = f"request {row.id}: sampling failed: {type(error).__name__}: {error}"
                    token = _FAILED
                values.append(token)
            for j, i in enumerate(wants_logp):
                row, token = self.rows[i], values[i]
                if token == _FAILED:
                    continue
                if row.logprobs is not None:
                    row.logprobs.append(float(logp[j, token]))
                if row.tops is not None:
                    row.tops += _top(logp[j:j + 1], row.params.top_logprobs)
            new = torch.tensor(values, dtype=torch.long, device=engine.device)
        new = engine._share(new)
        tokens = new.tolist()
        ending, reasons = [], {}
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if token == _FAILED:
                ending.append(i)
                reasons[i] = "error"
                continue
            previous = row.tokens[-1]
            row.tokens.append(token)
            if engine.is_front and row.on_token is not None:
                try:
                    row.on_token(token)
                except Exception:  # noqa: BLE001 - a streaming client's failure must not stop the batch
                    if self.log is not None:
                        self.log.exception("on_token callback failed for request %s", row.id)
            if stop_reason(row.params, special, previous, token):
                ending.append(i)
                reasons[i] = "stop"
            elif len(row.tokens) - row.prompt_length >= row.params.max_new_tokens:
                ending.append(i)
                reasons[i] = "length"
        finished = self._finish(ending, reasons)
        if self.rows:
            n = len(self.rows)
            self.cache.decode(n)
            step_tokens = torch.tensor([[row.tokens[-1]] for row in self.rows], device=engine.device)
            positions = torch.tensor([[length] for length in self.cache.lengths[:n]], device=engine.device)
            hidden = engine._run_stage(step_tokens, positions, self.cache)
            if hidden is not None:
                self.last = engine._logits(hidden)[:, 0]
        return finished

    def _finish(self, indices: list[int], reasons: dict) -> list[Finished]:
        """End rows `indices`: their results (the sampler's log-probs and errors shared), then out of the batch."""
        if not indices:
            return []
        engine = self.engine
        rows = [self.rows[i] for i in indices]
        if any(row.logprobs is not None or row.tops is not None or reasons[i] == "error"
               for i, row in zip(indices, rows)):
            shared = engine._share_object([(row.logprobs, row.tops, row.error) for row in rows]
                                          if engine.is_sampler else None)
            for row, (logprobs, tops, error) in zip(rows, shared):
                row.logprobs, row.tops, row.error = logprobs, tops, error
        out = []
        for i, row in zip(indices, rows):
            if reasons[i] == "error":
                out.append(Finished(row.id, error=GenerationError(row.error or f"request {row.id}: sampling failed")))
            else:
                out.append(Finished(row.id, GenerationResult(tokens=row.tokens, prompt_length=row.prompt_length,
                                                             logprobs=row.logprobs, finish_reason=reasons[i],
                                                             top_logprobs=row.tops)))
        for i in sorted(indices, reverse=True):
            self._remove(i)
        return out

    def _remove(self, index: int) -> None:
        """Row `index` leaves; the last row takes its slot."""
        last = len(self.rows) - 1
        if index != last:
            self.rows[index] = self.rows[last]
            self.cache.move(last, index)
            if self.last is not None:
                self.last[index] = self.last[last]
        self.rows.pop()
        self.cache.lengths[last] = 0
        if self.last is not None:
            self.last = self.last[:last]


def _top(logp: torch.Tensor, k: int) -> list[dict]:
    """{token id: log-prob} of the k most likely tokens of each row of logp [n, V]."""
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
