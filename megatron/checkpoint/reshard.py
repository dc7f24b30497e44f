"""Resume a run on a different layout: load a checkpoint saved at (tp, pp, dp, ZeRO) into an engine at (tp', pp', dp', ZeRO').

    progress = load_checkpoint_any_layout(training_engine, load_dir)   # resume.py plans when: another layout

Every parameter's fp32 master weight and Adam moments are consolidated to the full (tp=1) tensor
(ds_checkpoint.DeepSpeedCheckpoint), cut to this rank's tp shard, and written into whatever the
engine keeps (a plain torch optimizer, ZeRO-1/2 or bf16 flat partitions, ZeRO-3 partitions) through
DeepSpeed's tensor-fragment API. The Adam step, the LR schedule, the iteration and consumed samples
follow. Per-rank RNG streams cannot be mapped onto a different number of ranks: they start fresh
from the run's seed (exact with dropout 0; otherwise the dropout masks differ from the old run's).

A whole-matrix optimizer (muon, muonclip, dshampooadamw, galoreadamw, adam8bit: megatron/optimizer/full_matrix.py,
which DeepSpeed runs at stage 0) keeps its own state: every weight is set from its fp32 master, and each
parameter's inner optimizer state and master are consolidated and cut for this rank by full_matrix_state.py.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron.checkpoint.ds_checkpoint import TIED_PREFIX, DeepSpeedCheckpoint
from megatron.checkpoint.full_matrix_state import load_full_matrix_state, state_source
from megatron.checkpoint.layout import ConversionError
from megatron.model.pipeline import pipe_layer_prefix
from megatron.model.sharding import shard_state_dict
from megatron.optimizer.full_matrix import FullMatrixOptimizer
from megatron.checkpoint.format import TrainingProgress
from megatron import deepspeed_compat as compat

WEIGHT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
                 "vocab_size", "normalization", "swiglu", "position_embedding_type", "max_position_embeddings",
                 "untie_embeddings_and_output_weights", "add_bias_linear")


def config_differences(saved, current) -> list[str]:
    return [f"{f}: checkpoint {getattr(saved, f)!r} vs this run {getattr(current, f)!r}"
            for f in WEIGHT_FIELDS if getattr(saved, f) != getattr(current, f)]


def _full_name(local: str, config, pipeline: bool) -> str:
    if not pipeline:
        return local
    if local.startswith(TIED_PREFIX):
        return "embedding." + local[len(TIED_PREFIX):]
    index, rest = local.split(".", 1)
    return pipe_layer_prefix(int(index), config) + rest


def _set_zero3(param, optimizer, value: torch.Tensor, key: Optional[str]) -> None:
    """Write this rank's ZeRO-3 partition of `value` (the full tp-shard tensor) into the fp32 state `key`
    (None: the fp32 master, and the module's own partition too)."""
    partition = compat.fp32_opt_state_partition(optimizer, param, key)
    n = partition.numel()
    rank = compat.param_partition_rank(optimizer, param)
    flat = value.flatten().to(partition.dtype)
    padded = torch.zeros(n * (rank + 1), dtype=flat.dtype)
    padded[: min(flat.numel(), padded.numel())] = flat[: padded.numel()]
    mine = padded[n * rank:]
    partition.data.copy_(mine)
    if key is None:
        param.ds_tensor.data.copy_(mine.to(param.ds_tensor.dtype).view_as(param.ds_tensor))


def _ensure_adam_states(optimizer) -> None:
    """Create (zero) Adam states for DeepSpeed's flat fp32 partitions before the first step, and link them to
    the parameters, so the tensor-fragment API can write them (DeepSpeed creates them lazily at step 1)."""
    base = getattr(optimizer, "optimizer", None)
    if base is None:
        return
    flats = compat.flat_fp32_partitions(optimizer)
    if flats is None:
        raise ConversionError(f"cannot reach the fp32 partitions of {type(optimizer).__name__} to load Adam states")
    tensor_step = isinstance(base, torch.optim.Optimizer) and type(base).__module__.startswith("torch.")
    for flat in flats:
        state = base.state[flat]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0) if tensor_step else 0
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = torch.zeros_like(flat)
    compat.relink_hp_optimizer_states(optimizer)


def _set_step(optimizer, step: int) -> None:
    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        if "step" in group:
            group["step"] = step
    for state in base.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(float(step), dtype=old.dtype) if torch.is_tensor(old) else step


def load_checkpoint_any_layout(training_engine, load_dir: str, *, load_optim: bool = True, finetune: bool = False,
                               progress_bar: bool = True, source=None) -> TrainingProgress:
    """Load `load_dir` (any layout) into `training_engine` (megatron.training.engine.TrainingEngine).

    Collective over the engine's ranks only through DeepSpeed's own state (no communication here); each
    rank reads what it needs from the files. finetune: weights only, progress starts at iteration 0.
    source: an already opened checkpoint with DeepSpeedCheckpoint's reading interface (a universal folder, an
    argonne-lcf/Megatron-DeepSpeed checkpoint); default DeepSpeedCheckpoint(load_dir).
    """
    ckpt = source if source is not None else DeepSpeedCheckpoint(load_dir)
    config, ds = training_engine.model_config, training_engine.engine
    differences = config_differences(ckpt.config, config)
    if differences:
        raise ConversionError(f"--load {load_dir}: the checkpoint's model differs from this run's: "
                              + "; ".join(differences))
    has_moments = load_optim and not finetune and "converted_from" not in ckpt.client_state
    if isinstance(ds.optimizer, FullMatrixOptimizer):
        _load_whole_matrix(training_engine, ckpt, has_moments, progress_bar)
    else:
        _load_through_deepspeed(training_engine, ckpt, has_moments, progress_bar, load_dir)
    if training_engine.is_pipeline:
        compat.synchronize_tied_weights(ds.module)
    if finetune:
        return TrainingProgress(args=ckpt.args, checkpoint_path=ckpt.tag_dir)
    if ckpt.lr_scheduler_state() is not None and ds.lr_scheduler is not None:
        ds.lr_scheduler.load_state_dict(ckpt.lr_scheduler_state())
    state = ckpt.client_state
    ds.global_steps = int(state.get("global_steps") or 0)
    ds.global_samples = int(state.get("global_samples") or 0)
    ds.skipped_steps = int(state.get("skipped_steps") or 0)
    return TrainingProgress(iteration=int(state.get("iteration") or 0),
                            consumed_samples=int(state.get("consumed_samples") or 0),
                            consumed_tokens=int(state.get("consumed_tokens") or 0), args=ckpt.args,
                            checkpoint_path=ckpt.tag_dir)


def _load_whole_matrix(training_engine, ckpt, has_moments: bool, progress_bar: bool) -> None:
    """A whole-matrix optimizer (megatron/optimizer/full_matrix.py): every weight from its fp32 master, and with
    `has_moments` the optimizer's masters and state cut for this rank (full_matrix_state.py). Collective: a
    refusal on any rank is raised on all."""
    error = None
    try:
        _load_whole_matrix_here(training_engine, ckpt, has_moments, progress_bar)
    except ConversionError as refused:
        error = str(refused)
    errors = [error]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # a refusal can come from one rank only (the owner of a parameter): every rank raises it, none waits
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConversionError(first)


def _load_whole_matrix_here(training_engine, ckpt, has_moments: bool, progress_bar: bool) -> None:
    config, ps, ds = training_engine.model_config, training_engine.ps, training_engine.engine
    source = state_source(ckpt) if has_moments else None
    owned = {id(param) for _, param, _, _ in ds.optimizer.owned_layout()} if source is not None else set()
    names, full_masters = {}, {}  # the owned parameters' full masters are read once, for weight and optimizer
    named = list(ds.module.named_parameters())
    bar = tqdm(named, desc=f"load {os.path.basename(ckpt.tag_dir)} at tp {ps.tp_size} pp {ps.pp_size}",
               unit="param", disable=not progress_bar or ps.rank != 0)
    for local, param in bar:
        name = _full_name(local, config, training_engine.is_pipeline)
        names[id(param)] = name
        master = source.master(name) if source is not None else ckpt.full_optimizer_tensor(name, "fp32").float()
        if id(param) in owned:
            full_masters[name] = master
        master = shard_state_dict({name: master}, config, ps.tp_size, ps.tp_rank)[name]
        if tuple(master.shape) != tuple(param.shape):
            raise ConversionError(f"{ckpt.tag_dir}: {name} resharded to {tuple(master.shape)} but this run's "
                                  f"parameter is {tuple(param.shape)}")
        with torch.no_grad():
            param.data.copy_(master.to(param.dtype))
    if source is not None:
        load_full_matrix_state(ds.optimizer, names, source, config, ps.tp_size, ps.tp_rank, full_masters)


def _load_through_deepspeed(training_engine, ckpt, has_moments: bool, progress_bar: bool, load_dir: str) -> None:
    """Adam's fp32 masters and moments into whatever DeepSpeed's engine keeps (module docstring)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    config, ps, ds = training_engine.model_config, training_engine.ps, training_engine.engine
    optimizer = ds.optimizer
    zero3 = ds.zero_optimization_partition_weights()
    if has_moments and not isinstance(optimizer, torch.optim.Optimizer):
        _ensure_adam_states(optimizer)
    named = list(ds.module.named_parameters())
    bar = tqdm(named, desc=f"load {os.path.basename(ckpt.tag_dir)} at tp {ps.tp_size} pp {ps.pp_size}",
               unit="param", disable=not progress_bar or ps.rank != 0)
    for local, param in bar:
        name = _full_name(local, config, training_engine.is_pipeline)

        def shard(key, name=name):
            full = ckpt.full_optimizer_tensor(name, key)
            return shard_state_dict({name: full}, config, ps.tp_size, ps.tp_rank)[name].float()

        master = shard("fp32")
        expected = tuple(param.ds_shape) if zero3 else tuple(param.shape)
        if tuple(master.shape) != expected:
            raise ConversionError(f"{load_dir}: {name} resharded to {tuple(master.shape)} but this run's parameter "
                                  f"is {expected}")
        with torch.no_grad():
            if zero3:
                _set_zero3(param, optimizer, master, None)
            else:
                param.data.copy_(master.to(param.dtype))
                safe_set_full_fp32_param(param, master)
            if not has_moments:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = shard(key)
                if zero3:
                    _set_zero3(param, optimizer, value, key)
                elif compat.has_hp_mapping(param):
                    safe_set_full_optimizer_state(param, value, key)
                else:
                    optimizer.state[param][key] = value.clone()  # a plain torch optimizer (no ZeRO, fp32)
                    optimizer.state[param].setdefault("step", torch.tensor(0.0))
    if has_moments and ckpt.optimizer_step() is not None:
        _set_step(optimizer, ckpt.optimizer_step())
