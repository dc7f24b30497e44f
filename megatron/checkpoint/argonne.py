"""Read checkpoints written by argonne-lcf/Megatron-DeepSpeed (AuroraGPT's trainer) into the layout-free form.

    ckpt = ArgonneCheckpoint("auroragpt/checkpoints")   # <save> dir (latest / latest_checkpointed_iteration.txt)
    export_to_hf(ckpt, "auroragpt-hf")                  # or write_checkpoint(ckpt, ...), or --load to train on

What differs from ours, and where upstream defines it (file names relative to their repository):
- Tags (megatron/checkpointing.py save_checkpoint, through DeepSpeed): `<save>/global_stepN/`, DeepSpeed's
  `latest` ("global_stepN") and Megatron's `latest_checkpointed_iteration.txt` ("N", or "release").
- Arguments: the run's argparse `Namespace` under "args" (megatron/arguments.py dests): mapped onto our
  TransformerConfig by `config_from_argonne_args`, which refuses every model-shaping argument it cannot honour.
- Names (megatron/model/gpt_model.py GPTModel / GPTModelPipe, language_model.py, transformer.py):
      theirs (no pipeline)                                    theirs (pipeline)                 ours
      language_model.embedding.word_embeddings.weight         tied_modules.embed.* | 1.*        embedding.*
      language_model.encoder.layers.i.input_layernorm.*       {i+2}.input_layernorm.*           layers.i.input_norm.*
        self_attention.query_key_value / self_attention.dense                                   attention.qkv / .dense
        post_attention_layernorm / mlp.dense_h_to_4h / mlp.dense_4h_to_h          post_attention_norm / mlp.fc1 / fc2
      language_model.encoder.final_layernorm.*                {L+2}.*                           final_norm.*
      language_model.output_layer.weight                      {L+3}.lm_head.weight              output_layer.weight
  GPTModelPipe's layer 0 is a cast function, so every pipe layer index is ours + 1; the tied group is "embed".
  Without a pipeline DeepSpeed saves `state_dict_for_save_checkpoint()`: nested dicts, flattened here.
- QKV rows (megatron/model/transformer.py ParallelAttention.forward, checkpointing.py fix_query_key_value_ordering):
  checkpoint_version >= 2 stores, on each tp rank, per key/value group [q heads of the group | k | v];
  version 1.0 stores [heads, head_dim, 3] and version 0 [3, heads, head_dim] (both without GQA). Ours is
  [q | k | v] of the rank's heads. Converted shard by shard, so merging over tp stays ours.
- ZeRO / bf16 optimizer shards are DeepSpeed's own files; their parameter names go through the same map.

`write_argonne_checkpoint` goes the other way for the weights (GPTModelPipe layer files, their Namespace,
checkpoint_version 3.0): a checkpoint trained here can be finetuned there (--finetune / --no-load-optim).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Optional

import torch

from megatron import deepspeed_compat as compat
from megatron.checkpoint.format import MANIFEST_FILENAME
from megatron.config.model import TransformerConfig
from megatron.checkpoint.layout import (ConversionError, FullModelSource, _vocab_size_from_args, expected_shapes,
                                        strip_vocab_padding)
from megatron.checkpoint.ds_checkpoint import resolve_tag_dir
from megatron.checkpoint.zero_shards import OptimizerShards, load_mmap, optim_files
from megatron.model.sharding import merge_state_dicts

MODEL_FILE = compat.MODEL_STATES_FILE
LAYER_FILE = compat.LAYER_STATES_FILE
TIED_GROUP = "tied_modules.embed."
LAYER_SUFFIXES = {  # theirs -> ours, inside one transformer layer
    "input_layernorm.": "input_norm.",
    "self_attention.query_key_value.": "attention.qkv.",
    "self_attention.dense.": "attention.dense.",
    "post_attention_layernorm.": "post_attention_norm.",
    "mlp.dense_h_to_4h.": "mlp.fc1.",
    "mlp.dense_4h_to_h.": "mlp.fc2.",
}
IGNORED_BUFFERS = ("inv_freq",)  # RoPE's frequencies: recomputed from rope_theta, not weights


# ---- tags ----------------------------------------------------------------------------------------------

def is_argonne_checkpoint(path: str) -> bool:
    """True when `path` (a save dir or a tag dir) holds a checkpoint written by argonne-lcf/Megatron-DeepSpeed:
    its client state keeps the run's arguments as an argparse Namespace (ours keeps a dict)."""
    try:
        tag_dir = resolve_tag_dir(path)
    except ConversionError:
        return False
    if os.path.isfile(os.path.join(tag_dir, MANIFEST_FILENAME)):  # written by our --save (verified on load)
        return False
    first = sorted(n for n in os.listdir(tag_dir) if MODEL_FILE.match(n))[0]
    try:
        state = load_mmap(os.path.join(tag_dir, first), remember=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # damaged: not recognisable as theirs
        return False
    return isinstance(state.get("args"), argparse.Namespace)


# ---- arguments -> TransformerConfig --------------------------------------------------------------------

# Their arguments that shape the weights or the forward pass, and the only values we can reproduce.
REQUIRED_VALUES = {
    "apply_residual_connection_post_layernorm": (False, None), "onnx_safe": (False, None), "num_layers_per_virtual_pipeline_stage": (None,),
    "virtual_pipeline_model_parallel_size": (None, 1), "mos": (False, None), "kd": (False, None),
    "add_qkv_bias": (False, None), "num_experts_switch": (None,), "use_mup": (False, None), "embedding_weights_in_fp32": (False, None),
}


def config_from_argonne_args(ns, source: str, vocab_size: Optional[int] = None) -> TransformerConfig:
    """Our TransformerConfig from their run's Namespace; an error naming every argument we cannot honour."""
    a = dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)
    errors = []
    for name, allowed in REQUIRED_VALUES.items():
        if name in a and a[name] not in allowed:
            errors.append(f"--{name.replace('_', '-')} {a[name]!r} (we support only {allowed[0]!r})")
    experts = a.get("num_experts")
    if experts not in (None, 1, [1]) and not (isinstance(experts, list) and all(e == 1 for e in experts)):
        errors.append(f"--num-experts {experts!r} (mixture of experts is not supported)")
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if not a.get(name):
            errors.append(f"{name} is missing from the saved arguments")
    if errors:
        raise ConversionError(f"{source}: the run's arguments describe a model this framework cannot reproduce: "
                              + "; ".join(errors))
    heads, hidden = int(a["num_attention_heads"]), int(a["hidden_size"])
    if a.get("kv_channels") not in (None, hidden // heads):
        raise ConversionError(f"{source}: --kv-channels {a['kv_channels']} differs from hidden/heads = "
                              f"{hidden // heads}, which this framework's attention assumes")
    rope = bool(a.get("use_rotary_position_embeddings"))
    if a.get("position_embedding_type") not in (None, "rope", "learned_absolute", "none"):
        raise ConversionError(f"{source}: --position-embedding-type {a['position_embedding_type']!r} is not supported")
    if a.get("position_embedding_type") == "rope":
        rope = True
    position = "rope" if rope else ("learned_absolute" if a.get("add_position_embedding", True) else "none")
    if vocab_size is None:
        vocab_size = _argonne_vocab_size(a, source)
    values = dict(
        num_layers=int(a["num_layers"]), hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=a.get("num_key_value_heads") or heads, ffn_hidden_size=a.get("ffn_hidden_size"),
        seq_length=int(a.get("seq_length") or a.get("max_position_embeddings") or 1024),
        max_position_embeddings=a.get("max_position_embeddings"), vocab_size=int(vocab_size),
        make_vocab_size_divisible_by=int(a.get("make_vocab_size_divisible_by") or 128),
        normalization=a.get("normalization") or "layernorm", norm_epsilon=float(a.get("layernorm_epsilon", 1e-5)),
        swiglu=bool(a.get("swiglu")), position_embedding_type=position, rope_theta=float(a.get("rope_theta", 10000)),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights")),
        add_bias_linear=bool(a.get("add_bias_linear", True)),
        attention_dropout=float(a.get("attention_dropout", 0.1)), hidden_dropout=float(a.get("hidden_dropout", 0.1)),
        init_method_std=float(a.get("init_method_std", 0.02)),
        rotary_percent=float(a.get("rotary_percent") or 1.0),
        fp32_residual_connection=bool(a.get("fp32_residual_connection")),
        init_method="xavier_uniform" if a.get("init_method_xavier_uniform") else "normal",
        apply_layernorm_1p=bool(a.get("apply_layernorm_1p")), squared_relu=bool(a.get("squared_relu")),
        # their loss: vocab_parallel_cross_entropy over the padded vocabulary (megatron/core/tensor_parallel/
        # cross_entropy.py), so the padding rows were trained
        loss_over_padded_vocab=True,
        # their MLP: openai_gelu (tanh), else the fused bias-GeLU (tanh) unless the fusion was off: F.gelu (erf)
        gelu_approximation="tanh" if a.get("openai_gelu") or (
            a.get("bias_gelu_fusion", True) and a.get("add_bias_linear", True)) else "none")
    try:
        config = TransformerConfig(**values)
    except ValueError as err:
        raise ConversionError(f"{source}: {err}") from None
    tp = int(a.get("tensor_model_parallel_size") or 1)
    padded = a.get("padded_vocab_size")
    if padded is not None and int(padded) != config.padded_vocab_size(tp):
        raise ConversionError(
            f"{source}: the saved padded_vocab_size {padded} is not vocabulary {config.vocab_size} padded to a "
            f"multiple of {config.make_vocab_size_divisible_by} × tp {tp} = {config.padded_vocab_size(tp)}; "
            "pass the tokenizer's true --vocab-size")
    return config


def _argonne_vocab_size(a: dict, source: str) -> int:
    if a.get("tokenizer_type") == "NullTokenizer":
        # Their NullTokenizer has --vocab-size V ids plus an end-of-document id V (megatron/tokenizer/tokenizer.py),
        # as ours (data/tokenizers.py NullTokenizer)
        return int(a["vocab_size"]) + 1
    return _vocab_size_from_args(a, source)


def argonne_lr_state(sched: dict, global_batch_size: int) -> dict:
    """Their OptimizerParamScheduler.state_dict() (megatron/optimizer_param_scheduler.py: every length in samples,
    stepped by the global batch each iteration) as our LRSchedule state. In iterations (increment 1, as our runs
    without a batch ramp-up count) when every length is a whole number of global batches, so that the same
    schedule compares equal to the flags'; else in samples (increment = the global batch), which continues their
    schedule exactly too (resume.plan_resume compares it with the flags' schedule built upstream's way,
    `argonne_lr_state_of_flags`)."""
    lengths = {"num_steps": sched.get("num_steps"), "warmup_steps": sched.get("lr_warmup_steps"),
               "decay_steps": sched.get("lr_decay_steps"), "wd_incr_steps": sched.get("wd_incr_steps")}
    lengths = {k: v for k, v in lengths.items() if v is not None}
    gbs = max(1, int(global_batch_size))
    in_iterations = all(float(v) % gbs == 0 for v in lengths.values())
    # a length in samples need not be whole: --lr-warmup-fraction 0.05 of 64 samples is their 3.2 (kept as is)
    state = {k: int(float(v)) // gbs if in_iterations else (int(v) if float(v).is_integer() else float(v))
             for k, v in lengths.items()}
    state.update(increment=1 if in_iterations else gbs, max_lr=float(sched["max_lr"]),
                 min_lr=float(sched.get("min_lr") or 0.0), decay_style=sched.get("lr_decay_style"),
                 wsd_decay_steps=None, wsd_decay_style="linear", num_tokens=int(sched.get("num_tokens") or 0))
    for theirs, ours in (("lr_decay_tokens", "decay_tokens"), ("lr_warmup_tokens", "warmup_tokens"),
                         ("wd_incr_style", "wd_incr_style")):
        if theirs in sched:
            state[ours] = sched[theirs]
    if sched.get("wd_incr_style", "constant") != "constant":  # else both are --weight-decay (compared on its own)
        state.update(start_wd=sched.get("start_wd"), end_wd=sched.get("end_wd"))
    return state


def argonne_lr_state_of_flags(run, dp_size: int, saved: dict) -> dict:
    """The schedule upstream builds from the run's flags (its megatron/training.py get_optimizer_param_scheduler:
    lengths in samples, --lr-warmup-fraction × the decay samples unrounded), as `argonne_lr_state` gives a
    checkpoint's, at the position of `saved` (a checkpoint's argonne_lr_state): the two compare key by key."""
    from megatron.config.arguments import global_batch_size, train_samples

    opt, t = run.training.optimizer, run.training
    gbs = global_batch_size(run, dp_size)
    num_steps = int(saved["num_steps"]) * (gbs if saved.get("increment", 1) == 1 else 1)  # in samples
    if t.train_iters is not None:
        decay = (opt.lr_decay_iters or t.train_iters) * gbs
        warmup = opt.lr_warmup_iters * gbs
        wd_steps = t.train_iters * gbs
    else:
        decay = opt.lr_decay_samples or train_samples(run, dp_size)
        warmup = opt.lr_warmup_samples or 0
        wd_steps = train_samples(run, dp_size)
    if opt.lr_warmup_fraction is not None:
        warmup = opt.lr_warmup_fraction * decay
    wd = opt.weight_decay
    sched = {"max_lr": opt.lr, "min_lr": opt.min_lr, "lr_decay_style": opt.lr_decay_style, "num_steps": num_steps,
             "lr_decay_steps": decay, "lr_warmup_steps": warmup, "wd_incr_steps": wd_steps,
             "lr_decay_tokens": opt.lr_decay_tokens, "lr_warmup_tokens": opt.lr_warmup_tokens,
             "wd_incr_style": opt.weight_decay_incr_style,
             "start_wd": wd if opt.start_weight_decay is None else opt.start_weight_decay,
             "end_wd": wd if opt.end_weight_decay is None else opt.end_weight_decay}
    return argonne_lr_state(sched, gbs)


def tokenizer_args_from_argonne(a: dict, vocab_size: int) -> Optional[dict]:
    if not a.get("tokenizer_type"):
        return None
    return {"tokenizer_type": a["tokenizer_type"], "tokenizer_model": a.get("tokenizer_model"),
            "vocab_file": a.get("vocab_file"), "merge_file": a.get("merge_file"),
            # NullTokenizer: the --vocab-size flag (V; the model has V + 1), as our own saved tokenizer arguments
            "vocab_size": a.get("vocab_size") if a["tokenizer_type"] == "NullTokenizer" else vocab_size}


# ---- names ---------------------------------------------------------------------------------------------

def argonne_to_full_name(local: str, config: TransformerConfig, pipeline: bool) -> Optional[str]:
    """Our GPTModel name of one of their parameter names (None for buffers we recompute)."""
    if local.rsplit(".", 1)[-1] in IGNORED_BUFFERS:
        return None
    L = config.num_layers
    if not pipeline:
        for theirs, ours in (("language_model.embedding.", "embedding."),
                             ("language_model.encoder.final_layernorm.", "final_norm."),
                             ("language_model.output_layer.", "output_layer.")):
            if local.startswith(theirs):
                return ours + local[len(theirs):]
        m = re.match(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$", local)
        if m:
            return f"layers.{m.group(1)}." + _layer_suffix(m.group(2), local)
        raise ConversionError(f"{local!r} is not a parameter name of Megatron-DeepSpeed's GPTModel")
    if local.startswith(TIED_GROUP):
        return "embedding." + local[len(TIED_GROUP):]
    index, rest = local.split(".", 1)
    index = int(index)
    if index == 1:
        return "embedding." + rest
    if 2 <= index <= L + 1:
        return f"layers.{index - 2}." + _layer_suffix(rest, local)
    if index == L + 2:
        return "final_norm." + rest
    if index == L + 3 and rest == "lm_head.weight":
        return "output_layer.weight"
    raise ConversionError(f"{local!r} is not a parameter name of Megatron-DeepSpeed's {L}-layer GPTModelPipe")


def _layer_suffix(rest: str, local: str) -> str:
    for theirs, ours in LAYER_SUFFIXES.items():
        if rest.startswith(theirs):
            return ours + rest[len(theirs):]
    raise ConversionError(f"{local!r}: unknown transformer-layer parameter {rest!r}")


def argonne_pipe_layer(full: str, config: TransformerConfig) -> tuple[int, str]:
    """(their pipe layer index, name inside that layer's file) of our parameter `full`."""
    if full.startswith("embedding."):
        return 1, full[len("embedding."):]
    m = re.match(r"^layers\.(\d+)\.(.+)$", full)
    if m:
        rest = m.group(2)
        for theirs, ours in LAYER_SUFFIXES.items():
            if rest.startswith(ours):
                return int(m.group(1)) + 2, theirs + rest[len(ours):]
    if full.startswith("final_norm."):
        return config.num_layers + 2, full[len("final_norm."):]
    if full == "output_layer.weight":
        return config.num_layers + 3, "lm_head.weight"
    raise KeyError(full)


# ---- QKV rows ------------------------------------------------------------------------------------------

def argonne_qkv_shard_to_ours(t: torch.Tensor, version: float, config: TransformerConfig, tp: int) -> torch.Tensor:
    """One tp rank's query_key_value weight or bias in their row order -> ours ([q | k | v] of the rank's heads)."""
    d = config.head_dim
    groups = config.num_key_value_heads // tp
    per_group = config.num_attention_heads // config.num_key_value_heads
    rest = tuple(t.shape[1:])
    if version < 2.0:
        if per_group != 1:
            raise ConversionError(f"checkpoint_version {version} predates grouped-query attention, but the "
                                  f"arguments say {config.num_key_value_heads} key/value heads")
        heads = config.num_attention_heads // tp
        if version == 0:  # [3, heads, d] -> [heads, 3, d]
            t = t.reshape((3, heads, d) + rest).transpose(0, 1)
        elif version == 1.0:  # [heads, d, 3] -> [heads, 3, d]
            t = t.reshape((heads, d, 3) + rest).transpose(1, 2)
        else:
            raise ConversionError(f"unknown checkpoint_version {version}")
    grouped = t.reshape((groups, per_group + 2, d) + rest)
    q = grouped[:, :per_group].reshape((groups * per_group * d,) + rest)
    k = grouped[:, per_group].reshape((groups * d,) + rest)
    v = grouped[:, per_group + 1].reshape((groups * d,) + rest)
    return torch.cat([q, k, v]).contiguous()


# ---- the checkpoint ------------------------------------------------------------------------------------

class ArgonneCheckpoint(FullModelSource):
    """One saved iteration of an argonne-lcf/Megatron-DeepSpeed run, at whatever tp × pp × ZeRO it was written."""

    def __init__(self, path: str, weights: str = "auto", vocab_size: Optional[int] = None):
        if weights not in ("auto", "module", "fp32"):
            raise ValueError(f"weights must be auto, module or fp32 (got {weights!r})")
        self.tag_dir = resolve_tag_dir(path)
        self.description = f"Megatron-DeepSpeed checkpoint {self.tag_dir}"
        names = os.listdir(self.tag_dir)
        self.model_files = {int(m.group(1)): os.path.join(self.tag_dir, n) for n in names if (m := MODEL_FILE.match(n))}
        self.layer_files = {(int(m.group(1)), int(m.group(2))): os.path.join(self.tag_dir, n)
                            for n in names if (m := LAYER_FILE.match(n))}
        self.state0 = load_mmap(self.model_files[min(self.model_files)], remember=True)
        ns = self.state0.get("args")
        if ns is None:
            raise ConversionError(f"{self.tag_dir}: no 'args' in {os.path.basename(self.model_files[0])}")
        self.argonne_args = dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)
        self.config = config_from_argonne_args(self.argonne_args, self.description, vocab_size)
        self.version = float(self.state0.get("checkpoint_version", 0))
        a = self.argonne_args
        self.tp = int(a.get("tensor_model_parallel_size") or 1)
        self.pp = int(a.get("pipeline_model_parallel_size") or 1)
        self.pipeline = bool(self.layer_files)  # GPTModelPipe (even at pp=1 unless --no-pipeline-parallel)
        self.tokenizer_args = tokenizer_args_from_argonne(a, self.config.vocab_size)
        self.args = dict(self.config.to_dict(), **(self.tokenizer_args or {}))
        ds_config = self.state0.get("ds_config") or {}
        self.zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0)) \
            if isinstance(ds_config, dict) else 0
        if self.zero_stage == 3:
            raise ConversionError(f"{self.tag_dir}: reading Megatron-DeepSpeed ZeRO-3 checkpoints is not supported; "
                                  "convert it with their tools/ to a ZeRO-1/2 layout first")
        missing = sorted(set(range(self.tp * self.pp)) - set(self.model_files))
        if missing:
            raise ConversionError(f"{self.tag_dir}: mp_rank files {missing} are missing (tp {self.tp} × pp {self.pp})")
        self.weights = weights
        self._optim: dict[int, OptimizerShards] = {}
        self._modules: dict[int, dict] = {}
        self._stage_names = None

    @property
    def client_state(self) -> dict:
        """Progress in our client-state keys (their samples counter lives in the args)."""
        s, a = self.state0, self.argonne_args
        return {"iteration": int(s.get("iteration") or 0),
                "consumed_samples": int(a.get("consumed_train_samples") or 0),
                # upstream's validation loader resumes at its consumed_valid_samples (its load_checkpoint)
                "consumed_valid_samples": int(a.get("consumed_valid_samples") or 0),
                "consumed_tokens": int(s.get("tokens") or a.get("consumed_train_tokens") or 0),
                "global_steps": s.get("global_steps"), "global_samples": s.get("global_samples"),
                "skipped_steps": s.get("skipped_steps"), "args": self.args}

    @property
    def iteration(self) -> int:
        return int(self.state0.get("iteration") or 0)

    def lr_scheduler_state(self) -> Optional[dict]:
        """Their OptimizerParamScheduler state (DeepSpeed's 'lr_scheduler' entry, or Megatron's 'opt_param_scheduler'
        / 'lr_scheduler' without DeepSpeed) in our LRSchedule's keys; None when the checkpoint has none."""
        sched = self.state0.get("lr_scheduler") or self.state0.get("opt_param_scheduler")
        if not isinstance(sched, dict) or "num_steps" not in sched:
            return None
        return argonne_lr_state(sched, int(self.argonne_args.get("global_batch_size") or 1))

    def lr_scheduler_num_steps(self) -> Optional[int]:
        sched = self.state0.get("lr_scheduler")
        return int(sched["num_steps"]) if isinstance(sched, dict) and "num_steps" in sched else None

    # ---- where a parameter lives ----
    def _local_names(self, mp_rank: int) -> dict[str, tuple]:
        """Their parameter names (with tp-shard shapes) held by mp rank `mp_rank`."""
        state = load_mmap(self.model_files[mp_rank], remember=True)
        if state.get("param_shapes"):
            return {k: tuple(v) for group in state["param_shapes"] for k, v in group.items()}
        if not self.pipeline:
            return {k: tuple(v.shape) for k, v in self._module(mp_rank).items()
                    if argonne_to_full_name(k, self.config, False) is not None}
        raise ConversionError(f"{self.model_files[mp_rank]} has no param_shapes, so the pipeline stage of each "
                              "parameter is unknown; pass --weights module")

    def stage_of(self, full: str) -> int:
        if not self.pipeline:
            return 0
        if self._stage_names is None:
            self._stage_names = {}
            for stage in range(self.pp):
                for local in self._local_names(stage * self.tp):
                    name = argonne_to_full_name(local, self.config, True)
                    if name is not None:
                        self._stage_names.setdefault(name, stage)
        if full not in self._stage_names:
            raise ConversionError(f"{self.tag_dir}: no pipeline stage holds {full}")
        return self._stage_names[full]

    def _module(self, mp_rank: int) -> dict:
        if mp_rank not in self._modules:
            module = load_mmap(self.model_files[mp_rank], remember=True).get("module")
            if not module:
                raise ConversionError(f"{self.model_files[mp_rank]} holds no module weights")
            self._modules[mp_rank] = _flatten(module)
        return self._modules[mp_rank]

    def _uses_fp32_masters(self) -> bool:
        if self.weights == "module":
            return False
        has = any(compat.is_optim_states_file(n) for n in os.listdir(self.tag_dir))
        if self.weights == "fp32" and not has:
            raise ConversionError(f"{self.tag_dir}: --weights fp32 needs ZeRO or bf16 optimizer files; none found")
        return has

    def optimizer(self, mp_rank: int) -> OptimizerShards:
        if mp_rank not in self._optim:
            pipeline = self.pipeline
            if not optim_files(self.tag_dir, mp_rank):
                raise ConversionError(f"{self.tag_dir}: no ZeRO/bf16 optimizer files for mp rank {mp_rank}; the "
                                      "Adam state of a run without ZeRO is not read (resume with --no-load-optim)")
            shapes = self._local_names(mp_rank)
            self._optim[mp_rank] = OptimizerShards(
                self.tag_dir, mp_rank, shapes, lambda local: argonne_to_full_name(local, self.config, pipeline) or local,
                self.zero_stage)
        return self._optim[mp_rank]

    def _their_shard(self, full: str, tp_rank: int, key: str) -> torch.Tensor:
        if key != "fp32" or self._uses_fp32_masters():
            return self.optimizer(self.stage_of(full) * self.tp + tp_rank).get(full, key)
        mp = tp_rank  # without a pipeline; with one, each layer has its own file
        if self.pipeline:
            index, inner = argonne_pipe_layer(full, self.config)
            path = self.layer_files.get((index, tp_rank))
            if path is None:
                raise ConversionError(f"{self.tag_dir}: layer_{index:02d}-model_{tp_rank:02d}-model_states.pt is "
                                      f"missing (it holds {full})")
            return load_mmap(path)[inner]
        local = [k for k in self._module(mp) if argonne_to_full_name(k, self.config, False) == full]
        if not local:
            raise ConversionError(f"{self.model_files[mp]}: no weight for {full}")
        return self._module(mp)[local[0]]

    def full_optimizer_tensor(self, name: str, key: str) -> torch.Tensor:
        """Full (tp=1, unpadded, our row order) fp32 / exp_avg / exp_avg_sq / weights of our parameter `name`."""
        shards = []
        for t in range(self.tp):
            shard = self._their_shard(name, t, key).float()
            if ".attention.qkv." in name:
                shard = argonne_qkv_shard_to_ours(shard, self.version, self.config, self.tp)
            shards.append({name: shard})
        merged = merge_state_dicts(shards, self.config)[name]
        return strip_vocab_padding(name, merged, self.config, self.description, self.keep_vocab_padding)

    def optimizer_step(self) -> Optional[int]:
        return self.optimizer(0).step if self._uses_fp32_masters() else None

    def load_group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name: self.full_optimizer_tensor(name, "fp32") for name in expected_shapes(self.config, prefix)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[prefix + key] = value
    return out


# ---- training on from one -------------------------------------------------------------------------------

def load_argonne_checkpoint(training_engine, path: str, *, load_optim: bool = True, finetune: bool = False,
                            source: Optional["ArgonneCheckpoint"] = None):
    """--load of an argonne-lcf/Megatron-DeepSpeed checkpoint: weights, fp32 masters and Adam moments resharded
    into this engine's layout; iteration and consumed samples from their client state; our LR schedule moved to
    their step count. RNG streams start fresh from this run's seed."""
    from megatron.errors import CheckpointError

    try:
        return _load_argonne(training_engine, path, load_optim=load_optim, finetune=finetune, source=source)
    except ConversionError as err:
        raise CheckpointError(str(err)) from None


def _load_argonne(training_engine, path: str, *, load_optim: bool, finetune: bool, source=None):
    from megatron.errors import CheckpointError
    from megatron.checkpoint.reshard import load_checkpoint_any_layout

    ckpt = source if source is not None else ArgonneCheckpoint(path)
    if load_optim and not finetune and not any(compat.is_optim_states_file(n) for n in os.listdir(ckpt.tag_dir)):
        raise CheckpointError(f"--load {path}: the checkpoint has no ZeRO/bf16 optimizer shards, so its Adam state "
                              "cannot be read; pass --no-load-optim to continue with a fresh optimizer state")
    scheduler = training_engine.engine.lr_scheduler
    saved = ckpt.lr_scheduler_state()
    policy = getattr(scheduler, "on_resume", None)
    # The schedule's policy (--use-checkpoint-opt_param-scheduler, --override-..., or by default the flags and the
    # checkpoint must agree) applies as for our own checkpoints. By default resume.plan_resume has compared the
    # flags with the checkpoint upstream's way (in samples): they agree, so the checkpoint's state, in upstream's
    # own units, is the flags' schedule and is taken as it is (here and in the resharding load).
    if policy == "check" and saved is not None and not finetune:
        scheduler.on_resume = "checkpoint"
    try:
        progress = load_checkpoint_any_layout(training_engine, ckpt.tag_dir, load_optim=load_optim,
                                              finetune=finetune, source=ckpt)
        if not finetune and scheduler is not None and saved is not None:
            if saved["increment"] != 1 and policy == "override":  # the flags' units, the checkpoint's position
                saved = dict(saved, increment=scheduler.increment,
                             num_steps=progress.iteration * scheduler.increment)
            scheduler.load_state_dict(saved)
    finally:
        if scheduler is not None and policy is not None:
            scheduler.on_resume = policy
    if not finetune and scheduler is not None and saved is None:
        # no schedule saved: ours moved to their step count (their scheduler counts samples, stepped by the
        # global batch; ours iterations unless the batch ramps up)
        state = scheduler.state_dict()
        samples = ckpt.lr_scheduler_num_steps()
        state["num_steps"] = progress.iteration if state["increment"] == 1 else (
            samples if samples is not None else progress.consumed_samples)
        scheduler.load_state_dict(state)
    return progress
