"""DeepSpeed universal checkpoints: what our runs save for `ds_to_universal`, the conversion, and loading one back.

A universal checkpoint is a folder with one sub-folder per parameter, `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`,
each holding the full (tp=1, vocabulary unpadded) tensor, plus copies of the source's `mp_rank_*_model_states.pt`
(our client state: iteration, consumed samples, args, model config, LR schedule). DeepSpeed's
`python -m deepspeed.checkpoint.ds_to_universal` writes it from a ZeRO checkpoint, and DeepSpeed's own loader
(`"checkpoint": {"load_universal": true}`) cuts it back to any tp × pp × dp. Three pieces live here:

1. `universal_checkpoint_info(config, tp, pipeline)`: the patterns `ds_to_universal` needs to merge our tensor-
   parallel shards (DeepSpeed's contract, see deepspeed/checkpoint/constants.py and ds_to_universal.merge_tp_slices):
       vocabulary_parameter_patterns     word embedding, untied output layer (rows padded to padded_vocab_size)
       tp_replicated_parameter_patterns  norms, row-parallel biases, position embeddings, the final norm
       parameter_with_row_parallelism    attention.dense.weight, mlp.fc2.weight (split on dim 1)
       parameter_with_2_sub_params_cat_dim_0   SwiGLU's fc1 = [gate_r | up_r] on each rank
       parameter_with_sub_params (+ sub_param_shard_widths, version 0.4)   attention.qkv = [q_r | k_r | v_r],
                                         three sub-parameters of uneven widths under GQA
       pipeline_replicated_parameter_patterns   the tied embedding, held by the first and last stage
   The engine attaches it to the module; DeepSpeed saves it in every mp_rank file.
2. `convert_to_universal(checkpoint, out)`: runs DeepSpeed's converter, then renames the per-parameter folders to
   GPTModel names (a pipeline run names them `3.attention.qkv.weight`), so one universal folder serves pp=1 and
   pp>1 alike. Written to a temporary name and renamed when complete; `<parent>/latest_universal` moves last.
3. `UniversalCheckpoint`: a FullModelSource over a universal folder (for to-hf, reshard, and the fp32 loader);
   `load_universal_checkpoint(training_engine, path)`: resume from one through DeepSpeed's loader, mapping this
   engine's parameter names (pipe or not) onto the folder's.
A whole-matrix optimizer's folder (written by convert/to_universal.py itself, with its state in files of its own
beside DeepSpeed's: full_matrix_state.py) is read by the same loader as a checkpoint on another layout.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from megatron import deepspeed_compat as compat
from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import (ConversionError, FullModelSource, config_from_client_state,
                                           expected_shapes, full_parameter_names, tokenizer_args_from)
from megatron.model.pipeline import pipe_layer_index, pipe_layer_prefix
from megatron.checkpoint.unpickle import safe_load
from megatron.checkpoint.zero_shards import load_mmap

LATEST_UNIVERSAL_FILENAME = compat.LATEST_UNIVERSAL_FILENAME  # DeepSpeed's pointer to the newest universal folder
UNIVERSAL_SUFFIX = "_universal"
TIED_PIPE_PREFIX = "tied_modules.embedding."  # PipelineModule's name for our TiedLayerSpec("embedding")
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


# ---- 1. what every checkpoint carries ------------------------------------------------------------------

def universal_checkpoint_info(config: TransformerConfig, tp_size: int, pipeline: bool) -> dict:
    """DeepSpeed's `universal_checkpoint_info` for our parameter names at this layout.

    Every pattern matches at least one parameter of this model (ds_to_universal's strict mode refuses unused
    patterns), and each pattern is anchored to the naming in use: GPTModel names, or PipelineModule's
    `<pipe layer index>.<name in layer>` with the tied embedding under `tied_modules.embedding.`.
    """
    from deepspeed.checkpoint import constants as C

    L = config.num_layers
    tied = not config.untie_embeddings_and_output_weights
    bias = config.add_bias_linear
    norm_bias = config.normalization == "layernorm"
    if pipeline:
        layer = r"^\d+\."  # transformer layers are pipe layers 1..L
        embedding = re.escape(TIED_PIPE_PREFIX) if tied else r"0\."
        final_norm = rf"{L + 1}\."
        output = rf"^{L + 2}\.weight$"
    else:
        layer = r"^layers\.\d+\."
        embedding = r"embedding\."
        final_norm = r"final_norm\."
        output = r"^output_layer\.weight$"
    weight_or_bias = r"(weight|bias)" if norm_bias else r"weight"

    vocab = [rf"^{embedding}word_embeddings\.weight$"]
    if not tied:
        vocab.append(output)
    replicated = [layer + rf"(input_norm|post_attention_norm)\.{weight_or_bias}$",
                  rf"^{final_norm}{weight_or_bias}$"]
    if bias:
        replicated.append(layer + r"(attention\.dense|mlp\.fc2)\.bias$")
    if config.position_embedding_type == "learned_absolute":
        replicated.append(rf"^{embedding}position_embeddings\.weight$")
    row_parallel = [layer + r"(attention\.dense|mlp\.fc2)\.weight$"]

    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    sub_params, widths = [], {}
    for suffix, shape in (("weight", ((q, kv, kv), config.hidden_size)), ("bias", ((q, kv, kv),))):
        if suffix == "bias" and not bias:
            continue
        pattern = layer + rf"attention\.qkv\.{suffix}$"
        sub_params.append({"patterns": [pattern], "shape": shape, "partition_dim": 0})
        widths[pattern] = [[size // tp_size] * tp_size for size in (q, kv, kv)]

    info = {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        C.ORIGINAL_VOCAB_SIZE: config.vocab_size,
        C.PADDED_VOCAB_SIZE: config.padded_vocab_size(tp_size),
        C.VOCABULARY_PARAMETER_PATTERNS: vocab,
        C.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        C.PARAMETER_WITH_SUB_PARAMS: sub_params,
        C.SUB_PARAM_SHARD_WIDTHS: widths,
    }
    if config.swiglu:
        info[C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [layer + r"mlp\.fc1\." + ("(weight|bias)$" if bias else "weight$")]
    if pipeline and tied:
        info[C.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = [rf"^{re.escape(TIED_PIPE_PREFIX)}"]
    return info


# ---- names: GPTModel (one naming for every layout) <-> PipelineModule ------------------------------------

def pipe_name(full_name: str, config: TransformerConfig) -> str:
    """PipelineModule's name of GPTModel parameter `full_name` (the tied embedding under tied_modules)."""
    if full_name.startswith("embedding.") and not config.untie_embeddings_and_output_weights:
        return TIED_PIPE_PREFIX + full_name[len("embedding."):]
    index = pipe_layer_index(full_name, config)
    return f"{index}." + full_name[len(pipe_layer_prefix(index, config)):]


def full_name_of(local_name: str, config: TransformerConfig, pipeline: bool) -> str:
    """GPTModel's name of an engine parameter (PipelineModule names when `pipeline`)."""
    if not pipeline:
        return local_name
    if local_name.startswith(TIED_PIPE_PREFIX):
        return "embedding." + local_name[len(TIED_PIPE_PREFIX):]
    index, rest = local_name.split(".", 1)
    return pipe_layer_prefix(int(index), config) + rest


# ---- 3a. reading a universal folder ------------------------------------------------------------------

# ds_to_universal copies the source's model-state files: mp_rank_MM (ZeRO 0-2) or zero_pp_rank_D_mp_rank_MM (ZeRO-3)
MODEL_STATE_FILE = compat.DP0_MODEL_STATES_FILE


def is_universal_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, compat.UNIVERSAL_ZERO_DIR)) and any(MODEL_STATE_FILE.match(n) for n in os.listdir(path))


def resolve_universal_folder(path: str) -> str:
    """A universal folder itself, or the one `<path>/latest_universal` names; an error saying how to make one."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    if is_universal_folder(path):
        return path
    pointer = os.path.join(path, LATEST_UNIVERSAL_FILENAME)
    if not os.path.isfile(pointer):
        raise ConversionError(
            f"{path} is neither a universal checkpoint folder (zero/ + mp_rank_*_model_states.pt) nor a directory "
            f"with a {LATEST_UNIVERSAL_FILENAME} pointer; make one with `python tools/convert_checkpoint.py "
            f"to-universal --load {path}`, or drop --universal-checkpoint to load a regular checkpoint")
    tag = open(pointer).read().strip()
    folder = os.path.join(path, tag)
    if not is_universal_folder(folder):
        raise ConversionError(f"{pointer} names {tag!r}, but {folder} is not a complete universal checkpoint folder")
    return folder


def check_universal_folder(path: str) -> str:
    """resolve_universal_folder for --load --universal-checkpoint: a CheckpointError the entry point reports."""
    from megatron.errors import CheckpointError

    try:
        return resolve_universal_folder(path)
    except ConversionError as err:
        raise CheckpointError(f"--load {path} --universal-checkpoint: {err}") from None


class UniversalCheckpoint(FullModelSource):
    """A universal folder as a layout-free model (+ fp32 masters and Adam moments), whichever naming it uses."""

    def __init__(self, path: str, vocab_size: Optional[int] = None):
        self.tag_dir = resolve_universal_folder(path)
        self.description = f"universal checkpoint {self.tag_dir}"
        files = sorted((int(m.group(2)), n) for n in os.listdir(self.tag_dir) if (m := MODEL_STATE_FILE.match(n)))
        self.state0 = load_mmap(os.path.join(self.tag_dir, files[0][1]), remember=True)
        self.config = config_from_client_state(self.state0, self.description)
        if vocab_size:
            self.config = self.config.replace(vocab_size=vocab_size)
        self.args = dict(self.state0.get("args") or {})
        self.tokenizer_args = tokenizer_args_from(self.args)
        self.zero_dir = os.path.join(self.tag_dir, compat.UNIVERSAL_ZERO_DIR)
        self._dirs = self._index()

    def _index(self) -> dict[str, str]:
        """Full name -> its folder under zero/ (GPTModel names, or a pipeline run's names if not renamed)."""
        present = set(os.listdir(self.zero_dir))
        dirs, missing = {}, []
        for name in full_parameter_names(self.config):
            candidates = [name, pipe_name(name, self.config)]
            found = next((c for c in candidates if c in present), None)
            if found is None:
                missing.append(name)
            else:
                dirs[name] = os.path.join(self.zero_dir, found)
        if missing:
            raise ConversionError(f"{self.description}: no zero/<name> folder for {missing[:4]}"
                                  f"{' ...' if len(missing) > 4 else ''}; was the conversion complete?")
        return dirs

    @property
    def client_state(self) -> dict:
        return self.state0

    @property
    def iteration(self) -> int:
        return int(self.state0.get("iteration") or self.state0.get("global_steps") or 0)

    def folder_of(self, full_name: str) -> str:
        return self._dirs[full_name]

    def full_optimizer_tensor(self, name: str, key: str) -> torch.Tensor:
        if key not in STATE_KEYS:
            raise ValueError(f"optimizer state key must be one of {STATE_KEYS}, got {key!r}")
        path = os.path.join(self._dirs[name], f"{key}.pt")
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is missing: the universal checkpoint has no {key!r} for {name}")
        tensor = safe_load(path)["param"]
        expected = expected_shapes(self.config, _group_of(name))[name]
        if tuple(tensor.shape) != tuple(expected):
            raise ConversionError(f"{path} holds a tensor of shape {tuple(tensor.shape)}, but {name} of the saved "
                                  f"model configuration is {tuple(expected)}")
        return tensor

    def load_group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name: self.full_optimizer_tensor(name, "fp32") for name in expected_shapes(self.config, prefix)}

    def optimizer_step(self) -> Optional[int]:
        """Adam's step: zero/<name>/step.pt (from ZeRO-1/2), else the ZeRO-3 optimizer state DeepSpeed keeps in
        zero/optimizer_state.pt (where its own loader reads it)."""
        path = os.path.join(next(iter(self._dirs.values())), "step.pt")
        if os.path.isfile(path):
            step = safe_load(path)
        else:
            path = os.path.join(self.zero_dir, "optimizer_state.pt")
            if not os.path.isfile(path):
                return None
            common = safe_load(path)
            states = (common.get("optimizer_state_dict") or {}).get("state") or {}
            step = next(iter(states.values()), {}).get("step", common.get("base_optimizer_state_step"))
            if step is None:
                return None
        return int(step.item() if torch.is_tensor(step) else step)

    def lr_scheduler_state(self) -> Optional[dict]:
        return self.state0.get("lr_scheduler")

    @property
    def has_full_matrix_state(self) -> bool:
        """Whether the folder holds a whole-matrix optimizer's state (written by convert/to_universal.py)."""
        from megatron.checkpoint.full_matrix_state import UNIVERSAL_STATE_FILE

        return os.path.isfile(os.path.join(self.zero_dir, UNIVERSAL_STATE_FILE))

    def full_matrix_state(self):
        """The whole-matrix optimizer state of this folder (full_matrix_state.UniversalFullMatrixState)."""
        from megatron.checkpoint.full_matrix_state import UniversalFullMatrixState

        if not self.has_full_matrix_state:
            raise ConversionError(f"{self.description} holds Adam state only (DeepSpeed's layout), not a whole-matrix "
                                  "optimizer's; pass --no-load-optim to start the optimizer fresh")
        return UniversalFullMatrixState(self)


def _group_of(name: str) -> str:
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2]) + "."
    return name.split(".")[0] + "."


# ---- 3b. resuming a run from a universal folder ------------------------------------------------------------

def load_universal_checkpoint(training_engine, path: str, *, load_optim: bool = True, finetune: bool = False,
                              source: Optional["UniversalCheckpoint"] = None):
    """Resume `training_engine` from a universal folder (`source`: it, already opened); see _load_universal
    (errors as CheckpointError)."""
    from megatron.errors import CheckpointError

    try:
        return _load_universal(training_engine, path, load_optim=load_optim, finetune=finetune, source=source)
    except ConversionError as err:
        raise CheckpointError(str(err)) from None


def _load_universal(training_engine, path: str, *, load_optim: bool, finetune: bool, source=None):
    """Resume `training_engine` from the universal folder `path` (or the one `<path>/latest_universal` names).

    ZeRO 1-2: DeepSpeed's own loader (the engine was built with checkpoint.load_universal) restores the fp32
    masters, Adam moments and step, the LR schedule and DeepSpeed's counters. Without ZeRO (which DeepSpeed's
    universal loader does not handle), at ZeRO-3 (DeepSpeed 0.19.8 then looks for ZeRO-3's own
    zero_pp_rank_*_model_states.pt names, which a folder converted from ZeRO-1/2 lacks), with --finetune or
    --no-load-optim, the folder is read through UniversalCheckpoint by the same loader that resumes a
    checkpoint on another layout. RNG streams start
    fresh from the seed either way (they belong to the ranks of the old layout).
    """
    from megatron.checkpoint.reshard import config_differences, load_checkpoint_any_layout
    from megatron.checkpoint.format import TrainingProgress
    from megatron.errors import CheckpointError

    ckpt = source if source is not None else UniversalCheckpoint(path)
    differences = config_differences(ckpt.config, training_engine.model_config)
    if differences:
        raise ConversionError(f"--load {path} --universal-checkpoint: the checkpoint's model differs from this "
                              "run's: " + "; ".join(differences))
    ds = training_engine.engine
    if finetune or not load_optim or ds.zero_optimization_stage() not in (1, 2):
        return load_checkpoint_any_layout(training_engine, ckpt.tag_dir, load_optim=load_optim, finetune=finetune,
                                          source=ckpt)
    if not ds.load_universal_checkpoint():
        raise CheckpointError("the DeepSpeed engine was built without checkpoint.load_universal; pass "
                              "--universal-checkpoint so the generated DeepSpeed config enables it")
    config, pipeline = training_engine.model_config, training_engine.is_pipeline
    folder_name = {local: os.path.basename(ckpt.folder_of(full_name_of(local, config, pipeline)))
                   for local, _ in ds.module.named_parameters()}
    load_dir, tag = os.path.split(ckpt.tag_dir)
    with compat.universal_folder_names(ds.optimizer, lambda local: folder_name[local]):
        load_path, client_state = ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True, load_module_only=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {ckpt.tag_dir}; see the log above")
    client_state = client_state or {}
    if "iteration" not in client_state:
        raise CheckpointError(f"{ckpt.tag_dir} has no training progress (iteration, consumed samples); use "
                              "--finetune to load its weights only")
    return TrainingProgress(iteration=int(client_state["iteration"]),
                            consumed_samples=int(client_state.get("consumed_samples", 0)),
                            consumed_tokens=int(client_state.get("consumed_tokens", 0)),
                            args=client_state.get("args", {}), checkpoint_path=ckpt.tag_dir, extra=client_state)
