"""Build checkpoints the way argonne-lcf/Megatron-DeepSpeed writes them, for the reader's tests.

Their code cannot run here (apex, fused kernels), so the files are built from their documented layout. Each
fact names the file of theirs it comes from (paths relative to the argonne-lcf/Megatron-DeepSpeed repository):
- megatron/checkpointing.py save_checkpoint: client state {"args": argparse.Namespace, "checkpoint_version": 3.0,
  "iteration": N, "tokens": T} handed to DeepSpeed's engine.save_checkpoint(<save>) whose default tag is
  "global_step<N>"; DeepSpeed writes <save>/latest = "global_stepN", Megatron <save>/latest_checkpointed_iteration.txt.
- megatron/model/gpt_model.py GPTModelPipe: specs [_to_float16 (a function), EmbeddingPipe (TiedLayerSpec "embed"
  when tied, tied_weight_attr word_embeddings_weight), ParallelTransformerLayerPipe × L, LayerNorm/RMSNorm,
  LMHeadPipe (untied) or the tied embedding again with forward_fn]: pipe layer 1 is the embedding, 2..L+1 the
  transformer layers, L+2 the final norm, L+3 the head; DeepSpeed names the tied copy tied_modules.embed.*.
- megatron/model/transformer.py LMHeadPipe: self.lm_head (ColumnParallelLinear, no bias) -> "lm_head.weight".
- megatron/model/language_model.py Embedding: word_embeddings, position_embeddings; TransformerLanguageModel:
  embedding / encoder / output_layer under "language_model"; state_dict_for_save_checkpoint nests them as dicts
  (what DeepSpeed saves as "module" with --no-pipeline-parallel, megatron/checkpointing.py).
- megatron/model/transformer.py ParallelTransformerLayer: input_layernorm, self_attention.query_key_value,
  self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h; ParallelTransformer:
  layers.i, final_layernorm. ParallelMLP's swiglu chunks each rank's dense_h_to_4h output in two (gate, up).
- megatron/model/transformer.py ParallelAttention.forward: each rank's query_key_value output is viewed as
  [kv groups, heads per group + 2, head dim] and split [q..., k, v] (checkpoint_version >= 2);
  megatron/checkpointing.py fix_query_key_value_ordering/_transpose_first_dim: version 0 stored [3, heads, d]
  and 1.0 [heads, d, 3] per rank.
- megatron/arguments.py: argument dests (use_rotary_position_embeddings, rope_theta, add_position_embedding,
  layernorm_epsilon, num_key_value_heads, swiglu, untie_embeddings_and_output_weights, add_bias_linear,
  padded_vocab_size, make_vocab_size_divisible_by, consumed_train_samples).
- megatron/tokenizer/tokenizer.py _NullTokenizer: vocab_size V + 1 (end of document is id V).
Optimizer shards are DeepSpeed's (zero_pp_rank_D_mp_rank_MM_optim_states.pt, param_slice_mappings).
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import full_parameter_names
from megatron.model.sharding import shard_state_dict

LAYER_NAMES = {"input_norm.": "input_layernorm.", "attention.qkv.": "self_attention.query_key_value.",
               "attention.dense.": "self_attention.dense.", "post_attention_norm.": "post_attention_layernorm.",
               "mlp.fc1.": "mlp.dense_h_to_4h.", "mlp.fc2.": "mlp.dense_4h_to_h."}


def argonne_namespace(config: TransformerConfig, tp: int, pp: int, **extra) -> argparse.Namespace:
    c = config
    rope = c.position_embedding_type == "rope"
    values = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  kv_channels=c.head_dim, seq_length=c.seq_length, max_position_embeddings=c.max_position_embeddings,
                  use_rotary_position_embeddings=rope, rope_theta=int(c.rope_theta), rotary_percent=1.0,
                  add_position_embedding=not rope and c.position_embedding_type == "learned_absolute",
                  normalization=c.normalization, layernorm_epsilon=c.norm_epsilon, swiglu=c.swiglu,
                  untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights,
                  add_bias_linear=c.add_bias_linear, apply_layernorm_1p=False, openai_gelu=False, squared_relu=False,
                  make_vocab_size_divisible_by=c.make_vocab_size_divisible_by,
                  padded_vocab_size=c.padded_vocab_size(tp), tokenizer_type="NullTokenizer",
                  vocab_size=c.vocab_size - 1, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  no_pipeline_parallel=pp == 1, attention_dropout=c.attention_dropout, hidden_dropout=c.hidden_dropout,
                  num_experts=[1], lr=3e-4, data_path=["/lus/some/corpus"], consumed_train_samples=12,
                  consumed_train_tokens=12 * c.seq_length, iteration=3)
    values.update(extra)
    return argparse.Namespace(**values)


def their_qkv_full(ours: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Our [q | k | v] (tp=1) -> their rows: per kv group [q heads of the group | k | v] (version >= 2)."""
    d, groups = config.head_dim, config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    rest = tuple(ours.shape[1:])
    q_rows, kv_rows = config.num_attention_heads * d, groups * d
    q = ours[:q_rows].reshape((groups, per_group * d) + rest)
    k = ours[q_rows:q_rows + kv_rows].reshape((groups, d) + rest)
    v = ours[q_rows + kv_rows:].reshape((groups, d) + rest)
    return torch.cat([q, k, v], dim=1).reshape(ours.shape)


def their_qkv_shard(ours_full: torch.Tensor, config: TransformerConfig, tp: int, rank: int, version: float):
    shard = their_qkv_full(ours_full, config).chunk(tp, dim=0)[rank]  # ColumnParallelLinear: contiguous rows
    if version >= 2.0:
        return shard.clone()
    heads, d, rest = config.num_attention_heads // tp, config.head_dim, tuple(shard.shape[1:])
    per_head = shard.reshape((heads, 3, d) + rest)
    legacy = per_head.transpose(0, 1) if version == 0 else per_head.transpose(1, 2)  # [3,h,d] / [h,d,3]
    return legacy.contiguous().reshape(shard.shape)


def their_local_name(full: str, config: TransformerConfig, pipeline: bool) -> str:
    L = config.num_layers
    tied = not config.untie_embeddings_and_output_weights
    if full.startswith("layers."):
        _, i, rest = full.split(".", 2)
        for ours, theirs in LAYER_NAMES.items():
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
        return f"{int(i) + 2}.{rest}" if pipeline else f"language_model.encoder.layers.{i}.{rest}"
    if full.startswith("embedding."):
        rest = full[len("embedding."):]
        return (("tied_modules.embed." if tied else "1.") + rest) if pipeline else "language_model." + full
    if full.startswith("final_norm."):
        rest = full[len("final_norm."):]
        return f"{L + 2}.{rest}" if pipeline else "language_model.encoder.final_layernorm." + rest
    return f"{L + 3}.lm_head.weight" if pipeline else "language_model.output_layer.weight"


def their_shards(full: dict, config: TransformerConfig, tp: int, version: float) -> list[dict]:
    """Per tp rank: {our full name: their tp shard (their row order for query_key_value)}."""
    out = []
    for rank in range(tp):
        shard = shard_state_dict({k: v for k, v in full.items() if ".attention.qkv." not in k}, config, tp, rank)
        for name in full:
            if ".attention.qkv." in name:
                shard[name] = their_qkv_shard(full[name], config, tp, rank, version)
        out.append(shard)
    return out


def random_state(config: TransformerConfig, seed: int) -> dict:
    """{full name: {"fp32", "exp_avg", "exp_avg_sq"}} with random values (exp_avg_sq > 0)."""
    from megatron.checkpoint.layout import expected_shapes, layer_prefixes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in layer_prefixes(config):
        for name, shape in expected_shapes(config, prefix).items():
            out[name] = {"fp32": torch.randn(shape, generator=g) * 0.05,
                         "exp_avg": torch.randn(shape, generator=g) * 1e-3,
                         "exp_avg_sq": torch.rand(shape, generator=g) * 1e-5 + 1e-8}
    return out


def stage_layers(config: TransformerConfig, pp: int) -> list[range]:
    """Their pipe layer indices per stage: transformer layers split evenly (partition_method type:transformer)."""
    L = config.num_layers
    per = L // pp
    bounds = [0] + [2 + per * s for s in range(1, pp)] + [L + 4]
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


# Their OptimizerParamScheduler.state_dict() (megatron/optimizer_param_scheduler.py) after 3 iterations of
# convert_ranks.COMMON's schedule (--lr 3e-3 --min-lr 3e-4 cosine, warmup 2 and 8 iterations of a global batch of
# 4; their lengths count samples: megatron/training.py get_optimizer_param_scheduler)
UPSTREAM_SCHEDULER = {"max_lr": 3e-3, "lr_warmup_steps": 8, "lr_warmup_tokens": None, "num_steps": 12,
                      "num_tokens": 12 * 16, "lr_decay_style": "cosine", "lr_decay_steps": 32,
                      "lr_decay_tokens": None, "min_lr": 3e-4, "start_wd": 0.01, "end_wd": 0.01,
                      "wd_incr_style": "constant", "wd_incr_steps": 32}


def write_argonne_checkpoint(state: dict, config: TransformerConfig, save_dir: str, *, tp: int, pp: int,
                             pipeline: bool, version: float = 3.0, iteration: int = 3, step: int = 3,
                             optimizer: bool = True, module_dtype=torch.bfloat16) -> str:
    """Write `state` (random_state's form) as their run at tp × pp, ZeRO-1 with one data-parallel rank."""
    from deepspeed.utils.tensor_fragment import fragment_address

    tag = f"global_step{iteration}"
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir)
    names = full_parameter_names(config)
    per_key = {key: their_shards({n: state[n][key] for n in names}, config, tp, version)
               for key in ("fp32", "exp_avg", "exp_avg_sq")}
    tied = not config.untie_embeddings_and_output_weights
    ns = argonne_namespace(config, tp, pp, global_batch_size=4)  # convert_ranks.COMMON's
    stages = stage_layers(config, pp) if pipeline else [None]
    for s, layers in enumerate(stages):
        for t in range(tp):
            mp = s * tp + t
            if pipeline:
                held = [n for n in names if _their_index(n, config) in layers
                        or (tied and n.startswith("embedding.") and config.num_layers + 3 in layers)]
            else:
                held = names
            local = {their_local_name(n, config, pipeline): n for n in held}
            shapes = {ln: per_key["fp32"][t][n].shape for ln, n in local.items()}
            module = None
            if pipeline:
                for index in layers:
                    # a layer file holds the layer module's own state dict (no index, no tied_modules prefix)
                    layer = {_inner_name(n, config): per_key["fp32"][t][n].to(module_dtype)
                             for n in held if _their_index(n, config) == index}
                    if layer:
                        torch.save(layer, os.path.join(tag_dir, f"layer_{index:02d}-model_{t:02d}-model_states.pt"))
            else:
                module = _nested_module({ln: per_key["fp32"][t][n].to(module_dtype) for ln, n in local.items()})
            client = {"module": module, "args": ns, "checkpoint_version": version, "iteration": iteration,
                      "tokens": 12 * config.seq_length, "global_steps": iteration, "global_samples": 12,
                      "skipped_steps": 0, "dp_world_size": 1, "mp_world_size": tp * pp,
                      "param_shapes": [shapes] if optimizer else None,
                      "ds_config": {"zero_optimization": {"stage": 1 if optimizer else 0}},
                      "lr_scheduler": dict(UPSTREAM_SCHEDULER)}
            torch.save(client, os.path.join(tag_dir, f"mp_rank_{mp:02d}_model_states.pt"))
            if optimizer:
                flats, mapping, offset = {k: [] for k in per_key}, {}, 0
                for ln, n in local.items():
                    numel = per_key["fp32"][t][n].numel()
                    mapping[ln] = fragment_address(numel=numel, start=offset)
                    offset += numel
                    for key in per_key:
                        flats[key].append(per_key[key][t][n].reshape(-1))
                flat = {k: torch.cat(v) for k, v in flats.items()}
                osd = {"param_slice_mappings": [mapping], "single_partition_of_fp32_groups": [flat["fp32"]],
                       "base_optimizer_state": {"state": {0: {"step": torch.tensor(float(step)),
                                                              "exp_avg": flat["exp_avg"],
                                                              "exp_avg_sq": flat["exp_avg_sq"]}},
                                                "param_groups": [{"lr": 3e-4, "params": [0]}]},
                       "zero_stage": 1, "partition_count": 1, "ds_version": "0.14.0"}
                torch.save({"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.14.0"},
                           os.path.join(tag_dir, f"zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt"))
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return tag_dir


def _their_index(full: str, config: TransformerConfig) -> int:
    L = config.num_layers
    if full.startswith("embedding."):
        return 1
    if full.startswith("layers."):
        return int(full.split(".")[1]) + 2
    return L + 2 if full.startswith("final_norm.") else L + 3


def _inner_name(full: str, config: TransformerConfig) -> str:
    if full.startswith("embedding."):
        return full[len("embedding."):]
    return their_local_name(full, config, True).split(".", 1)[1]


def _nested_module(flat: dict) -> dict:
    """GPTModel.state_dict_for_save_checkpoint's nesting: language_model -> embedding/encoder/output_layer."""
    lm = {"embedding": {}, "encoder": {}, "moe_state_dict": {}}
    for name, tensor in flat.items():
        rest = name[len("language_model."):]
        part, key = rest.split(".", 1)
        if part == "embedding":
            module, param = key.split(".", 1)
            lm["embedding"].setdefault(module, {})[param] = tensor
        elif part == "encoder":
            lm["encoder"][key] = tensor
        else:
            lm.setdefault("output_layer", {})[key] = tensor
    return {"language_model": lm}


class TruthSource:
    """The states an argonne checkpoint was built from, with DeepSpeedCheckpoint's reading interface: the
    reference that --load of the argonne files must reproduce."""

    def __init__(self, path: str, config: TransformerConfig, step: int = 3):
        self.state, self.config, self.step = torch.load(path), config, step
        self.tag_dir, self.args = path, {}
        self.client_state = {"iteration": 3, "consumed_samples": 12, "consumed_tokens": 12 * config.seq_length,
                             "global_steps": 3, "global_samples": 12, "skipped_steps": 0}

    def full_optimizer_tensor(self, name: str, key: str) -> torch.Tensor:
        return self.state[name][key].clone()

    def optimizer_step(self) -> int:
        return self.step

    def lr_scheduler_state(self):
        return None

