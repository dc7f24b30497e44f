"""Post-training end to end on a CPU, from text every machine has (the Python standard library's docstrings):

    python examples/post_train_cpu.py [--workdir runs/post-train] [--sft-iters 200] [--dpo-iters 80]

1. sentences from the stdlib's docstrings -> sft.jsonl ({"prompt", "response"}: the first words, the rest) and
   dpo.jsonl ({"prompt", "chosen", "rejected"}: the rest in its own order is preferred to the rest with its words
   in reverse order), a byte-level BPE tokenizer trained on them (tools/train_tokenizer.py), both preprocessed
   (tools/preprocess_data.py --task sft|dpo);
2. a tiny Llama-style model saved by transformers as a Hugging Face folder (the "HF model" a team would bring);
3. SFT from it (finetune_gpt.py --task sft --load HF_DIR --finetune), then DPO from the SFT checkpoint
   (--task dpo: the reference pass, then training), both on 2 CPU ranks under torchrun;
4. the DPO checkpoint exported to Hugging Face (tools/convert_checkpoint.py to-hf) and sampled with transformers.
A few minutes on a laptop. `build_preference_data` is also what tests/test_post_training.py trains DPO on.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_WORDS = 3


def stdlib_sentences(limit: int, seed: int = 0, min_words: int = 7, max_words: int = 14) -> list[str]:
    """Up to `limit` distinct plain sentences of min..max words from the stdlib's module docstrings, in a seeded
    order (the same on every machine with the same Python)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sentences = set()
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            for sentence in doc.replace("\n", " ").split(". "):
                words = sentence.strip().rstrip(".").split()
                if min_words <= len(words) <= max_words and all(w.isascii() and w.isalpha() for w in words):
                    sentences.add(" ".join(words))
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    return ordered[:limit]


def build_preference_data(out_dir: str, examples: int = 600, seed: int = 0) -> dict:
    """Write sft.jsonl and dpo.jsonl (one line per sentence) and a BPE tokenizer trained on the sentences into
    out_dir; returns their paths and the tokenizer flags."""
    sys.path.insert(0, ROOT)
    from tools.train_tokenizer import train_bpe

    os.makedirs(out_dir, exist_ok=True)
    sentences = stdlib_sentences(examples, seed)
    sft, dpo = [], []
    for sentence in sentences:
        words = sentence.split()
        prompt, rest = " ".join(words[:PROMPT_WORDS]), words[PROMPT_WORDS:]
        sft.append({"prompt": prompt, "response": " " + " ".join(rest)})
        dpo.append({"prompt": prompt, "chosen": " " + " ".join(rest), "rejected": " " + " ".join(rest[::-1])})
    paths = {"sft": os.path.join(out_dir, "sft.jsonl"), "dpo": os.path.join(out_dir, "dpo.jsonl")}
    for task, records in (("sft", sft), ("dpo", dpo)):
        with open(paths[task], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    train_bpe(sentences * 2, 512, tokenizer_dir)
    paths["tokenizer_dir"] = tokenizer_dir
    paths["tokenizer_flags"] = ["--tokenizer-type", "GPT2BPETokenizer",
                                "--vocab-file", os.path.join(tokenizer_dir, "vocab.json"),
                                "--merge-file", os.path.join(tokenizer_dir, "merges.txt")]
    return paths


def preprocess(task: str, source: str, out_prefix: str, tokenizer_flags: list) -> str:
    """tools/preprocess_data.py --task; returns the prefix finetune_gpt.py's --data-path takes."""
    _run([sys.executable, "tools/preprocess_data.py", "--task", task, "--input", source, "--output-prefix",
          out_prefix, "--workers", "1", *tokenizer_flags])
    return f"{out_prefix}_text_document"


MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "ffn_hidden_size": 128, "seq_length": 64}


def model_flags(vocab_size: int) -> list[str]:
    m = MODEL
    return ["--num-layers", str(m["num_layers"]), "--hidden-size", str(m["hidden_size"]),
            "--num-attention-heads", str(m["num_attention_heads"]), "--num-key-value-heads",
            str(m["num_key_value_heads"]), "--ffn-hidden-size", str(m["ffn_hidden_size"]),
            "--seq-length", str(m["seq_length"]), "--max-position-embeddings", str(m["seq_length"]),
            "--normalization", "rmsnorm", "--swiglu", "--position-embedding-type", "rope",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--hidden-dropout", "0", "--attention-dropout", "0"]


def make_hf_model(hf_dir: str, tokenizer_dir: str) -> None:
    """A tiny randomly initialised LlamaForCausalLM with the tokenizer, as transformers saves one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True) \
        if os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")) else None
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizer or PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                                     eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    m = MODEL
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
                         num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
                         num_key_value_heads=m["num_key_value_heads"], max_position_embeddings=m["seq_length"],
                         rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def _run(command: list, env=None) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "post-train"))
    parser.add_argument("--sft-iters", type=int, default=200)
    parser.add_argument("--dpo-iters", type=int, default=80)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    work = os.path.abspath(args.workdir)
    data = build_preference_data(os.path.join(work, "data"))
    sft_prefix = preprocess("sft", data["sft"], os.path.join(work, "data", "sft"), data["tokenizer_flags"])
    dpo_prefix = preprocess("dpo", data["dpo"], os.path.join(work, "data", "dpo"), data["tokenizer_flags"])
    hf_in = os.path.join(work, "hf-initial")
    make_hf_model(hf_in, data["tokenizer_dir"])
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_in, local_files_only=True).vocab_size
    common = model_flags(vocab) + data["tokenizer_flags"] + [
        "--micro-batch-size", "4", "--global-batch-size", "16", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "5", "--clip-grad", "1.0", "--split", "95,5,0", "--eval-interval", "20",
        "--eval-iters", "2", "--log-interval", "10", "--num-workers", "0", "--seed", "1234", "--zero-stage", "1",
        "--save-interval", "1000"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "finetune_gpt.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sft_dir, dpo_dir = os.path.join(work, "sft"), os.path.join(work, "dpo")
    _run(launch + ["--task", "sft", "--data-path", sft_prefix, "--load", hf_in, "--finetune", "--save", sft_dir,
                   "--train-iters", str(args.sft_iters), "--lr", "3e-3", "--min-lr", "3e-4", *common], env)
    _run(launch + ["--task", "dpo", "--dpo-beta", "0.1", "--data-path", dpo_prefix, "--load", sft_dir, "--finetune",
                   "--save", dpo_dir, "--train-iters", str(args.dpo_iters), "--lr", "1e-3", "--min-lr", "1e-4",
                   "--recompute-ref-logps", *common], env)
    hf_out = os.path.join(work, "hf-dpo")
    _run([sys.executable, "tools/convert_checkpoint.py", "to-hf", "--load", dpo_dir, "--out", hf_out])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_in, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_out, local_files_only=True)
    for prompt in [json.loads(line)["prompt"] for line in open(data["dpo"])][-3:]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        print(f"{prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:])!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
