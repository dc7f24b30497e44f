"""Long sequences: the tiled MLP, the tiled logits + loss, recomputation with its inputs on the CPU or split
over tp, and the out-of-memory advice (docs/LONG_SEQUENCES.md).

Each option must change no loss bit beyond float reordering: with the same seed, loss and every gradient after
one backward equal the plain run's within 1e-6 (fp32, CPU), at 1 rank (in process) and at tp = 2, Ulysses sp = 2
and pp = 2 (one 2-rank launch). A dispatch-mode probe records the largest tensor any operation makes during a
training step, so "no [sequence, vocabulary] or [sequence, ffn-hidden] tensor is whole" is checked, not assumed;
it runs once on a 16k-token sequence.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import long_sequence_ranks as ranks
from megatron.config.arguments import parse_args
from megatron.config.model import TransformerConfig
from megatron.core.random import seed_model_parallel_rng
from megatron.distributed.parallel_state import ParallelState
from megatron.errors import ConfigError
from megatron.model import GPTModel
from megatron.training.out_of_memory import StepOutOfMemory, is_out_of_memory, out_of_memory_error
from multirank import run_ranks

TOLERANCE = 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten operation returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def tiny(seq: int, **changes) -> TransformerConfig:
    """Llama-style, with a vocabulary (500) and a SwiGLU width (2 × 256) well above the hidden size (32)."""
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=256,
                seq_length=seq, vocab_size=500, make_vocab_size_divisible_by=8, normalization="rmsnorm", swiglu=True,
                position_embedding_type="rope", untie_embeddings_and_output_weights=True, add_bias_linear=False,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(changes)
    return TransformerConfig(**base)


def train_step(config: TransformerConfig, batch: int = 2, seed: int = 0, probe: bool = False):
    """(per-token loss, {name: grad}, largest tensor's elements or None) of one forward + backward."""
    seed_model_parallel_rng(9, ParallelState.single())
    model = GPTModel(config, seed=3)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_length + 1), generator=g)
    largest = LargestTensor() if probe else None
    with largest or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, (largest.numel if probe else None)


def worst(a: dict, b: dict) -> float:
    return max(ranks.max_abs(a[n], b[n]) for n in a)


@pytest.mark.parametrize("changes", [
    dict(tiled_logits_loss=True),
    dict(tiled_mlp=True, sequence_tile_size=24),  # 64 tokens of 2 rows: tiles of 12 positions, the last ragged
    dict(tiled_mlp=True, tiled_logits_loss=True, sequence_tile_size=7, loss_over_padded_vocab=True),
    dict(tiled_logits_loss=True, untie_embeddings_and_output_weights=False, swiglu=False,
         normalization="layernorm", position_embedding_type="learned_absolute", add_bias_linear=True),
], ids=["logits-loss", "mlp-ragged", "both-padded-vocab", "tied-gpt"])
def test_tiling_changes_no_loss_or_gradient_beyond_float_reordering(changes):
    plain = {k: v for k, v in changes.items() if k not in ("tiled_mlp", "tiled_logits_loss", "sequence_tile_size")}
    ref_loss, ref_grads, _ = train_step(tiny(64, **plain))
    loss, grads, _ = train_step(tiny(64, **changes))
    assert ranks.max_abs(loss, ref_loss) <= TOLERANCE
    assert worst(grads, ref_grads) <= TOLERANCE


def test_checkpoint_in_cpu_replays_dropout_and_equals_plain_recomputation_bit_for_bit():
    dropout = dict(attention_dropout=0.2, hidden_dropout=0.2, checkpoint_activations=True)
    ref_loss, ref_grads, _ = train_step(tiny(32, **dropout))
    loss, grads, _ = train_step(tiny(32, checkpoint_in_cpu=True, **dropout))
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    no_dropout, _, _ = train_step(tiny(32, checkpoint_activations=True, checkpoint_in_cpu=True))
    assert not torch.equal(no_dropout, loss), "dropout was not active: the replay check would be vacuous"


def test_no_tensor_of_sequence_by_vocabulary_or_ffn_exists_with_tiling():
    seq, batch = 256, 2
    bound = batch * seq * 128  # above [b, s, qkv = 64] and [b, s, h]; below [b, s, 504] logits, [b, s, 512] fc1
    _, _, plain = train_step(tiny(seq), batch, probe=True)
    assert plain >= batch * seq * 504, "the probe must see the untiled logits, or it proves nothing"
    _, _, tiled = train_step(tiny(seq, tiled_mlp=True, tiled_logits_loss=True), batch, probe=True)
    assert tiled < bound


def test_a_16k_token_sequence_trains_with_tiling_and_no_whole_logits():
    seq = 16384
    config = tiny(seq, num_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                  tiled_mlp=True, tiled_logits_loss=True, sequence_tile_size=2048)
    loss, grads, largest = train_step(config, batch=1, probe=True)
    assert loss.shape == (1, seq) and torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert largest < seq * 128  # the whole logits would be seq × 504 elements, fc1's seq × 512


# ---- flags --------------------------------------------------------------------------------------------------
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--mock-data", "--vocab-size", "100", "--train-iters", "3"]


def test_flags_reach_the_model_config():
    run = parse_args(BASE + ["--tiled-mlp", "--tiled-logits-loss", "--sequence-tile-size", "512",
                             "--checkpoint-activations", "--checkpoint-in-cpu", "--partition-activations"])
    m = run.model
    assert (m.tiled_mlp, m.tiled_logits_loss, m.sequence_tile_size) == (True, True, 512)
    assert (m.checkpoint_in_cpu, m.partition_activations) == (True, True)
    assert parse_args(BASE).model.sequence_tile_length(batch=2) == 32  # default: hidden size tokens per tile


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-in-cpu"], "--checkpoint-in-cpu acts on the inputs kept for recomputed layers: it needs "
                              "--checkpoint-activations or --recompute-granularity full"),
    (["--partition-activations", "--recompute-activations"], "--partition-activations acts on the inputs"),
    (["--checkpoint-activations", "--partition-activations", "--sequence-parallel",
      "--tensor-model-parallel-size", "2"], "is already split along the sequence over them; drop one"),
    (["--contigious-checkpointing"], "--contigious-checkpointing: DeepSpeed's contiguous checkpoint buffers"),
    (["--synchronize-each-layer"], "--synchronize-each-layer: a device synchronisation around each recomputed"),
    (["--sequence-tile-size", "0"], "--sequence-tile-size"),
])
def test_refused_combinations_name_their_flags(flags, message):
    with pytest.raises((ConfigError, SystemExit)) as e:
        parse_args(BASE + flags)
    if e.type is ConfigError:
        assert message in str(e.value)


def test_an_out_of_memory_step_lists_the_options_this_run_does_not_use():
    with pytest.raises(RuntimeError) as allocation:
        torch.empty(2**50)  # the CPU allocator's real error (4 PiB)
    assert is_out_of_memory(allocation.value) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    run = parse_args(BASE + ["--checkpoint-activations", "--tiled-mlp"])
    error = out_of_memory_error(allocation.value, run, ParallelState.single(), iteration=7)
    assert isinstance(error, StepOutOfMemory) and error.exit_code == 2
    text = str(error)
    assert "iteration 7 ran out of memory on rank 0 at --seq-length 32" in text and "can't allocate memory" in text
    assert "--checkpoint-in-cpu" in text and "--tiled-logits-loss" in text and "--ds-sequence-parallel-size" in text
    assert "--tiled-mlp:" not in text and "--checkpoint-activations (" not in text  # already on


# ---- 2 ranks: tp = 2, Ulysses sp = 2, pp = 2 ------------------------------------------------------------------
OFFLOAD = dict(checkpoint_activations=True, checkpoint_in_cpu=True)
TWO_RANK_CASES = [  # (model, tp, Ulysses sp, Megatron sp, options, dropout)
    ("llama", 2, 1, False, ranks.LONG, 0.0),
    ("gpt", 2, 1, True, ranks.LONG, 0.0),
    ("llama", 2, 1, False, dict(OFFLOAD, partition_activations=True), 0.1),
    ("gpt", 2, 1, False, dict(OFFLOAD, partition_activations=True, **ranks.LONG), 0.0),
    ("llama", 1, 2, False, dict(OFFLOAD, **ranks.LONG), 0.0),
]
PIPE_CASES = [("llama", dict(OFFLOAD, **ranks.LONG)), ("gpt", ranks.LONG)]


def _two_rank_checks(rank, world_size):
    results = {}
    for kind, tp, sp, seqpar, options, dropout in TWO_RANK_CASES:
        ranks.layout_case(kind, tp, sp, seqpar, options, world_size, results, dropout)
    for kind, options in PIPE_CASES:
        ranks.pipeline_case(kind, options, world_size, results)
    return results


@pytest.fixture(scope="module")
def two_rank_results():
    merged = {}
    for results in run_ranks(2, _two_rank_checks, timeout=400):
        for key, value in results.items():
            merged[key] = max(merged.get(key, 0.0), value)
    return merged


@pytest.mark.timeout(600)
def test_tp2_sp2_and_pp2_with_tiling_and_offload_equal_the_plain_run(two_rank_results):
    over = {k: v for k, v in two_rank_results.items() if v > TOLERANCE}
    assert len(two_rank_results) > 2 * len(TWO_RANK_CASES) and over == {}
