"""Read and write our DeepSpeed checkpoints at any tp × pp × ZeRO stage, in the layout-free form.

    ckpt = DeepSpeedCheckpoint("runs/x/checkpoints")         # <save> dir (follows `latest`) or a global_step* dir
    for prefix, tensors in ckpt.iter_groups(): ...            # full (tp=1, unpadded) tensors, layer by layer
    ckpt.full_optimizer_tensor("layers.0.mlp.fc1.weight", "exp_avg")
    megatron.convert.ds_writer.write_checkpoint(source, "runs/y", tp=2, pp=2)   # the writer, weights only

Files read: `mp_rank_MM_model_states.pt` (module weights, client state), `layer_XX-model_TT-model_states.pt`
(pipeline layers), `zero_pp_rank_D_mp_rank_MM_model_states.pt` (ZeRO-3) and the optimizer files (zero_shards.py).
A model-parallel rank MM is pp_rank × tp + tp_rank, as DeepSpeed numbers them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron import deepspeed_compat as compat
from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import (ConversionError, FullModelSource, config_from_client_state,
                                           expected_shapes, layer_prefixes, strip_vocab_padding,
                                           tokenizer_args_from)
from megatron.checkpoint.zero_shards import OptimizerShards, load_mmap, torch_optimizer_param_order
from megatron.model.pipeline import pipe_layer_index, pipe_layer_prefix
from megatron.model.sharding import merge_state_dicts
from megatron.checkpoint.format import READ_ADVICE, checkpoint_format_version, read_latest_tag
from megatron.errors import CheckpointError

MODEL_FILE = compat.MODEL_STATES_FILE
ZERO3_MODEL_FILE = compat.ZERO3_MODEL_STATES_FILE
LAYER_FILE = compat.LAYER_STATES_FILE
TIED_PREFIX = "tied_modules.embedding."


def resolve_tag_dir(path: str) -> str:
    """An global_step* directory itself, or the one a --save directory's pointer files name."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such checkpoint directory")
    names = os.listdir(path)
    if any(MODEL_FILE.match(n) or ZERO3_MODEL_FILE.match(n) for n in names):
        return path
    try:
        return os.path.join(path, read_latest_tag(path, READ_ADVICE))  # a reader: no "start from scratch"
    except CheckpointError as error:
        raise ConversionError(str(error)) from error


def pipe_stage_bounds(config: TransformerConfig, pp: int) -> list[int]:
    """First pipe-layer index of each stage (+ the end), as PipelineModule's 'type:TransformerLayerPipe' splits."""
    from deepspeed.runtime import utils as ds_utils

    weights = [0] + [1] * config.num_layers + [0, 0]
    return ds_utils.partition_balanced(weights=weights, num_parts=pp)


class DeepSpeedCheckpoint(FullModelSource):
    """One saved iteration of our training run, at whatever layout it was written."""

    def __init__(self, path: str, weights: str = "auto", vocab_size: Optional[int] = None):
        if weights not in ("auto", "module", "fp32"):
            raise ValueError(f"weights must be auto, module or fp32 (got {weights!r})")
        self.tag_dir = resolve_tag_dir(path)
        self.description = f"checkpoint {self.tag_dir}"
        names = os.listdir(self.tag_dir)
        self.model_files = {int(m.group(1)): os.path.join(self.tag_dir, n) for n in names if (m := MODEL_FILE.match(n))}
        self.zero3_files = {(int(m.group(2)), int(m.group(1))): os.path.join(self.tag_dir, n)
                            for n in names if (m := ZERO3_MODEL_FILE.match(n))}
        self.layer_files = {(int(m.group(1)), int(m.group(2))): os.path.join(self.tag_dir, n)
                            for n in names if (m := LAYER_FILE.match(n))}
        if not self.model_files and not self.zero3_files:
            raise ConversionError(f"{self.tag_dir}: no mp_rank_*_model_states.pt files: not a DeepSpeed checkpoint")
        first = self.model_files.get(0) or self.zero3_files.get((0, 0))
        if first is None:
            raise ConversionError(f"{self.tag_dir}: the files of model-parallel rank 0 are missing")
        self.state0 = load_mmap(first, remember=True)
        try:
            self.format_version = checkpoint_format_version(self.state0, first)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        self.config = config_from_client_state(self.state0, self.description)
        if vocab_size:
            self.config = self.config.replace(vocab_size=vocab_size)
        args = self.state0.get("args") or {}
        self.args = dict(args)
        self.tokenizer_args = tokenizer_args_from(args)
        self.tp = int(args.get("tensor_model_parallel_size") or 1)
        self.pp = int(args.get("pipeline_model_parallel_size") or 1)
        self.pipeline = bool(self.layer_files) or self.pp > 1
        ds_config = self.state0.get("ds_config") or {}
        self.zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0)) if isinstance(ds_config, dict) else 0
        self.dp = int(self.state0.get("dp_world_size") or 1)
        mp_world = int(self.state0.get("mp_world_size") or self.tp * self.pp)
        if mp_world != self.tp * self.pp:
            raise ConversionError(f"{self.tag_dir}: DeepSpeed saved model-parallel size {mp_world} but the run's "
                                  f"arguments say tp {self.tp} × pp {self.pp}")
        self._check_files()
        self.weights = weights
        self._optim: dict[int, OptimizerShards] = {}
        self._modules: dict[int, dict] = {}

    # ---- layout checks -------------------------------------------------------------------------------
    def _check_files(self) -> None:
        mp_world = self.tp * self.pp
        if self.zero_stage == 3:
            have = {mp for (mp, _) in self.zero3_files}
        else:
            have = set(self.model_files)
        missing = sorted(set(range(mp_world)) - have)
        if missing:
            raise ConversionError(f"{self.tag_dir}: model states of model-parallel ranks {missing} are missing "
                                  f"(the run had tp {self.tp} × pp {self.pp}); copy the complete checkpoint")
        if self.pipeline:
            missing = [compat.layer_states_name(i, t) for i in self._saved_layer_indices() for t in range(self.tp)
                       if (i, t) not in self.layer_files]
            if missing:
                raise ConversionError(f"{self.tag_dir}: pipeline layer files missing: {missing[:6]}")

    def _saved_layer_indices(self) -> list[int]:
        return sorted({pipe_layer_index(name, self.config) for name in _all_names(self.config)})

    @property
    def client_state(self) -> dict:
        return self.state0

    @property
    def iteration(self) -> int:
        return int(self.state0.get("iteration") or self.state0.get("global_steps") or 0)

    def mp_rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def stage_of(self, full_name: str) -> int:
        if not self.pipeline:
            return 0
        bounds = pipe_stage_bounds(self.config, self.pp)
        index = pipe_layer_index(full_name, self.config)
        return max(s for s in range(self.pp) if bounds[s] <= index)

    # ---- local (pipe) names <-> full names ----------------------------------------------------------------
    def _to_full_name(self, local: str) -> str:
        if not self.pipeline:
            return local
        if local.startswith(TIED_PREFIX):
            return "embedding." + local[len(TIED_PREFIX):]
        index, rest = local.split(".", 1)
        return pipe_layer_prefix(int(index), self.config) + rest

    # ---- weights -------------------------------------------------------------------------------------------
    def _module(self, mp_rank: int) -> dict:
        if mp_rank not in self._modules:
            module = load_mmap(self.model_files[mp_rank], remember=True).get("module")
            if not module:
                raise ConversionError(f"{self.model_files[mp_rank]} holds no module weights")
            self._modules[mp_rank] = module
        return self._modules[mp_rank]

    def _uses_fp32_masters(self) -> bool:
        if self.zero_stage == 3:
            return True
        if self.weights == "module":
            return False
        has = _has_optim_files(self.tag_dir)
        if self.weights == "fp32" and not has:
            raise ConversionError(f"{self.tag_dir}: --weights fp32 needs ZeRO or bf16 optimizer files; none found")
        return has

    def _local_shard(self, name: str, tp_rank: int) -> torch.Tensor:
        stage = self.stage_of(name)
        mp = self.mp_rank(tp_rank, stage)
        if self._uses_fp32_masters():
            return self.optimizer(mp).get(name, "fp32")
        if self.pipeline:
            index = pipe_layer_index(name, self.config)
            layer_sd = self._layer(index, tp_rank)
            return layer_sd[name[len(pipe_layer_prefix(index, self.config)):]]
        return self._module(mp)[name]

    def _layer(self, index: int, tp_rank: int) -> dict:
        key = (index, tp_rank)
        if getattr(self, "_layer_cache_key", None) != key:
            self._layer_cache = load_mmap(self.layer_files[key])
            self._layer_cache_key = key
        return self._layer_cache

    def load_group(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name in expected_shapes(self.config, prefix):
            shards = [{name: self._local_shard(name, t)} for t in range(self.tp)]
            merged = merge_state_dicts(shards, self.config)[name]
            out[name] = strip_vocab_padding(name, merged, self.config, self.description, self.keep_vocab_padding)
        return out

    # ---- optimizer ------------------------------------------------------------------------------------------
    def optimizer(self, mp_rank: int) -> OptimizerShards:
        if mp_rank not in self._optim:
            tp_rank, stage = mp_rank % self.tp, mp_rank // self.tp
            if self.zero_stage == 3:
                model_state = load_mmap(self.zero3_files[(mp_rank, 0)], remember=True)
            else:
                model_state = load_mmap(self.model_files[mp_rank], remember=True)
            shapes, order = self._local_shapes(mp_rank, model_state, stage, tp_rank)
            self._optim[mp_rank] = OptimizerShards(
                self.tag_dir, mp_rank, shapes, self._to_full_name, self.zero_stage, model_state,
                torch_optimizer_param_order(order, shapes))
        return self._optim[mp_rank]

    def _local_shapes(self, mp_rank, model_state, stage, tp_rank) -> tuple[dict, list]:
        """Local parameter names (engine module names) with shapes, in the module's parameter order."""
        if model_state.get("param_shapes"):
            shapes = {k: tuple(v) for group in model_state["param_shapes"] for k, v in group.items()}
            return shapes, list(shapes)
        if not self.pipeline:
            buffers = set(model_state.get("buffer_names") or [])
            module = model_state["module"]
            shapes = {k: tuple(v.shape) for k, v in module.items() if k not in buffers}
            return shapes, list(shapes)
        bounds = pipe_stage_bounds(self.config, self.pp)
        shapes = {}
        tied = not self.config.untie_embeddings_and_output_weights
        last = self.config.num_layers + 2
        has_tied = tied and (stage == 0 or bounds[stage] <= last < bounds[stage + 1])
        if has_tied:  # PipelineModule registers tied_modules before the layers
            for k, v in load_mmap(self.layer_files[(0, tp_rank)]).items():
                shapes[TIED_PREFIX + k] = tuple(v.shape)
        for index in range(bounds[stage], bounds[stage + 1]):
            if tied and index in (0, last):
                continue
            for k, v in load_mmap(self.layer_files[(index, tp_rank)]).items():
                shapes[f"{index}.{k}"] = tuple(v.shape)
        return shapes, list(shapes)

    def optimizer_step(self) -> Optional[int]:
        return self.optimizer(0).step

    def model_states(self, tp_rank: int, stage: int) -> tuple[dict, list[tuple[str, tuple]]]:
        """(the model-states object of tp rank `tp_rank` of pipeline stage `stage`, its parameters as (full name,
        local shape) in the order the engine's optimizer numbers them: training/engine's param groups, weights
        with >= 2 dims first, then the rest, each in module order). ZeRO 0-2."""
        mp_rank = self.mp_rank(tp_rank, stage)
        model_state = load_mmap(self.model_files[mp_rank], remember=True)
        shapes, order = self._local_shapes(mp_rank, model_state, stage, tp_rank)
        return model_state, [(self._to_full_name(n), tuple(shapes[n])) for n in torch_optimizer_param_order(order,
                                                                                                          shapes)]

    def full_optimizer_tensor(self, name: str, key: str) -> torch.Tensor:
        """The full (tp=1, unpadded vocabulary) fp32 / exp_avg / exp_avg_sq of parameter `name`."""
        stage = self.stage_of(name)
        if key == "fp32" and not self._uses_fp32_masters():
            shards = [{name: self._local_shard(name, t).float()} for t in range(self.tp)]
        else:
            shards = [{name: self.optimizer(self.mp_rank(t, stage)).get(name, key)} for t in range(self.tp)]
        merged = merge_state_dicts(shards, self.config)[name]
        return strip_vocab_padding(name, merged, self.config, self.description, self.keep_vocab_padding)

    def lr_scheduler_state(self) -> Optional[dict]:
        return self.state0.get("lr_scheduler")


def _all_names(config: TransformerConfig) -> list[str]:
    return [n for p in layer_prefixes(config) for n in expected_shapes(config, p)]


def _has_optim_files(tag_dir: str) -> bool:
    return any(compat.is_optim_states_file(n) for n in os.listdir(tag_dir))
