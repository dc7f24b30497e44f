"""Write our checkpoint layout (weights only) at any tp × pp from any reader's stream, so a run can train on
from it (--finetune, or --load at that layout): Hugging Face → ours, and resharding offline.

    write_checkpoint(source, "runs/y/checkpoints", tp=2, pp=2)
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
from tqdm import tqdm

from megatron import deepspeed_compat as compat
from megatron.checkpoint.format import (CHECKPOINT_FORMAT_KEY, checkpoint_format_marker, checkpoint_tag,
                                        publish_directory, write_manifest, write_pointers)
from megatron.checkpoint.layout import ConversionError, FullModelSource, layer_prefixes
from megatron.model.pipeline import pipe_layer_index, pipe_layer_prefix
from megatron.model.sharding import shard_state_dict


def write_checkpoint(source: FullModelSource, save_dir: str, tp: int = 1, pp: int = 1, *,
                     dtype: torch.dtype = torch.float32, iteration: int = 0, args: Optional[dict] = None,
                     progress: bool = True) -> str:
    """Write `source` as a weights-only checkpoint of our training run at tp × pp (load it with --finetune).

    pp == 1 writes what DeepSpeedEngine reads (mp_rank_TT_model_states.pt with the module); pp > 1 writes
    PipelineModule's per-layer files plus one mp_rank file per model-parallel rank.
    """
    import deepspeed

    from megatron.config.parallel import ParallelConfig, layout_errors

    config = source.config
    errors = layout_errors(tp * pp, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                           config)
    if errors:
        raise ConversionError(f"cannot write a tp {tp} × pp {pp} checkpoint: " + "; ".join(errors))
    tag = checkpoint_tag(iteration)
    tmp_dir = os.path.join(save_dir, ".tmp-" + tag)
    final_dir = os.path.join(save_dir, tag)
    if os.path.exists(final_dir):
        raise ConversionError(f"{final_dir} already exists; choose another --save directory")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    run_args = dict(args or {})
    run_args.update({k: v for k, v in config.to_dict().items()})
    run_args.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if source.tokenizer_args:
        run_args.update(source.tokenizer_args)
    modules = [dict() for _ in range(tp)]
    for prefix, tensors in tqdm(source.iter_groups(), total=len(layer_prefixes(config)), desc="write checkpoint",
                                unit="layer", disable=not progress):
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        for t in range(tp):
            shard = shard_state_dict(tensors, config, tp, t)
            if pp == 1:
                modules[t].update(shard)
                continue
            index = pipe_layer_index(next(iter(shard)), config)
            local = {k[len(pipe_layer_prefix(index, config)):]: v for k, v in shard.items()}
            torch.save(local, os.path.join(tmp_dir, compat.layer_states_name(index, t)))
    client_state = {CHECKPOINT_FORMAT_KEY: checkpoint_format_marker(), "args": run_args, "model_config": config.to_dict(),
                    "converted_from": source.description}
    for stage in range(pp):
        for t in range(tp):
            state = dict(module=modules[t] if pp == 1 else None, buffer_names=[], optimizer=None, param_shapes=None,
                         lr_scheduler=None, skipped_steps=0, global_steps=iteration, global_samples=0,
                         dp_world_size=1, mp_world_size=tp * pp, ds_config={}, ds_version=deepspeed.__version__,
                         **client_state)
            torch.save(state, os.path.join(tmp_dir, compat.model_states_name(stage * tp + t)))
    write_manifest(tmp_dir, iteration=iteration, world_size=1, converted_from=source.description)
    publish_directory(tmp_dir, final_dir)
    write_pointers(save_dir, iteration, tag)
    return final_dir
