"""Write our weights in argonne-lcf/Megatron-DeepSpeed's layout (GPTModelPipe layer files, their Namespace,
checkpoint_version 3.0), so a checkpoint trained here can be finetuned there (--finetune / --no-load-optim);
megatron/checkpoint/argonne.py reads theirs.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Optional

import torch

from megatron import deepspeed_compat as compat
from megatron.checkpoint.argonne import argonne_pipe_layer
from megatron.checkpoint.layout import ConversionError, FullModelSource
from megatron.config.model import TransformerConfig


def ours_qkv_shard_to_argonne(t: torch.Tensor, config: TransformerConfig, tp: int) -> torch.Tensor:
    """One tp rank's attention.qkv in our order ([q | k | v] of its heads) -> theirs (per group [q.. | k | v])."""
    d = config.head_dim
    groups = config.num_key_value_heads // tp
    per_group = config.num_attention_heads // config.num_key_value_heads
    rest = tuple(t.shape[1:])
    q_rows, kv_rows = groups * per_group * d, groups * d
    q = t[:q_rows].reshape((groups, per_group * d) + rest)
    k = t[q_rows:q_rows + kv_rows].reshape((groups, d) + rest)
    v = t[q_rows + kv_rows:].reshape((groups, d) + rest)
    return torch.cat([q, k, v], dim=1).reshape(t.shape).contiguous()


def argonne_namespace(config: TransformerConfig, tp: int, pp: int, tokenizer_args: Optional[dict],
                      iteration: int = 0) -> argparse.Namespace:
    """The arguments their loader reads back (megatron/checkpointing.py load_args_from_checkpoint,
    check_checkpoint_args) for a run of `config` at tp × pp."""
    c = config
    rope = c.position_embedding_type == "rope"
    tok = dict(tokenizer_args or {})
    tokenizer_type = tok.get("tokenizer_type") or "NullTokenizer"
    vocab_arg = c.vocab_size - 1 if tokenizer_type == "NullTokenizer" else tok.get("vocab_size")
    return argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, kv_channels=c.head_dim,
        seq_length=c.seq_length, encoder_seq_length=c.seq_length, max_position_embeddings=c.max_position_embeddings,
        use_rotary_position_embeddings=rope, rotary_percent=c.rotary_percent,
        rope_theta=int(c.rope_theta) if float(c.rope_theta).is_integer() else c.rope_theta,
        add_position_embedding=c.position_embedding_type == "learned_absolute", normalization=c.normalization,
        layernorm_epsilon=c.norm_epsilon, swiglu=c.swiglu, apply_layernorm_1p=c.apply_layernorm_1p,
        squared_relu=c.squared_relu, fp32_residual_connection=c.fp32_residual_connection,
        init_method_xavier_uniform=c.init_method == "xavier_uniform",
        # their GeLU (a plain GeLU MLP only: their --openai-gelu is checked before --swiglu and would override it):
        # --openai-gelu is tanh; without it the fused bias-GeLU (tanh) unless the fusion is off (erf)
        openai_gelu=not (c.swiglu or c.squared_relu) and c.gelu_approximation == "tanh",
        bias_gelu_fusion=c.gelu_approximation == "tanh",
        untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights,
        add_bias_linear=c.add_bias_linear, make_vocab_size_divisible_by=c.make_vocab_size_divisible_by,
        padded_vocab_size=c.padded_vocab_size(tp), tokenizer_type=tokenizer_type,
        tokenizer_model=tok.get("tokenizer_model"), vocab_file=tok.get("vocab_file"),
        merge_file=tok.get("merge_file"), vocab_size=vocab_arg, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, no_pipeline_parallel=False, attention_dropout=c.attention_dropout,
        hidden_dropout=c.hidden_dropout, init_method_std=c.init_method_std, num_experts=[1], iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0, consumed_train_tokens=0, data_parallel_random_init=False)


def write_argonne_checkpoint(source: FullModelSource, save_dir: str, tp: int = 1, pp: int = 1, *,
                             dtype: torch.dtype = torch.float32, iteration: int = 0) -> str:
    """Write `source` the way argonne-lcf/Megatron-DeepSpeed's GPTModelPipe saves (weights only: resume there
    with --finetune or --no-load-optim). Layer files layer_XX-model_TT (their indices), one client-state file
    per model-parallel rank with their Namespace and checkpoint_version 3.0, tag global_stepN, both pointers."""
    import deepspeed

    from megatron.checkpoint.format import publish_directory, write_pointers
    from megatron.model.sharding import shard_state_dict

    config = source.config
    if config.num_key_value_heads % tp or config.num_attention_heads % tp:
        raise ConversionError(f"cannot write tp {tp}: the heads ({config.num_attention_heads} query, "
                              f"{config.num_key_value_heads} key/value) do not split evenly")
    if config.num_layers < pp:
        raise ConversionError(f"cannot write pp {pp} stages for {config.num_layers} layers")
    tag = compat.global_step_tag(iteration)
    final_dir = os.path.join(save_dir, tag)
    if os.path.exists(final_dir):
        raise ConversionError(f"{final_dir} already exists; choose another --save directory")
    tmp_dir = os.path.join(save_dir, ".tmp-" + tag)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    # their loss trains the vocabulary's padding rows: the source's own (trained ones from a run with
    # --loss-over-padded-vocab or from upstream) travel with the weights; the Hugging Face export drops them
    source.keep_vocab_padding = True
    padded_config = config.replace(loss_over_padded_vocab=True)
    for _, tensors in source.iter_groups():
        for t in range(tp):
            try:
                shard = shard_state_dict(tensors, padded_config, tp, t)
            except ValueError as error:
                raise ConversionError(str(error)) from None
            by_layer: dict[int, dict] = {}
            for name, value in shard.items():
                if ".attention.qkv." in name:
                    value = ours_qkv_shard_to_argonne(value, config, tp)
                index, inner = argonne_pipe_layer(name, config)
                by_layer.setdefault(index, {})[inner] = value.to(dtype).contiguous()
            for index, layer in by_layer.items():
                torch.save(layer, os.path.join(tmp_dir, compat.layer_states_name(index, t)))
    ns = argonne_namespace(config, tp, pp, source.tokenizer_args, iteration)
    for mp in range(tp * pp):
        torch.save({"module": None, "buffer_names": [], "optimizer": None, "param_shapes": None,
                    "lr_scheduler": None, "global_steps": iteration, "global_samples": 0, "skipped_steps": 0,
                    "dp_world_size": 1, "mp_world_size": tp * pp, "ds_config": {}, "ds_version": deepspeed.__version__,
                    "args": ns, "checkpoint_version": 3.0, "iteration": iteration, "tokens": 0},
                   os.path.join(tmp_dir, compat.model_states_name(mp)))
    publish_directory(tmp_dir, final_dir)
    write_pointers(save_dir, iteration, tag)
    return final_dir
