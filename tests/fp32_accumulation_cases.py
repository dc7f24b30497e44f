"""Run targets for tests/test_fp32_grad_accumulation.py: trainings in spawned gloo ranks that record, at each
optimizer step, the tied embedding's gradient as it enters the whole-matrix optimizer's reduction
(mixed_precision.reduce_by_owner) and as it leaves it."""

from __future__ import annotations

import optimizer_cases as oc


def train_recording_tied(rank: int, world_size: int, cases: list) -> dict:
    """oc.train_logged's results, plus {"tied": [per step: {"before": (dtype, values) of each tied weight's
    main_grad (None without one), "grad": whether .grad was set, "after": (dtype, values) of its reduced
    gradient}]} per case."""
    import megatron.optimizer.full_matrix as full_matrix

    real = full_matrix.reduce_by_owner
    steps: list = []

    def recording(params, owner, plan, dp_rank):
        main = [getattr(w, "main_grad", None) for w, _ in plan.tied]
        before = [None if m is None else (str(m.dtype), m.flatten().tolist()) for m in main]
        grads = [w.grad is not None for w, _ in plan.tied]
        out = real(params, owner, plan, dp_rank)
        after = [(str(out[id(w)].dtype), out[id(w)].flatten().tolist()) for w, _ in plan.tied]
        steps.append({"before": before, "grad": grads, "after": after})
        return out

    full_matrix.reduce_by_owner = recording
    try:
        out = {}
        for name, argv in cases:
            steps.clear()
            out.update(oc.train_logged(rank, world_size, [(name, argv)]))
            out[name]["tied"] = list(steps)
        return out
    finally:
        full_matrix.reduce_by_owner = real
