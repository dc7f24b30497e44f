"""Generation speed of our inference engine vs Hugging Face `generate` (its KV cache) on the same small Llama.

Ours: megatron.inference.InferenceEngine (preallocated KV cache, SDPA, oneDNN-packed weights, torch.inference_mode) on
one rank (`--no-pack`: without the packed weights). `--hf-cache static` gives HF generate a StaticCache.
Theirs: LlamaForCausalLM.generate on the model exported by tools/convert_checkpoint.py's to-hf writer (the same
weights). Greedy, batch 1 and 8, prompts of 128 and 512 tokens, 128 new tokens (no early stop). For each case the
two sides alternate `--rounds` times and the fastest run of each counts. Time to first token (TTFT) is the
prefill plus the first token, taken in the same run (our on_token callback, a streamer for HF); tokens/s counts
the new tokens of the whole batch over the whole run (wall clock), and per CPU-second of the process (less
sensitive to other processes sharing the machine). The greedy tokens of both sides are compared too (they must agree).

    python benchmarks/bench_generate.py                 # the table for benchmarks/RESULTS.md
    python benchmarks/bench_generate.py --quick         # tiny sizes: checks that the script runs

More rows: a function f(setup) -> list[Row] appended to EXTRA_MEASUREMENTS runs after the cases on the same
setup (the engine, the HF folder); the server's throughput with concurrent clients is meant to be added that way.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@dataclass
class Row:
    name: str            # what ran, e.g. "batch 8, prompt 512"
    ours_ttft: float     # seconds
    theirs_ttft: float
    ours_tps: float      # new tokens per second
    theirs_tps: float
    ours_cpu_tps: float = 0.0    # new tokens per CPU-second of this process (all its threads)
    theirs_cpu_tps: float = 0.0
    note: str = ""


@dataclass
class Setup:
    args: argparse.Namespace
    engine: object       # InferenceEngine
    hf_model: object     # LlamaForCausalLM
    hf_dir: str


EXTRA_MEASUREMENTS: list[Callable[[Setup], list[Row]]] = []


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-cache", choices=["dynamic", "static"], default="dynamic",
                   help="HF generate's KV cache: its default DynamicCache, or StaticCache (cache_implementation)")
    p.add_argument("--no-pack", action="store_true", help="ours without packed weights (F.linear, as before)")
    p.add_argument("--hf-packed", action="store_true",
                   help="HF's nn.Linear layers on the same oneDNN-packed weights as ours (not stock HF: shows what the "
                        "GEMM backend alone gives)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab = 2, 64, 4, 2, 128, 512
        args.batches, args.prompts, args.new_tokens, args.rounds = "1,2", "8,16", 4, 1
    return args


def build(args, directory: str) -> Setup:
    from megatron.checkpoint.layout import StateDictSource
    from megatron.config.model import TransformerConfig
    from megatron.convert.hf_io import export_to_hf
    from megatron.data.tokenizers import NullTokenizer
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import InferenceTokenizer
    from megatron.model import GPTModel
    from transformers import AutoModelForCausalLM

    longest = max(int(p) for p in args.prompts.split(",")) + args.new_tokens
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, ffn_hidden_size=args.ffn, seq_length=longest, vocab_size=args.vocab,
        make_vocab_size_divisible_by=128, normalization="rmsnorm", swiglu=True, position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.05)
    source = StateDictSource(GPTModel(config, seed=5).state_dict(), config)
    export_to_hf(source, directory, save_tokenizer_files=False, progress=False)
    engine = InferenceEngine.from_source(source, InferenceTokenizer(NullTokenizer(args.vocab)), device="cpu",
                                         max_batch_size=max(int(b) for b in args.batches.split(",")),
                                         pack_weights=not args.no_pack)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    if args.hf_packed:
        _pack_hf(hf_model, max(int(b) for b in args.batches.split(",")))
    return Setup(args, engine, hf_model, directory)


def _pack_hf(model, batch_hint: int) -> None:
    """Every nn.Linear of the HF model (lm_head included) runs core/packed_linear.py on a packed copy of its weight."""
    from megatron.core import packed_linear

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            packed = packed_linear.pack(module.weight, batch_hint)
            module.forward = (lambda m, w: lambda x: packed_linear.linear(x, m.weight, m.bias, w))(module, packed)


def _ours(engine, prompts, new_tokens):
    """(seconds to the first new token, seconds in all, CPU-seconds in all, the new tokens of each prompt)."""
    from megatron.inference import SamplingParams

    params = [SamplingParams(max_new_tokens=new_tokens, greedy=True, ignore_eos=True)] * len(prompts)
    first = []
    start, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(prompts, params, on_token=lambda index, token: first or first.append(time.perf_counter()))
    end, cpu = time.perf_counter(), time.process_time() - cpu
    return first[0] - start, end - start, cpu, [r.tokens[len(p):] for r, p in zip(results, prompts)]


class _FirstToken:
    """A generate() streamer that notes when the first new tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def _theirs(model, prompts, new_tokens, cache: str = "dynamic"):
    ids = torch.tensor(prompts)
    extra = {} if cache == "dynamic" else {"cache_implementation": cache}
    streamer = _FirstToken()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, streamer=streamer, **extra)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    return streamer.first - start, end - start, cpu, out[:, ids.shape[1]:].tolist()


def measure(setup: Setup, batch: int, prompt_length: int) -> Row:
    """The fastest of `--rounds` alternating runs of each side (time to first token and total separately)."""
    args = setup.args
    g = torch.Generator().manual_seed(batch * 1000 + prompt_length)
    prompts = torch.randint(0, args.vocab - 1, (batch, prompt_length), generator=g).tolist()
    best = {"ours": [float("inf")] * 3, "theirs": [float("inf")] * 3}
    agree = True
    for _ in range(args.rounds):
        runs = {"ours": _ours(setup.engine, prompts, args.new_tokens),
                "theirs": _theirs(setup.hf_model, prompts, args.new_tokens, args.hf_cache)}
        for side, run in runs.items():
            best[side] = [min(old, new) for old, new in zip(best[side], run[:3])]
        agree = agree and runs["ours"][3] == runs["theirs"][3]
    generated = batch * args.new_tokens
    return Row(f"batch {batch}, prompt {prompt_length}", best["ours"][0], best["theirs"][0],
               generated / best["ours"][1], generated / best["theirs"][1],
               generated / best["ours"][2], generated / best["theirs"][2],
               "greedy tokens equal" if agree else "GREEDY TOKENS DIFFER")


def server_throughput(setup: Setup) -> list[Row]:
    """The text generation server (megatron/inference/server.py, in this process on the same engine; continuous
    batching) under 8 concurrent clients, each a POST /v1/completions of one prompt (token ids, greedy), against the
    same 8 prompts in one in-process engine.generate call. Both stop on eod, so the tokens each generates are counted.
    TTFT: one streamed request's first chunk vs a one-token in-process generate."""
    import concurrent.futures
    import threading

    import httpx
    import uvicorn

    from megatron.inference import SamplingParams
    from megatron.inference.server import Scheduler, ServerSettings, build_app
    from megatron.distributed.launcher import free_port

    args, engine = setup.args, setup.engine
    clients, prompt_length = 8, min(int(p) for p in args.prompts.split(","))
    g = torch.Generator().manual_seed(77)
    prompts = torch.randint(0, args.vocab - 1, (clients, prompt_length), generator=g).tolist()
    port = free_port("127.0.0.1")
    settings = ServerSettings(port=port, max_new_tokens=args.new_tokens, log_requests=False)
    scheduler = Scheduler(engine, max_batch_size=clients, batch_wait_s=settings.batch_wait_s)  # the default window
    server = uvicorn.Server(uvicorn.Config(build_app(engine, scheduler, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    http = httpx.Client(limits=httpx.Limits(max_connections=clients), timeout=600)  # connections kept open

    def complete(prompt) -> int:
        reply = http.post(url, json={"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0}).json()
        return reply["usage"]["completion_tokens"]

    def first_chunk(prompt) -> float:
        start = time.perf_counter()
        with http.stream("POST", url, json={"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                            "stream": True}) as reply:
            next(reply.iter_lines())
            return time.perf_counter() - start

    greedy = [SamplingParams(max_new_tokens=args.new_tokens, greedy=True)] * clients
    best = {"server": float("inf"), "engine": float("inf"), "server_ttft": float("inf"), "engine_ttft": float("inf"),
            "server_cpu": float("inf"), "engine_cpu": float("inf")}  # CPU-seconds of this process: server included
    tokens = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda p: http.post(url, json={"prompt": p[:4], "max_tokens": 1}), prompts))  # warm up
            for _ in range(args.rounds):
                best["server_ttft"] = min(best["server_ttft"], first_chunk(prompts[0]))
                start = time.perf_counter()
                engine.generate(prompts[:1], [SamplingParams(max_new_tokens=1, greedy=True)])
                best["engine_ttft"] = min(best["engine_ttft"], time.perf_counter() - start)
                start, cpu = time.perf_counter(), time.process_time()
                tokens["server"] = sum(pool.map(complete, prompts))
                best["server"] = min(best["server"], time.perf_counter() - start)
                best["server_cpu"] = min(best["server_cpu"], time.process_time() - cpu)
                start, cpu = time.perf_counter(), time.process_time()
                results = engine.generate(prompts, greedy)
                best["engine"] = min(best["engine"], time.perf_counter() - start)
                best["engine_cpu"] = min(best["engine_cpu"], time.process_time() - cpu)
                tokens["engine"] = sum(len(r.tokens) - r.prompt_length for r in results)
    finally:
        http.close()
        server.should_exit = True
        thread.join()
        scheduler.stop()
    note = (f"server vs in-process generate (not HF): {clients} clients, largest batch {scheduler.largest_batch}, "
            f"{scheduler.joined_running} sequences joined a running batch"
            + ("" if tokens["server"] == tokens["engine"] else ", TOKEN COUNTS DIFFER"))
    return [Row(f"server, {clients} concurrent clients, prompt {prompt_length}", best["server_ttft"],
                best["engine_ttft"], tokens["server"] / best["server"], tokens["engine"] / best["engine"],
                tokens["server"] / best["server_cpu"], tokens["engine"] / best["engine_cpu"], note=note)]


EXTRA_MEASUREMENTS.append(server_throughput)

def table(rows: list[Row]) -> str:
    lines = ["| case | TTFT ours (s) | TTFT HF (s) | tokens/s ours | tokens/s HF | ours / HF (tokens/s) | "
             "ours / HF (tokens per CPU-second) | |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = f"{r.ours_cpu_tps / r.theirs_cpu_tps:.2f}×" if r.ours_cpu_tps and r.theirs_cpu_tps else "–"
        lines.append(f"| {r.name} | {r.ours_ttft:.3f} | {r.theirs_ttft:.3f} | {r.ours_tps:,.1f} | "
                     f"{r.theirs_tps:,.1f} | **{r.ours_tps / r.theirs_tps:.2f}×** | {cpu} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import transformers

    args = parse_cli(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# bench_generate {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    print(f"# Llama L{args.layers} h{args.hidden} heads {args.heads}/{args.kv_heads} ffn {args.ffn} "
          f"vocab {args.vocab}, fp32, greedy, {args.new_tokens} new tokens, HF {args.hf_cache} cache"
          + (", HF's linear layers on our packed weights (not stock HF)" if args.hf_packed else ""))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        setup = build(args, directory)
        print(f"# ours: {setup.engine.packed_weights} weights packed for oneDNN (core/packed_linear.py)")
        with torch.inference_mode():  # warm both paths (first-call allocations, lazy imports)
            _ours(setup.engine, [[1, 2, 3]], 2)
            _theirs(setup.hf_model, [[1, 2, 3]], 2, args.hf_cache)
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            for prompt_length in (int(p) for p in args.prompts.split(",")):
                rows.append(measure(setup, batch, prompt_length))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        for extra in EXTRA_MEASUREMENTS:
            rows += extra(setup)
    print()
    print(table(rows))
    print(f"\n# {time.perf_counter() - started:.0f} s")
    return 0 if all("DIFFER" not in r.note for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
