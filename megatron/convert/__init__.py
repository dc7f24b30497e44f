"""Checkpoint conversion: our DeepSpeed checkpoints (any tp × pp × ZeRO) ⇄ Hugging Face, re-layout, ZeRO → fp32.

Everything meets in one layout-free form: the unsharded (tp=1) GPTModel state dict without vocabulary
padding, streamed one layer at a time (`model_layout.FullModelSource`). Readers produce it
(ds_checkpoint, hf_io), writers consume it (hf_io, ds_checkpoint.write_checkpoint); reshard.py
loads any checkpoint into a training engine of another layout, optimizer state included.
"""

from megatron.checkpoint.layout import FullModelSource, full_parameter_names, layer_prefixes

__all__ = ["FullModelSource", "full_parameter_names", "layer_prefixes"]
