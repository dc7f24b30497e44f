"""Read a local Hugging Face Llama or GPT-2 directory as a FullModelSource (tensors read lazily), for the
converters (from-hf) and for anything else that opens a checkpoint by what is on disk (sources.py).

    source = HFModelSource("out/hf")
    source.config                        # our TransformerConfig, from config.json
    source.load_group("layers.0.")       # full (tp=1) tensors in our names
"""

from __future__ import annotations

import json
import os

import torch

from megatron.checkpoint import hf_gpt2, hf_llama
from megatron.checkpoint.layout import ConversionError, FullModelSource, expected_shapes

ARCHITECTURES = {"llama": hf_llama, "gpt2": hf_gpt2}


class HFModelSource(FullModelSource):
    """A local Hugging Face Llama or GPT-2 directory as a FullModelSource (tensors read lazily)."""

    def __init__(self, directory: str, make_vocab_size_divisible_by: int = 128):
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ConversionError(f"{directory}: no config.json; point --hf-dir at a Hugging Face model directory")
        self.directory = directory
        self.description = f"Hugging Face model {directory}"
        self.hf_config = AutoConfig.from_pretrained(directory)
        model_type = self.hf_config.model_type
        if model_type not in ARCHITECTURES:
            raise ConversionError(f"{directory}: model_type {model_type!r} is not supported; supported: "
                                  f"{sorted(ARCHITECTURES)}")
        self.arch = ARCHITECTURES[model_type]
        self.config = self.arch.config_from_hf(self.hf_config, self.description, make_vocab_size_divisible_by)
        self.hf_tokenizer_dir = directory if _has_tokenizer_files(directory) else None
        self._handles: dict = {}
        self._locations = self._index_weights()

    def _index_weights(self) -> dict[str, str]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(d, index_name)
            if os.path.isfile(path):
                with open(path) as f:
                    return {k: os.path.join(d, v) for k, v in json.load(f)["weight_map"].items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = os.path.join(d, single)
            if os.path.isfile(path):
                return {k: path for k in self._keys_of(path)}
        raise ConversionError(f"{d}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")

    def _open(self, path: str):
        if path not in self._handles:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[path] = safe_open(path, framework="pt")
            else:
                self._handles[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[path]

    def _keys_of(self, path: str):
        handle = self._open(path)
        return list(handle.keys())

    def get(self, name: str) -> torch.Tensor:
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in self._locations:
                handle = self._open(self._locations[candidate])
                if hasattr(handle, "get_tensor"):
                    return handle.get_tensor(candidate)
                return handle[candidate]
        raise ConversionError(f"{self.description}: tensor {name!r} is missing from the weight files")

    # What --load of a Hugging Face folder needs (weights only: resume.py accepts it with --finetune).
    client_state: dict = {"converted_from": "huggingface"}
    args: dict = {}

    @property
    def tag_dir(self) -> str:
        return self.directory

    def full_optimizer_tensor(self, name: str, key: str) -> torch.Tensor:
        if key != "fp32":
            raise ConversionError(f"{self.description} holds weights only, no optimizer state {key!r}")
        return self.full_weight(name).float()

    def optimizer_step(self):
        return None

    def lr_scheduler_state(self):
        return None

    def load_group(self, prefix):
        if prefix == "output_layer." and "lm_head.weight" not in self._locations:
            raise ConversionError(f"{self.description}: untied embeddings but no lm_head.weight in the weights")
        tensors = self.arch.from_hf(prefix, self.get, self.config)
        shapes = expected_shapes(self.config, prefix)
        vocab = self.config.vocab_size
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in tensors and tensors[name].shape[0] != vocab:
                raise ConversionError(f"{self.description}: {name} has {tensors[name].shape[0]} rows but "
                                      f"config.json says vocab_size {vocab}")
        return {k: v for k, v in tensors.items() if k in shapes}


def _has_tokenizer_files(directory: str) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return any(os.path.isfile(os.path.join(directory, n)) for n in names)
