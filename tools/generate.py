"""Generate text from a checkpoint with the inference engine (megatron/inference: KV cache, one batch).

    python tools/generate.py --load runs/x/ckpt --prompt "Once upon a time" --max-new-tokens 40 --top-p 0.9
    python tools/generate.py --hf runs/x/hf --prompt "Once upon a time" --greedy
    torchrun --nproc-per-node 2 tools/generate.py --load runs/x/ckpt --tp 2 --prompt "Hello" --greedy

--load takes our checkpoints (any tp × pp × ZeRO, resharded to --tp/--pp), universal folders and argonne
checkpoints; --hf a Hugging Face Llama/GPT-2 folder. Greedy (--greedy or --temperature 0), or sampling with
--temperature and --top-k or --top-p (upstream's filters; each prompt's draws come from --seed). All prompts
run as one batch. The tokenizer is the run's (saved in the checkpoint's arguments; the folder's own for --hf)
unless --tokenizer-* flags override it. Under torchrun/mpiexec every rank runs its share and rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.deepspeed_compat import quiet_cpu_accelerator_probe  # noqa: E402

quiet_cpu_accelerator_probe()  # before DeepSpeed is imported: no "Setting accelerator to CPU" warning on a CPU

import torch  # noqa: E402

from megatron.inference.generation import filter_logits  # noqa: E402,F401  (upstream's filters, re-exported)


def load_our_model(load: str, vocab_size: int | None = None):
    """GPTModel (tp=1, eval mode) and its config from our checkpoint at any layout (for full-recompute checks)."""
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.model import GPTModel, shard_state_dict

    ckpt = DeepSpeedCheckpoint(load, vocab_size=vocab_size)
    config = ckpt.config.replace(attention_dropout=0.0, hidden_dropout=0.0)
    model = GPTModel(config)
    model.load_state_dict(shard_state_dict(ckpt.state_dict(), config, 1, 0), strict=True)
    return model.eval(), config, ckpt


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def hf_folder_error(path: str):
    """Why `path` is not a Hugging Face model folder with a tokenizer (naming it and the fix); None when it is.
    Checked here: given a missing path, transformers takes it for a Hub repo id, and a folder without tokenizer
    files ends in a misleading 'install sentencepiece'."""
    fix = "point --hf at a folder written by tools/convert_checkpoint.py to-hf (or save_pretrained)"
    if not os.path.isdir(path):
        return f"--hf {path}: no such directory; {fix}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"--hf {path}: no config.json there, so it is not a Hugging Face model folder; {fix}"
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
        return (f"--hf {path}: no tokenizer files there ({', '.join(HF_TOKENIZER_FILES)}); export with "
                "tokenizer files (to-hf without --no-tokenizer, from a run that recorded its tokenizer) or copy "
                "them into the folder")
    return None


def _params(args):
    from megatron.inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy or args.temperature == 0.0,
                          temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                          top_p=0.0 if args.top_p >= 1.0 else args.top_p, seed=args.seed,
                          stop_on_eol=args.stop_on_eol, stop_on_double_eol=args.stop_on_double_eol,
                          prevent_newline_after_colon=args.prevent_newline_after_colon, ignore_eos=args.ignore_eos)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint (--save dir or global_step* dir, any tp × pp × ZeRO), a "
                                    "universal folder or an argonne Megatron-DeepSpeed checkpoint")
    src.add_argument("--hf", help="a Hugging Face Llama / GPT-2 model directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (or 0): off; not together with --top-k")
    p.add_argument("--seed", type=int, default=1234, help="each prompt's sampling seed (reproducible)")
    p.add_argument("--add-bos", action="store_true", help="prepend the eod token to each prompt (upstream's add_BOS)")
    p.add_argument("--stop-on-eol", action="store_true")
    p.add_argument("--stop-on-double-eol", action="store_true")
    p.add_argument("--prevent-newline-after-colon", action="store_true")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (launch tp × pp ranks with torchrun or "
                                                       "mpiexec); default: the checkpoint's layout if it fits, else 1")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    args = p.parse_args(argv)
    from megatron.distributed import destroy_distributed
    from megatron.distributed.refusal import run_entry_point

    started_before = torch.distributed.is_initialized()
    try:
        return run_entry_point("generate.py", lambda: generate_text(args))  # a refusal is said before the teardown
    finally:
        if not started_before:
            destroy_distributed()


def generate_text(args) -> int:
    """Load, generate, print on rank 0; a refusal raises (MegatronError)."""
    from megatron.distributed import initialize_distributed
    from megatron.distributed.launcher import discover
    from megatron.errors import CheckpointError, ConfigError, MegatronError
    from megatron.inference import InferenceEngine
    from megatron.inference.tokenization import tokenize_prompt

    if args.top_k > 1 and 0.0 < args.top_p < 1.0:
        raise ConfigError("--top-k and --top-p cannot both be set (upstream's sampling takes one); drop one")
    if args.hf:
        problem = hf_folder_error(args.hf)
        if problem:
            raise ConfigError(problem)
    device = None
    if discover().world_size > 1 and not torch.distributed.is_initialized():
        device = initialize_distributed(use_deepspeed=False).device
    tokenizer_args = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                      "vocab_file": args.vocab_file, "merge_file": args.merge_file, "vocab_size": args.vocab_size}
    try:
        engine = InferenceEngine.from_checkpoint(args.load or args.hf, tp=args.tp, pp=args.pp,
                                                 tokenizer_args=tokenizer_args, device=device,
                                                 max_batch_size=max(1, len(args.prompt)))
    except (OSError, ValueError) as error:  # a damaged or unsupported folder: the reader's reason
        if isinstance(error, MegatronError):
            raise
        raise CheckpointError(f"{args.load or args.hf}: cannot load it ({error}); point --load/--hf at a "
                              "checkpoint or a folder written by tools/convert_checkpoint.py to-hf") from None
    tokenizer = engine.tokenizer
    if tokenizer.vocab_size > engine.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                          f"{engine.vocab_size}; pass the run's tokenizer")
    prompts = [tokenize_prompt(tokenizer, text, args.add_bos) for text in args.prompt]
    params = _params(args)
    results = engine.generate(prompts, [params] * len(prompts))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    for text, result in zip(args.prompt, results):
        print(f"--- prompt: {text!r}\n{tokenizer.detokenize(result.tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
