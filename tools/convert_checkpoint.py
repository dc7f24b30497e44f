"""Convert checkpoints: ours (any tp × pp × ZeRO) ⇄ Hugging Face, ours → ours at another tp × pp, ZeRO → fp32,
ours → DeepSpeed universal.

    python tools/convert_checkpoint.py to-hf        --load runs/x/ckpt --out runs/x/hf [--dtype bf16]
    python tools/convert_checkpoint.py from-hf      --hf-dir llama-dir --save runs/y/ckpt --tp 2 --pp 2
    python tools/convert_checkpoint.py reshard      --load runs/x/ckpt --save runs/z/ckpt --tp 1 --pp 4
    python tools/convert_checkpoint.py zero-to-fp32 --load runs/x/ckpt --out model_fp32.safetensors
    python tools/convert_checkpoint.py to-universal --load runs/x/ckpt [--out DIR]
    python tools/convert_checkpoint.py to-argonne   --load runs/x/ckpt --save mds/ckpt --tp 2 --pp 2

--load of to-hf, reshard and zero-to-fp32 also takes a DeepSpeed universal folder (or a directory whose
latest_universal names one) and a checkpoint of argonne-lcf/Megatron-DeepSpeed (global_stepN, its Namespace
arguments, names and QKV order are read; see megatron/checkpoint/argonne.py).

from-hf and reshard write weights-only checkpoints: continue from them with `pretrain_gpt.py --load DIR
--finetune`. To resume a run (optimizer, LR schedule, consumed samples) on another layout, point --load at
the original checkpoint: the loader reshards it (megatron/checkpoint/reshard.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.deepspeed_compat import quiet_cpu_accelerator_probe  # noqa: E402

quiet_cpu_accelerator_probe()  # before DeepSpeed is imported: no "Setting accelerator to CPU" warning on a CPU

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.convert.ds_writer import write_checkpoint  # noqa: E402
from megatron.checkpoint.hf import HFModelSource  # noqa: E402
from megatron.convert.hf_io import DTYPES, export_to_hf, parse_size  # noqa: E402
from megatron.fileio import atomic_output  # noqa: E402
from megatron.checkpoint.layout import full_parameter_names  # noqa: E402
from megatron.checkpoint.sources import open_checkpoint  # noqa: E402
from megatron.errors import MegatronError  # noqa: E402


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"--dtype {text!r} is not one of {sorted(DTYPES)}")
    return DTYPES[text]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face directory (Llama or GPT-2)")
    p.add_argument("--load", required=True, help="--save dir of the run (follows its latest pointer) or a global_step* dir")
    p.add_argument("--out", required=True, help="new Hugging Face directory")
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="fp32 (default), bf16 or fp16")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--weights", choices=("auto", "module", "fp32"), default="auto",
                   help="fp32: ZeRO/bf16 fp32 master weights; module: the model's own weights; auto: fp32 if saved")
    p.add_argument("--hf-architecture", choices=("llama", "gpt2"), default=None, help="default: from the model")
    p.add_argument("--vocab-size", type=int, default=None, help="only when the checkpoint does not record it")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the run's tokenizer files")

    p = sub.add_parser("from-hf", help="Hugging Face directory -> our checkpoint at --tp × --pp (weights only)")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", type=_dtype, default=torch.float32)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    def layout_writer(name: str, help_text: str) -> None:
        """A sub-command that reads a checkpoint and writes it at --tp × --pp."""
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--load", required=True)
        q.add_argument("--save", required=True)
        q.add_argument("--tp", type=int, default=1)
        q.add_argument("--pp", type=int, default=1)
        q.add_argument("--dtype", type=_dtype, default=torch.float32)
        q.add_argument("--weights", choices=("auto", "module", "fp32"), default="auto")

    layout_writer("reshard", "our checkpoint -> our checkpoint at another --tp × --pp (weights only)")

    p = sub.add_parser("to-universal", help="our ZeRO checkpoint -> DeepSpeed universal folder (ds_to_universal); "
                       "a whole-matrix optimizer's (muon, dshampooadamw, adam8bit, ...) written with its state "
                       "(docs/OPTIMIZERS.md)")
    p.add_argument("--load", required=True, help="--save dir of the run (follows its latest pointer) or a global_step* dir")
    p.add_argument("--out", default=None, help="default: <iter dir>_universal, with <save>/latest_universal naming it")
    p.add_argument("--workers", type=int, default=1, help="processes extracting ZeRO shards (default 1; a "
                   "whole-matrix optimizer's checkpoint is written by one process and refuses more)")

    layout_writer("to-argonne", "any checkpoint -> argonne-lcf/Megatron-DeepSpeed layout (weights only)")

    p = sub.add_parser("zero-to-fp32", help="one consolidated fp32 state dict (GPTModel names, tp=1, no padding)")
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True, help="FILE.safetensors or FILE.pt")
    return parser


def zero_to_fp32(load: str, out: str) -> int:
    """Write the fp32 master weights of every parameter, consolidated over tp, pp and ZeRO; returns the count."""
    ckpt = open_checkpoint(load)
    names = full_parameter_names(ckpt.config)
    state = {name: ckpt.full_optimizer_tensor(name, "fp32").float().contiguous()
             for name in tqdm(names, desc="consolidate fp32", unit="param")}
    with atomic_output(out) as tmp:
        if out.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    return len(state)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            source = open_checkpoint(args.load, weights=args.weights, vocab_size=args.vocab_size)
            summary = export_to_hf(source, args.out, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
                                   architecture=args.hf_architecture, save_tokenizer_files=not args.no_tokenizer)
            print(f"wrote {summary['architecture']} to {args.out}: {len(summary['weights'])} weight file(s), "
                  f"tokenizer files: {[os.path.basename(f) for f in summary['tokenizer']] or 'none (tokenizer unknown)'}")
        elif args.command == "from-hf":
            source = HFModelSource(args.hf_dir, args.make_vocab_size_divisible_by)
            path = write_checkpoint(source, args.save, args.tp, args.pp, dtype=args.dtype,
                                    args={"tokenizer_type": "HFTokenizer", "tokenizer_model": args.hf_dir}
                                    if source.hf_tokenizer_dir else None)
            print(f"wrote {path} (tp {args.tp} × pp {args.pp}); train on with --load {args.save} --finetune")
        elif args.command == "reshard":
            source = open_checkpoint(args.load, weights=args.weights)
            path = write_checkpoint(source, args.save, args.tp, args.pp, dtype=args.dtype, args=source.args)
            print(f"wrote {path} (tp {args.tp} × pp {args.pp}); train on with --load {args.save} --finetune")
        elif args.command == "to-argonne":
            from megatron.convert.to_argonne import write_argonne_checkpoint

            source = open_checkpoint(args.load, weights=args.weights)
            path = write_argonne_checkpoint(source, args.save, args.tp, args.pp, dtype=args.dtype,
                                            iteration=getattr(source, "iteration", 0))
            print(f"wrote {path} (tp {args.tp} × pp {args.pp}); Megatron-DeepSpeed continues from it with --load "
                  f"{args.save} --finetune (weights only)")
        elif args.command == "to-universal":
            from megatron.convert.to_universal import convert_to_universal

            path = convert_to_universal(args.load, args.out, workers=args.workers)
            print(f"wrote {path}; resume at any layout with --load {os.path.dirname(path)} --universal-checkpoint")
        else:
            count = zero_to_fp32(args.load, args.out)
            print(f"wrote {count} fp32 tensors to {args.out}")
    except MegatronError as err:  # ConversionError, CheckpointError, TokenizerError...: the message names the input
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
