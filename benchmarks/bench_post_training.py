"""Post-training step time: our DPO against our SFT on the same pairs, and our DPO against TRL's DPOTrainer.

    python benchmarks/bench_post_training.py [--pairs 512] [--batch 16] [--steps 20] [--layers 4 --hidden 256]

Data: examples/post_train_cpu.py's preference set (stdlib sentences; chosen = the words in order, rejected =
reversed), preprocessed by tools/preprocess_data.py --task sft|dpo; the SFT set is the same prompts with the chosen
responses. Model: a Llama-style model (RMSNorm, SwiGLU, RoPE, untied) written by transformers, loaded by ours with
--load HF_DIR --finetune, so both sides start from the same weights. One process, fp32, AdamW, the same batch of
pairs per optimizer step (no gradient accumulation), the same number of torch threads.
- ours: finetune_gpt.py's path (megatron/training/loop.train with the SFT / DPO task), reference log-probabilities
  precomputed in the run's first pass (not timed); the step time is the median of upstream's
  elapsed_time_per_iteration_ms over the steps after --warmup.
- TRL: DPOTrainer(precompute_ref_log_probs=True) on the same jsonl pairs, its own tokenization and dynamic padding
  (ours cuts each micro-batch after its last response token); the median time from one on_step_end of a
  TrainerCallback to the next (the iteration with its batch's loading) after --warmup.
Prints the table for benchmarks/RESULTS.md: DPO / SFT step time (target <= 2.2x) and our DPO samples/s over TRL's
(target >= 1.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def parse_cli():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="pairs (SFT: examples) per optimizer step")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps of each run left out of the medians")
    p.add_argument("--rounds", type=int, default=3, help="alternating (SFT, DPO, TRL) runs, so that machine noise "
                                                         "hits all three")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    return p.parse_args()


def prepare(a, work: str) -> dict:
    from post_train_cpu import build_preference_data

    from tools import preprocess_data

    data = build_preference_data(os.path.join(work, "data"), examples=a.pairs)
    prefixes = {}
    for task in ("sft", "dpo"):
        prefix = os.path.join(work, "data", task)
        assert preprocess_data.main(["--task", task, "--input", data[task], "--output-prefix", prefix, "--quiet",
                                     *data["tokenizer_flags"]]) == 0
        prefixes[task] = prefix + "_text_document"
    from megatron.data.post_training import open_post_training_data

    longest = int(open_post_training_data(prefixes["dpo"]).sequence_lengths().max())
    data["seq"] = 8 * ((longest - 1 + 7) // 8)  # seq_length + 1 tokens hold the longest sequence
    data["prefixes"] = prefixes
    return data


def make_hf_model(a, data: dict, hf_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(data["tokenizer_dir"], "tokenizer.json"),
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=a.hidden, intermediate_size=a.ffn,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=data["seq"] + 8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def our_run(a, data: dict, task: str, hf_dir: str, work: str, first: bool) -> list:
    """The step times (s) after --warmup of one of our runs (one rank, in this process)."""
    import torch

    from megatron.cli import parse_args
    from megatron.config.post_training import split_post_training_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.post_training.tasks import build_task
    from megatron.training.loop import train

    seq = data["seq"]
    argv = ["--task", task, "--data-path", data["prefixes"][task], *data["tokenizer_flags"],
            "--load", hf_dir, "--finetune", "--num-layers", a.layers, "--hidden-size", a.hidden,
            "--num-attention-heads", a.heads, "--num-key-value-heads", a.kv_heads, "--ffn-hidden-size", a.ffn,
            "--seq-length", seq, "--max-position-embeddings", seq + 8, "--normalization", "rmsnorm", "--swiglu",
            "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--hidden-dropout", 0, "--attention-dropout", 0, "--micro-batch-size", a.batch,
            "--global-batch-size", a.batch, "--train-iters", a.steps, "--optimizer", "adamw", "--lr", "1e-5",
            "--lr-decay-style", "constant", "--split", "100,0,0", "--eval-iters", 0, "--log-interval", 1,
            "--zero-stage", 0, "--num-workers", 0, "--seed", 1234]
    if task == "dpo":  # the first round computes and stores the reference, the others read it
        argv += ["--dpo-beta", "0.1", "--ref-logps-path", os.path.join(work, "ref.pt")]
        argv += ["--recompute-ref-logps"] if first else []
    config, rest = split_post_training_args([str(x) for x in argv])
    run = parse_args(rest)
    ps = ParallelState.build(run.parallel, run.model)
    lines = []
    train(run, ps, torch.device("cpu"), printer=lines.append, task=build_task(config))
    ms = [float(m.group(1)) for line in lines for m in [re.search(r"elapsed_time_per_iteration_ms=([\d.]+)", line)]
          if m]
    return [t / 1000.0 for t in ms[a.warmup:]]


def trl_run(a, data: dict, hf_dir: str, work: str) -> list:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times = []

    class StepTimer(TrainerCallback):
        """From one step's end to the next's: the whole iteration, its batch's loading and collation included,
        as our elapsed_time_per_iteration_ms counts it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.t is not None:
                times.append(now - self.t)
            self.t = now

    records = [json.loads(line) for line in open(data["dpo"])]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    config = DPOConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                       learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, precompute_ref_log_probs=True,
                       max_length=data["seq"] + 1, report_to=[], use_cpu=True, save_strategy="no",
                       logging_steps=10 ** 6, dataloader_num_workers=0, seed=1234, disable_dropout=True,
                       optim="adamw_torch", max_grad_norm=1.0, weight_decay=0.01)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return times[max(0, a.warmup - 1):]  # the first interval starts at step 1's end


def main() -> int:
    a = parse_cli()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    from megatron.distributed.launcher import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    work = a.workdir or tempfile.mkdtemp(prefix="bench-post-training-")
    data = prepare(a, work)
    hf_dir = os.path.join(work, "hf")
    make_hf_model(a, data, hf_dir)
    times = {"sft": [], "dpo": [], "trl": []}
    for round_number in range(a.rounds):
        times["sft"] += our_run(a, data, "sft", hf_dir, work, round_number == 0)
        times["dpo"] += our_run(a, data, "dpo", hf_dir, work, round_number == 0)
        times["trl"] += trl_run(a, data, hf_dir, work)
    sft, dpo, trl = ({"step_s": statistics.median(times[k])} for k in ("sft", "dpo", "trl"))
    ours_sps, trl_sps = a.batch / dpo["step_s"], a.batch / trl["step_s"]
    print(f"\nLlama L{a.layers} h{a.hidden} ({a.heads} heads, {a.kv_heads} kv, ffn {a.ffn}), seq {data['seq']}, "
          f"{a.pairs} pairs, batch {a.batch}, {a.rounds} alternating rounds of {a.steps} steps (median of the steps "
          f"after {a.warmup} in each), torch threads {torch.get_num_threads()}\n")
    print("| run | step time (median) | samples/s | ratio |")
    print("|---|---|---|---|")
    print(f"| ours SFT (chosen responses, {a.batch} examples) | {1000 * sft['step_s']:.1f} ms | "
          f"{a.batch / sft['step_s']:.1f} | 1.00 |")
    print(f"| ours DPO ({a.batch} pairs, reference precomputed) | {1000 * dpo['step_s']:.1f} ms | {ours_sps:.1f} | "
          f"**{dpo['step_s'] / sft['step_s']:.2f}x** SFT's step time (target <= 2.2x) |")
    print(f"| TRL DPOTrainer (precompute_ref_log_probs) | {1000 * trl['step_s']:.1f} ms | {trl_sps:.1f} | "
          f"ours **{ours_sps / trl_sps:.2f}x** its samples/s (target >= 1.0x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
