"""Peak memory and time of one training step with each long-sequence option, against the plain step.

One GPTModel (a small Llama with a real 32k vocabulary, so the logits matter) runs one forward + backward on
one rank per configuration, each in a fresh process: plain, full recomputation, then recomputation plus
--tiled-logits-loss, --tiled-mlp, and both (docs/LONG_SEQUENCES.md). Peak memory is the process's peak
resident set (ru_maxrss) minus its resident set just before the step; the losses of every configuration are
checked equal to the plain one's (within 1e-5 absolute on the mean). --checkpoint-in-cpu moves nothing on a CPU
and is left out. Not a test: `python benchmarks/bench_sequence_tiling.py --help`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [
    ("plain", {}),
    ("recompute", {"checkpoint_activations": True}),
    ("recompute + tiled logits/loss", {"checkpoint_activations": True, "tiled_logits_loss": True}),
    ("recompute + tiled MLP", {"checkpoint_activations": True, "tiled_mlp": True}),
    ("recompute + both tilings", {"checkpoint_activations": True, "tiled_logits_loss": True, "tiled_mlp": True}),
]


def parse_cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seqs", default="2048,8192", help="sequence lengths, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) and print JSON
    return p.parse_args()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_one(cli: argparse.Namespace, spec: dict) -> dict:
    import resource

    import torch

    from megatron.config.model import TransformerConfig
    from megatron.model import GPTModel

    torch.set_num_threads(cli.threads)
    config = TransformerConfig(
        num_layers=cli.layers, hidden_size=cli.hidden, num_attention_heads=cli.heads,
        num_key_value_heads=cli.kv_heads, ffn_hidden_size=cli.ffn, seq_length=spec["seq"], vocab_size=cli.vocab,
        normalization="rmsnorm", swiglu=True, position_embedding_type="rope", untie_embeddings_and_output_weights=True,
        add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, **spec["options"])
    model = GPTModel(config, seed=1)
    tokens = torch.randint(0, cli.vocab, (1, spec["seq"] + 1), generator=torch.Generator().manual_seed(0))
    before = _rss_bytes()
    start = time.perf_counter()
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": (peak - before) / 2**20, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    cli = parse_cli()
    if cli.one:
        print(json.dumps(run_one(cli, json.loads(cli.one))))
        return
    import torch

    print(f"Llama L{cli.layers} h{cli.hidden} ({cli.heads} heads, {cli.kv_heads} kv, ffn {cli.ffn}), vocabulary "
          f"{cli.vocab}, batch 1, fp32, one forward + backward per fresh process, torch {torch.__version__}, "
          f"{cli.threads} threads; tile: --hidden-size tokens (the default)\n")
    print("| seq | configuration | peak memory of the step (MB) | vs plain | step time (s) | vs plain | loss |")
    print("|---|---|---|---|---|---|---|")
    for seq in [int(s) for s in cli.seqs.split(",")]:
        plain = None
        for name, options in CONFIGS:
            argv = [sys.executable, __file__, "--one", json.dumps({"seq": seq, "options": options})]
            argv += [f"--{k}={v}" for k, v in (("layers", cli.layers), ("hidden", cli.hidden), ("heads", cli.heads),
                                               ("kv-heads", cli.kv_heads), ("ffn", cli.ffn), ("vocab", cli.vocab),
                                               ("threads", cli.threads))]
            out = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            plain = plain or out
            if abs(out["loss"] - plain["loss"]) > 1e-5:
                raise SystemExit(f"{name} at seq {seq}: loss {out['loss']} differs from plain {plain['loss']}")
            print(f"| {seq} | {name} | {out['peak_mb']:.0f} | {out['peak_mb'] / plain['peak_mb']:.2f}x | "
                  f"{out['seconds']:.2f} | {out['seconds'] / plain['seconds']:.2f}x | {out['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
