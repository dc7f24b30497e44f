"""lm-evaluation-harness on our engine: the model type "megatron" (loglikelihood, loglikelihood_rolling,
generate_until), for tools/evaluate.py or any lm_eval.simple_evaluate call in the same process.

    from megatron.inference.lm_eval_adapter import MegatronLM       # registers "megatron" with lm-eval
    lm = MegatronLM(engine, batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

It reproduces what lm-eval's own `hf` backend computes on the exported model:
- requests are tokenized as HFLM does (TemplateLM's context/continuation split, no BOS added unless
  add_bos_token, the prefix token bos else eod for an empty context), and a sequence longer than the context
  keeps its last max_length + 1 tokens;
- loglikelihood: the sum of the continuation's token log-probs (engine.score); is_greedy: whether greedy
  decoding from the context gives the continuation token for token (engine.generate, greedy, ignoring eod),
  which is HFLM's "argmax at every continuation position" (the two agree up to the first mismatch);
- loglikelihood_rolling: lm-eval's disjoint rolling windows (context 1) over the text, summed;
- generate_until: the context's last max_length - max_gen_toks tokens, greedy unless do_sample, cut at the
  first `until` string.
Data parallelism as lm-eval expects it: `rank` and `world_size` are this rank's dp coordinates, lm-eval shards
its requests by them, and the tp/pp ranks of one replica run the same requests together (every engine call
is collective). all_gather / gather_object / barrier run over the dp group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron.inference.engine import SamplingParams

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


@register_model("megatron")
class MegatronLM(TemplateLM):
    """An lm-eval model over an InferenceEngine the caller built (InferenceEngine.from_checkpoint on every rank);
    pass the instance to lm_eval.simple_evaluate(model=...)."""

    def __init__(self, engine, batch_size: int = 8, max_gen_toks: int = 256, add_bos_token: bool = False,
                 dp_group=None, dp_rank: int = 0, dp_size: int = 1):
        super().__init__()
        self.engine = engine
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.tokenizer = engine.tokenizer
        self._rank, self._world_size, self.dp_group = dp_rank, dp_size, dp_group

    # -- what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos", None)
        return bos if bos is not None else self.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.engine.max_sequence_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    @property
    def device(self):
        return torch.device("cpu")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.tokenize(string))
        bos = getattr(self.tokenizer, "bos", None)
        keep_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if not keep_bos and bos is not None and ids[:1] == [bos] and not string.startswith(
                self.tokenizer.detokenize([bos]) or "\0"):
            ids = ids[1:]  # the tokenizer adds bos itself (Llama); HFLM asks for no special tokens
        return ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.detokenize(list(tokens))

    # -- the three request types
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, with_greedy=True):
        sequences, lengths = [], []
        for _, context_enc, continuation_enc in requests:
            sequences.append((list(context_enc) + list(continuation_enc))[-(self.max_length + 1):])
            lengths.append(len(continuation_enc))
        scores = self._score(sequences)
        generated = [None] * len(sequences)
        if with_greedy:
            greedy = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in lengths]
            generated = self._generate([seq[:len(seq) - n] for seq, n in zip(sequences, lengths)], greedy)
        results = []
        for (request, _, _), seq, n, score, gen in zip(requests, sequences, lengths, scores, generated):
            logprob = float(sum(score[len(score) - n:]))
            is_greedy = gen is not None and gen.tokens[gen.prompt_length:] == seq[len(seq) - n:]
            results.append((logprob, bool(is_greedy)))
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, (logprob, bool(is_greedy)))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, with_greedy=False)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise ValueError(f"generation_kwargs {unknown}: model 'megatron' takes {', '.join(GEN_KWARGS)}")
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sampled = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            prompts.append(self.tok_encode(context)[-(self.max_length - max_gen):])
            params.append(SamplingParams(max_new_tokens=max_gen, greedy=not sampled,
                                         temperature=float(kwargs.get("temperature", 1.0)) if sampled else 1.0,
                                         top_p=float(kwargs.get("top_p", 0.0) or 0.0) if sampled else 0.0,
                                         top_k=int(kwargs.get("top_k", 0) or 0) if sampled else 0))
            stops.append(until)
        outputs = []
        for req, result, until in zip(requests, self._generate(prompts, params), stops):
            text = self.tok_decode(result.tokens[result.prompt_length:])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    # -- batched engine calls (collective over tp/pp: every rank of a replica makes the same ones)
    def _score(self, sequences):
        out = []
        for start in range(0, len(sequences), self.batch_size):
            out += self.engine.score(sequences[start:start + self.batch_size])
        return out

    def _generate(self, prompts, params):
        out = []
        for start in range(0, len(prompts), self.batch_size):
            out += self.engine.generate(prompts[start:start + self.batch_size], params[start:start + self.batch_size])
        return out

    # -- data parallelism over the dp group
    def all_gather(self, tensor):
        if self._world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=self.dp_group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self._world_size == 1:
            return [obj]
        parts = [None] * self._world_size
        dist.all_gather_object(parts, obj, group=self.dp_group)
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self.dp_group)
