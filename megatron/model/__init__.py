"""The GPT / Llama model built from megatron.core's parallel layers.

norms, rotary, attention, mlp, transformer (one layer), embedding (input + output projection),
gpt_model (GPTModel), sharding (tp layout of state dicts), pipeline (DeepSpeed PipelineModule).
The pipeline module imports DeepSpeed, so it is imported from megatron.model.pipeline on demand.
"""

from megatron.model.embedding import gather_logits
from megatron.model.gpt_model import (GPTModel, allreduce_sequence_parallel_grads, default_position_ids,
                                      register_sequence_parallel_grad_hooks)
from megatron.model.sharding import merge_state_dicts, partition_of, shard_state_dict

__all__ = [
    "GPTModel", "gather_logits", "allreduce_sequence_parallel_grads", "register_sequence_parallel_grad_hooks",
    "default_position_ids", "merge_state_dicts", "partition_of", "shard_state_dict",
]
