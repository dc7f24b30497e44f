"""Inference on our models: the engine (engine.py: a checkpoint at any tp × pp, generation by continuous batching
with a KV cache (batching.py), scoring, beam search), upstream's sampling and stop rules (generation.py) and the tokenizer side
(tokenization.py). The HTTP server and the lm-eval adapter are built on the engine.

The package sits above checkpoint/ and model/ (it loads checkpoints and runs the model) and below the entry
points; nothing under megatron/ but its own modules imports it."""

from megatron.inference.batching import Finished, Request, RunningBatch
from megatron.inference.engine import GenerationError, GenerationResult, InferenceEngine, SamplingParams

__all__ = ["InferenceEngine", "SamplingParams", "GenerationResult", "GenerationError", "RunningBatch", "Request",
           "Finished"]
