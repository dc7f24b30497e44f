"""Single-process checks of megatron.core: shard/merge layout, cross entropy, collectives, RNG tracker, recompute."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import mappings
from megatron.core.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, merge_shards
from megatron.core.layers import shard_tensor
from megatron.core.random import RNGStatesTracker, checkpoint, derive_seed, get_rng_tracker, seed_model_parallel_rng
from megatron.distributed.parallel_state import ParallelState


def test_shard_tensor_splits_each_segment_separately_and_merge_inverts_it():
    full = torch.arange(8.0).unsqueeze(1).repeat(1, 3)  # rows 0..7 = [q0 q1 q2 q3 | k0 k1 | v0 v1]
    shards = [shard_tensor(full, 0, 2, r, segments=[4, 2, 2]) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 1, 4, 6]
    assert shards[1][:, 0].tolist() == [2, 3, 5, 7]
    assert torch.equal(merge_shards(shards, 0, segments=[4, 2, 2]), full)
    cols = [shard_tensor(full.T, 1, 4, r) for r in range(4)]
    assert torch.equal(merge_shards(cols, 1), full.T)


def test_shard_tensor_rejects_a_segment_that_tp_does_not_divide():
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 4"):
        shard_tensor(torch.zeros(6, 2), 0, 4, 0, segments=[4, 2])


def test_vocab_parallel_cross_entropy_matches_torch_and_padding_columns_never_win():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 16)
    logits[..., 12:] = 100.0  # padding columns with huge logits
    target = torch.randint(0, 12, (2, 7))
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits[..., :12].clone().requires_grad_(True)
    ours = vocab_parallel_cross_entropy(ours_in, target, None, vocab_size=12)
    ref = F.cross_entropy(ref_in.reshape(-1, 12), target.reshape(-1), reduction="none").view(2, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_in.grad[..., :12], ref_in.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(ours_in.grad[..., 12:] == 0)


def test_vocab_parallel_cross_entropy_takes_bf16_logits_and_returns_float32_loss():
    logits = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_collectives_and_parallel_layers_run_without_torch_distributed():
    x = torch.randn(2, 4, 6, requires_grad=True)
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.gather_from_sequence_parallel_region, mappings.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
    assert mappings.all_to_all(x, None, 2, 1) is x
    column = ColumnParallelLinear(6, 8, init_seed=1)
    row = RowParallelLinear(8, 6, init_seed=2)
    embedding = VocabParallelEmbedding(10, 6, padded_num_embeddings=16, init_seed=3)
    assert row(column(x)).shape == (2, 4, 6)
    assert torch.all(embedding.weight[10:] == 0) and embedding(torch.tensor([[9, 0]])).shape == (1, 2, 6)


def test_layer_init_is_a_function_of_the_seed():
    a, b, c = (ColumnParallelLinear(4, 4, init_seed=s, init_std=0.5) for s in (7, 7, 8))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert derive_seed(1, "layers.0.mlp.fc1.weight") == derive_seed(1, "layers.0.mlp.fc1.weight")
    assert derive_seed(1, "layers.0.mlp.fc1.weight") != derive_seed(1, "layers.1.mlp.fc1.weight")


def test_rng_tracker_fork_needs_seeding_and_leaves_the_default_stream_untouched():
    tracker = RNGStatesTracker()
    with pytest.raises(RuntimeError, match="seed_model_parallel_rng"):
        with tracker.fork():
            pass
    tracker.add("model-parallel-rng", 99)
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    with tracker.fork():
        inside_first = torch.rand(5)
    assert torch.equal(torch.rand(5), expected)
    with tracker.fork():
        inside_second = torch.rand(5)
    assert not torch.equal(inside_first, inside_second)  # the stream advances between forks


def test_checkpoint_replays_tracker_and_default_dropout_streams_on_recompute():
    seed_model_parallel_rng(3, ParallelState.single())
    weight = torch.randn(32, 32, requires_grad=True)

    def block(x):
        with get_rng_tracker().fork():
            x = F.dropout(x @ weight, p=0.5)
        return F.dropout(torch.tanh(x), p=0.5) @ weight

    grads = []
    for recompute in (False, True):
        seed_model_parallel_rng(3, ParallelState.single())
        weight.grad = None
        x = torch.randn(4, 32)
        out = checkpoint(block, x) if recompute else block(x)
        out.square().sum().backward()
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    get_rng_tracker().reset()


def test_vocab_parallel_cross_entropy_without_padding_matches_torch_and_leaves_logits_untouched():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11) * 4
    target = torch.randint(0, 11, (3, 5))
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    weights = torch.rand(3, 5)
    ours = vocab_parallel_cross_entropy(ours_in, target, None, vocab_size=11)
    ref = F.cross_entropy(ref_in.reshape(-1, 11), target.reshape(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours_in.detach(), logits)  # the work buffer is the Function's own, not the caller's


@pytest.mark.parametrize("vocab_size", [11, 9], ids=["no-padding", "padding"])
def test_vocab_parallel_cross_entropy_refuses_a_second_backward_through_its_reused_buffer(vocab_size):
    logits = torch.randn(2, 11, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 3]), None, vocab_size=vocab_size).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
