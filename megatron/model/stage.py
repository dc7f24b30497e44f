"""One pipeline stage's share of GPTModel, for inference: the layers this pp rank runs, under GPTModel's names.

    stage = GPTStage(config, ps)                       # pp rank p of ps: layers stage_layer_bounds(...)[p:p+2]
    hidden = stage(tokens_or_hidden, positions, kv_cache=cache)
    logits = stage.logits(hidden)                      # last stage only: [b, s, padded_vocab / tp]

The first stage embeds tokens, the last holds the final norm and the output projection (with tied
embeddings, a copy of the word embedding), every stage its contiguous run of layers. Parameter names are
GPTModel's (`layers.<global index>.…`), so a full state dict sharded with sharding.shard_state_dict loads
into each stage by the names it holds. With pp = 1 the single stage is the whole GPTModel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.config.model import TransformerConfig
from megatron.core.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.packed_linear import pack, packable
from megatron.distributed.parallel_state import ParallelState
from megatron.model.embedding import Embedding, OutputLayer, language_model_logits
from megatron.model.gpt_model import DEFAULT_SEED
from megatron.model.kv_cache import KVCache
from megatron.model.norms import build_norm
from megatron.model.rotary import rotary_cos_sin
from megatron.model.transformer import TransformerLayer


def stage_layer_bounds(num_layers: int, pp: int) -> list[int]:
    """First layer of each of the `pp` stages, then num_layers: as even as possible, earlier stages get the extra."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {pp} pipeline stages (1 <= pp <= num_layers)")
    per, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + per + (1 if stage < extra else 0))
    return bounds


class GPTStage(nn.Module):
    def __init__(self, config: TransformerConfig, ps: Optional[ParallelState] = None, seed: int = DEFAULT_SEED):
        super().__init__()
        ps = ps or ParallelState.single()
        if config.sequence_parallel and ps.tp_size > 1:
            raise ValueError("GPTStage runs inference without Megatron sequence parallelism; build it from a "
                             "config with sequence_parallel=False")
        self.config, self.ps = config, ps
        self.first, self.last = ps.is_pipeline_first_stage, ps.is_pipeline_last_stage
        bounds = stage_layer_bounds(config.num_layers, ps.pp_size)
        self.layer_indices = list(range(bounds[ps.pp_rank], bounds[ps.pp_rank + 1]))
        tied = not config.untie_embeddings_and_output_weights
        self.embedding = Embedding(config, ps, seed) if self.first or (self.last and tied) else None
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, ps, i, seed) for i in self.layer_indices})
        self.final_norm = build_norm(config, False) if self.last else None
        self.output_layer = OutputLayer(config, ps, seed) if self.last and not tied else None
        self.tied_packed_weight: Optional[torch.Tensor] = None  # the tied logits' packed weight (pack_weights)

    def pack_weights(self, batch_hint: int) -> int:
        """Give every linear layer (and the logits) a packed copy of its weight for CPU inference
        (core/packed_linear.py: faster GEMMs for a few rows, the weights held twice); call it after the weights
        are loaded and moved, and again if they change. Returns how many weights were packed (0 where the
        device or dtype does not allow it: the layers then run F.linear)."""
        packed = 0
        linears = [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, OutputLayer))]
        for module in linears:
            if packable(module.weight):
                module.packed_weight = pack(module.weight, batch_hint)
                packed += 1
        if self.last and self.output_layer is None and packable(self.embedding.word_embeddings.weight):
            self.tied_packed_weight = pack(self.embedding.word_embeddings.weight, batch_hint)
            packed += 1
        return packed

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """Token ids [b, s] on the first stage, the previous stage's hidden states [b, s, h] on the others;
        returns this stage's hidden states [b, s, h]. With a cache, the tokens are its next columns."""
        hidden = self.embedding(inputs, position_ids) if self.first else inputs
        rotary = None
        if self.config.position_embedding_type == "rope":
            rotary = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)
        if kv_cache is not None:
            kv_cache.begin(hidden.shape[1])
        for layer in self.layers.values():
            hidden = layer(hidden, position_ids, rotary, None, kv_cache)
        if kv_cache is not None:
            kv_cache.advance()
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This tp rank's vocabulary logits [b, s, padded_vocab / tp] (last stage only)."""
        if not self.last:
            raise ValueError("GPTStage.logits: only the last pipeline stage holds the output projection")
        hidden = self.final_norm(hidden)
        if self.output_layer is not None:
            return self.output_layer(hidden)
        return language_model_logits(hidden, self.embedding.word_embeddings.weight, self.ps.tp_group, False,
                                     self.tied_packed_weight)
