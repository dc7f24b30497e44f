"""Rank-side code of the model parity tests: build tp/sp/Megatron-SP layouts and compare them with tp=1.

Each check returns relative errors (||parallel - reference|| / ||reference||) by name so that one
launch per world size runs every configuration; the test module asserts on them. The tp=1
reference runs inside every rank on ParallelState.single() (no collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.config.model import TransformerConfig
from megatron.config.parallel import ParallelConfig
from megatron.distributed.parallel_state import ParallelState
from megatron.model import GPTModel, allreduce_sequence_parallel_grads, gather_logits, merge_state_dicts
from megatron.model import register_sequence_parallel_grad_hooks, shard_state_dict
from megatron.model.sharding import VOCAB_PARAMS

VOCAB = 100
BATCH, SEQ = 2, 16


def gpt_config(**changes) -> TransformerConfig:
    """GPT-2 style: layernorm, tanh GeLU, learned positions, tied embeddings, biases."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=SEQ, vocab_size=VOCAB,
                make_vocab_size_divisible_by=8, attention_dropout=0.0, hidden_dropout=0.0)
    base.update(changes)
    return TransformerConfig(**base)


def llama_config(**changes) -> TransformerConfig:
    """Llama style: RMSNorm, SwiGLU, RoPE (theta 500000), GQA 8/4 heads, untied, no biases."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, ffn_hidden_size=96,
                seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=8, normalization="rmsnorm",
                swiglu=True, position_embedding_type="rope", rope_theta=500000.0,
                untie_embeddings_and_output_weights=True, add_bias_linear=False, attention_dropout=0.0,
                hidden_dropout=0.0, norm_epsilon=1e-6)
    base.update(changes)
    return TransformerConfig(**base)


CONFIGS = {"gpt": gpt_config, "llama": llama_config}


def batch(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def reference(config: TransformerConfig, seed: int):
    """tp=1 model: full state dict, logits, per-token loss and grads of the mean loss."""
    model = GPTModel(config, ParallelState.single(), seed=seed)
    tokens, labels = batch()
    full_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = gather_logits(model(tokens), ParallelState.single(), VOCAB)
    loss = model(tokens, labels=labels)
    loss.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return full_sd, logits, loss.detach(), grads


def gather_objects(obj, group, size):
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def compare_dicts(prefix: str, merged: dict, expected: dict, results: dict) -> None:
    """Relative error per parameter; vocabulary tensors are compared on the real (unpadded) rows."""
    assert set(merged) == set(expected), f"{prefix}: parameter names differ: {set(merged) ^ set(expected)}"
    for name, ref in expected.items():
        got = merged[name]
        if name in VOCAB_PARAMS:
            got, ref = got[:VOCAB], ref[:VOCAB]
        results[f"{prefix}:{name}"] = rel_err(got, ref)


def parity_case(kind: str, tp: int, sp: int, sequence_parallel: bool, world_size: int, results: dict) -> None:
    """One layout against tp=1: init, logits, loss and every gradient."""
    seed = 1234
    config = CONFIGS[kind](sequence_parallel=sequence_parallel)
    label = f"{kind}/tp{tp}/sp{sp}/{'seqpar' if sequence_parallel else 'noseqpar'}"
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=tp, ds_sequence_parallel_size=sp,
                                            sequence_parallel=sequence_parallel), config, world_size=world_size)
    full_sd, ref_logits, ref_loss, ref_grads = reference(config, seed)
    model = GPTModel(config, ps, seed=seed)

    # Init is identical whatever tp: merged shards equal the tp=1 weights (vocab padding aside).
    shards = gather_objects(model.state_dict(), ps.tp_group, tp)
    compare_dicts(f"{label}/init", merge_state_dicts(shards, config), full_sd, results)
    model.load_state_dict(shard_state_dict(full_sd, config, tp, ps.tp_rank))

    tokens, labels = batch()
    s_local = SEQ // sp
    window = slice(ps.sp_rank * s_local, (ps.sp_rank + 1) * s_local)
    tokens, labels, ref_loss, ref_logits = tokens[:, window], labels[:, window], ref_loss[:, window], ref_logits[:, window]
    positions = torch.arange(window.start, window.stop).unsqueeze(0).expand(BATCH, s_local)
    with torch.no_grad():
        logits = gather_logits(model(tokens, positions), ps, VOCAB)
    results[f"{label}/logits"] = rel_err(logits, ref_logits)
    loss = model(tokens, positions, labels=labels)
    results[f"{label}/loss"] = rel_err(loss, ref_loss)
    assert loss.dtype == torch.float32 and loss.shape == (BATCH, s_local)
    # Sequence-parallel grads: llama layouts use the autograd hooks, gpt ones the explicit all-reduce.
    use_hooks = kind == "llama"
    handles = register_sequence_parallel_grad_hooks(model, ps) if use_hooks else []
    (loss.sum() / (BATCH * SEQ)).backward()  # this shard's part of the full-sequence mean
    if not use_hooks:
        allreduce_sequence_parallel_grads(model, ps)
    for handle in handles:
        handle.remove()
    for p in model.parameters():  # Ulysses: each sp rank holds the gradient of its tokens only
        if sp > 1:
            dist.all_reduce(p.grad, group=ps.sp_group)
    grads = {n: p.grad for n, p in model.named_parameters()}
    merged = merge_state_dicts(gather_objects(grads, ps.tp_group, tp), config)
    compare_dicts(f"{label}/grad", merged, ref_grads, results)


# ---- RNG tracker and activation checkpointing (tp = 2) ----------------------------------------
def rng_tracker_case(world_size: int, results: dict) -> None:
    """tp-stream dropout masks differ across tp ranks, default-stream masks match, fork leaves default alone."""
    import torch.nn.functional as F

    from megatron.core.random import get_rng_tracker, seed_model_parallel_rng

    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2), world_size=world_size)
    seed_model_parallel_rng(42, ps)
    before = torch.get_rng_state()
    with get_rng_tracker().fork():
        tp_mask = F.dropout(torch.ones(4096), p=0.5) > 0
    results["rng/fork_keeps_default_state"] = bool(torch.equal(before, torch.get_rng_state()))
    default_mask = F.dropout(torch.ones(4096), p=0.5) > 0
    tp_masks = gather_objects(tp_mask, ps.tp_group, 2)
    default_masks = gather_objects(default_mask, ps.tp_group, 2)
    results["rng/tp_masks_differ_across_tp"] = not torch.equal(tp_masks[0], tp_masks[1])
    results["rng/default_masks_match_across_tp"] = torch.equal(default_masks[0], default_masks[1])


def checkpointing_case(world_size: int, results: dict) -> None:
    """With dropout on (tp stream and default stream), recomputation gives bit-identical loss and grads."""
    from megatron.core.random import seed_model_parallel_rng

    config = llama_config(attention_dropout=0.2, hidden_dropout=0.2, sequence_parallel=True)
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), config,
                             world_size=world_size)
    tokens, labels = batch()
    outcome = {}
    for recompute in (False, True):
        seed_model_parallel_rng(5, ps)
        model = GPTModel(config.replace(checkpoint_activations=recompute, checkpoint_num_layers=1), ps, seed=3)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        allreduce_sequence_parallel_grads(model, ps)
        outcome[recompute] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        if not recompute:
            with torch.no_grad():
                model.eval()
                results["ckpt/dropout_changes_loss"] = not torch.equal(model(tokens, labels=labels).mean(), loss)
    results["ckpt/loss_identical"] = torch.equal(outcome[False][0], outcome[True][0])
    results["ckpt/grads_identical"] = all(torch.equal(outcome[False][1][n], g) for n, g in outcome[True][1].items())


# ---- DeepSpeed pipeline (pp = 2) ----------------------------------------------------------------
def pipeline_case(kind: str, world_size: int, results: dict, checkpoint_activations: bool = False) -> None:
    """pp=2 PipelineModule under DeepSpeed's engine: layer state dicts, loss and grads equal GPTModel's.

    With checkpoint_activations the pipe recomputes every layer (activation_checkpoint_interval=1).
    """
    import deepspeed

    from megatron.model.pipeline import build_pipeline_module, pipe_state_dict_to_model

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    seed, lr = 1234, 100.0
    config = CONFIGS[kind](checkpoint_activations=checkpoint_activations)
    ps = ParallelState.build(ParallelConfig(pipeline_model_parallel_size=2), config, world_size=world_size)
    pipe = build_pipeline_module(config, ps, seed=seed)
    reference_model = GPTModel(config, ParallelState.single(), seed=seed)
    full_sd = reference_model.state_dict()
    before = {}
    for local_index, layer in enumerate(pipe.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            for name, value in pipe_state_dict_to_model(pipe._local_start + local_index, layer.state_dict(),
                                                        config).items():
                before[name] = value.clone()
                results[f"pipe-{kind}/init:{name}"] = rel_err(value, full_sd[name])

    tokens, labels = batch()
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, :5] = 0
    per_token = reference_model(tokens, labels=labels)
    ref_loss = (per_token * loss_mask).sum() / loss_mask.sum()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference_model.named_parameters()}

    assert pipe.activation_checkpoint_interval == (1 if checkpoint_activations else 0)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=lr),
        config={"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**9,
                "gradient_clipping": 0.0},  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
    )
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    data = [((tokens, positions), (labels, loss_mask))]
    loss = engine.train_batch(iter(data))
    results[f"pipe-{kind}/loss"] = rel_err(loss.reshape(()), ref_loss)
    for local_index, layer in enumerate(pipe.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            for name, value in pipe_state_dict_to_model(pipe._local_start + local_index, layer.state_dict(),
                                                        config).items():
                results[f"pipe-{kind}/grad:{name}"] = rel_err((before[name] - value) / lr, ref_grads[name])


# ---- vocab-parallel cross entropy (tp = 2) ------------------------------------------------------
def cross_entropy_case(world_size: int, results: dict, padded: int = 96, prefix: str = "ce") -> None:
    """Loss and logits-gradient from vocab-split logits (tp = world_size) equal F.cross_entropy on the real
    vocabulary. With padded 128 at tp 4 the last rank's shard is all padding."""
    import torch.nn.functional as F

    from megatron.core import mappings
    from megatron.core.cross_entropy import vocab_parallel_cross_entropy

    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=world_size), world_size=world_size)
    g = torch.Generator().manual_seed(11)
    vocab = 90
    full = torch.randn(3, 5, padded, generator=g) * 3
    full[..., vocab:] = 50.0  # padding columns would win if they were not excluded
    target = torch.randint(0, vocab, (3, 5), generator=g)
    target[0, :world_size] = torch.arange(world_size) * (padded // world_size)  # a target on each real shard
    target = target.clamp(max=vocab - 1)
    expected_full = full[..., :vocab].clone().requires_grad_(True)
    expected = F.cross_entropy(expected_full.reshape(-1, vocab), target.reshape(-1), reduction="none").view(3, 5)
    (expected * torch.arange(15.0).view(3, 5)).sum().backward()

    local = mappings.scatter_to_tensor_parallel_region(full, ps.tp_group).detach().requires_grad_(True)
    local_before = local.detach().clone()
    loss = vocab_parallel_cross_entropy(local, target, ps.tp_group, vocab_size=vocab)
    (loss * torch.arange(15.0).view(3, 5)).sum().backward()
    grad = torch.cat(gather_objects(local.grad, ps.tp_group, world_size), dim=-1)
    results[f"{prefix}/loss"] = rel_err(loss, expected)
    results[f"{prefix}/grad"] = rel_err(grad[..., :vocab], expected_full.grad)
    results[f"{prefix}/padding_grad_is_zero"] = bool((grad[..., vocab:] == 0).all())
    results[f"{prefix}/logits_untouched"] = bool(torch.equal(local.detach(), local_before))
