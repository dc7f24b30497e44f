"""Serve a checkpoint over HTTP: upstream Megatron-DeepSpeed's `PUT /api` and an OpenAI-compatible API.

    python tools/run_text_generation_server.py --load runs/x/ckpt                         # 1 rank
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load runs/x/ckpt \\
        --tensor-model-parallel-size 2                                                  # or mpiexec -n 2 ...
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["Hello"], "tokens_to_generate": 16}'

--load takes our checkpoints (any layout, resharded on load to --tensor/--pipeline-model-parallel-size; the
checkpoint's own layout by default), DeepSpeed universal folders, argonne Megatron-DeepSpeed checkpoints and Hugging
Face Llama/GPT-2 folders. The model's shape comes from the checkpoint (as --use-checkpoint-args gives it), so
--load (plus --tokenizer-* where the checkpoint records none) is enough. Rank 0 serves HTTP on --host:--port;
the other ranks follow its requests (megatron/inference/server.py). SIGTERM or Ctrl-C drains the requests in
flight and stops every rank. Upstream's generation flags keep their names and defaults: --temperature, --top_p and
--top_k are what a request gets when it leaves them out, --out-seq-length is the most new tokens one sequence may
ask for, and --max-tokens-to-oom bounds prompts × (longest prompt + tokens_to_generate) of a PUT /api request.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.deepspeed_compat import quiet_cpu_accelerator_probe  # noqa: E402

quiet_cpu_accelerator_probe()  # before DeepSpeed is imported: no "Setting accelerator to CPU" warning on a CPU

from megatron.errors import ConfigError, MegatronError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint: ours (any layout), universal, argonne or HF folder")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="tp to serve at (default: the checkpoint's, where the world size fits it)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="pp to serve at (as above)")
    tok = p.add_argument_group("tokenizer (where the checkpoint records none, or to override it)")
    tok.add_argument("--tokenizer-type", default=None)
    tok.add_argument("--tokenizer-model", default=None)
    tok.add_argument("--vocab-file", default=None)
    tok.add_argument("--merge-file", default=None)
    tok.add_argument("--vocab-size", type=int, default=None)
    gen = p.add_argument_group("text generation (upstream's flags)")
    gen.add_argument("--temperature", type=float, default=1.0, help="a request's default temperature")
    gen.add_argument("--top_p", type=float, default=0.0, help="a request's default top_p (0: off)")
    gen.add_argument("--top_k", type=int, default=0, help="a request's default top_k (0: off, 1: greedy)")
    gen.add_argument("--out-seq-length", type=int, default=1024,
                     help="the most new tokens one sequence may ask for (tokens_to_generate, max_tokens)")
    gen.add_argument("--max-tokens-to-oom", type=int, default=12000,
                     help="PUT /api refuses prompts × (longest prompt + tokens_to_generate) above this")
    gen.add_argument("--seq-length", type=int, default=None,
                     help="the context served (default: the checkpoint's --max-position-embeddings)")
    gen.add_argument("--max-batch-size", type=int, default=8, help="sequences the engine runs in one batch")
    gen.add_argument("--batch-wait-ms", type=float, default=25.0,
                     help="how long a batch waits for more requests after the first (0: start at once)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=5000)
    net.add_argument("--no-request-log", action="store_true",
                     help="do not print each request (as every request's no_log would)")
    return p


def check_flags(args) -> None:
    """Every bad flag at once, each named (ConfigError)."""
    from megatron.inference.api_upstream import UpstreamDefaults, parse_upstream_request

    problems = []
    body = {"prompts": ["x"], "temperature": args.temperature, "top_k": args.top_k, "top_p": float(args.top_p)}
    try:
        parse_upstream_request(body, UpstreamDefaults())
    except MegatronError as error:
        problems.append(f"--{error.field}: {error}")
    for flag, value, low in (("--out-seq-length", args.out_seq_length, 1), ("--max-tokens-to-oom",
                              args.max_tokens_to_oom, 1), ("--max-batch-size", args.max_batch_size, 1),
                             ("--port", args.port, 0), ("--batch-wait-ms", args.batch_wait_ms, 0)):
        if value < low:
            problems.append(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if problems:
        raise ConfigError("; ".join(problems))


PROG = "run_text_generation_server.py"


def main(argv=None) -> int:
    """0 once stopped (SIGTERM / Ctrl-C), 2 on a refusal (said once for the job, no traceback)."""
    from megatron.distributed.refusal import run_entry_point

    args = build_parser().parse_args(argv)
    return run_entry_point(PROG, lambda: serve_checkpoint(args))


def serve_checkpoint(args) -> int:
    check_flags(args)
    import torch

    from megatron.distributed import initialize_distributed
    from megatron.distributed.launcher import discover
    from megatron.inference import InferenceEngine
    from megatron.inference.api_upstream import UpstreamDefaults
    from megatron.inference.server import ServerSettings, serve

    world = discover().world_size
    if world > 1:
        initialize_distributed(use_deepspeed=False)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    tokenizer_args = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                      "vocab_file": args.vocab_file, "merge_file": args.merge_file, "vocab_size": args.vocab_size}
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    engine = InferenceEngine.from_checkpoint(args.load, tp=tp, pp=pp, tokenizer_args=tokenizer_args,
                                             dtype=dtype, max_batch_size=args.max_batch_size,
                                             max_sequence_length=args.seq_length)
    layout = engine.ps.tp_size * engine.ps.pp_size
    if world != layout:
        raise ConfigError(f"the server runs one model replica: launch tp {engine.ps.tp_size} × pp "
                          f"{engine.ps.pp_size} = {layout} ranks (got {world}), or set "
                          "--tensor-model-parallel-size / --pipeline-model-parallel-size to fill the world")
    settings = ServerSettings(host=args.host, port=args.port, max_new_tokens=args.out_seq_length,
                              max_tokens_to_oom=args.max_tokens_to_oom, log_requests=not args.no_request_log,
                              batch_wait_s=args.batch_wait_ms / 1000.0,
                              upstream_defaults=UpstreamDefaults(temperature=args.temperature, top_k=args.top_k,
                                                                 top_p=float(args.top_p)))

    def ready():
        print(f"serving {engine.model_name} on http://{args.host}:{args.port} (tp {engine.ps.tp_size}, pp "
              f"{engine.ps.pp_size}, context {engine.max_sequence_length}): PUT /api, POST /v1/completions, "
              "POST /v1/chat/completions, GET /v1/models, GET /health", flush=True)

    serve(engine, settings, args.max_batch_size, on_ready=ready)
    engine.shutdown()
    if engine.ps.rank == 0:
        print("run_text_generation_server.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    from megatron.distributed import destroy_distributed

    destroy_distributed()
    sys.exit(code)
