"""Named model shapes (`--model-preset NAME`): tiny (tests), GPT-2 small, Llama-2-7B, and upstream's ALCF model
architectures (argonne-lcf/Megatron-DeepSpeed ALCF/helpers.sh `get_model_arch_*`, the MODEL_ARCH knob).

A preset fills the model flags; flags given on the command line win over it. The AuroraGPT presets hold
exactly upstream's HEADS, NLAYERS, HIDDEN, NUM_KV_HEAD, FFN_HIDDEN_SIZE and SEQ.
"""

from __future__ import annotations

import difflib

from megatron.errors import ConfigError

_LLAMA_STYLE = dict(
    normalization="rmsnorm",
    swiglu=True,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    norm_epsilon=1e-5,
)

PRESETS: dict[str, dict] = {
    # Small enough for multi-rank CPU tests: heads and kv heads divisible by tp up to 4.
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                 ffn_hidden_size=128, seq_length=64, **_LLAMA_STYLE),
    "tiny-gpt": dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64,
                     normalization="layernorm", position_embedding_type="learned_absolute"),
    "gpt2-small": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024,
                       max_position_embeddings=1024, normalization="layernorm",
                       position_embedding_type="learned_absolute"),
    "llama2-7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                      ffn_hidden_size=11008, seq_length=4096, **_LLAMA_STYLE),
    "auroragpt-7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         ffn_hidden_size=11008, seq_length=4096, **_LLAMA_STYLE),
    "auroragpt-2b": dict(num_layers=12, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                         ffn_hidden_size=11008, seq_length=8192, **_LLAMA_STYLE),
    "auroragpt-33b": dict(num_layers=78, hidden_size=8268, num_attention_heads=78, num_key_value_heads=6,
                          ffn_hidden_size=11076, seq_length=4096, **_LLAMA_STYLE),
    "auroragpt-70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                          ffn_hidden_size=28672, seq_length=8192, **_LLAMA_STYLE),
    "llama3-3b": dict(num_layers=28, hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                      ffn_hidden_size=8192, seq_length=8192, **_LLAMA_STYLE),
    "smollm3-3b": dict(num_layers=36, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                       ffn_hidden_size=11008, seq_length=8192, **_LLAMA_STYLE),
    "phi4-mini": dict(num_layers=24, hidden_size=3072, num_attention_heads=32, num_key_value_heads=8,
                      ffn_hidden_size=8192, seq_length=8192, **_LLAMA_STYLE),
}


def preset(name: str) -> dict:
    """Model-flag values of a named preset (a copy); unknown names list the known ones."""
    error = preset_error(name)
    if error:
        raise ConfigError(error)
    return dict(PRESETS[name.lower()])


def preset_error(name: str):
    """Why `name` is not a preset (naming the nearest and the known ones); None when it is one."""
    if name.lower() in PRESETS:
        return None
    close = difflib.get_close_matches(name.lower(), list(PRESETS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown --model-preset {name!r}; {hint}known presets: {', '.join(sorted(PRESETS))}"
