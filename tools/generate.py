"""Sample text from a model: our checkpoint (any layout, consolidated on this process) or a Hugging Face directory.

    python tools/generate.py --load runs/x/ckpt --prompt "Once upon a time" --max-new-tokens 40 --top-p 0.9
    python tools/generate.py --hf runs/x/hf --prompt "Once upon a time" --greedy

Greedy (--greedy or --temperature 0), or sampling with --temperature, --top-k and --top-p. The tokenizer is the
run's (saved in the checkpoint's arguments) unless --tokenizer-* flags override it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.deepspeed_compat import quiet_cpu_accelerator_probe  # noqa: E402

quiet_cpu_accelerator_probe()  # before DeepSpeed is imported: no "Setting accelerator to CPU" warning on a CPU

import torch  # noqa: E402


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits [b, V] with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def sample(next_logits, prompt_ids: list[int], max_new_tokens: int, *, greedy: bool, temperature: float,
           top_k: int, top_p: float, max_length: int, eos: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Extend `prompt_ids`; next_logits(tokens [1, s]) -> logits [1, V] of the last position."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-max_length:]], dtype=torch.long)
        logits = next_logits(window).float()
        if greedy or temperature == 0.0:
            token = int(logits.argmax(-1))
        else:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(token)
        if eos is not None and token == eos:
            break
    return ids


def load_our_model(load: str, vocab_size: int | None = None):
    """GPTModel (tp=1, eval mode) and its config from our checkpoint at any layout."""
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint (--save dir or global_step* dir), any tp × pp × ZeRO")
    src.add_argument("--hf", help="a Hugging Face model directory (loaded with transformers)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    settings = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    if args.hf:
        problem = hf_folder_error(args.hf)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.hf)
            model = AutoModelForCausalLM.from_pretrained(args.hf).eval()
        except (OSError, ValueError) as error:  # a damaged or unsupported folder: transformers' reason
            print(f"error: --hf {args.hf}: transformers cannot load it ({error}); point --hf at a folder written by "
                  "tools/convert_checkpoint.py to-hf or save_pretrained", file=sys.stderr)
            return 2
        encode, eos = tokenizer.encode, tokenizer.eos_token_id

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)
        max_length = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions

        def next_logits(tokens):
            return model(tokens).logits[:, -1, :]
    else:
        from megatron.data.tokenizers import NullTokenizer, build_tokenizer
        from megatron.errors import MegatronError

        try:
            model, config, ckpt = load_our_model(args.load, args.vocab_size)
            saved = ckpt.tokenizer_args or {}
            tok_type = args.tokenizer_type or saved.get("tokenizer_type")
            if not tok_type:
                print(f"error: {args.load} does not record its tokenizer; pass --tokenizer-type and its files",
                      file=sys.stderr)
                return 2
            tokenizer = build_tokenizer(tok_type, args.tokenizer_model or saved.get("tokenizer_model"),
                                        args.vocab_file or saved.get("vocab_file"),
                                        args.merge_file or saved.get("merge_file"), args.vocab_size or saved.get("vocab_size"))
        except MegatronError as error:  # a checkpoint or tokenizer that cannot be read: the message names it
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        if tok_type == "NullTokenizer" and tokenizer.vocab_size == config.vocab_size + 1:
            # saved with this framework's older NullTokenizer (--vocab-size V: V tokens, EOD V - 1; docs/UPSTREAM.md)
            tokenizer = NullTokenizer(config.vocab_size, eod_in_vocab_size=True)
        if tokenizer.vocab_size != config.vocab_size:
            print(f"error: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                  f"{config.vocab_size}; pass the run's tokenizer", file=sys.stderr)
            return 2
        encode, decode, eos = tokenizer.tokenize, tokenizer.detokenize, tokenizer.eod
        max_length = config.max_position_embeddings

        def next_logits(tokens):
            return model(tokens)[:, -1, : config.vocab_size]

    for prompt in args.prompt:
        ids = encode(prompt)
        out = sample(next_logits, ids, args.max_new_tokens, max_length=max_length, eos=eos, generator=generator,
                     **settings)
        print(f"--- prompt: {prompt!r}\n{decode(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
