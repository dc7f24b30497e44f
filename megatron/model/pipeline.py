"""GPTModel as DeepSpeed's PipelineModule: the same layer classes as a list of pipe stages.

Pipe layers, in order (index: GPTModel parameter prefix):
    0        embedding        Embedding (a TiedLayerSpec keyed "embedding" when tied)   "embedding."
    1..L     transformer      TransformerLayer i-1                                      "layers.{i-1}."
    L+1      final norm       LayerNorm / RMSNorm                                       "final_norm."
    L+2      output           OutputLayer, or the tied embedding projecting with its   "output_layer." /
                              word embedding weight (no file of its own)                "embedding."
Activations between stages are tuples (hidden, position_ids) until the final norm (each stage computes
RoPE's cos/sin once per micro-batch from position_ids, see rotary.cached_rotary); the batch
follows DeepSpeed's convention ((tokens, position_ids), (labels, loss_mask)). With --reset-attention-mask
the inputs are (tokens, position_ids, document_ids) and the document ids travel with the activations
as a third element, from which each layer builds its document-wise attention mask.
The topology is PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp·sp): the same
rank order as ParallelState (Ulysses' sp ranks are part of DeepSpeed's "data" axis, whose
gradients are summed there as Ulysses needs).
"""

from __future__ import annotations

import re

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron.config.model import TransformerConfig
from megatron.core.cross_entropy import tiled_vocab_parallel_cross_entropy, vocab_parallel_cross_entropy
from megatron.core.random import activation_checkpoint_function
from megatron.distributed.parallel_state import ParallelState
from megatron.model.attention import document_attention_mask
from megatron.model.embedding import Embedding, OutputLayer, language_model_logits, output_projection_input
from megatron.model.gpt_model import DEFAULT_SEED
from megatron.model.norms import LayerNorm, LayerNorm1P, RMSNorm, mark_sequence_parallel
from megatron.model.rotary import cached_rotary
from megatron.model.transformer import TransformerLayer


class EmbeddingPipe(Embedding):
    def forward(self, inputs):
        tokens, position_ids, *document_ids = inputs  # document ids: only with --reset-attention-mask
        return (super().forward(tokens, position_ids), position_ids, *document_ids)


class TransformerLayerPipe(TransformerLayer):
    def forward(self, inputs):
        hidden, position_ids, *document_ids = inputs
        rotary = None
        if self.config.position_embedding_type == "rope":  # computed by this stage's first layer, then reused
            rotary = cached_rotary(position_ids, self.config.rotary_dim, self.config.rope_theta)
        mask = document_attention_mask(document_ids[0]) if document_ids else None
        return (super().forward(hidden, position_ids, rotary, mask), position_ids, *document_ids)


def _norm_pipe(base):
    class NormPipe(base):
        def __init__(self, config: TransformerConfig, sequence_parallel: bool):
            super().__init__(config.hidden_size, eps=config.norm_epsilon)
            mark_sequence_parallel(self, sequence_parallel)

        def forward(self, inputs):
            hidden = inputs[0] if isinstance(inputs, tuple) else inputs
            return super().forward(hidden)

    NormPipe.__name__ = NormPipe.__qualname__ = base.__name__ + "Pipe"
    return NormPipe


LayerNormPipe, LayerNorm1PPipe, RMSNormPipe = _norm_pipe(LayerNorm), _norm_pipe(LayerNorm1P), _norm_pipe(RMSNorm)


class OutputLayerPipe(OutputLayer):
    def forward(self, hidden):
        if self.config.tiled_logits_loss:  # the loss projects, tile by tile (MaskedMeanLoss)
            return output_projection_input(hidden, self.ps.tp_group, self.sequence_parallel)
        return super().forward(hidden)


def tied_output_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """forward_fn of the tied last stage: project with the (tied) word embedding."""
    if embedding.config.tiled_logits_loss:
        return output_projection_input(hidden, embedding.ps.tp_group, embedding.sequence_parallel)
    return language_model_logits(hidden, embedding.word_embeddings.weight, embedding.ps.tp_group,
                                 embedding.sequence_parallel)


class MaskedMeanLoss:
    """Pipe loss: vocab-parallel cross entropy averaged over tokens with loss_mask == 1.

    The loss hook: with `reduce`, targets are (labels, *rest) and the loss is reduce(per-token loss [b, s], rest)
    (a post-training task's loss: SFT's globally normalised sum, DPO's pair loss from the reference log-probs
    carried in `rest`).
    With --tiled-logits-loss the last layer hands over the hidden states instead of logits, and the loss projects
    them tile by tile with the output weight that build_pipeline_module gives it (`output_weight`)."""

    def __init__(self, config: TransformerConfig, ps: ParallelState, reduce=None):
        self.config, self.ps, self.reduce = config, ps, reduce
        self.output_weight = None  # () -> this stage's output weight, set by build_pipeline_module when tiled
        self.__name__ = "masked_mean_cross_entropy" if reduce is None else getattr(reduce, "__name__", "task_loss")

    def __call__(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels, *rest = targets
        if self.config.tiled_logits_loss:  # `logits` are the hidden states entering the projection
            losses = tiled_vocab_parallel_cross_entropy(
                logits, self.output_weight(), labels, self.config.sequence_tile_length(labels.shape[0]),
                self.ps.tp_group, self.config.loss_vocab_size)
        else:
            losses = vocab_parallel_cross_entropy(logits, labels, self.ps.tp_group, self.config.loss_vocab_size)
        if self.reduce is not None:
            return self.reduce(losses, rest)
        mask = rest[0].reshape(-1).float()
        return (losses.reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)


def build_pipeline_module(config: TransformerConfig, ps: ParallelState, seed: int = DEFAULT_SEED,
                          partition_method: str = "type:TransformerLayerPipe",
                          loss_fn=None) -> PipelineModule:
    """GPTModel's layers as a PipelineModule over ps's layout (collective: call on every rank)."""
    if config.vocab_size <= 0:
        raise ValueError("TransformerConfig.vocab_size must be set (the tokenizer's vocabulary size)")
    sequence_parallel = config.sequence_parallel and ps.tp_size > 1
    specs = []
    if config.untie_embeddings_and_output_weights:
        specs.append(LayerSpec(EmbeddingPipe, config, ps, seed))
    else:
        specs.append(TiedLayerSpec("embedding", EmbeddingPipe, config, ps, seed,
                                   tied_weight_attr=["word_embeddings.weight"]))
    specs.extend(LayerSpec(TransformerLayerPipe, config, ps, i, seed) for i in range(config.num_layers))
    norm_pipe = RMSNormPipe if config.normalization == "rmsnorm" else \
        LayerNorm1PPipe if config.apply_layernorm_1p else LayerNormPipe
    specs.append(LayerSpec(norm_pipe, config, sequence_parallel))
    if config.untie_embeddings_and_output_weights:
        specs.append(LayerSpec(OutputLayerPipe, config, ps, seed))
    else:
        specs.append(TiedLayerSpec("embedding", EmbeddingPipe, config, ps, seed, forward_fn=tied_output_logits,
                                   tied_weight_attr=["word_embeddings.weight"]))
    topology = PipeModelDataParallelTopology(num_pp=ps.pp_size, num_mp=ps.tp_size,
                                             num_dp=ps.dp_size * ps.sp_size)
    interval = config.checkpoint_num_layers if config.checkpoint_activations else 0
    loss_fn = loss_fn or MaskedMeanLoss(config, ps)
    module = PipelineModule(
        layers=specs, loss_fn=loss_fn, topology=topology,
        partition_method=partition_method, activation_checkpoint_interval=interval,
        activation_checkpoint_func=activation_checkpoint_function(
            config.checkpoint_in_cpu, ps.tp_group if config.partition_activations else None),
    )
    if config.tiled_logits_loss and isinstance(loss_fn, MaskedMeanLoss):
        last = module.forward_funcs[-1] if module.forward_funcs else None
        if isinstance(last, OutputLayerPipe):
            loss_fn.output_weight = lambda: last.weight
        elif "embedding" in module.tied_modules:
            tied = module.tied_modules["embedding"]
            loss_fn.output_weight = lambda: tied.word_embeddings.weight
    return module


# ---- pipe layer index <-> GPTModel parameter names ------------------------------------------
def pipe_layer_prefix(layer_index: int, config: TransformerConfig) -> str:
    """GPTModel parameter-name prefix of the params held by pipe layer `layer_index`."""
    L = config.num_layers
    if layer_index == 0:
        return "embedding."
    if 1 <= layer_index <= L:
        return f"layers.{layer_index - 1}."
    if layer_index == L + 1:
        return "final_norm."
    if layer_index == L + 2:
        return "output_layer." if config.untie_embeddings_and_output_weights else "embedding."
    raise ValueError(f"pipe layer index {layer_index} is outside 0..{L + 2} for --num-layers {L}")


def pipe_layer_index(param_name: str, config: TransformerConfig) -> int:
    """Index of the pipe layer that owns GPTModel parameter `param_name` (tied weights: layer 0)."""
    if param_name.startswith("embedding."):
        return 0
    match = re.match(r"layers\.(\d+)\.", param_name)
    if match and int(match.group(1)) < config.num_layers:
        return int(match.group(1)) + 1
    if param_name.startswith("final_norm."):
        return config.num_layers + 1
    if param_name.startswith("output_layer.") and config.untie_embeddings_and_output_weights:
        return config.num_layers + 2
    raise KeyError(f"{param_name!r} is not a GPTModel parameter of a {config.num_layers}-layer model")


def pipe_state_dict_to_model(layer_index: int, layer_sd: dict, config: TransformerConfig) -> dict:
    """Rename one pipe layer's state dict (a `layer_XX-model_YY-model_states.pt`) to GPTModel names."""
    prefix = pipe_layer_prefix(layer_index, config)
    return {prefix + key: value for key, value in layer_sd.items()}


def model_state_dict_to_pipe(model_sd: dict, config: TransformerConfig) -> dict[int, dict]:
    """Split a GPTModel state dict into per-pipe-layer state dicts {layer index: {local name: tensor}}."""
    out: dict[int, dict] = {}
    for name, value in model_sd.items():
        index = pipe_layer_index(name, config)
        out.setdefault(index, {})[name[len(pipe_layer_prefix(index, config)):]] = value
    return out
