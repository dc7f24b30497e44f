"""Prepacked weights for inference on CPU: the linear layers' GEMMs through oneDNN on a weight reordered once.

Why. Generation on a CPU multiplies a few rows (one token per sequence) by every weight of the model, each step.
torch's `F.linear` hands that to MKL's sgemm, which is slow for so few rows: for the shapes of a decode step
(8 rows × 512 × 32,000 for a Llama's logits) it measured 2.3x slower than oneDNN on a weight reordered once into
its blocked layout (one thread of a 2-core AVX-512 VM, torch 2.13: 14.0 ms against 6.2 ms; 1.3-1.5x for the
layers' qkv / fc1 / fc2 / dense; the same or faster at prefill sizes). torch's Inductor does the same when it
freezes a model for CPU inference (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`). The sum over
the input features runs in another order than MKL's, so outputs differ from `F.linear` by float rounding (~1e-6
relative in fp32), as two BLAS libraries do.

What it costs. The packed copy sits next to the parameter (the state dict, training and tied embeddings read the
parameter), so a packed layer holds its weight twice. The copy is a snapshot: `pack` again after changing the
weights. Only frozen, inference-only modules (the inference engine's GPTStage) are packed, and the packed path
runs only with autograd off.

This is the one module that calls those private operators (checked against torch 2.13): `packable` says no
where they are missing or the weight is not a float32 / bfloat16 CPU tensor, and the layers then use F.linear.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CHECKED_TORCH = "2.13"


def _operators_present() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and mkldnn is not None
                    and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` [out, in] can be packed here: a 2-D float32 or bfloat16 CPU tensor, oneDNN present."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.numel() > 0 and _operators_present())


def pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """oneDNN's reordered copy of `weight` [out, in] for inputs of about `batch_hint` rows (any row count works)."""
    if not packable(weight):
        raise ValueError(f"packed_linear.pack: a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                         f"{weight.device} cannot be packed (needs float32/bfloat16 on CPU with oneDNN)")
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(1, int(batch_hint)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed copy of `weight` when there is one and autograd is off."""
    if packed is None or torch.is_grad_enabled() or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
