"""Our Llama-style GPTModel ⇄ Hugging Face `LlamaForCausalLM`: config and per-layer tensor mapping.

Ours fuses q/k/v as [all q | all k | all v] and SwiGLU as [gate | up] (tp=1 layout); HF keeps
q_proj/k_proj/v_proj and gate_proj/up_proj apart. Both use the rotate-half RoPE convention, so q/k
weights are not permuted. Norms: input_norm → input_layernorm, post_attention_norm →
post_attention_layernorm, final_norm → model.norm.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import ConversionError

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def inexpressible(config: TransformerConfig) -> list[str]:
    """Why LlamaForCausalLM cannot hold this model (empty when it can)."""
    errors = []
    if config.apply_layernorm_1p:
        errors.append("LayerNorm weights are zero-centred (--apply-layernorm-1p); transformers stores the gain itself")
    if config.squared_relu:
        errors.append("the MLP activation is squared ReLU (--squared-relu)")
    if config.normalization != "rmsnorm":
        errors.append(f"normalization is {config.normalization!r}; Llama uses RMSNorm (--normalization rmsnorm)")
    if not config.swiglu:
        errors.append("the MLP is GeLU; Llama uses SwiGLU (--swiglu)")
    if config.position_embedding_type != "rope":
        errors.append(f"position embeddings are {config.position_embedding_type!r}; Llama uses RoPE")
    elif config.rotary_percent < 1.0:
        errors.append(f"RoPE rotates {config.rotary_dim} of {config.head_dim} head dims (--rotary-percent "
                      f"{config.rotary_percent}); LlamaForCausalLM rotates whole heads (transformers ignores a "
                      "partial_rotary_factor in its default RoPE)")
    return errors


def hf_config(config: TransformerConfig, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_epsilon,
        rope_theta=config.rope_theta, tie_word_embeddings=not config.untie_embeddings_and_output_weights,
        attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear, hidden_act="silu",
        initializer_range=config.init_method_std, architectures=[ARCHITECTURE], dtype=dtype,
        bos_token_id=None, eos_token_id=None,
    )


def config_from_hf(hf, source: str, make_vocab_size_divisible_by: int = 128) -> TransformerConfig:
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    errors = []
    if rope_type != "default":
        errors.append(f"rope scaling {rope_type!r} (our model implements plain RoPE only)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        errors.append(f"hidden_act {hf.hidden_act!r} (ours is SwiGLU with SiLU)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        errors.append(f"head_dim {head_dim} × {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}")
    if bool(getattr(hf, "attention_bias", False)) != bool(getattr(hf, "mlp_bias", False)):
        errors.append("attention_bias and mlp_bias differ (ours has one --add-bias-linear switch)")
    if errors:
        raise ConversionError(f"{source}: this Llama model cannot be expressed by our GPTModel: " + "; ".join(errors))
    return TransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
        seq_length=min(hf.max_position_embeddings, 4096), max_position_embeddings=hf.max_position_embeddings,
        vocab_size=hf.vocab_size, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="rmsnorm", norm_epsilon=hf.rms_norm_eps, swiglu=True, position_embedding_type="rope",
        rope_theta=float(theta), untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
        add_bias_linear=bool(getattr(hf, "attention_bias", False)), attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=getattr(hf, "initializer_range", 0.02),
    )


def _linear_pairs(config: TransformerConfig, i: int) -> list[tuple[str, str]]:
    """(our name stem, HF name stem) of layer i's unfused tensors."""
    hf = f"model.layers.{i}."
    return [(f"layers.{i}.attention.dense", hf + "self_attn.o_proj"), (f"layers.{i}.mlp.fc2", hf + "mlp.down_proj")]


def to_hf(prefix: str, tensors: dict, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """HF tensors of one full (tp=1, unpadded) layer group."""
    out = {}
    if prefix == "embedding.":
        out["model.embed_tokens.weight"] = tensors["embedding.word_embeddings.weight"]
    elif prefix == "final_norm.":
        out["model.norm.weight"] = tensors["final_norm.weight"]
    elif prefix == "output_layer.":
        out["lm_head.weight"] = tensors["output_layer.weight"]
    else:
        i = int(prefix.split(".")[1])
        hf = f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = tensors[prefix + "input_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = tensors[prefix + "post_attention_norm.weight"]
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        f = config.ffn_hidden_size
        kinds = ("weight", "bias") if config.add_bias_linear else ("weight",)
        for kind in kinds:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"),
                                   tensors[f"{prefix}attention.qkv.{kind}"].split([q, kv, kv], dim=0)):
                out[f"{hf}self_attn.{part}.{kind}"] = piece.contiguous()
            gate, up = tensors[f"{prefix}mlp.fc1.{kind}"].split([f, f], dim=0)
            out[f"{hf}mlp.gate_proj.{kind}"], out[f"{hf}mlp.up_proj.{kind}"] = gate.contiguous(), up.contiguous()
            for ours, theirs in _linear_pairs(config, i):
                out[f"{theirs}.{kind}"] = tensors[f"{ours}.{kind}"]
    return out


def from_hf(prefix: str, get: Callable[[str], torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """One full layer group of ours from HF tensors (`get(name)` reads one HF tensor)."""
    if prefix == "embedding.":
        return {"embedding.word_embeddings.weight": get("model.embed_tokens.weight")}
    if prefix == "final_norm.":
        return {"final_norm.weight": get("model.norm.weight")}
    if prefix == "output_layer.":
        return {"output_layer.weight": get("lm_head.weight")}
    i = int(prefix.split(".")[1])
    hf = f"model.layers.{i}."
    out = {prefix + "input_norm.weight": get(hf + "input_layernorm.weight"),
           prefix + "post_attention_norm.weight": get(hf + "post_attention_layernorm.weight")}
    for kind in (("weight", "bias") if config.add_bias_linear else ("weight",)):
        out[f"{prefix}attention.qkv.{kind}"] = torch.cat(
            [get(f"{hf}self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")], dim=0)
        out[f"{prefix}mlp.fc1.{kind}"] = torch.cat(
            [get(f"{hf}mlp.gate_proj.{kind}"), get(f"{hf}mlp.up_proj.{kind}")], dim=0)
        for ours, theirs in _linear_pairs(config, i):
            out[f"{ours}.{kind}"] = get(f"{theirs}.{kind}")
    return out
