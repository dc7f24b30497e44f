"""Resume a run: open the checkpoint --load names once, describe what it holds, plan the resume (every refusal is
decided here, before the model is built, and reported together), then execute the plan into the built engine.

    checkpointer = Checkpointer(run, ps, device, log)
    run = checkpointer.prepare()            # refusals; the run the engine is to be built with
    te = build_engine(run, ps, device)
    progress = checkpointer.load(te)        # where to continue (iteration 0 when there is nothing to resume)
    ...
    checkpointer.save(te, progress, extra_state)

What --load can name (sources.py tells them apart by what is on disk):
- one of our --save directories, or one checkpoint directory in it (`<save>/global_step3`: loaded as named,
  the pointer is not consulted); at the run's layout DeepSpeed's own loader reads it, at any other
  tp / pp / dp / ZeRO stage (or when it was written by tools/convert_checkpoint.py) reshard.py does;
- a DeepSpeed universal folder (with --universal-checkpoint);
- a checkpoint written by argonne-lcf/Megatron-DeepSpeed (AuroraGPT);
- a Hugging Face Llama or GPT-2 folder (weights only: with --finetune, a new run from those weights).

Hyperparameters on resume. Upstream's OptimizerParamScheduler (its `_check_and_set`) decides the LR schedule's
shape and the weight decay: by default a flag that differs from the checkpoint is refused,
--override-opt_param-scheduler takes the flags, --use-checkpoint-opt_param-scheduler the checkpoint's values.
Adam's betas and eps and --clip-grad are not the scheduler's: under upstream DeepSpeed restores them from the
checkpoint (the optimizer's param groups, ZeRO's clip value) and a changed flag is ignored without a word. Here
they follow the same three rules as the weight decay, so a changed flag is applied or refused, never ignored.
Whatever wins is what the first resumed step uses: DeepSpeed's load puts back the checkpoint's param groups (their
lr is the one of the step the checkpoint was saved at), so afterwards the LR schedule and the winning values are
applied again (`_apply_hyperparameters`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron.checkpoint.format import MANIFEST_FILENAME, TrainingProgress
from megatron.checkpoint.layout import ConversionError
from megatron.deepspeed_compat import is_optim_states_file
from megatron.errors import CheckpointError, ConfigError
from megatron.optimizer import WHOLE_MATRIX as WHOLE_MATRIX_OPTIMIZERS

# The model-shaping fields a checkpoint's weights fix, and the flags that set them.
SHAPE_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-key-value-heads (--group-query-attention --num-query-groups)",
    "ffn_hidden_size": "--ffn-hidden-size", "vocab_size": "--vocab-size or the tokenizer's vocabulary",
    "normalization": "--normalization", "swiglu": "--swiglu", "position_embedding_type": "--position-embedding-type",
    "max_position_embeddings": "--max-position-embeddings",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "add_bias_linear": "--disable-bias-linear",
}
# Optimizer hyperparameters compared on resume: (saved-args key, flag, where the run keeps it).
HYPERPARAMETERS = (
    ("weight_decay", "--weight-decay", "weight_decay"),
    ("adam_beta1", "--adam-beta1", "adam_beta1"),
    ("adam_beta2", "--adam-beta2", "adam_beta2"),
    ("adam_eps", "--adam-eps", "adam_eps"),
    ("clip_grad", "--clip-grad", "clip_grad"),
)
# Optimizers that take no --adam-beta1/2 or --adam-eps (megatron/optimizer/__init__.py): those flags are not compared
WITHOUT_ADAM_HYPERPARAMETERS = ("sgd", "apex.sgd", "sgdschedulefree", "sophiag", "muon", "muonclip")
# A training task's settings (finetune_gpt.py's, saved in the run's arguments by training/loop.py from the task's
# run_args) compared on resume by the same policy as the hyperparameters: (saved-args key, flag). A key that the
# checkpoint or the run does not record (a pretraining run) is not compared.
TASK_ARGS = (("task", "--task"), ("dpo_beta", "--dpo-beta"), ("dpo_loss", "--dpo-loss"),
             ("label_smoothing", "--label-smoothing"), ("rpo_alpha", "--rpo-alpha"), ("packing", "--packing"),
             ("overlong_examples", "--overlong-examples"))
ADAM_STATE = ("adam", "adamw", "apex.adam")  # what resharding, universal and argonne loads carry across layouts
# (and, from our own checkpoints and universal folders, the whole-matrix optimizers': _whole_matrix_state_travels)
_SAME_OPTIMIZER = {"apex.adam": "adamw", "apex.sgd": "sgd", "ipex.fusedlamb": "ipex.lamb"}  # same state layout


# ---- where and what --------------------------------------------------------------------------------------

@dataclass
class CheckpointDescription:
    """What one checkpoint holds, read from its files once (the reader keeps the model-states object, which
    DeepSpeed's own load then takes instead of reading the file again)."""

    kind: str  # "ours", "universal", "argonne" or "huggingface"
    load_dir: str  # what --load names
    tag: Optional[str]  # the tag under load_dir (ours), else the folder's name
    path: str  # the checkpoint directory itself
    source: object  # the opened reader (a FullModelSource: DeepSpeedCheckpoint, UniversalCheckpoint, ...)
    args: dict  # the run's saved arguments ({} when it records none)
    config: object  # the saved model's TransformerConfig
    optimizer: Optional[str]  # the --optimizer it was trained with
    has_optimizer_state: bool
    has_rng: bool
    lr_scheduler: Optional[dict]
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    converted: bool = False  # written by tools/convert_checkpoint.py: weights only

    def layout(self) -> str:
        return f"tp {self.tp} × pp {self.pp} × dp {self.dp}, ZeRO-{self.zero_stage}"


@dataclass
class ResumePlan:
    description: CheckpointDescription
    run: object  # the RunConfig the engine is built with (the checkpoint's hyperparameters where the policy says)
    how: str  # "deepspeed" (same layout), "reshard" (any other layout, Hugging Face), "universal" or "argonne"
    load_optim: bool
    load_rng: bool
    load_lr_state: bool
    finetune: bool
    notices: list = field(default_factory=list)


def _is_tag_dir(path: str) -> bool:
    """A checkpoint directory itself (global_stepN, iter_N or any tag) rather than a --save directory."""
    from megatron.checkpoint.ds_checkpoint import MODEL_FILE, ZERO3_MODEL_FILE

    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return MANIFEST_FILENAME in names or any(MODEL_FILE.match(n) or ZERO3_MODEL_FILE.match(n) for n in names)


def locate(run, log: Callable[[str], None], rank: int) -> Optional[tuple[str, str, Optional[str]]]:
    """Collective (ours: the ranks split the checksums). (kind, load_dir, tag) of what --load names, or None when
    it holds no checkpoint yet (a warning; an error with --exit-on-missing-checkpoint)."""
    from megatron.checkpoint.argonne import is_argonne_checkpoint
    from megatron.checkpoint.deepspeed_io import find_checkpoint
    from megatron.checkpoint.universal import check_universal_folder

    ckpt, rel = run.checkpoint, run.reliability
    load = ckpt.load
    if run.training.zero.universal_checkpoint:
        _no_load_tag(ckpt, f"--universal-checkpoint loads the universal folder --load {load} names")
        folder = check_universal_folder(load)
        return "universal", os.path.dirname(folder), os.path.basename(folder)
    if is_argonne_checkpoint(load):
        from megatron.checkpoint.ds_checkpoint import resolve_tag_dir

        _no_load_tag(ckpt, f"--load {load} is an argonne-lcf/Megatron-DeepSpeed checkpoint")
        tag_dir = resolve_tag_dir(load)
        return "argonne", os.path.dirname(tag_dir), os.path.basename(tag_dir)
    if os.path.isfile(os.path.join(load, "config.json")) and not _is_tag_dir(load):
        _no_load_tag(ckpt, f"--load {load} is a Hugging Face folder")
        return "huggingface", os.path.dirname(os.path.abspath(load)), os.path.basename(os.path.abspath(load))
    load_dir, tag = load, ckpt.load_tag
    if tag is None and _is_tag_dir(load):
        load_dir, tag = os.path.dirname(os.path.abspath(load)), os.path.basename(os.path.abspath(load))
        if rank == 0:
            log(f"--load {load} is one checkpoint directory, not a --save directory: resuming it as named "
                f"(tag {tag} under {load_dir}; the pointer files there are not consulted)")
    tag = find_checkpoint(load_dir, strict=rel.no_checkpoint_fallback, exit_on_missing=rel.exit_on_missing_checkpoint,
                          log=log, tag=tag)
    return None if tag is None else ("ours", load_dir, tag)


def _no_load_tag(ckpt, what: str) -> None:
    """--load-tag picks among our tags; refused, naming what --load is instead, for the other sources."""
    if ckpt.load_tag is not None:
        raise ConfigError(f"--load-tag {ckpt.load_tag} chooses among this framework's checkpoints (global_step*), but "
                          f"{what}: point --load at that folder itself and drop --load-tag")


def describe(kind: str, load_dir: str, tag: str, make_vocab_size_divisible_by: int = 128) -> CheckpointDescription:
    """Open the checkpoint once and say what it holds."""
    from megatron.checkpoint.deepspeed_io import checkpoint_contents

    path = os.path.join(load_dir, tag)
    try:
        if kind == "huggingface":
            from megatron.checkpoint.hf import HFModelSource

            source = HFModelSource(path, make_vocab_size_divisible_by)
            return CheckpointDescription(kind, path, None, path, source, {}, source.config, None,
                                         has_optimizer_state=False, has_rng=False, lr_scheduler=None,
                                         converted=True)
        if kind == "universal":
            from megatron.checkpoint.universal import UniversalCheckpoint

            source = UniversalCheckpoint(path)
            args = dict(source.args)
            return CheckpointDescription(
                kind, load_dir, tag, source.tag_dir, source, args, source.config, _optimizer_name(args),
                has_optimizer_state=True, has_rng=False, lr_scheduler=source.lr_scheduler_state(),
                tp=int(args.get("tensor_model_parallel_size") or 1), pp=int(args.get("pipeline_model_parallel_size")
                                                                           or 1))
        if kind == "argonne":
            from megatron.checkpoint.argonne import ArgonneCheckpoint

            source = ArgonneCheckpoint(path)
            args = dict(source.argonne_args)
            has_optim = any(is_optim_states_file(n) for n in os.listdir(source.tag_dir))
            return CheckpointDescription(
                kind, load_dir, tag, source.tag_dir, source, args, source.config, _optimizer_name(args),
                has_optimizer_state=has_optim, has_rng=False, lr_scheduler=source.lr_scheduler_state(), tp=source.tp,
                pp=source.pp, zero_stage=source.zero_stage)
        from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint, _has_optim_files

        source = DeepSpeedCheckpoint(path)
    except ConversionError as error:
        raise CheckpointError(f"--load {load_dir}: {error}") from None
    contents = checkpoint_contents(path)
    args = dict(source.args)
    converted = "converted_from" in source.client_state
    has_optim = contents["optimizer"] and not converted and (
        source.zero_stage == 0 or _has_optim_files(source.tag_dir))
    return CheckpointDescription(
        kind, load_dir, tag, source.tag_dir, source, args, source.config, _optimizer_name(args),
        has_optimizer_state=has_optim, has_rng=contents["rng"] and not converted,
        lr_scheduler=source.lr_scheduler_state(), tp=source.tp, pp=source.pp, dp=source.dp,
        zero_stage=source.zero_stage, converted=converted)


def _optimizer_name(args: dict) -> Optional[str]:
    name = args.get("optimizer")
    return str(name) if name else None


# ---- the plan: every refusal here, together ------------------------------------------------------------------

def plan_resume(desc: CheckpointDescription, run, ps) -> ResumePlan:
    """What the resume does, and the run the engine is to be built with; a ConfigError listing every refusal."""
    ckpt = run.checkpoint
    finetune = ckpt.finetune
    load_optim = not ckpt.no_load_optim and not finetune
    load_rng = not ckpt.no_load_rng and not finetune
    load_lr_state = not ckpt.no_load_lr_state and not finetune
    where = f"--load {run.checkpoint.load}" + (f" ({desc.tag})" if desc.kind == "ours" else "")
    problems = []

    run, legacy_notice = _older_null_tokenizer(desc, run)
    run, padded_notice, padded_problem = _padded_vocab_loss(desc, run, ps)
    differences = [f"{SHAPE_FLAGS[f]} gives {getattr(run.model, f)!r}, the checkpoint has {getattr(desc.config, f)!r}"
                   for f in SHAPE_FLAGS if getattr(run.model, f) != getattr(desc.config, f)]
    if differences:
        problems.append(f"the flags describe another model than the checkpoint {desc.path}: " + "; ".join(differences)
                        + ". The checkpoint is fine: give its values (or --use-checkpoint-args to take them from "
                        "it)")

    if desc.kind == "ours" and not finetune:
        if load_optim and not desc.has_optimizer_state and not desc.converted:
            problems.append(f"{desc.path} holds no optimizer state (saved with --no-save-optim): resume it with "
                            "--no-load-optim (the optimizer starts fresh; iteration and LR schedule continue) or "
                            "--finetune")
        if load_rng and not desc.has_rng and not desc.converted:
            problems.append(f"{desc.path} holds no RNG states (saved with --no-save-rng): resume it with "
                            "--no-load-rng (random streams start fresh from --seed)")

    if desc.kind == "huggingface" and not finetune:
        problems.append(f"{desc.path} is a Hugging Face folder: it holds weights only (no iteration, optimizer or "
                        "LR schedule to resume); add --finetune to start a new run from its weights, or convert it "
                        "with tools/convert_checkpoint.py from-hf")
    how = {"universal": "universal", "argonne": "argonne", "huggingface": "reshard"}.get(desc.kind) or (
        "reshard" if _layout_differs(desc, run, ps) else "deepspeed")
    mine = run.training.optimizer.optimizer
    dp_notice = None
    if how == "reshard" and _whole_parameter_state_at_another_dp(desc, run, ps):
        how = "deepspeed"  # its state is numbered by parameter, whole, the same at any dp size and ZeRO-0/1/2
        if load_rng:
            load_rng = False
            dp_notice = (f"{where} was saved at dp {desc.dp}, this run has dp {ps.dp_size * ps.sp_size}: the "
                         f"--optimizer {mine} state and fp32 masters (partitioned by whole parameters) load as they "
                         "are; the per-rank random streams cannot be mapped onto other ranks and start fresh from "
                         "--seed (exact without dropout)")
    if load_optim and desc.has_optimizer_state:
        if mine not in ADAM_STATE and how != "deepspeed" and not _whole_matrix_state_travels(desc, mine):
            what = (f"{where} needs its optimizer state converted (its layout is {desc.layout()}"
                    + (f", a {desc.kind} checkpoint" if desc.kind != "ours" else "") + ")")
            if mine in WHOLE_MATRIX_OPTIMIZERS:
                problems.append(f"{what}, but only this framework's own checkpoints and the universal folders its "
                                "`tools/convert_checkpoint.py to-universal` writes carry --optimizer "
                                f"{mine}'s whole-matrix state to another layout; this one carries Adam state only. "
                                "Resume at the checkpoint's layout, or pass --no-load-optim (fresh optimizer state, "
                                "schedule kept)")
            else:
                problems.append(f"{what}, which carries Adam's state (and the whole-matrix optimizers') only, "
                                f"not --optimizer {mine}'s; resume at the checkpoint's layout, or pass "
                                "--no-load-optim (fresh optimizer state, schedule kept)")
        theirs = desc.optimizer
        if theirs is not None and _SAME_OPTIMIZER.get(theirs, theirs) != _SAME_OPTIMIZER.get(mine, mine):
            problems.append(f"{where} holds the state of --optimizer {theirs}, but this run uses --optimizer {mine}; "
                            f"resume with --optimizer {theirs}, or start the new optimizer fresh with "
                            "--no-load-optim (keeps the iteration and LR schedule) or --finetune")

    if run.training.data_parallel_random_init and not finetune and desc.args.get("data_parallel_random_init") is False:
        problems.append(f"{where}: --data-parallel-random-init is given, but the checkpoint was saved by a run "
                        "without it (as upstream, the two must match); drop the flag to resume, or pass --finetune "
                        "to start a new run from these weights")

    run, notices, policy_problems = _resolve_hyperparameters(desc, run, load_optim, load_lr_state, finetune,
                                                             ps.dp_size)
    problems += policy_problems
    run, task_notices, task_problems = _resolve_task_args(desc, run, finetune)
    problems += task_problems
    notices += task_notices
    notices[:0] = [n for n in (legacy_notice, padded_notice, dp_notice) if n]
    if padded_problem:
        problems.append(padded_problem)
    if problems:
        raise ConfigError(f"cannot resume {where}:\n  - " + "\n  - ".join(problems))
    return ResumePlan(desc, run, how, load_optim=load_optim, load_rng=load_rng, load_lr_state=load_lr_state,
                      finetune=finetune, notices=notices)


def _older_null_tokenizer(desc: CheckpointDescription, run):
    """(run, notice): a checkpoint of ours saved when this framework's NullTokenizer counted the end-of-document id
    in --vocab-size V (V tokens, EOD V - 1; now V + 1 tokens, EOD V, as upstream) is recognised by its model
    having exactly the flag's V tokens; the run then keeps that convention (model vocabulary V, EOD V - 1)."""
    data = run.data
    if (desc.kind != "ours" or data.tokenizer_type not in (None, "NullTokenizer") or data.vocab_size is None
            or run.model.vocab_size != data.vocab_size + 1 or desc.config.vocab_size != data.vocab_size):
        return run, None
    run = dataclasses.replace(run, model=run.model.replace(vocab_size=data.vocab_size))
    return run, (f"{desc.path} was saved with this framework's older NullTokenizer convention (--vocab-size "
                 f"{data.vocab_size} meant {data.vocab_size} tokens, end of document {data.vocab_size - 1}); the run "
                 f"keeps it: {data.vocab_size} tokens, end-of-document id {data.vocab_size - 1} (a new run with "
                 f"--vocab-size {data.vocab_size} has {data.vocab_size + 1} tokens and end of document "
                 f"{data.vocab_size}, as upstream; docs/UPSTREAM.md)")


def _padded_vocab_loss(desc: CheckpointDescription, run, ps):
    """(run, notice, problem) for the loss over the padded vocabulary: without --[no-]loss-over-padded-vocab the
    run follows how the checkpoint was trained (every argonne-lcf/Megatron-DeepSpeed checkpoint: over the padded
    vocabulary, its padding rows trained); with it on, the padding rows the checkpoint trained must fit this
    layout's padding."""
    given = (run.args or {}).get("loss_over_padded_vocab")
    trained = bool(getattr(desc.config, "loss_over_padded_vocab", False))
    notice = None
    if given is None and trained != run.model.loss_over_padded_vocab:
        run = dataclasses.replace(run, model=run.model.replace(loss_over_padded_vocab=trained))
        if trained:
            who = "argonne-lcf/Megatron-DeepSpeed" if desc.kind == "argonne" else "a run"
            notice = (f"the loss's softmax runs over the padded vocabulary ({run.model.padded_vocab_size(ps.tp_size)} "
                      f"columns for {run.model.vocab_size} tokens) and trains the padding rows, as {who} trained "
                      f"{desc.path} (--loss-over-padded-vocab; --no-loss-over-padded-vocab masks the padding)")
    if not (run.model.loss_over_padded_vocab and trained) or desc.kind not in ("ours", "argonne"):
        return run, notice, None
    theirs, ours = desc.config.padded_vocab_size(desc.tp), run.model.padded_vocab_size(ps.tp_size)
    if theirs > ours:
        return run, notice, (
            f"--loss-over-padded-vocab: {desc.path} trained {theirs} vocabulary rows (padded at tp {desc.tp}), but "
            f"this run pads the vocabulary to {ours} (--make-vocab-size-divisible-by "
            f"{run.model.make_vocab_size_divisible_by} × tp {ps.tp_size}), which has no room for all of them; run at "
            f"tp {desc.tp} (or a --make-vocab-size-divisible-by giving {theirs}), or pass "
            "--no-loss-over-padded-vocab to drop the padding rows and mask them in the loss")
    if theirs < ours:
        notice = ((notice + "; ") if notice else "") + (
            f"this run pads the vocabulary to {ours} rows, the checkpoint to {theirs}: the {ours - theirs} new "
            "padding rows start at zero, so the loss is not the checkpoint run's own")
    return run, notice, None


def _layout_differs(desc: CheckpointDescription, run, ps) -> bool:
    """True when DeepSpeed cannot load the checkpoint as is: another tp, pp, dp or ZeRO stage, or weights only."""
    from megatron.optimizer import deepspeed_zero_stage

    return (desc.tp != ps.tp_size or desc.pp != ps.pp_size or desc.dp != ps.dp_size * ps.sp_size
            or desc.zero_stage != deepspeed_zero_stage(run) or desc.converted)


def _whole_parameter_state_at_another_dp(desc: CheckpointDescription, run, ps) -> bool:
    """A whole-matrix optimizer's checkpoint (DeepSpeed stage 0: one model-states file per tp × pp rank holding
    the full optimizer state, numbered by parameter; megatron/optimizer/full_matrix.py) at the same tp and pp but
    another dp size or ZeRO stage 0/1/2: DeepSpeed's own load reads it at any dp."""
    from megatron.optimizer import WHOLE_MATRIX, deepspeed_zero_stage

    theirs = _SAME_OPTIMIZER.get(desc.optimizer, desc.optimizer)
    return (desc.kind == "ours" and not desc.converted and run.training.optimizer.optimizer in WHOLE_MATRIX
            and theirs == run.training.optimizer.optimizer and desc.tp == ps.tp_size and desc.pp == ps.pp_size
            and desc.zero_stage == 0 == deepspeed_zero_stage(run))


def _whole_matrix_state_travels(desc: CheckpointDescription, optimizer: str) -> bool:
    """A whole-matrix optimizer's state (full_matrix/2) loads at another layout from our own checkpoints and from
    universal folders that hold it (megatron/checkpoint/full_matrix_state.py), not from argonne's or DeepSpeed's
    own universal folders (Adam state only)."""
    if optimizer not in WHOLE_MATRIX_OPTIMIZERS:
        return False
    if desc.kind == "ours":
        return not desc.converted
    return desc.kind == "universal" and bool(getattr(desc.source, "has_full_matrix_state", False))


def _policy(run) -> str:
    opt = run.training.optimizer
    return "override" if opt.override_opt_param_scheduler else \
        "checkpoint" if opt.use_checkpoint_opt_param_scheduler else "check"


def _resolve_hyperparameters(desc: CheckpointDescription, run, load_optim: bool, load_lr_state: bool,
                             finetune: bool, dp_size: int):
    """(run with the winning values, notices, refusals) for the LR schedule and the optimizer hyperparameters."""
    from megatron.optimizer.lr_schedule import schedule_differences

    if finetune:
        return run, [], []
    policy = _policy(run)
    fix = ("give --override-opt_param-scheduler to use the flags' values, or --use-checkpoint-opt_param-scheduler "
           "to keep the checkpoint's")
    problems, notices = [], []
    if load_lr_state and desc.lr_scheduler is not None and policy == "check":
        differ = _argonne_schedule_differences(run, desc.lr_scheduler, dp_size) if desc.kind == "argonne" \
            else schedule_differences(run, desc.lr_scheduler, dp_size)
        if differ:
            problems.append("the LR schedule of the flags differs from the checkpoint's: " + "; ".join(differ)
                            + f"; {fix}")
    opt = run.training.optimizer
    taken = {}
    for key, flag, attr in HYPERPARAMETERS:
        saved = desc.args.get(key)
        if saved is None:
            continue
        # the weight decay is the schedule's (upstream's start_wd/end_wd); the rest travel with the optimizer state
        if (key == "weight_decay" and not load_lr_state) or (key != "weight_decay" and not load_optim):
            continue
        if key.startswith("adam_") and opt.optimizer in WITHOUT_ADAM_HYPERPARAMETERS:
            continue
        flags_value = getattr(opt, attr)
        if _same(flags_value, saved):
            continue
        if policy == "check":
            problems.append(f"{flag} {flags_value} differs from the checkpoint's {saved}; {fix}")
        elif policy == "checkpoint":
            taken[attr] = type(flags_value)(saved)
            notices.append(f"{flag}: using the checkpoint's {saved} (--use-checkpoint-opt_param-scheduler; "
                           f"the flag gave {flags_value})")
        else:
            notices.append(f"{flag}: using the flag's {flags_value} instead of the checkpoint's {saved} "
                           "(--override-opt_param-scheduler)")
    if taken:  # the engine is built with them, and the next checkpoint records them
        optimizer = dataclasses.replace(opt, **taken)
        run = dataclasses.replace(run, training=dataclasses.replace(run.training, optimizer=optimizer),
                                  args={**run.args, **taken})
    return run, notices, problems


def _flag_value(value) -> str:
    """A saved value as a flag's setting: on/off for a switch or an unset option."""
    return "off" if value is None or value is False else "on" if value is True else str(value)


def _resolve_task_args(desc: CheckpointDescription, run, finetune: bool):
    """(run with the winning values in run.args, notices, refusals) for TASK_ARGS: a resumed run continues the
    checkpoint's objective unless the policy flags say otherwise (--finetune starts a new run: nothing compared).
    --task is never taken from a checkpoint (it decides the data and the loss the run was built with)."""
    if finetune:
        return run, [], []
    policy = _policy(run)
    given = run.args or {}
    fix = ("give --override-opt_param-scheduler to use the flags' values, --use-checkpoint-opt_param-scheduler "
           "to keep the checkpoint's, or --finetune to start a new run from its weights")
    problems, notices, taken = [], [], {}
    for key, flag in TASK_ARGS:
        if key not in desc.args or key not in given or _same(given[key], desc.args[key]):
            continue
        mine, saved = _flag_value(given[key]), _flag_value(desc.args[key])
        if policy == "override":
            notices.append(f"{flag}: using the flag's {mine} instead of the checkpoint's {saved} "
                           "(--override-opt_param-scheduler)")
        elif policy == "checkpoint" and key != "task":
            taken[key] = desc.args[key]
            notices.append(f"{flag}: using the checkpoint's {saved} (--use-checkpoint-opt_param-scheduler; the flag "
                           f"gave {mine})")
        elif key == "task":
            problems.append(f"--task {mine}: the checkpoint was saved by a --task {saved} run; give --task {saved} "
                            "to resume it, --finetune to start a new run from its weights, or "
                            "--override-opt_param-scheduler to continue it with another task")
        else:
            problems.append(f"{flag} {mine} differs from the checkpoint's {saved}; {fix}")
    if taken:  # the task reads its settings back from run.args (megatron/post_training/tasks.py)
        run = dataclasses.replace(run, args={**run.args, **taken})
    return run, notices, problems


# what sets each of upstream's schedule settings, as our LRSchedule state names them (megatron/checkpoint/argonne.py)
_UPSTREAM_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "decay_style": "--lr-decay-style",
    "decay_steps": "--lr-decay-iters/--lr-decay-samples (default: the run length)",
    "warmup_steps": "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction",
    "wd_incr_steps": "the run length (weight-decay increments)", "decay_tokens": "--lr-decay-tokens",
    "warmup_tokens": "--lr-warmup-tokens", "wd_incr_style": "--weight-decay-incr-style",
    "start_wd": "--start-weight-decay", "end_wd": "--end-weight-decay"}


def _argonne_schedule_differences(run, saved: dict, dp_size: int) -> list[str]:
    """Upstream's check (its OptimizerParamScheduler._check_and_set) of an upstream checkpoint's schedule: the
    flags' schedule built upstream's way (lengths in samples, the warmup fraction unrounded) against the saved
    one, in the same units; one line per difference."""
    from megatron.checkpoint.argonne import argonne_lr_state_of_flags

    flags = argonne_lr_state_of_flags(run, dp_size, saved)
    return [f"{what}: the flags give {flags[k]!r}, the checkpoint has {saved[k]!r}"
            for k, what in _UPSTREAM_SCHEDULE_FLAGS.items()
            if k in saved and k in flags and not _same(flags[k], saved[k])]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# ---- executing the plan --------------------------------------------------------------------------------------

def execute(plan: ResumePlan, te, set_tracker_states: Optional[Callable[[dict], None]] = None,
            log: Callable[[str], None] = print) -> TrainingProgress:
    """Load the planned checkpoint into the built engine `te` (collective) and apply the winning
    hyperparameters; returns the progress to continue from."""
    from megatron.checkpoint import deepspeed_io
    from megatron.checkpoint.zero_shards import forget_remembered

    desc = plan.description
    if hasattr(desc.source, "keep_vocab_padding"):  # the padding rows travel when the loss trains them
        desc.source.keep_vocab_padding = bool(plan.run.model.loss_over_padded_vocab)
    wanted = _hyperparameter_snapshot(te.engine)
    try:
        with deepspeed_io.lr_scheduler_detached(te.engine, detach=not plan.load_lr_state):
            if plan.how == "universal":
                from megatron.checkpoint.universal import load_universal_checkpoint

                progress = load_universal_checkpoint(te, desc.path, load_optim=plan.load_optim,
                                                     finetune=plan.finetune, source=desc.source)
            elif plan.how == "argonne":
                from megatron.checkpoint.argonne import load_argonne_checkpoint

                progress = load_argonne_checkpoint(te, desc.path, load_optim=plan.load_optim,
                                                   finetune=plan.finetune, source=desc.source)
            elif plan.how == "reshard":
                from megatron.checkpoint.reshard import load_checkpoint_any_layout

                try:
                    progress = load_checkpoint_any_layout(te, desc.path, load_optim=plan.load_optim,
                                                          finetune=plan.finetune, source=desc.source)
                except ConversionError as error:
                    raise CheckpointError(str(error)) from None
            else:
                progress = deepspeed_io.load_with_deepspeed(te, desc.load_dir, desc.tag, te.device,
                                                            load_optim=plan.load_optim, load_rng=plan.load_rng,
                                                            finetune=plan.finetune,
                                                            set_tracker_states=set_tracker_states, log=log,
                                                            source=desc.source)
    finally:
        forget_remembered()
    deepspeed_io.barrier()
    _apply_hyperparameters(te.engine, wanted)
    te.train_weights()  # schedule-free: back from the averaged weights the checkpoint holds
    return progress


def _hyperparameter_snapshot(engine) -> list[dict]:
    """The hyperparameters each param group was built with (from the plan's run), before a load replaces them."""
    keys = ("weight_decay", "betas", "eps")
    return [{k: group[k] for k in keys if k in group} for group in engine.optimizer.param_groups]


def _apply_hyperparameters(engine, wanted: list[dict]) -> None:
    """After DeepSpeed restored the checkpoint's param groups and clip value: the run's own (the plan already
    put the checkpoint's there where the policy takes them), then the LR (and weight decay) of the schedule."""
    from megatron.deepspeed_compat import set_optimizer_clip_grad

    groups = engine.optimizer.param_groups
    if len(groups) == len(wanted):
        for group, values in zip(groups, wanted):
            group.update(values)
    set_optimizer_clip_grad(engine.optimizer, engine.gradient_clipping())
    if hasattr(engine.lr_scheduler, "apply"):  # our LRSchedule (a test may hand DeepSpeed another)
        engine.lr_scheduler.apply()


# ---- one object for the loop -------------------------------------------------------------------------------

class Checkpointer:
    """The loop's one entry to checkpoints: `prepare` before the model is built, `load` after, `save` whenever."""

    def __init__(self, run, ps, device: torch.device, log: Callable[[str], None] = print):
        self.run, self.ps, self.device, self.log = run, ps, device, log
        self.plan: Optional[ResumePlan] = None

    def _say(self, line: str) -> None:
        if self.ps.rank == 0:
            self.log(line)

    def prepare(self):
        """Collective. Decide the resume and check --save before anything heavy is built; returns the run the
        engine is to be built with. Every refusal is a ConfigError or CheckpointError."""
        from megatron.checkpoint.zero_shards import read_log

        with read_log(self.log):
            return self._prepare()

    def _prepare(self):
        from megatron.checkpoint.deepspeed_io import check_save_dir, estimate_checkpoint_bytes

        run = self.run
        if run.checkpoint.load:
            located = locate(run, self.log, self.ps.rank)
            if located is not None:
                try:
                    self.plan = plan_resume(describe(*located, run.model.make_vocab_size_divisible_by), run, self.ps)
                except BaseException:  # refused: nothing loads, so drop the objects the reader kept for the load
                    from megatron.checkpoint.zero_shards import forget_remembered

                    forget_remembered()
                    raise
                for notice in self.plan.notices:
                    self._say(f"resume: {notice}")
                run = self.run = self.plan.run
        if run.checkpoint.save:  # writable from every rank, room for one checkpoint; stale .tmp-* saves removed
            check_save_dir(run.checkpoint.save, estimate_checkpoint_bytes(run.model, run.training.precision),
                           log=self.log if self.ps.rank == 0 else (lambda _line: None))
        return run

    @property
    def resuming(self) -> bool:
        return self.plan is not None

    def load(self, te, set_tracker_states: Optional[Callable[[dict], None]] = None) -> TrainingProgress:
        """Collective. Execute the plan into the built engine; a fresh TrainingProgress when nothing is resumed."""
        if self.plan is None:
            return TrainingProgress(args=self.run.args)
        from megatron.checkpoint.zero_shards import read_log

        with read_log(self.log):
            progress = execute(self.plan, te, set_tracker_states, self.log)
        if self.plan.finetune:
            progress = TrainingProgress(args=progress.args, checkpoint_path=progress.checkpoint_path)
        self._say(f"loaded {progress.checkpoint_path} at iteration {progress.iteration}, "
                  f"{progress.consumed_samples} consumed samples")
        return progress

    def save(self, te, progress: TrainingProgress, tracker_states=None, extra_state: Optional[dict] = None) -> str:
        """Collective. Write `progress` (and the engine's state) under --save; returns the checkpoint directory."""
        from megatron.checkpoint.deepspeed_io import save_checkpoint

        run = self.run
        with te.eval_weights():  # schedule-free: the checkpoint holds the averaged weights (exact resume)
            path = save_checkpoint(te.engine, run.checkpoint.save, progress, self.device,
                                   tracker_states=tracker_states,
                                   extra_state={**(extra_state or {}), "model_config": run.model.to_dict()},
                                   keep_last_n=run.reliability.keep_last_n_checkpoints, log=self.log,
                                   save_optim=not run.checkpoint.no_save_optim,
                                   save_rng=not run.checkpoint.no_save_rng)
        self._say(f"saved checkpoint {path}")
        return path


def load_checkpoint(te, run, log: Callable[[str], None] = print,
                    set_tracker_states: Optional[Callable[[dict], None]] = None) -> TrainingProgress:
    """Collective. Locate, describe, plan and execute in one call, into an engine already built for `run` (tools
    and tests; the loop plans before it builds the engine, so that a refusal costs no model build)."""
    checkpointer = Checkpointer(dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, save=None)),
                                te.ps, te.device, log)
    checkpointer.prepare()
    return checkpointer.load(te, set_tracker_states)
