"""Our GPT-2-style GPTModel ⇄ Hugging Face `GPT2LMHeadModel`: config and per-layer tensor mapping.

HF GPT-2 uses Conv1D (weights stored [in, out], i.e. transposed), a fused c_attn whose output is
[q | k | v] (the same order as our tp=1 qkv), learned positions, GeLU ("gelu_new" is the tanh approximation,
"gelu" the exact erf form: our gelu_approximation "tanh" / "none"),
LayerNorm with biases, biases on every linear, and always ties lm_head to wte.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import ConversionError

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"

# our TransformerConfig.gelu_approximation -> transformers' activation_function (and back, with its alias)
GELU_NAMES = {"tanh": "gelu_new", "none": "gelu"}
GELU_FROM_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

_NORMS = (("input_norm", "ln_1"), ("post_attention_norm", "ln_2"))
_CONV1D = (("attention.qkv", "attn.c_attn"), ("attention.dense", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"),
           ("mlp.fc2", "mlp.c_proj"))


def inexpressible(config: TransformerConfig) -> list[str]:
    """Why GPT2LMHeadModel cannot hold this model (empty when it can)."""
    errors = []
    if config.apply_layernorm_1p:
        errors.append("LayerNorm weights are zero-centred (--apply-layernorm-1p); transformers stores the gain itself")
    if config.squared_relu:
        errors.append("the MLP activation is squared ReLU (--squared-relu)")
    if config.normalization != "layernorm":
        errors.append(f"normalization is {config.normalization!r}; GPT-2 uses LayerNorm")
    if config.swiglu:
        errors.append("the MLP is SwiGLU; GPT-2 uses GeLU")
    if config.position_embedding_type != "learned_absolute":
        errors.append(f"position embeddings are {config.position_embedding_type!r}; GPT-2 learns absolute positions")
    if config.untie_embeddings_and_output_weights:
        errors.append("embeddings are untied (--untie-embeddings-and-output-weights); GPT-2 ties lm_head to wte")
    if not config.add_bias_linear:
        errors.append("linear layers have no bias (--disable-bias-linear); GPT-2 has biases everywhere")
    if config.num_key_value_heads != config.num_attention_heads:
        errors.append(f"GQA ({config.num_key_value_heads} kv heads for {config.num_attention_heads} heads); "
                      "GPT-2 is multi-head attention")
    return errors


def hf_config(config: TransformerConfig, dtype: torch.dtype):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
        activation_function=GELU_NAMES[config.gelu_approximation], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=config.norm_epsilon, initializer_range=config.init_method_std,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=True, architectures=[ARCHITECTURE], dtype=dtype, bos_token_id=None, eos_token_id=None,
    )


def config_from_hf(hf, source: str, make_vocab_size_divisible_by: int = 128) -> TransformerConfig:
    errors = []
    if hf.activation_function not in GELU_FROM_HF:
        errors.append(f"activation_function {hf.activation_function!r} (ours is GeLU: one of {sorted(GELU_FROM_HF)})")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        errors.append("scale_attn_by_inverse_layer_idx")
    if not getattr(hf, "scale_attn_weights", True):
        errors.append("scale_attn_weights=False")
    if getattr(hf, "tie_word_embeddings", True) is False:
        errors.append("untied lm_head")
    if errors:
        raise ConversionError(f"{source}: this GPT-2 model cannot be expressed by our GPTModel: " + "; ".join(errors))
    return TransformerConfig(
        num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, seq_length=hf.n_positions,
        max_position_embeddings=hf.n_positions, vocab_size=hf.vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, normalization="layernorm",
        norm_epsilon=hf.layer_norm_epsilon, swiglu=False, position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=False, add_bias_linear=True, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=hf.initializer_range, gelu_approximation=GELU_FROM_HF[hf.activation_function],
    )


def to_hf(prefix: str, tensors: dict, config: TransformerConfig) -> dict[str, torch.Tensor]:
    if prefix == "embedding.":
        return {"transformer.wte.weight": tensors["embedding.word_embeddings.weight"],
                "transformer.wpe.weight": tensors["embedding.position_embeddings.weight"]}
    if prefix == "final_norm.":
        return {"transformer.ln_f.weight": tensors["final_norm.weight"], "transformer.ln_f.bias": tensors["final_norm.bias"]}
    i = int(prefix.split(".")[1])
    hf = f"transformer.h.{i}."
    out = {}
    for ours, theirs in _NORMS:
        for kind in ("weight", "bias"):
            out[f"{hf}{theirs}.{kind}"] = tensors[f"{prefix}{ours}.{kind}"]
    for ours, theirs in _CONV1D:
        out[f"{hf}{theirs}.weight"] = tensors[f"{prefix}{ours}.weight"].t().contiguous()
        out[f"{hf}{theirs}.bias"] = tensors[f"{prefix}{ours}.bias"]
    return out


def from_hf(prefix: str, get: Callable[[str], torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    if prefix == "embedding.":
        return {"embedding.word_embeddings.weight": get("transformer.wte.weight"),
                "embedding.position_embeddings.weight": get("transformer.wpe.weight")}
    if prefix == "final_norm.":
        return {"final_norm.weight": get("transformer.ln_f.weight"), "final_norm.bias": get("transformer.ln_f.bias")}
    i = int(prefix.split(".")[1])
    hf = f"transformer.h.{i}."
    out = {}
    for ours, theirs in _NORMS:
        for kind in ("weight", "bias"):
            out[f"{prefix}{ours}.{kind}"] = get(f"{hf}{theirs}.{kind}")
    for ours, theirs in _CONV1D:
        out[f"{prefix}{ours}.weight"] = get(f"{hf}{theirs}.weight").t().contiguous()
        out[f"{prefix}{ours}.bias"] = get(f"{hf}{theirs}.bias")
    return out
