"""Hugging Face directories: export a FullModelSource to one (streamed, sharded safetensors).

    export_to_hf(source, "out/hf", dtype=torch.float32)      # config.json, model*.safetensors, tokenizer

Reading one back is megatron/checkpoint/hf.py (HFModelSource), with the other checkpoint readers.

The writer keeps at most one shard (max_shard_bytes) plus one layer in memory; the directory is
assembled under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from tqdm import tqdm

from megatron.config.model import TransformerConfig
from megatron.checkpoint.hf import ARCHITECTURES
from megatron.checkpoint import hf_gpt2, hf_llama
from megatron.checkpoint.layout import ConversionError, FullModelSource, layer_prefixes
from megatron.fileio import replace_atomically

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_size(text) -> int:
    """'5GB', '500MB', '2e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def pick_architecture(config: TransformerConfig, requested: Optional[str] = None):
    """hf_llama or hf_gpt2 for this config; an error listing what the target cannot express."""
    if requested:
        if requested not in ARCHITECTURES:
            raise ConversionError(f"--hf-architecture {requested!r} is not one of {sorted(ARCHITECTURES)}")
        arch = ARCHITECTURES[requested]
    else:
        arch = hf_llama if config.normalization == "rmsnorm" or config.swiglu else hf_gpt2
    errors = arch.inexpressible(config)
    if errors:
        raise ConversionError(f"the model cannot be exported as {arch.ARCHITECTURE}: " + "; ".join(errors))
    return arch


# ---- writing ----------------------------------------------------------------------------------------------

class ShardedSafetensorsWriter:
    """Collects tensors into shards of at most `max_shard_bytes`, writing each shard as soon as it is full."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, os.path.join(self.directory, tmp_name), metadata={"format": "pt"})
        self.shards.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            replace_atomically(os.path.join(self.directory, self.shards[0][0]), os.path.join(self.directory, "model.safetensors"))
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, tensor_names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            replace_atomically(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
            weight_map.update({t: final for t in tensor_names})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return names


def save_tokenizer(source: FullModelSource, directory: str) -> list[str]:
    """The run's tokenizer as Hugging Face files, when the source knows it; [] otherwise."""
    if source.hf_tokenizer_dir:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source.hf_tokenizer_dir)
        except (OSError, ValueError):
            return []
        tok.save_pretrained(directory)
        return sorted(os.listdir(directory))
    args = source.tokenizer_args
    if not args or args.get("tokenizer_type") in (None, "NullTokenizer"):
        return []
    from megatron.data.tokenizers import build_tokenizer

    tok = build_tokenizer(args["tokenizer_type"], args.get("tokenizer_model"), args.get("vocab_file"),
                          args.get("merge_file"), args.get("vocab_size"))
    if tok.vocab_size != source.config.vocab_size:
        raise ConversionError(
            f"the run's tokenizer ({args['tokenizer_type']}) has {tok.vocab_size} tokens but the checkpoint's "
            f"vocabulary has {source.config.vocab_size}; pass the tokenizer the run was trained with")
    return tok.save_pretrained_files(directory)


def export_to_hf(source: FullModelSource, out_dir: str, *, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = 5 * 10**9, architecture: Optional[str] = None,
                 save_tokenizer_files: bool = True, progress: bool = True) -> dict:
    """Write `source` as a Hugging Face model directory; returns a summary (architecture, files)."""
    arch = pick_architecture(source.config, architecture)
    source.keep_vocab_padding = False  # Hugging Face models have the real vocabulary's rows only
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output directory {out_dir} exists and is not empty; choose a new one or empty it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-hf-", dir=parent)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        groups = source.iter_groups()
        for prefix, tensors in tqdm(groups, total=len(layer_prefixes(source.config)), desc="export to HF",
                                    unit="layer", disable=not progress):
            for name, tensor in arch.to_hf(prefix, tensors, source.config).items():
                writer.add(name, tensor.to(dtype))
            del tensors
        files = writer.finish()
        arch.hf_config(source.config, dtype).save_pretrained(tmp)
        tokenizer_files = save_tokenizer(source, tmp) if save_tokenizer_files else []
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        replace_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": arch.ARCHITECTURE, "weights": files, "tokenizer": tokenizer_files}
