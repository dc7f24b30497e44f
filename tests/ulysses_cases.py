"""Rank-side code of tests/test_ulysses.py: a model-level check of Ulysses' document masks and kv-head
replication, then trainings (engine_cases.train_cases), in one launch per world size."""

from __future__ import annotations

import torch
import torch.distributed as dist

import engine_cases as ec

EOD = 99


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def model_checks(world_size: int) -> dict:
    """GPTModel at sp = world_size against one rank: one kv head (replicated to every sp rank, DeepSpeed's rule)
    and a document mask from EOD tokens; {name: relative error} of the per-token loss and every gradient."""
    from megatron.config.model import TransformerConfig
    from megatron.config.parallel import ParallelConfig
    from megatron.distributed.parallel_state import ParallelState
    from megatron.model import GPTModel
    from megatron.model.attention import document_ids_from_tokens
    from megatron.training.engine import position_ids_and_loss_mask

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                               ffn_hidden_size=48, seq_length=16, vocab_size=100, normalization="rmsnorm",
                               swiglu=True, position_embedding_type="rope", attention_dropout=0.0, hidden_dropout=0.0,
                               untie_embeddings_and_output_weights=True, add_bias_linear=False)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 99, (2, 17), generator=g)
    tokens[0, 5], tokens[1, 9], tokens[1, 12] = EOD, EOD, EOD
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions, _ = position_ids_and_loss_mask(inputs, EOD, reset_position_ids=True, eod_mask_loss=False)
    documents = document_ids_from_tokens(inputs, EOD)
    out = {}
    for masked in (False, True):
        extra = {"document_ids": documents} if masked else {}
        reference = GPTModel(config, ParallelState.single(), seed=5)
        ref_loss = reference(inputs, positions, labels=labels, **extra)
        ref_loss.mean().backward()
        ps = ParallelState.build(ParallelConfig(ds_sequence_parallel_size=world_size), config, world_size=world_size)
        model = GPTModel(config, ps, seed=5)
        chunk = 16 // world_size
        part = slice(ps.sp_rank * chunk, (ps.sp_rank + 1) * chunk)
        loss = model(inputs[:, part], positions[:, part], labels=labels[:, part], **extra)
        (loss.sum() / ref_loss.numel()).backward()
        name = "document_mask" if masked else "causal"
        out[f"{name}/loss"] = _rel_err(loss, ref_loss[:, part])
        for (param_name, p), ref in zip(model.named_parameters(), reference.parameters()):
            dist.all_reduce(p.grad, group=ps.sp_group)
            out[f"{name}/grad/{param_name}"] = _rel_err(p.grad, ref.grad)
    return out


def checks_and_trainings(rank: int, world_size: int, cases: list, with_model_checks: bool) -> dict:
    """model_checks (optional), then every training case in turn, on these ranks."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    out = {"model_checks": model_checks(world_size) if with_model_checks else {}}
    out.update(ec.train_cases(rank, world_size, cases))
    return out
