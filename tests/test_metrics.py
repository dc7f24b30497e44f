"""FLOPs per token against a hand computation and torch's FLOP counter; throughput/MFU; TensorBoard and wandb."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron.config.logging import LoggingConfig
from megatron.config.model import TransformerConfig
from megatron.training.metrics import forward_flops_per_token, hardware_flops_per_token, throughput, \
    training_flops_per_token
from megatron.training.tracking import Tracker

# h 64, 2 layers, 8 heads of 8, 2 kv heads (GQA), SwiGLU f 176, s 128, vocab 1000 padded to 1024.
SMALL = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                          ffn_hidden_size=176, swiglu=True, seq_length=128, vocab_size=1000,
                          normalization="rmsnorm", position_embedding_type="rope", add_bias_linear=False)


def test_flops_per_token_matches_a_hand_computation_with_gqa_swiglu_and_logits():
    qkv = 2 * 64 * (64 + 2 * 16)  # 12288: k and v are 2 heads × 8 wide
    scores = 2 * 128 * 64 + 2 * 128 * 64  # 32768: QKᵀ and ·V over all 128 keys (not causal)
    out_proj = 2 * 64 * 64  # 8192
    mlp = 2 * 3 * 64 * 176  # 67584: gate, up, down
    logits = 2 * 64 * 1024  # 131072
    forward = 2 * (qkv + scores + out_proj + mlp) + logits
    assert forward == 372736 == forward_flops_per_token(SMALL)
    assert training_flops_per_token(SMALL) == 3 * 372736
    full = SMALL.replace(checkpoint_activations=True)
    assert training_flops_per_token(full) == 3 * 372736  # model FLOPs: recomputation not counted
    assert hardware_flops_per_token(full) == 3 * 372736 + 2 * (qkv + scores + out_proj + mlp)
    block = full.replace(recompute_method="block", checkpoint_num_layers=1)  # only the first layer recomputed
    assert hardware_flops_per_token(block) == 3 * 372736 + (qkv + scores + out_proj + mlp)
    selective = SMALL.replace(recompute_core_attention=True)  # only the core attention of each layer
    assert hardware_flops_per_token(selective) == 3 * 372736 + 2 * scores
    assert forward_flops_per_token(SMALL, causal=True) == forward - 2 * 32768 // 2


def test_mha_gelu_case_equals_the_6n_plus_12lhs_rule():
    c = TransformerConfig(num_layers=3, hidden_size=96, num_attention_heads=4, seq_length=256, vocab_size=512)
    matmul_params = 3 * 12 * 96 * 96 + 96 * 512  # per layer 4h² attention + 8h² MLP, plus the output layer
    assert training_flops_per_token(c) == 6 * matmul_params + 12 * 3 * 96 * 256


def _reference_forward(x, w, cfg):
    """A plain Llama-style forward (GQA attention + SwiGLU + logits) whose FLOPs torch can count."""
    b, s, h = x.shape
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for layer in w["layers"]:
        q = (x @ layer["q"]).view(b, s, nq, hd).transpose(1, 2)
        k = (x @ layer["k"]).view(b, s, nkv, hd).transpose(1, 2).repeat_interleave(nq // nkv, dim=1)
        v = (x @ layer["v"]).view(b, s, nkv, hd).transpose(1, 2).repeat_interleave(nq // nkv, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)  # the full s×s matrix
        a = (probs @ v).transpose(1, 2).reshape(b, s, h)
        x = x + a @ layer["o"]
        x = x + (F.silu(x @ layer["gate"]) * (x @ layer["up"])) @ layer["down"]
    return x @ w["out"]


def test_formula_agrees_with_torch_flop_counter_forward_and_backward():
    cfg, b = SMALL, 2
    h, f, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = dict(q=(h, h), k=(h, kv), v=(h, kv), o=(h, h), gate=(h, f), up=(h, f), down=(f, h))
    w = {"layers": [{n: torch.randn(*sh, requires_grad=True) * 0.02 for n, sh in shapes.items()}
                    for _ in range(cfg.num_layers)],
         "out": torch.randn(h, cfg.padded_vocab_size(), requires_grad=True)}
    for layer in w["layers"]:
        for t in layer.values():
            t.retain_grad()
    x = torch.randn(b, cfg.seq_length, h, requires_grad=True)
    tokens = b * cfg.seq_length
    with FlopCounterMode(display=False) as forward_counter:
        y = _reference_forward(x, w, cfg)
    assert forward_counter.get_total_flops() == forward_flops_per_token(cfg) * tokens
    with FlopCounterMode(display=False) as total_counter:
        _reference_forward(x, w, cfg).sum().backward()
    # Backward also computes the input gradient of the first layer (which a real model skips at the embedding).
    assert total_counter.get_total_flops() == training_flops_per_token(cfg) * tokens
    del y


def test_throughput_reports_tokens_samples_tflops_and_mfu():
    t = throughput(SMALL, seconds=2.0, samples=16, num_devices=4, peak_tflops=0.5)
    assert t.tokens_per_s == 16 * 128 / 2.0 and t.samples_per_s == 8.0 and t.tokens_per_s_per_device == 256.0
    assert t.tflops_per_device == pytest.approx(1024 * 3 * 372736 / 4 / 1e12)
    assert t.mfu == pytest.approx(t.tflops_per_device / 0.5) and t.hfu == t.mfu  # no recomputation
    r = throughput(SMALL.replace(checkpoint_activations=True), seconds=2.0, samples=16, num_devices=4,
                   peak_tflops=0.5)
    assert r.mfu == pytest.approx(t.mfu) and r.hfu > r.mfu  # MFU counts model FLOPs only; HFU the recompute
    assert "mfu" not in throughput(SMALL, 1.0, 1, 1).as_dict()
    with pytest.raises(ValueError, match="seconds > 0"):
        throughput(SMALL, 0.0, 1, 1)


def test_tracker_writes_tensorboard_scalars_and_an_offline_wandb_run_from_rank_0_only(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb, wb = tmp_path / "tb", tmp_path / "wandb"
    cfg = LoggingConfig(tensorboard_dir=str(tb), wandb_project="tests", wandb_exp_name="tracker")
    silent = Tracker(LoggingConfig(tensorboard_dir=str(tmp_path / "other")), rank=1)
    silent.log({"loss": 1.0}, step=1)
    silent.close()
    assert not silent.active and not (tmp_path / "other").exists()
    with Tracker(cfg, rank=0, config={"lr": 0.1}, wandb_dir=str(wb)) as tracker:
        assert tracker.active
        for step in (1, 2, 3):
            tracker.log({"lm-loss": 4.0 - step, "lr": 0.1 * step, "mfu": None}, step=step)
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("lm-loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert "mfu" not in events.Tags()["scalars"]
    runs = [d for d in os.listdir(wb / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(wb / "wandb" / runs[0]))
