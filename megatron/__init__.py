"""A Megatron-DeepSpeed-style framework for pretraining GPT and Llama-style models.

Layers, top to bottom (imports point down): training/ -> model/, data/ -> core/ -> dist/ -> config/.
See README.md and docs/ARCHITECTURE.md for the picture.
"""

__version__ = "0.1.0"
