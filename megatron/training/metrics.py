"""Throughput metrics: tokens/s, samples/s, TFLOPS per device and MFU. The ONE place with the FLOPs formula.

Model FLOPs per token (a multiply-add is 2 FLOPs; h hidden, L layers, s sequence length, f ffn hidden,
d_kv = kv heads × head dim, V vocabulary as the output layer holds it, i.e. padded):

    forward per layer = 2·h·(h + 2·d_kv)     query, key and value projections (GQA: smaller k and v)
                      + 2·s·h + 2·s·h         scores QKᵀ and the weighted sum of V, over the FULL s×s matrix
                      + 2·h·h                 attention output projection
                      + 2·m·h·f               MLP, m = 3 matrices with SwiGLU (gate, up, down), 2 with GeLU
    forward           = L · (per layer) + 2·h·V   (the logits layer)
    training          = 3 × forward           (backward costs twice the forward)
                      + L · (per layer)       when activations are recomputed (--checkpoint-activations)

Attention is counted as if NOT causal (the whole s×s score matrix), as Megatron-LM and nanoGPT's 6N + 12·L·h·s
count it, so numbers compare with theirs; `causal=True` halves the two score terms instead. Norms, softmax,
rotary embeddings, biases and the loss are not counted (each is O(h) per token, under 1% at real sizes).
These are "model FLOPs": MFU = achieved model FLOPs per second per device / peak (LoggingConfig.peak_tflops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.config.model import TransformerConfig


def forward_flops_per_token(config: TransformerConfig, vocab_size: Optional[int] = None,
                            seq_length: Optional[int] = None, causal: bool = False) -> int:
    """Forward-pass model FLOPs for one token (see the module docstring). `vocab_size` default: the padded one."""
    h, f, L = config.hidden_size, config.ffn_hidden_size, config.num_layers
    s = config.seq_length if seq_length is None else seq_length
    V = config.padded_vocab_size() if vocab_size is None else vocab_size
    d_kv = config.num_key_value_heads * config.head_dim
    mlp_matrices = 3 if config.swiglu else 2
    scores = 4 * s * h // (2 if causal else 1)
    per_layer = 2 * h * (h + 2 * d_kv) + scores + 2 * h * h + 2 * mlp_matrices * h * f
    return L * per_layer + 2 * h * V


def training_flops_per_token(config: TransformerConfig, vocab_size: Optional[int] = None,
                             seq_length: Optional[int] = None, causal: bool = False,
                             recompute: Optional[bool] = None) -> int:
    """Forward + backward (3× forward), plus one more forward of the layers when activations are recomputed."""
    forward = forward_flops_per_token(config, vocab_size, seq_length, causal)
    recompute = config.checkpoint_activations if recompute is None else recompute
    logits = 2 * config.hidden_size * (config.padded_vocab_size() if vocab_size is None else vocab_size)
    return 3 * forward + ((forward - logits) if recompute else 0)


@dataclass
class Throughput:
    tokens_per_s: float
    samples_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: Optional[float]  # fraction of peak (0..1); None without a peak

    def as_dict(self) -> dict:
        d = {"tokens_per_s": self.tokens_per_s, "samples_per_s": self.samples_per_s,
             "tokens_per_s_per_device": self.tokens_per_s_per_device, "tflops_per_device": self.tflops_per_device}
        if self.mfu is not None:
            d["mfu"] = self.mfu
        return d


def throughput(config: TransformerConfig, seconds: float, samples: int, num_devices: int,
               seq_length: Optional[int] = None, peak_tflops: Optional[float] = None,
               vocab_size: Optional[int] = None) -> Throughput:
    """Rates for `samples` sequences of `seq_length` tokens trained in `seconds` on `num_devices` devices."""
    if seconds <= 0 or num_devices < 1:
        raise ValueError(f"throughput needs seconds > 0 and num_devices >= 1 (got {seconds}, {num_devices})")
    s = config.seq_length if seq_length is None else seq_length
    tokens_per_s = samples * s / seconds
    flops_per_s = tokens_per_s * training_flops_per_token(config, vocab_size, s)
    tflops = flops_per_s / num_devices / 1e12
    return Throughput(tokens_per_s=tokens_per_s, samples_per_s=samples / seconds,
                      tokens_per_s_per_device=tokens_per_s / num_devices, tflops_per_device=tflops,
                      mfu=tflops / peak_tflops if peak_tflops else None)
