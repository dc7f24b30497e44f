"""Throughput metrics: tokens/s, samples/s, TFLOPS per device and MFU. The ONE place with the FLOPs formula.

Model FLOPs per token (a multiply-add is 2 FLOPs; h hidden, L layers, s sequence length, f ffn hidden,
d_q = heads × head dim (= h unless --kv-channels), d_kv = kv heads × head dim, V vocabulary as the output
layer holds it, i.e. padded):

    forward per layer = 2·h·(d_q + 2·d_kv)   query, key and value projections (GQA: smaller k and v)
                      + 2·s·d_q + 2·s·d_q     scores QKᵀ and the weighted sum of V ("core attention"), over the
                                              FULL s×s matrix
                      + 2·d_q·h               attention output projection
                      + 2·m·h·f               MLP, m = 3 matrices with SwiGLU (gate, up, down), 2 with GeLU
    forward           = L · (per layer) + 2·h·V   (the logits layer)
    training (model)  = 3 × forward           (backward costs twice the forward)

Hardware FLOPs add what recomputation runs again (Megatron's HFU): the forward of every recomputed layer
(--recompute-granularity full / --checkpoint-activations; with --recompute-method block only the first N
layers), or the core attention of every layer (--recompute-granularity selective).

Attention is counted as if NOT causal (the whole s×s score matrix), as Megatron-LM and nanoGPT's 6N + 12·L·h·s
count it, so numbers compare with theirs; `causal=True` halves the two score terms instead. Norms, softmax,
rotary embeddings, biases and the loss are not counted (each is O(h) per token, under 1% at real sizes).
MFU = achieved model FLOPs per second per device / peak (LoggingConfig.peak_tflops); HFU likewise with the
hardware FLOPs. Both are reported; they differ only when activations are recomputed.
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
    d_q, d_kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    mlp_matrices = 3 if config.swiglu else 2
    per_layer = 2 * h * (d_q + 2 * d_kv) + core_attention_flops_per_token(config, s, causal) + 2 * d_q * h \
        + 2 * mlp_matrices * h * f
    return L * per_layer + 2 * h * V


def core_attention_flops_per_token(config: TransformerConfig, seq_length: Optional[int] = None,
                                   causal: bool = False) -> int:
    """Scores QKᵀ and the weighted sum of V, per token and layer (what selective recomputation runs again)."""
    s = config.seq_length if seq_length is None else seq_length
    return 4 * s * config.num_attention_heads * config.head_dim // (2 if causal else 1)


def training_flops_per_token(config: TransformerConfig, vocab_size: Optional[int] = None,
                             seq_length: Optional[int] = None, causal: bool = False,
                             recompute: Optional[bool] = None) -> int:
    """Model FLOPs: forward + backward (3× forward). recompute=True: hardware FLOPs of the config's
    recomputation on top (see hardware_flops_per_token)."""
    forward = forward_flops_per_token(config, vocab_size, seq_length, causal)
    if not recompute:
        return 3 * forward
    return hardware_flops_per_token(config, vocab_size, seq_length, causal)


def hardware_flops_per_token(config: TransformerConfig, vocab_size: Optional[int] = None,
                             seq_length: Optional[int] = None, causal: bool = False) -> int:
    """Model FLOPs plus what recomputation runs again: whole recomputed layers (full granularity), or the
    core attention of every layer (selective)."""
    forward = forward_flops_per_token(config, vocab_size, seq_length, causal)
    logits = 2 * config.hidden_size * (config.padded_vocab_size() if vocab_size is None else vocab_size)
    per_layer = (forward - logits) // config.num_layers
    extra = config.recomputed_layers * per_layer
    if config.recompute_core_attention:
        extra += config.num_layers * core_attention_flops_per_token(config, seq_length, causal)
    return 3 * forward + extra


@dataclass
class Throughput:
    tokens_per_s: float
    samples_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float  # model FLOPs
    mfu: Optional[float]  # model FLOPs utilisation, fraction of peak (0..1); None without a peak
    hardware_tflops_per_device: float = 0.0  # with recomputation
    hfu: Optional[float] = None  # hardware FLOPs utilisation; None without a peak

    def as_dict(self) -> dict:
        d = {"tokens_per_s": self.tokens_per_s, "samples_per_s": self.samples_per_s,
             "tokens_per_s_per_device": self.tokens_per_s_per_device, "tflops_per_device": self.tflops_per_device,
             "hardware_tflops_per_device": self.hardware_tflops_per_device}
        if self.mfu is not None:
            d["mfu"], d["hfu"] = self.mfu, self.hfu
        return d


def throughput(config: TransformerConfig, seconds: float, samples: int, num_devices: int,
               seq_length: Optional[int] = None, peak_tflops: Optional[float] = None,
               vocab_size: Optional[int] = None) -> Throughput:
    """Rates for `samples` sequences of `seq_length` tokens trained in `seconds` on `num_devices` devices."""
    if seconds <= 0 or num_devices < 1:
        raise ValueError(f"throughput needs seconds > 0 and num_devices >= 1 (got {seconds}, {num_devices})")
    s = config.seq_length if seq_length is None else seq_length
    tokens_per_s = samples * s / seconds
    tflops = tokens_per_s * training_flops_per_token(config, vocab_size, s) / num_devices / 1e12
    hardware = tokens_per_s * hardware_flops_per_token(config, vocab_size, s) / num_devices / 1e12
    return Throughput(tokens_per_s=tokens_per_s, samples_per_s=samples / seconds,
                      tokens_per_s_per_device=tokens_per_s / num_devices, tflops_per_device=tflops,
                      mfu=tflops / peak_tflops if peak_tflops else None, hardware_tflops_per_device=hardware,
                      hfu=hardware / peak_tflops if peak_tflops else None)
