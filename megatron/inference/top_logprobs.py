"""The k most likely tokens at every position of finished sequences: what OpenAI's `logprobs: k` reports (and
what lm-eval's local-completions backend reads to tell whether a continuation is greedy).

    tops = top_logprobs(engine, sequences, k)   # collective, like every engine call
    tops[i][j] = {token id: log-prob} of the k most likely tokens after sequences[i][:j + 1]

The engine's contract gives the chosen token's log-prob only, so this runs one prefill of each sequence on the
engine's own building blocks (its stage, KV cache, full-vocabulary logits and model-parallel broadcast): left-
padded rows with their own positions, exactly as engine.generate's prefill, one batch of max_batch_size at a
time. Every rank of the model's groups calls it with the same arguments; every rank returns the same lists.
These are the engine's private helpers: when the engine offers top log-probs itself, this module goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def top_logprobs(engine, sequences: list[list[int]], k: int) -> list[list[dict[int, float]]]:
    out: list = []
    for first in range(0, len(sequences), engine.max_batch_size):
        out += _batch(engine, sequences[first:first + engine.max_batch_size], k)
    return out


def _batch(engine, sequences, k):
    for i, sequence in enumerate(sequences):
        engine._check_prompt(f"sequence {i}", sequence)
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    start = [width - n for n in lengths]
    pad = engine.tokenizer.eod
    tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, start[row]:] = torch.tensor(sequence, dtype=torch.long)
    tokens = tokens.to(engine.device)
    start_t = torch.tensor(start, device=engine.device)
    positions = (torch.arange(width, device=engine.device).unsqueeze(0) - start_t.unsqueeze(1)).clamp(min=0)
    cache = engine._new_cache(len(sequences), width, start)
    hidden = engine._run_stage(tokens, positions, cache)
    result = None
    if hidden is not None:  # the last stage: its tp ranks gather the logits together
        result = []
        for row in range(len(sequences)):
            if lengths[row] < 2:
                result.append([])
                continue
            logp = F.log_softmax(engine._logits(hidden[row:row + 1, start[row]:width - 1])[0], dim=-1)
            values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            result.append([dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)])
    return engine._share_object(result if engine.is_sampler else None)
