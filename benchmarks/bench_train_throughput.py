"""Training throughput of our engine vs Hugging Face transformers on the same small Llama, side by side.

Ours: pretrain_gpt.py's path (parse_args → megatron.distributed.initialize_distributed → ParallelState →
training.engine.build_engine: GPTModel + DeepSpeed ZeRO-0 + AdamW + LR schedule) on one rank. Theirs:
LlamaForCausalLM + torch.optim.AdamW + gradient clipping in a plain loop (bf16: torch.autocast, as HF's
Trainer does). Same sizes, batch and sequence; runs alternate so machine noise hits both. Prints tokens/s,
TFLOPS (training.metrics) and ours/theirs. Not a test: `python benchmarks/bench_train_throughput.py --help`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192, help="a multiple of 128, so neither side pads")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first run of each side")
    p.add_argument("--rounds", type=int, default=3, help="alternating (ours, theirs) runs per precision")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each side")
    return p.parse_args()


def our_flags(a, precision: str) -> list[str]:
    flags = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--num-attention-heads", a.heads,
             "--num-key-value-heads", a.kv_heads, "--ffn-hidden-size", a.ffn, "--seq-length", a.seq,
             "--max-position-embeddings", a.seq, "--swiglu", "--normalization", "rmsnorm", "--disable-bias-linear",
             "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--attention-dropout", 0,
             "--hidden-dropout", 0, "--micro-batch-size", a.micro_batch, "--global-batch-size", a.micro_batch,
             "--train-iters", 1000, "--optimizer", "adamw", "--lr", 1e-4, "--lr-decay-style", "constant",
             "--weight-decay", 0.1,
             "--clip-grad", 1.0, "--mock-data", "--vocab-size", a.vocab, "--zero-stage", 0,
             "--distributed-backend", "nccl" if a.device == "cuda" else "gloo"]
    if precision == "bf16":
        flags.append("--bf16")
    return [str(f) for f in flags]


class Ours:
    def __init__(self, a, precision: str, device):
        from megatron.config.arguments import parse_args, validate_run
        from megatron.distributed.parallel_state import ParallelState
        from megatron.training.engine import build_engine

        run = parse_args(our_flags(a, precision))
        validate_run(run, world_size=1)
        self.run, self.device = run, device
        self.engine = build_engine(run, ParallelState.build(run.parallel, run.model), device)

    def step(self, tokens) -> float:
        return self.engine.train_step(iter([{"tokens": tokens}])).loss

    def close(self):
        self.engine.destroy()


class Theirs:
    def __init__(self, a, precision: str, device):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                             num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                             max_position_embeddings=a.seq, rms_norm_eps=1e-5, rope_theta=10000.0,
                             tie_word_embeddings=False, attention_dropout=0.0, attention_bias=False, mlp_bias=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config).to(device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
        self.autocast = precision == "bf16"
        self.device = device

    def step(self, tokens) -> float:
        import torch

        inputs = tokens[:, :-1]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    def close(self):
        pass


def timed(side, batches, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens in batches:
        side.step(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profile_one_step(name, side, tokens):
    from torch.profiler import ProfilerActivity, profile

    side.step(tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step(tokens)
    print(f"\n---- {name}: top ops by self CPU time ----")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    a = parse_cli()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    import torch
    from tqdm import tqdm

    from megatron.config.arguments import parse_args
    from megatron.distributed import initialize_distributed
    from megatron.training.metrics import throughput

    if a.threads:
        torch.set_num_threads(a.threads)
    env = initialize_distributed(backend="nccl" if a.device == "cuda" else "gloo")
    device = torch.device(a.device) if a.device == "cpu" else env.device
    model_config = parse_args(our_flags(a, "fp32")).model
    gen = torch.Generator().manual_seed(0)
    total = a.warmup + a.steps
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=gen).to(device) for _ in range(total)]
    tokens_per_run = a.steps * a.micro_batch * a.seq
    rows = []
    for precision in a.precisions.split(","):
        sides = {"ours": Ours(a, precision, device), "hf": Theirs(a, precision, device)}
        for side in sides.values():
            timed(side, batches[:a.warmup], device)
        if a.profile:
            for name, side in sides.items():
                profile_one_step(f"{name} {precision}", side, batches[0])
        seconds = {name: [] for name in sides}
        for _ in tqdm(range(a.rounds), desc=f"{precision} rounds", leave=False):
            for name, side in sides.items():
                seconds[name].append(timed(side, batches[a.warmup:], device))
        for side in sides.values():
            side.close()
        tqdm.write(f"{precision} seconds per run: " + ", ".join(
            f"{name} [{' '.join(f'{t:.2f}' for t in s)}]" for name, s in seconds.items()))
        med = {name: statistics.median(s) for name, s in seconds.items()}
        best = {name: min(s) for name, s in seconds.items()}
        tps = {name: tokens_per_run / med[name] for name in med}
        tflops = {name: throughput(model_config, med[name], a.steps * a.micro_batch, 1).tflops_per_device
                  for name in med}
        rows.append((precision, tps["ours"], tps["hf"], tflops["ours"], tflops["hf"], tps["ours"] / tps["hf"],
                     best["hf"] / best["ours"]))
    print(f"\nLlama L{a.layers} h{a.hidden} heads {a.heads}/{a.kv_heads} ffn {a.ffn} vocab {a.vocab}, "
          f"micro batch {a.micro_batch} × seq {a.seq}, {a.steps} steps × {a.rounds} alternating rounds (median), "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'precision':>9} | {'ours tok/s':>10} | {'HF tok/s':>10} | {'ours TFLOPS':>11} | {'HF TFLOPS':>9} | "
          f"ours/HF (median) | ours/HF (best run)")
    for p, ours, hf, tf_ours, tf_hf, ratio, best_ratio in rows:
        print(f"{p:>9} | {ours:10.1f} | {hf:10.1f} | {tf_ours:11.4f} | {tf_hf:9.4f} | {ratio:15.2f}x | "
              f"{best_ratio:17.2f}x")


if __name__ == "__main__":
    main()
