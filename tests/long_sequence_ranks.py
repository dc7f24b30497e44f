"""Rank-side code of tests/test_sequence_tiling.py: tiling and offloaded recomputation against the plain run.

Each case builds the same layout twice from the same seed -- plain (untiled, recomputation keeping its inputs
whole on the device, or no recomputation) and with the long-sequence options -- and records the largest absolute
difference of the per-token loss and of every gradient after one backward. One 2-rank launch runs every case.
"""

from __future__ import annotations

import torch

from megatron.config.parallel import ParallelConfig
from megatron.core.random import seed_model_parallel_rng
from megatron.distributed.parallel_state import ParallelState
from megatron.model import GPTModel, allreduce_sequence_parallel_grads
from model_parity_ranks import BATCH, CONFIGS, SEQ, batch

LONG = dict(tiled_mlp=True, tiled_logits_loss=True, sequence_tile_size=10)  # ragged: 2 × 16 tokens in tiles of 5


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _loss_and_grads(config, ps, positions):
    seed_model_parallel_rng(5, ps)
    model = GPTModel(config, ps, seed=3)
    tokens, labels = batch()
    if ps.sp_size > 1:
        window = slice(ps.sp_rank * positions.shape[1], (ps.sp_rank + 1) * positions.shape[1])
        tokens, labels = tokens[:, window], labels[:, window]
    loss = model(tokens, positions, labels=labels)
    (loss.sum() / (BATCH * SEQ)).backward()
    allreduce_sequence_parallel_grads(model, ps)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def layout_case(kind: str, tp: int, sp: int, seqpar: bool, options: dict, world_size: int, results: dict,
                dropout: float = 0.0) -> None:
    """`options` on top of the layout vs the same layout without them: loss and every local gradient."""
    plain = CONFIGS[kind](sequence_parallel=seqpar, attention_dropout=dropout, hidden_dropout=dropout,
                          **({"checkpoint_activations": True} if options.get("checkpoint_activations") else {}))
    ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=tp, ds_sequence_parallel_size=sp,
                                            sequence_parallel=seqpar), plain, world_size=world_size)
    s_local = SEQ // sp
    positions = torch.arange(ps.sp_rank * s_local, (ps.sp_rank + 1) * s_local).unsqueeze(0).expand(BATCH, s_local)
    label = f"{kind}/tp{tp}/sp{sp}/{'seqpar' if seqpar else 'noseqpar'}/" + ",".join(sorted(options))
    ref_loss, ref_grads = _loss_and_grads(plain, ps, positions)
    loss, grads = _loss_and_grads(plain.replace(**options), ps, positions)
    results[f"{label}/loss"] = max_abs(loss, ref_loss)
    results[f"{label}/grads"] = max(max_abs(grads[n], g) for n, g in ref_grads.items())


def pipeline_case(kind: str, options: dict, world_size: int, results: dict) -> None:
    """pp=2 under DeepSpeed's pipeline engine with `options` against GPTModel on one rank (loss and the
    gradients recovered from one SGD step)."""
    import deepspeed

    from megatron.model.pipeline import build_pipeline_module, pipe_state_dict_to_model

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    seed, lr = 1234, 100.0
    reference_config = CONFIGS[kind]()
    config = reference_config.replace(**options)
    ps = ParallelState.build(ParallelConfig(pipeline_model_parallel_size=2), config, world_size=world_size)
    pipe = build_pipeline_module(config, ps, seed=seed)
    reference = GPTModel(reference_config, ParallelState.single(), seed=seed)
    before = {}
    for index, layer in enumerate(pipe.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            for name, value in pipe_state_dict_to_model(pipe._local_start + index, layer.state_dict(), config).items():
                before[name] = value.clone()
    tokens, labels = batch()
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, :5] = 0
    ref_loss = (reference(tokens, labels=labels) * loss_mask).sum() / loss_mask.sum()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=lr),
        config={"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**9,
                "gradient_clipping": 0.0})
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    loss = engine.train_batch(iter([((tokens, positions), (labels, loss_mask))]))
    label = f"pipe-{kind}/" + ",".join(sorted(options))
    results[f"{label}/loss"] = max_abs(loss.reshape(()), ref_loss)
    for index, layer in enumerate(pipe.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            for name, value in pipe_state_dict_to_model(pipe._local_start + index, layer.state_dict(), config).items():
                # one SGD step at lr 100: the gradient comes back through (before - after) / lr
                results[f"{label}/grad:{name}"] = max_abs((before[name] - value) / lr, ref_grads[name])
