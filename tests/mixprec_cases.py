"""Run targets for tests/test_mixed_precision.py: the whole-matrix optimizers in bf16 (megatron/optimizer/
mixed_precision.py) trained inside spawned gloo ranks, plus, on one rank, the optimizer's own overflow skip, loss
scaling and clipping driven directly (fp16 does not train on CPU, so its scaler is checked here)."""

from __future__ import annotations

import optimizer_cases as oc

NAMES = ["muon", "muonclip", "dshampooadamw", "galoreadamw", "adam8bit"]


def _step(optimizer, weight, grad) -> dict:
    """One optimizer step with `grad` as the backward of the scaled loss would leave it; what happened."""
    import torch

    before = weight.detach().clone()
    scale = optimizer.cur_scale
    weight.grad = (grad * scale).to(weight.dtype)
    optimizer.step()
    return {"before": before.float(), "scale_used": scale, "scale_after": optimizer.cur_scale,
            "overflow": optimizer.overflow, "changed": bool((weight.detach() != before).any()), "norm": optimizer.last_grad_norm,
            "master": optimizer._copies[id(weight)].clone(), "weight": weight.detach().clone(),
            "grad16": (grad * scale).to(weight.dtype).float() / scale if torch.isfinite(grad).all() else None}


def overflow_and_scaling() -> dict:
    """fp16 (on CPU only copies and adds touch the fp16 tensor) with upstream's scaler flags, SGD on the fp32
    master: good, inf, inf, good, good, good gradients; bf16 with a NaN gradient; clipping by --clip-grad."""
    import torch

    from megatron.config.training import PrecisionConfig
    from megatron.optimizer.full_matrix import FullMatrixOptimizer
    from megatron.optimizer.mixed_precision import GradientPlan, loss_scaler

    def sgd(groups):
        return torch.optim.SGD(groups, lr=0.1)

    def build(dtype, scaler=None, clip=0.0):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(8, 8).to(dtype))
        plan = GradientPlan(scaler=scaler, half=dtype, clip_grad=clip)
        return weight, FullMatrixOptimizer([{"params": [weight]}], lambda p: True, sgd, sgd, gradients=plan)

    good, inf = torch.full((8, 8), 0.01), torch.full((8, 8), 0.01)
    inf[3, 4] = float("inf")
    precision = PrecisionConfig(fp16=True, initial_loss_scale=256.0, loss_scale_window=2, hysteresis=2,
                                min_loss_scale=1.0)
    weight, optimizer = build(torch.float16, loss_scaler(precision))
    fp16 = [_step(optimizer, weight, g) for g in (good, inf, inf, good, good, good)]
    nan = good.clone()
    nan[0, 0] = float("nan")
    weight, optimizer = build(torch.bfloat16)
    bf16 = [_step(optimizer, weight, g) for g in (nan, good)]
    big = torch.full((8, 8), 1.0)  # norm 8: clipped to 1 by --clip-grad 1
    weight, optimizer = build(torch.bfloat16, clip=1.0)
    return _plain({"fp16": fp16, "bf16": bf16, "clipped": _step(optimizer, weight, big)})


def _plain(value):
    """Tensors as nested lists (the result crosses a process boundary after the rank exits)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


# ---- fp32 masters, read from the optimizer, and the same gradients at every layout ----------------------

# the mock data of the 50-step runs: the tiny model learns a bank of 32 phrases over 50 steps (loss 4.9 -> 3.2 with
# Muon) without memorising it (8 phrases: the loss falls to ~1 and bf16's logit roundings become large against it)
LONG_PHRASES = 32
# the synthetic gradients' global norm at steps 1, 2, 3 (--clip-grad 1: the first is not clipped, the others are)
SYNTHETIC_NORMS = (0.5, 3.0, 1.5)


def train_with_masters(rank: int, world_size: int, cases: list, units: bool = False) -> dict:
    """oc.train_logged's results (cases named "long/..." on a bank of LONG_PHRASES phrases); with units, also
    {"units": overflow_and_scaling()} (after the trainings, which set up DeepSpeed's communication that its loss
    scaler logs through). For the cases named "masters/..." or "synthetic/..." also "masters": the fp32 masters
    after the last step, whole and under GPTModel's names ({name: numpy array}, those this rank owns), and
    "norms": the optimizer's global gradient norm at each step.

    "synthetic/..." cases give the optimizer, at every step, bitwise the same gradients at every layout in place of
    the backward's (`synthetic_gradient`, each rank its tp shard, set into every parameter's .grad just before the
    optimizer reduces them over dp: identical on every dp rank, so the bf16 or fp32 sum over dp divided by dp is
    exact), and the same per-head attention maxima for MuonClip's QK-clip (`synthetic_max_logits`): the masters
    then depend on the optimizer's path only (dp reduction, owners, tp gather of fused segments, clipping,
    write-back, the owners' broadcast), not on the forward/backward's bf16 summation order."""
    import engine_cases as ec

    out, phrases = {}, ec.LEARNABLE_PHRASES
    for name, argv in cases:
        record = {}
        real = _patch_build_optimizer(record, synthetic=name.startswith("synthetic/")) \
            if name.startswith(("masters/", "synthetic/")) else None
        ec.LEARNABLE_PHRASES = LONG_PHRASES if name.startswith("long/") else phrases
        try:
            out.update(oc.train_logged(rank, world_size, [(name, argv)]))
        finally:
            ec.LEARNABLE_PHRASES = phrases
            if real is not None:
                import megatron.training.engine as engine

                engine.build_optimizer = real
        if real is not None and "error" not in out[name]:
            out[name].update(masters=record.get("masters"), norms=record.get("norms", []))
    if units:
        out["units"] = overflow_and_scaling()
    return out


def synthetic_gradient(name: str, shape, step: int):
    """The single-rank gradient of GPTModel parameter `name` at `step`: normal, seeded by name and step, scaled
    so that the whole model's gradient norm is about SYNTHETIC_NORMS[step - 1] (the tiny model has ~23k
    parameters)."""
    import zlib

    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 16 + step)
    return torch.randn(tuple(shape), generator=generator) * (SYNTHETIC_NORMS[step - 1] / 151.0)


def synthetic_max_logits(layer: int, heads: int, step: int):
    """Each attention head's largest logit at `step` (one layer, all heads): around MuonClip's threshold 0.05 in
    the tests, so some heads are clipped and others not."""
    import torch

    generator = torch.Generator().manual_seed(1000 * layer + step)
    return 0.02 + 0.06 * torch.rand(heads, generator=generator)


def _patch_build_optimizer(record: dict, synthetic: bool):
    """Wrap megatron.training.engine.build_optimizer so that the optimizer it builds records its masters after
    every step (and, `synthetic`, steps on the synthetic gradients); returns the real function."""
    import megatron.training.engine as engine

    real = engine.build_optimizer

    def build(run, model, ps=None, device_type="cpu"):
        optimizer = real(run, model, ps, device_type)
        _instrument(optimizer, model, run.model, ps, record, synthetic)
        return optimizer

    engine.build_optimizer = build
    return real


def _instrument(optimizer, model, config, ps, record: dict, synthetic: bool) -> None:
    import torch
    from deepspeed.pipe import PipelineModule

    from megatron.checkpoint.universal import full_name_of
    from megatron.model.sharding import partition_of, shard_state_dict

    pipeline = isinstance(model, PipelineModule)
    names = {id(p): full_name_of(local, config, pipeline) for local, p in model.named_parameters()}
    tp, tp_rank = ps.tp_size, ps.tp_rank
    steps = {"count": 0}

    def single_rank_shape(name, param):
        part = partition_of(name, config)
        shape = list(param.shape)
        if part.dim is not None:
            shape[part.dim] = config.vocab_size if part.vocab else shape[part.dim] * tp
        return shape

    own_gradients = optimizer._own_gradients

    def own_synthetic_gradients():
        step = steps["count"] + 1
        for param in optimizer._params:
            name = names[id(param)]
            full = synthetic_gradient(name, single_rank_shape(name, param), step)
            param.grad = shard_state_dict({name: full}, config, tp, tp_rank)[name].to(param.dtype)
            param.main_grad = None
        for module in getattr(optimizer, "attention", []):
            heads = module.heads_per_rank
            logits = synthetic_max_logits(module.layer_index, heads * tp, step)
            module.max_logits = logits[tp_rank * heads:(tp_rank + 1) * heads].clone()
        return own_gradients()

    if synthetic:
        optimizer._own_gradients = own_synthetic_gradients
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        result = step(*args, **kwargs)
        steps["count"] += 1
        record.setdefault("norms", []).append(getattr(optimizer, "last_grad_norm", None))  # None in fp32
        masters = {}
        for param, copy in optimizer._pairs:  # the owned parameters (the same on every tp rank)
            name = names[id(param)]
            whole = copy
            if optimizer._split(param) and id(param) not in optimizer._gathered:
                whole = optimizer._gather(param, copy)  # an elementwise optimizer's shard: merged (collective)
            if partition_of(name, config).vocab:
                whole = whole[:config.vocab_size]  # the padding rows depend on tp
            masters[name] = whole.detach().to(torch.float32).numpy().copy()
        record["masters"] = masters
        return result

    optimizer.step = step_and_record
