"""Run targets for tests/test_dry_run_memory.py: build a real training engine for each case (flags), take one
step, and count the bytes of the optimizer's tensors next to what the --dry-run estimate says for the same flags
(megatron/optimizer/memory.py)."""

from __future__ import annotations

import engine_cases as ec


def _held(optimizer, model) -> dict:
    """{"state": bytes of the leaf optimizers' state tensors, "masters": bytes of the tensors they step that are
    not the model's parameters} on this rank, each tensor counted once (the 8-bit maps are shared)."""
    import torch

    leaves, todo = [], [optimizer]
    while todo:  # DeepSpeed's wrappers keep theirs as .optimizer, FullMatrixOptimizer as .matrix / .other
        current = todo.pop()
        inner = [getattr(current, a, None) for a in ("optimizer", "matrix", "other")]
        inner = [o for o in inner if o is not None and o is not current and hasattr(o, "state")]
        if inner:
            todo += inner
        else:
            leaves.append(current)
    seen = {}

    def count(value):
        if torch.is_tensor(value) and value.dim() > 0:
            seen.setdefault((value.untyped_storage().data_ptr(), value.storage_offset(), value.numel()),
                            value.numel() * value.element_size())
        elif isinstance(value, dict):
            for v in value.values():
                count(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                count(v)
        elif hasattr(value, "__dict__") and not callable(value):  # GaLore's projector, Shampoo's preconditioner
            count(vars(value))

    for leaf in leaves:
        for state in leaf.state.values():
            count(state)
    state = sum(seen.values())
    own = {id(p) for p in model.parameters()}
    stepped = {id(p): p for leaf in leaves for g in leaf.param_groups for p in g["params"] if id(p) not in own}
    return {"state": state, "masters": sum(p.numel() * p.element_size() for p in stepped.values())}


def measure(rank: int, world_size: int, cases: list) -> dict:
    """{name: {"held": _held after one step, "estimate": optimizer_memory(run, world_size)}}."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from megatron.config.arguments import parse_args
    from megatron.data.data_iterator import build_data_iterator
    from megatron.data.gpt_dataset import build_datasets
    from megatron.distributed.parallel_state import ParallelState
    from megatron.optimizer.memory import optimizer_memory
    from megatron.training.engine import build_engine
    from megatron.training.loop import seed_everything

    ec.record_process_groups()
    out = {}
    for name, argv in cases:
        ec.destroy_previous_case_groups()
        run = parse_args(argv)
        ps = ParallelState.build(run.parallel, run.model)
        seed_everything(run.training.seed, ps, torch.device("cpu"))
        te = build_engine(run, ps, torch.device("cpu"))
        try:
            batch = run.training.global_batch_size
            train, _, _ = build_datasets(run.data, run.model.seq_length, run.training.seed, (batch, 0, 0),
                                         run.model.vocab_size, ps.dp_rank, ps.dp_size)
            te.train_step(build_data_iterator(train, run.training.micro_batch_size, ps.dp_rank, ps.dp_size, 0))
            out[name] = {"held": _held(te.engine.optimizer, te.engine.module),
                         "estimate": optimizer_memory(run, world_size)}
        finally:
            te.destroy()
    return out


def single_rank(rank: int, world_size: int, trainings: list, memory_cases: list) -> dict:
    """One launch for the one-rank checks: oc.train_logged's trainings, then `measure`'s cases."""
    import optimizer_cases as oc

    return {"trainings": oc.train_logged(rank, world_size, trainings),
            "memory": measure(rank, world_size, memory_cases)}
