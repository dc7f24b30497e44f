"""The inference engine: a checkpoint at any tp × pp, batched generation with a KV cache, scoring, beam search.

    engine = InferenceEngine.from_checkpoint("runs/x/ckpt")             # ours, universal, argonne or HF folder
    [result] = engine.generate([engine.tokenizer.tokenize("Hello")], [SamplingParams(max_new_tokens=20, greedy=True)])
    engine.score([[5, 17, 42]])                                         # log-probs of tokens[1:]
    sequences, scores = engine.beam_search(prompt, beam_width=4, max_new_tokens=20, stop_token=eod, length_penalty=1.0)

Every method is collective: each rank of the model's process groups calls it with the same arguments, in the
same order (torch.distributed already initialised when tp · pp > 1); every rank returns the same results.

How requests run: continuous batching (inference/batching.py). generate() queues its requests into a RunningBatch
of max_batch_size slots; at every decode step finished rows leave and queued requests join, prefilled together
into free slots of a per-slot KV cache (model/slot_cache.py: each row its own length and positions), so a row
attends exactly to its own tokens and gives what it gives alone (up to float rounding of the batched matmuls),
whatever joins or leaves beside it. The server drives the same RunningBatch step by step from its queue
(`running_batch()`). One rank (the last stage's tp rank 0) samples, with each row's own generator, and
broadcasts the new tokens over the model-parallel group; the others follow, and every rank sees which rows
finished from those tokens. The k most likely tokens at each position (SamplingParams.top_logprobs, OpenAI's
`logprobs: k`) come from the same logits. Beam search runs alone, on model/kv_cache.py's KVCache.

Pipeline parallelism runs this rank's stage of layers (model/stage.py) and passes the hidden states [b, s, h]
to the next stage with torch.distributed point-to-point send/recv (not DeepSpeed's PipelineEngine, which
schedules training micro-batches): each tp rank of stage p sends to the same tp rank of stage p + 1, the only
rank that needs them, and every shape is known to both sides from the batch (no shape exchange).

The context limit, as upstream: a prompt plus max_new_tokens longer than max_sequence_length is refused
(GenerationError naming the request); beam search stops at the limit instead (upstream clips it there).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.checkpoint.layout import check_group, layer_prefixes
from megatron.config.model import TransformerConfig
from megatron.config.parallel import ParallelConfig
from megatron.distributed.parallel_state import ParallelState
from megatron.inference.batching import Request, RunningBatch
from megatron.inference.generation import BeamHypotheses, GenerationError, GenerationResult, SamplingParams
from megatron.inference.tokenization import InferenceTokenizer, special_tokens
from megatron.model.kv_cache import KVCache
from megatron.model.sharding import shard_state_dict
from megatron.model.stage import GPTStage

__all__ = ["InferenceEngine", "SamplingParams", "GenerationResult", "GenerationError"]

log = logging.getLogger(__name__)


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype:
    """None (float32), a torch dtype, or one of _DTYPES' names."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise GenerationError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")


def _default_device() -> torch.device:
    from megatron.distributed.device import detect_device_type, device_for_rank

    return device_for_rank(detect_device_type(), int(os.environ.get("LOCAL_RANK", "0")))


def build_tokenizer_for(source, tokenizer_args: Optional[dict], load: str) -> InferenceTokenizer:
    """The tokenizer of a checkpoint: the run's recorded tokenizer with `tokenizer_args` (build_tokenizer's
    keywords) over it (another tokenizer_type replaces it whole), else the Hugging Face folder's own files."""
    from megatron.data.tokenizers import HFTokenizer, NullTokenizer, build_tokenizer

    saved = dict(getattr(source, "tokenizer_args", None) or {})
    given = {k: v for k, v in (tokenizer_args or {}).items() if v is not None}
    if given.get("tokenizer_type") and given["tokenizer_type"] != saved.get("tokenizer_type"):
        args = given
    else:
        args = {**saved, **given}
    if args.get("tokenizer_type"):
        tokenizer = build_tokenizer(args["tokenizer_type"], args.get("tokenizer_model"), args.get("vocab_file"),
                                    args.get("merge_file"), args.get("vocab_size"))
        config = getattr(source, "config", None)
        if args["tokenizer_type"] == "NullTokenizer" and config is not None \
                and tokenizer.vocab_size == config.vocab_size + 1:
            # saved with this framework's older NullTokenizer (--vocab-size V: V tokens, EOD V - 1; docs/UPSTREAM.md)
            tokenizer = NullTokenizer(config.vocab_size, eod_in_vocab_size=True)
        return InferenceTokenizer(tokenizer)
    if getattr(source, "hf_tokenizer_dir", None):
        return InferenceTokenizer(HFTokenizer(source.hf_tokenizer_dir))
    raise GenerationError(f"{load} does not record its tokenizer; pass one (--tokenizer-type and its files)")


class InferenceEngine:
    def __init__(self, stage: GPTStage, tokenizer, *, max_batch_size: int = 8,
                 max_sequence_length: Optional[int] = None, model_name: str = "model", pack_weights: bool = True):
        """`pack_weights`: on CPU, give the layers oneDNN-packed copies of their weights (model/stage.py
        pack_weights: faster decode steps, the weights held twice); the stage's weights must not change after."""
        self.stage, self.config, self.ps = stage, stage.config, stage.ps
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = self.config.vocab_size
        limit = self.config.max_position_embeddings
        if max_sequence_length is not None and max_sequence_length > limit and \
                self.config.position_embedding_type == "learned_absolute":
            raise GenerationError(f"max_sequence_length {max_sequence_length} is beyond the model's learned "
                                  f"positions (--max-position-embeddings {limit})")
        self.max_sequence_length = int(max_sequence_length or limit)
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        parameter = next(stage.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._special = special_tokens(tokenizer)
        ps = self.ps
        self._mp_group = ps.groups.get("mp")
        self._mp_size = len(ps.group_ranks.get("mp", [0]))
        self._source_rank = ps.rank_of(tp=0, sp=0, dp=ps.dp_rank, pp=ps.pp_size - 1)
        self.is_sampler = ps.rank == self._source_rank  # samples, and owns the log-probs
        self.is_front = ps.tp_rank == 0 and ps.pp_rank == 0  # calls on_token (global rank 0 of one replica)
        pp_ranks = ps.group_ranks.get("pp", [ps.rank])
        self._prev = pp_ranks[ps.pp_rank - 1] if ps.pp_rank > 0 else None
        self._next = pp_ranks[ps.pp_rank + 1] if ps.pp_rank + 1 < ps.pp_size else None
        self._hidden_dtype = torch.float32 if self.config.fp32_residual_connection else self.dtype
        self.packed_weights = stage.pack_weights(max_batch_size) if pack_weights else 0

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, load: str, *, tp: Optional[int] = None, pp: Optional[int] = None,
                        tokenizer_args: Optional[dict] = None, dtype=None, device=None, max_batch_size: int = 8,
                        max_sequence_length: Optional[int] = None) -> "InferenceEngine":
        """Load `load` (our checkpoint at any layout, a universal folder, an argonne checkpoint or a Hugging Face
        Llama/GPT-2 folder) resharded to tp × pp; the model's shape is the checkpoint's. tp/pp default to the
        checkpoint's saved layout where it fits the world size, else 1."""
        from megatron.checkpoint.sources import open_checkpoint

        vocab_size = (tokenizer_args or {}).get("vocab_size")
        if vocab_size and (tokenizer_args or {}).get("tokenizer_type") == "NullTokenizer":
            vocab_size += 1  # NullTokenizer's --vocab-size V: the model has V + 1 tokens (as upstream's)
        source = open_checkpoint(load, vocab_size=vocab_size)
        tokenizer = build_tokenizer_for(source, tokenizer_args, load)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if tp is None and pp is None:
            saved_tp, saved_pp = int(getattr(source, "tp", 1) or 1), int(getattr(source, "pp", 1) or 1)
            tp, pp = (saved_tp, saved_pp) if world % (saved_tp * saved_pp) == 0 and world > 1 else (1, 1)
        name = os.path.basename(os.path.normpath(load))
        return cls.from_source(source, tokenizer, tp=tp or 1, pp=pp or 1, dtype=dtype, device=device,
                               max_batch_size=max_batch_size, max_sequence_length=max_sequence_length,
                               model_name=name)

    @classmethod
    def from_source(cls, source, tokenizer=None, *, tp: int = 1, pp: int = 1, dtype=None, device=None,
                    max_batch_size: int = 8, max_sequence_length: Optional[int] = None,
                    model_name: str = "model", pack_weights: bool = True) -> "InferenceEngine":
        """An engine on any FullModelSource (checkpoint/layout.py), e.g. StateDictSource of a GPTModel
        (`pack_weights`: as for __init__)."""
        config: TransformerConfig = source.config.replace(
            attention_dropout=0.0, hidden_dropout=0.0, sequence_parallel=False, checkpoint_activations=False)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1 and tp * pp > 1:
            raise GenerationError(f"tp {tp} × pp {pp} needs torch.distributed initialised with a multiple of "
                                  f"{tp * pp} ranks (launch with torchrun or mpiexec)")
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        try:
            ps = ParallelState.build(parallel, config) if world > 1 else ParallelState.single()
        except ValueError as error:
            raise GenerationError(f"cannot run {source.description} at tp {tp} × pp {pp}: {error}") from None
        if pp > config.num_layers:
            raise GenerationError(f"pp {pp} is more than the model's {config.num_layers} layers")
        device = torch.device(device) if device is not None else _default_device()
        dtype = _resolve_dtype(dtype)
        stage = GPTStage(config, ps)
        load_stage_weights(stage, source)
        stage = stage.to(device=device, dtype=dtype).eval()
        return cls(stage, tokenizer, max_batch_size=max_batch_size, max_sequence_length=max_sequence_length,
                   model_name=model_name, pack_weights=pack_weights)

    def shutdown(self) -> None:
        """Drop the model (the process groups belong to the caller)."""
        self.stage = None

    # ---- collective building blocks --------------------------------------------------------------------
    def _run_stage(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> Optional[torch.Tensor]:
        """This stage's forward of tokens [b, s]: the last stage returns its hidden states, the others None."""
        b, s = tokens.shape
        if self.stage.first:
            inputs = tokens
        else:
            inputs = torch.empty(b, s, self.config.hidden_size, dtype=self._hidden_dtype, device=self.device)
            dist.recv(inputs, src=self._prev)
        hidden = self.stage(inputs, positions, kv_cache=cache)
        if self._next is not None:
            dist.send(hidden.contiguous(), dst=self._next)
            return None
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits [b, s, V] from the last stage's hidden states (tp-gathered)."""
        from megatron.model.embedding import gather_logits

        return gather_logits(self.stage.logits(hidden), self.ps, self.vocab_size).float()

    def _share(self, values: torch.Tensor) -> torch.Tensor:
        """The sampler's `values` on every rank of the model-parallel group."""
        if self._mp_size > 1:
            dist.broadcast(values, src=self._source_rank, group=self._mp_group)
        return values

    def _share_object(self, value):
        if self._mp_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=self._source_rank, group=self._mp_group)
        return holder[0]

    def _new_cache(self, batch: int, capacity: int) -> KVCache:
        config = self.config
        return KVCache(batch, capacity, self.stage.layer_indices, config.num_key_value_heads // self.ps.tp_size,
                       config.head_dim, dtype=self.dtype, device=self.device)

    def _check_prompt(self, where: str, prompt) -> None:
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise GenerationError(f"{where}: a prompt must be a non-empty list of token ids in [0, "
                                  f"{self.vocab_size})")

    # ---- generation --------------------------------------------------------------------------------------
    @property
    def pad_token(self) -> int:
        """What fills the padded columns of a prefill (masked; never attended to by a real token)."""
        return self._special.eod if self._special.eod is not None else 0

    @property
    def special(self):
        return self._special

    def request_problem(self, where: str, prompt, params: SamplingParams) -> Optional[str]:
        """Why a generation request cannot run (named by `where`), or None."""
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            return f"{where}: a prompt must be a non-empty list of token ids in [0, {self.vocab_size})"
        if not isinstance(params, SamplingParams):
            return f"{where}: params must be a SamplingParams, got {type(params).__name__}"
        problems = params.problems()
        if problems:
            return f"{where}: " + "; ".join(problems)
        if len(prompt) + params.max_new_tokens > self.max_sequence_length:
            return (f"{where}: the prompt's {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                    f"the context of {self.max_sequence_length} tokens; shorten the prompt or ask for fewer tokens")
        if (params.stop_on_eol or params.stop_on_double_eol) and self._special.newline is None:
            return (f"{where}: stop_on_eol / stop_on_double_eol need a tokenizer with a newline token; "
                    f"{self.tokenizer!r} has none")
        return None

    def running_batch(self):
        """An empty RunningBatch (inference/batching.py) of max_batch_size slots: continuous batching, step by
        step, for a caller that feeds it requests as they come (the server)."""
        return RunningBatch(self, log)

    @torch.inference_mode()
    def generate(self, prompts: list, params: list, on_token: Optional[Callable[[int, int], None]] = None) -> list:
        """Continue each prompt (token ids) by its SamplingParams; results in order. on_token(index, token) is
        called on the replica's first rank after each new token (an exception there is logged, not raised).
        At most max_batch_size sequences run at once; the others join as rows finish (continuous batching)."""
        if len(prompts) != len(params):
            raise GenerationError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            problem = self.request_problem(f"request {i}", prompt, p)
            if problem:
                raise GenerationError(problem)

        def callback(index):
            return None if on_token is None else (lambda token: on_token(index, token))

        batch = self.running_batch()
        waiting = [Request(i, list(prompt), p, callback(i)) for i, (prompt, p) in enumerate(zip(prompts, params))]
        waiting.reverse()
        results: list = [None] * len(prompts)
        while waiting or batch.active:
            joins = [waiting.pop() for _ in range(min(batch.free, len(waiting)))]
            for done in batch.step(joins):
                if done.error is not None:
                    raise done.error
                results[done.id] = done.result
        return results

    @torch.inference_mode()
    def score(self, sequences: list) -> list:
        """Per-token log-probs of tokens[1:] of each sequence given its prefix (lm-eval's loglikelihood)."""
        for i, sequence in enumerate(sequences):
            self._check_prompt(f"sequence {i}", sequence)
            if len(sequence) > self.max_sequence_length:
                raise GenerationError(f"sequence {i}: {len(sequence)} tokens exceed the context of "
                                      f"{self.max_sequence_length} tokens")
        results = self.generate(sequences, [SamplingParams(return_logprobs=True) for _ in sequences])
        return [r.logprobs for r in results]

    # ---- beam search -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def beam_search(self, prompt: list, beam_width: int, max_new_tokens: int, stop_token: int,
                    length_penalty: float = 1.0, num_return_gen: Optional[int] = None,
                    prevent_newline_after_colon: bool = False) -> tuple:
        """Upstream's beam search for one prompt: (sequences, scores), best first, at most num_return_gen
        (default beam_width) of them; each sequence is the prompt + its generated tokens (the stop token
        included where a beam ended on it), each score sum_logprobs / generated_length ** length_penalty.
        It stops at the context limit (upstream clips tokens_to_generate there)."""
        self._check_prompt("beam_search", prompt)
        if not isinstance(beam_width, int) or beam_width < 1:
            raise GenerationError(f"beam_width must be an integer >= 1, got {beam_width!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens!r}")
        prompt_length = len(prompt)
        final = min(prompt_length + max_new_tokens, self.max_sequence_length)
        if prompt_length >= final:
            raise GenerationError(f"beam_search: the prompt's {prompt_length} tokens leave no room in the context "
                                  f"of {self.max_sequence_length} tokens")
        num_return_gen = beam_width if num_return_gen is None else num_return_gen
        colon, newline = self._special.colon, self._special.newline
        beams = [list(prompt) for _ in range(beam_width)]
        cache = self._new_cache(beam_width, final)
        positions = torch.arange(prompt_length, device=self.device).unsqueeze(0).expand(beam_width, -1)
        tokens = torch.tensor(beams, dtype=torch.long, device=self.device)
        hidden = self._run_stage(tokens, positions, cache)
        last = self._logits(hidden[:, -1:])[:, 0] if hidden is not None else None
        scores = torch.zeros(beam_width, 1, dtype=torch.float32, device=self.device)
        hypotheses = BeamHypotheses(beam_width, length_penalty)
        done = False
        for context_length in range(prompt_length, final):
            generated = context_length + 1 - prompt_length
            decision = torch.zeros(1 + 2 * beam_width, dtype=torch.long, device=self.device)
            if self.is_sampler:
                logits = last
                if prevent_newline_after_colon and colon is not None and newline is not None:
                    logits = logits.clone()
                    after_colon = torch.tensor([b[-1] == colon for b in beams], device=self.device)
                    logits[after_colon, newline] = -1e10
                new_scores = F.log_softmax(logits, dim=-1) + scores
                vocab = new_scores.shape[1]
                flat = new_scores[0] if context_length == prompt_length else new_scores.view(-1)
                sorted_scores, indices = torch.sort(flat, descending=True)
                best_scores = sorted_scores[:2 * beam_width]
                chosen = []
                for rank, (index, score) in enumerate(zip(indices[:2 * beam_width].tolist(), best_scores)):
                    beam, word = index // vocab, index % vocab
                    if word == stop_token:
                        if rank >= beam_width:
                            continue
                        hypotheses.add(beams[beam] + [word], float(score), generated)
                    else:
                        chosen.append((word, score, beam))
                    if len(chosen) == beam_width:
                        break
                done = hypotheses.is_done(float(best_scores.max()), generated)
                decision[0] = int(done)
                decision[1:1 + beam_width] = torch.tensor([c[2] for c in chosen])
                decision[1 + beam_width:] = torch.tensor([c[0] for c in chosen])
                scores = torch.stack([c[1] for c in chosen]).unsqueeze(1)
            decision = self._share(decision).tolist()
            if decision[0]:
                done = True
                break
            rows, words = decision[1:1 + beam_width], decision[1 + beam_width:]
            beams = [beams[r] + [w] for r, w in zip(rows, words)]
            if context_length + 1 == final:
                break
            cache.reorder(torch.tensor(rows, device=self.device))
            step_positions = torch.full((beam_width, 1), context_length, device=self.device)
            hidden = self._run_stage(torch.tensor(words, device=self.device).unsqueeze(1), step_positions, cache)
            if hidden is not None:
                last = self._logits(hidden)[:, 0]
        result = None
        if self.is_sampler:
            if not done:
                for beam in range(beam_width):
                    hypotheses.add(beams[beam], float(scores[beam, 0]), generated)
            ranked = sorted(hypotheses.beams, key=lambda item: item[0], reverse=True)[:max(1, num_return_gen)]
            result = ([tokens for _, tokens in ranked], [float(score) for score, _ in ranked])
        return self._share_object(result)


def load_stage_weights(stage: GPTStage, source) -> None:
    """Load the groups this stage holds from a FullModelSource, sharded to its tp rank; every parameter of the
    stage must be filled."""
    config, ps = stage.config, stage.ps
    wanted = set(stage.state_dict().keys())
    needed = [prefix for prefix in layer_prefixes(config)
              if any(name.startswith(prefix) for name in wanted)]
    loaded = set()
    for prefix in needed:
        tensors = source.load_group(prefix)
        check_group(prefix, tensors, config, source.description)
        shard = {name: tensor for name, tensor in shard_state_dict(tensors, config, ps.tp_size, ps.tp_rank).items()
                 if name in wanted}
        stage.load_state_dict(shard, strict=False)
        loaded |= set(shard)
    missing = sorted(wanted - loaded)
    if missing:
        raise GenerationError(f"{source.description}: no weights for {missing[:5]} of the model")
