"""The Megatron-DeepSpeed command line: the flag names users already type, mapped onto config/'s dataclasses.

`parse_args(argv) -> RunConfig` parses and checks everything that does not need the world size;
`validate_run(run, world_size)` checks the rest once ranks are known. Derived values (gradient
accumulation, batch ramp-up, number of train iterations) are small functions of (run, dp size) below.

Each concern declares its flags next to its dataclass (`add_*_arguments(parser)`) and builds that dataclass from
the parsed namespace (`*_from_args(ns)`): config/model.py, parallel.py, training.py (with optimizer_args.py),
checkpoint.py, logging.py, data.py and reliability.py. This module keeps what crosses concerns: the order of
the groups in --help, the flag spellings (--a_b, typos, other frameworks' names, refused and no-effect flags),
the checks between flags, the --deepspeed_config and --use-checkpoint-args adoption, and RunConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron.config import upstream_flags
from megatron.config.checkpoint import CheckpointConfig, checkpoint_from_args
from megatron.config.data import DataConfig, add_data_arguments, add_data_blend_arguments, data_from_args
from megatron.config.logging import LoggingConfig, ProfilingConfig, add_tracking_arguments, logging_from_args, \
    profiling_from_args
from megatron.config.model import TransformerConfig, add_model_arguments, model_from_args
from megatron.config.optimizer_args import optimizer_flag_errors
from megatron.config.presets import preset_error
from megatron.config.parallel import ParallelConfig, add_parallel_arguments, layout_errors, parallel_from_args
from megatron.config.reliability import ReliabilityConfig, add_reliability_arguments, reliability_from_args
from megatron.config.training import (  # noqa: F401 (LR_DECAY_STYLES, WSD_DECAY_STYLES: imported from here too)
    LR_DECAY_STYLES, WSD_DECAY_STYLES, TrainingConfig, add_batch_arguments, add_deepspeed_arguments,
    add_precision_arguments, add_run_control_arguments, add_schedule_arguments, training_from_args,
)
from megatron.errors import ConfigError


@dataclass
class RunConfig:
    model: TransformerConfig  # vocab_size may be 0 until the tokenizer is built
    parallel: ParallelConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    args: dict  # every flag's final value: what checkpoints save as "the run's arguments"
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)  # config/reliability.py
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)  # config/logging.py
    notices: list = field(default_factory=list)  # what the flags resolved to, said once by rank 0


# Flags Megatron-DeepSpeed recipes pass that change nothing in training here (kernel-fusion toggles and flags
# that ask for what is always done here); accepted so recipes run unchanged, and `--help` says so.
# (flag, kind, why) with kind "flag" (no value) or a type for a value. More in upstream_flags.NO_EFFECT.
COMPAT_NO_EFFECT = [
    ("--deepspeed", "flag", "the engine is always DeepSpeed"),
    ("--deepspeed-mpi", "flag", "rank discovery is automatic (megatron.distributed)"),
    ("--local-rank", int, "the local rank is read from the launcher's environment (megatron.distributed)"),
    ("--no-bias-dropout-fusion", "flag", "no fused kernels to turn off"),
    ("--no-masked-softmax-fusion", "flag", "no fused kernels to turn off"),
    ("--no-gradient-accumulation-fusion", "flag", "no fused kernels to turn off"),
    ("--no-persist-layer-norm", "flag", "no fused kernels to turn off"),
    ("--no-async-tensor-model-parallel-allreduce", "flag", "tp all-reduces are synchronous"),
    ("--log-memory-to-tensorboard", "flag", "memory in use is always logged (memory/in_use_mb)"),
    ("--log-validation-ppl-to-tensorboard", "flag", "validation perplexity is always logged"),
    ("--log-batch-size-to-tensorboard", "flag", "the batch size is always logged"),
]

# Megatron features we do not have, refused flag by flag with the reason (megatron/config/upstream_flags.py).
REFUSED = dict(upstream_flags.REFUSED)


# Flags other frameworks use for what a Megatron-DeepSpeed flag here does; named in the unknown-flag error.
OTHER_NAMES = {
    "--cpu-offload": "--cpu-optimizer (optimizer state) and --remote-device cpu (ZeRO-3 parameters)",
    "--offload-optimizer": "--cpu-optimizer",
    "--offload-param": "--remote-device cpu",
    "--gradient-accumulation-steps": "--global-batch-size (= micro batch × dp × accumulation steps)",
    "--batch-size": "--micro-batch-size (per rank) or --global-batch-size",
    "--lr-warmup-steps": "--lr-warmup-iters",
}


# DeepSpeed's BF16 optimizer (fp32 master weights and fp32 gradient accumulation, its fp32 state sharded over the
# data-parallel ranks) is what older DeepSpeed, upstream's, runs without ZeRO for bf16 with
# data_types.grad_accum_dtype fp32. DeepSpeed 0.19.8 selects the same class only through zero_optimization.stage 1
# and raises NotImplementedError ("unsupported mix of model_dtype") at stage 0, so --zero-stage 0 asks for it as 1.
ZERO0_FP32_ACCUMULATION_NOTICE = (
    "--accumulate-allreduce-grads-in-fp32 with --bf16 at --zero-stage 0: gradients accumulate in fp32 in "
    "DeepSpeed's BF16 optimizer (what upstream's DeepSpeed runs without ZeRO for this mix), which this DeepSpeed "
    "selects as ZeRO stage 1 (its fp32 state sharded over data-parallel ranks; the same updates); drop the flag "
    "for a ZeRO-0 run with bf16 accumulation")
ZERO0_FP32_ACCUMULATION = (
    "--accumulate-allreduce-grads-in-fp32 with --bf16 cannot run at ZeRO stage 0 as the DeepSpeed config file "
    "states it: DeepSpeed accumulates bf16 gradients in fp32 only in its BF16 optimizer, which it selects at "
    "zero_optimization.stage 1. Set the stage to 1 in the file (or leave it out), or drop the flag for bf16 "
    "accumulation")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's messages already name the flag ("argument --lr: invalid ...")
        raise ConfigError(f"{message} (see --help)")


def default_text(action: argparse.Action) -> Optional[str]:
    """What --help says of a flag's default: '(default: X)', or None when its help states it already (a help that
    says "default" or "required")."""
    helptext = (action.help or "").lower()
    if ("default" in helptext or "required" in helptext or action.default is argparse.SUPPRESS
            or action.dest.startswith("refused__") or helptext.startswith("no effect")):
        return None
    if isinstance(action, argparse._StoreFalseAction):
        return "(default: on)"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)):
        return "(default: on)" if action.default else "(default: off)"
    if action.default is None and getattr(action, "model_default", None) is not None:
        return f"(default: {action.model_default}, or the --model-preset's)"
    if action.default is None:
        return "(default: not set)"
    if isinstance(action.default, (list, tuple)):
        return f"(default: {' '.join(str(v) for v in action.default) or 'none'})"
    return f"(default: {action.default})"


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag states its default; one line per flag where the terminal allows."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=38)

    brief = False  # --help: each flag's first sentence (and its default); --help-all: the whole text

    def _get_help_string(self, action):
        extra = default_text(action) if action.option_strings and action.help is not argparse.SUPPRESS else None
        text = action.help or ""
        if self.brief:
            text = _first_sentence(text)
        return f"{text} {extra}".strip() if extra else text


def _first_sentence(text: str) -> str:
    """The help text up to its first '. ' or '; ' (with its default, if that is stated later); --help-all has
    the rest."""
    cut = min((i for i in (text.find(". "), text.find("; ")) if i > 0), default=-1)
    if cut < 0:
        return text
    rest = text[cut:]
    stated = re.search(r"\bdefault\b.*?(?=\)|; |\. |$)", rest, re.I)
    return text[:cut] + (f" ({stated.group(0).strip('() ')})" if stated and "default" not in text[:cut].lower()
                         else "") + " ..."


# The flags --help shows: what an AuroraGPT recipe or a first run sets. Every other working flag is listed by
# --help-all (each group's line in --help says how many more it has), with the no-effect and refused ones.
HELP_ESSENTIALS = frozenset("""
    --model-preset --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-key-value-heads
    --seq-length --max-position-embeddings --normalization --swiglu --use-rotary-position-embeddings
    --position-embedding-type --rotary-position-embeddings-theta --untie-embeddings-and-output-weights
    --disable-bias-linear --attention-dropout --hidden-dropout --init-method-std
    --data-path --data-file-list --split --sample-mode --mock-data --tokenizer-type --tokenizer-model --vocab-file
    --merge-file --vocab-size --num-workers --data-cache-path --train-data-path --valid-data-path --test-data-path
    --tensor-model-parallel-size --pipeline-model-parallel-size --sequence-parallel --ds-sequence-parallel-size
    --distributed-backend
    --micro-batch-size --global-batch-size --rampup-batch-size
    --train-iters --train-samples --train-tokens --lr --min-lr --lr-decay-style --lr-decay-iters
    --lr-warmup-iters --lr-warmup-fraction --weight-decay --clip-grad --adam-beta1 --adam-beta2 --adam-eps
    --optimizer --override-opt-param-scheduler --use-checkpoint-opt-param-scheduler
    --bf16 --fp16 --accumulate-allreduce-grads-in-fp32
    --deepspeed-config --zero-stage --cpu-optimizer --checkpoint-activations --recompute-granularity
    --universal-checkpoint
    --seed --log-interval --eval-interval --eval-iters --save --save-interval --load --no-load-optim --no-load-rng
    --finetune --load-tag --use-checkpoint-args --exit-interval --exit-duration-in-mins --exit-signal-handler
    --dry-run
    --tensorboard-dir --wandb-project --timing-log-level --log-params-norm --peak-tflops
    --distributed-timeout-minutes --keep-last-n-checkpoints --no-checkpoint-fallback
""".split())


class _HelpAction(argparse.Action):
    """-h/--help: the flags that do something, by concern; --help-all: also the no-effect and refused flags (each
    with its reason), so that `--help-all | grep FLAG` finds any upstream flag."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        everything = option_string == "--help-all"
        groups = parser._action_groups
        hidden = [g for g in groups if getattr(g, "hidden_from_help", False)]
        members = {id(g): g._group_actions for g in groups}
        if not everything:
            parser._action_groups = [g for g in groups if g not in hidden]
            for group in parser._action_groups:  # the essentials, then how many more --help-all shows
                more = [a for a in group._group_actions if a.option_strings and a.help is not argparse.SUPPRESS
                        and not HELP_ESSENTIALS & set(a.option_strings) and not isinstance(a, _HelpAction)]
                group._group_actions = [a for a in group._group_actions if a not in more]
                if more and group.title:
                    group.description = f"(+ {len(more)} more: --help-all)"
        _HelpFormatter.brief = not everything
        try:
            text = parser.format_help()
        finally:
            parser._action_groups = groups
            for group in groups:
                group._group_actions = members[id(group)]
                if group.description and group.description.startswith("(+ "):
                    group.description = None
            _HelpFormatter.brief = False
        if not everything:
            counts = " and ".join(f"{len(g._group_actions)} {g.short_name}" for g in hidden)
            text += (f"\nAlso accepted: {counts} flags of argonne-lcf/Megatron-DeepSpeed (each with its reason): "
                     "--help-all lists them.\n")
        parser._print_message(text, sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped by concern. Model and batch flags default to None so presets and files can fill them."""
    p = _Parser(prog="pretrain_gpt.py", allow_abbrev=False, exit_on_error=False, add_help=False,
                usage="%(prog)s [flags]   (--help: the flags most runs set, by concern; --help-all: every flag, "
                      "with upstream's no-effect and refused ones)", formatter_class=_HelpFormatter,
                description="Pretrain a GPT/Llama model with DeepSpeed (Megatron-DeepSpeed flag names; "
                            "'--a_b' spellings are accepted for every '--a-b').")
    p.add_argument("-h", "--help", action=_HelpAction, help="list the flags most runs set, by concern, and exit")
    p.add_argument("--help-all", action=_HelpAction,
                   help="list every flag, with its whole text, and upstream's flags that have no effect here or are "
                        "refused, with the reasons")

    # The groups in --help follow a user's concerns: what model, on what data, on how many devices, how long and
    # how fast it learns, then checkpoints, logging and fault handling.
    add_model_arguments(p)  # config/model.py: model, initialization
    add_data_arguments(p)  # config/data.py
    add_data_blend_arguments(p)  # config/data.py: per-split blends, corpus mixing, the blend report (issue #11)
    add_parallel_arguments(p)  # config/parallel.py
    add_batch_arguments(p)  # config/training.py: batch, schedule and optimizer, precision, DeepSpeed, run control
    add_schedule_arguments(p)  # with config/optimizer_args.py's --optimizer, its hyperparameters and schedules
    add_precision_arguments(p)
    add_deepspeed_arguments(p)
    add_run_control_arguments(p)  # with config/checkpoint.py's and config/logging.py's profiler flags
    add_tracking_arguments(p)  # config/logging.py
    add_reliability_arguments(p)  # config/reliability.py

    known = {option for action in p._actions for option in action.option_strings}
    g = p.add_argument_group("accepted for Megatron-DeepSpeed recipes, no effect here (kernel-fusion toggles, "
                             "and flags asking for what is always done here)")
    g.hidden_from_help, g.short_name = True, "no-effect"
    for flag, kind, why in COMPAT_NO_EFFECT + upstream_flags.NO_EFFECT:
        if flag in known:  # implemented by a flag above: that one wins
            continue
        known.add(flag)
        if kind == "flag":
            g.add_argument(flag, action="store_true", help=f"no effect: {why}")
        else:
            g.add_argument(flag, type=kind, help=f"no effect: {why}")
    g = p.add_argument_group("refused (not supported here)")
    g.hidden_from_help, g.short_name = True, "refused"
    for flag, why in REFUSED.items():
        if flag in known:
            continue
        known.add(flag)
        g.add_argument(flag, nargs="*", default=None, metavar="ARG", dest=_refused_dest(flag), help=why)
    _finish_help(p)
    return p


def _short_metavar(action: argparse.Action) -> Optional[str]:
    """A short name for a flag's value in --help (N, X, PATH, VALUE) instead of argparse's upper-cased dest, so
    that most flags fit on one line; None where the flag names its own metavar or takes no value."""
    if action.metavar is not None or action.choices is not None or action.nargs == 0 or not action.option_strings:
        return None
    dest = action.dest
    kind = getattr(action.type, "__name__", "")  # config/argtypes.py's converters keep int's / float's name
    if kind == "int":
        return "N"
    if kind == "float":
        return "X"
    if any(word in dest for word in ("path", "file", "dir", "load", "save", "model")) and dest != "model_preset":
        return "PATH"
    return "VALUE"


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Every flag that does something states its default in --help, and its value has a short name."""
    model_defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
                      if f.default is not dataclasses.MISSING}
    for action in parser._actions:
        if not action.option_strings or action.dest.startswith("refused__"):
            continue
        if action.default is None and model_defaults.get(action.dest) not in (None, 0, ""):
            action.model_default = model_defaults[action.dest]  # a model flag left unset: the model's default
        metavar = _short_metavar(action)
        if metavar:
            action.metavar = metavar
        if not action.help:
            action.help = default_text(action)


def _refused_dest(flag: str) -> str:
    return "refused__" + flag[2:].replace("-", "_")


def _normalize(argv: list[str]) -> list[str]:
    """'--a_b[=v]' → '--a-b[=v]' so both spellings reach the same flag; values are left alone."""
    out = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = name.replace("_", "-") + eq + value
        out.append(token)
    return out


_NEGATIONS = ("--no-", "--disable-", "--dont-", "--skip-")


def _negated(flag: str) -> bool:
    return flag.startswith(_NEGATIONS)


def _did_you_mean(name: str, known: list[str]) -> Optional[str]:
    """The nearest known flag of the same polarity (never --no-x for --x or the reverse)."""
    if name in OTHER_NAMES:
        return OTHER_NAMES[name]
    same_polarity = [k for k in known if _negated(k) == _negated(name)]
    close = difflib.get_close_matches(name, same_polarity, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_flag_lines(parser: argparse.ArgumentParser, unknown: list[str], typed: dict) -> list[str]:
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    lines, after_flag = [], False
    for token in unknown:
        if not token.startswith("-"):
            if after_flag:  # the value of the unknown flag just reported
                after_flag = False
                continue
            lines.append(f"unexpected value {token!r} (is a flag before it misspelled or missing a value?)")
            continue
        name = token.split("=", 1)[0]
        close = _did_you_mean(name, known)
        hint = f"; did you mean {close}?" if close else "; see --help"
        lines.append(f"unknown flag {typed.get(name, name)}{hint}")
        after_flag = "=" not in token
    return lines


def _drop_option(parser: argparse.ArgumentParser, argv: list[str], options: set[str]) -> list[str]:
    """argv without every occurrence of `options` and the values that follow them."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, _ = token.partition("=")
        if token.startswith("--") and name in options:
            i += 1
            if not eq:
                nargs = parser._option_string_actions[name].nargs
                count = 1 if nargs is None else nargs if isinstance(nargs, int) else None  # None: all values
                while i < len(argv) and not argv[i].startswith("--") and (count is None or count > 0):
                    i += 1
                    if count is not None:
                        count -= 1
            continue
        out.append(token)
        i += 1
    return out


def _parse_collecting(parser: argparse.ArgumentParser, argv: list[str], typed: dict):
    """(namespace, errors): every bad value and every unknown flag, each named as the user typed it."""
    errors = []
    for _ in range(len(argv) + 1):
        try:
            ns, unknown = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:
            options = set((e.argument_name or "").split("/"))
            used = next((t.split("=", 1)[0] for t in argv if t.split("=", 1)[0] in options), None)
            if used is None:  # not tied to one flag: report it as argparse says it
                raise ConfigError(f"{e} (see --help)") from None
            errors.append(f"{typed.get(used, used)}: {e.message}")
            argv = _drop_option(parser, argv, options)
            continue
        break
    return ns, errors + _unknown_flag_lines(parser, unknown, typed)


def read_deepspeed_config(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object at the top level")
    return ds


def deepspeed_file_values(ds: dict) -> dict:
    """The flag-dest → value pairs a DeepSpeed config states (batch sizes, ZeRO stage, precision, clipping)."""
    values = {}
    for key, dest in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                      ("train_batch_size", "global_batch_size"), ("gradient_clipping", "clip_grad")):
        if isinstance(ds.get(key), (int, float)) and not isinstance(ds.get(key), bool):
            values[dest] = ds[key]
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        if "stage" in zero:
            values["zero_stage"] = int(zero["stage"])
        offload = zero.get("offload_optimizer")
        values["cpu_optimizer"] = isinstance(offload, dict) and offload.get("device") == "cpu"
    bf16 = ds.get("bf16", ds.get("bfloat16"))
    if isinstance(bf16, dict):
        values["bf16"] = bool(bf16.get("enabled", False))
    if isinstance(ds.get("fp16"), dict):
        values["fp16"] = bool(ds["fp16"].get("enabled", False))
    return values


# dest -> (flag, DeepSpeed key) of the settings a --deepspeed_config file and the flags must agree on.
DEEPSPEED_AGREEMENT = {
    "micro_batch_size": ("--micro-batch-size", "train_micro_batch_size_per_gpu"),
    "global_batch_size": ("--global-batch-size", "train_batch_size"),
    "clip_grad": ("--clip-grad", "gradient_clipping"),
    "zero_stage": ("--zero-stage", "zero_optimization.stage"),
    "cpu_optimizer": ("--cpu-optimizer", "zero_optimization.offload_optimizer.device == 'cpu'"),
    "bf16": ("--bf16", "bf16.enabled"),
    "fp16": ("--fp16", "fp16.enabled"),
}


def _adopt_deepspeed_file(ns: argparse.Namespace) -> None:
    """Fill flags not given from the --deepspeed_config file; a given flag that disagrees is an error."""
    path = ns.deepspeed_config
    file_values = deepspeed_file_values(read_deepspeed_config(path))
    errors = []
    for dest, file_value in file_values.items():
        given = getattr(ns, dest)
        if given is None:
            setattr(ns, dest, file_value)
        elif given != file_value:
            flag, key = DEEPSPEED_AGREEMENT[dest]
            errors.append(f"{flag} {given} disagrees with {path}: {key} = {file_value}")
    if errors:
        raise ConfigError("the flags and the --deepspeed_config file disagree; make them match:\n  - "
                          + "\n  - ".join(errors))


_FP32_NAMES = ("torch.float32", "fp32", "float32", "float")  # DeepSpeed's DtypeEnum.fp32 spellings


def _file_decides_accumulation(ns: argparse.Namespace, notices: list) -> None:
    """With a --deepspeed_config file, its data_types.grad_accum_dtype decides the gradient accumulation dtype, as
    upstream (its --accumulate-allreduce-grads-in-fp32 reaches only Megatron's own DDP, which a DeepSpeed run does
    not use); a file without it gets DeepSpeed's default, the model's dtype. A flag the file overrides gets a
    notice naming both."""
    accum = read_deepspeed_config(ns.deepspeed_config).get("data_types", {})
    accum = accum.get("grad_accum_dtype") if isinstance(accum, dict) else None
    file_fp32 = isinstance(accum, str) and accum.lower() in _FP32_NAMES
    if ns.accumulate_allreduce_grads_in_fp32 and not file_fp32 and (ns.bf16 or ns.fp16):
        said = "has no data_types.grad_accum_dtype" if accum is None else f"sets data_types.grad_accum_dtype = {accum}"
        notices.append(f"--accumulate-allreduce-grads-in-fp32 is overridden by {ns.deepspeed_config}, which {said}: "
                       f"gradients accumulate in {accum or ('bf16' if ns.bf16 else 'fp16')}, as upstream runs it "
                       "(the DeepSpeed config file decides)")
    ns.accumulate_allreduce_grads_in_fp32 = file_fp32 and bool(ns.bf16)


# --use-checkpoint-args, as upstream's load_args_from_checkpoint: these take the checkpoint's value when the flag
# is not given (upstream's list, plus this framework's shape settings upstream has no flag for) ...
_CHECKPOINT_ARGS_IF_UNSET = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                             "num_key_value_heads", "kv_channels", "max_position_embeddings", "tokenizer_type",
                             "vocab_size", "make_vocab_size_divisible_by", "normalization", "norm_epsilon",
                             "rope_theta")
# ... and these always take it (upstream's force=True).
_CHECKPOINT_ARGS_ALWAYS = ("position_embedding_type", "rotary_percent", "add_bias_linear", "swiglu",
                           "untie_embeddings_and_output_weights", "apply_layernorm_1p", "tensor_model_parallel_size",
                           "pipeline_model_parallel_size")


def _adopt_checkpoint_args(ns: argparse.Namespace, notices: list, read_saved_args) -> None:
    """--use-checkpoint-args: fill the model shape and the tp/pp sizes from the arguments saved in the --load
    checkpoint (--load-tag's, else the pointer's); a --load without a checkpoint yet keeps the flags, as upstream.
    `read_saved_args(load, load_tag) -> (directory, args) | None` reads them (megatron.cli passes the checkpoint
    package's reader: config/ imports no package above it)."""
    if read_saved_args is None:
        raise ConfigError("--use-checkpoint-args: this caller of megatron.config.parse_args reads no checkpoint; "
                          "parse with megatron.cli.parse_args (as pretrain_gpt.py does)")
    found = read_saved_args(ns.load, ns.load_tag)
    directory, saved = found if found is not None else (None, None)
    if saved is None:
        notices.append(f"--use-checkpoint-args: --load {ns.load} holds no checkpoint yet; the flags given are used")
        return
    if "position_embedding_type" not in saved and "use_rotary_position_embeddings" in saved:  # upstream's args
        saved["position_embedding_type"] = "rope" if saved["use_rotary_position_embeddings"] else (
            "learned_absolute" if saved.get("add_position_embedding", True) else "none")
    if "add_bias_linear" not in saved and "disable_bias_linear" in saved:
        saved["add_bias_linear"] = not saved["disable_bias_linear"]
    if saved.get("padded_vocab_size") and not saved.get("vocab_size"):
        saved["vocab_size"] = saved["padded_vocab_size"]
    taken = []
    for dest in _CHECKPOINT_ARGS_IF_UNSET + _CHECKPOINT_ARGS_ALWAYS:
        value = saved.get(dest)
        if value is None or not hasattr(ns, dest):
            continue
        if dest in _CHECKPOINT_ARGS_IF_UNSET and getattr(ns, dest) is not None:
            continue
        if getattr(ns, dest) != value:
            setattr(ns, dest, value)
            taken.append(f"--{dest.replace('_', '-')} {value}")
    if "position_embedding_type" in saved:  # the checkpoint's type, not the flags that would choose another
        ns.use_rotary_position_embeddings = ns.no_position_embedding = False
    notices.append(f"--use-checkpoint-args: from {directory}: " + (", ".join(taken) if taken else
                                                                  "the flags already match the checkpoint"))


def _check_flags(ns: argparse.Namespace, typed: Optional[dict] = None) -> list[str]:
    typed = typed or {}
    errors = []
    for flag, why in REFUSED.items():
        value = getattr(ns, _refused_dest(flag), None)
        if value is None:
            continue
        off = upstream_flags.REFUSED_OFF_VALUES.get(flag)
        if off and value and set(value) <= off:  # e.g. --num-experts 1: a dense model, as here
            continue
        errors.append(f"{typed.get(flag, flag)}: {why}")
    if ns.model_preset and preset_error(ns.model_preset):
        errors.append(preset_error(ns.model_preset))
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 both given; pick one")
    granularity = "selective" if ns.recompute_activations else ns.recompute_granularity
    if ns.checkpoint_activations and granularity is not None:
        errors.append("--checkpoint-activations and --recompute-activations/--recompute-granularity both given; "
                      "give one (--checkpoint-activations is --recompute-granularity full --recompute-method uniform)")
    if ns.recompute_method and granularity != "full":
        errors.append("--recompute-method needs --recompute-granularity full")
    if ns.recompute_method == "block" and ns.pipeline_model_parallel_size > 1:
        errors.append("--recompute-method block is supported with --pipeline-model-parallel-size 1 only; use "
                      "uniform")
    if ns.partition_activations and ns.sequence_parallel and (ns.tensor_model_parallel_size or 1) > 1:
        errors.append("--partition-activations splits a replicated layer input over the tp ranks, but with "
                      "--sequence-parallel that input is already split along the sequence over them; drop one")
    if ns.openai_gelu and (ns.swiglu or ns.squared_relu):
        errors.append(f"--openai-gelu selects the GeLU of the MLP; it cannot be combined with "
                      f"{'--swiglu' if ns.swiglu else '--squared-relu'} (pick one activation)")
    if ns.reset_attention_mask and ns.ds_sequence_parallel_size > 1:
        errors.append("--reset-attention-mask is not supported with --ds-sequence-parallel-size "
                      f"{ns.ds_sequence_parallel_size} (Ulysses); drop one")
    if ns.accumulate_allreduce_grads_in_fp32 and ns.fp16 and not ns.deepspeed_config:  # a file decides (notice)
        errors.append("--accumulate-allreduce-grads-in-fp32 is supported with --bf16 (and fp32) only, not --fp16")
    if ns.train_range_to_skip and len(ns.train_range_to_skip) % 2:
        errors.append(f"--train-range-to-skip takes pairs START END (got {len(ns.train_range_to_skip)} values)")
    elif any(a > b for a, b in zip((ns.train_range_to_skip or [])[::2], (ns.train_range_to_skip or [])[1::2])):
        errors.append("--train-range-to-skip: each START must be <= its END")
    steps = ns.profile_steps.split(",")
    if len(steps) != 2 or not all(s.strip().isdigit() and int(s) >= 1 for s in steps) or int(steps[0]) > int(steps[1]):
        errors.append(f"--profile_steps {ns.profile_steps!r} must be START,END with 1 <= START <= END")
    if ns.data_impl in ("lazy", "cached"):
        errors.append(f"--data-impl {ns.data_impl}: the only format is MMIDIDX (.bin/.idx); use mmap or infer")
    if ns.dataloader_type == "cyclic":
        errors.append("--dataloader-type cyclic is not supported: the run makes one pass over the blended index "
                      "(single); size the blend with --train-samples/--train-iters instead")
    if ns.universal_checkpoint and not ns.load:
        errors.append("--universal-checkpoint loads the universal folder that --load names; give --load")
    for dest in ("load_tag", "use_checkpoint_args", "no_load_lr_state"):
        if getattr(ns, dest) and not ns.load:
            flag = "--" + dest.replace("_", "-")
            errors.append(f"{typed.get(flag, flag)} concerns the checkpoint --load names; give --load")
    if ns.load_tag is not None and (not ns.load_tag.strip() or "/" in ns.load_tag or ns.load_tag in (".", "..")):
        errors.append(f"--load-tag {ns.load_tag!r} must be the name of one checkpoint directory under --load "
                      "(e.g. global_step100)")
    lengths = [f for f in ("train_iters", "train_samples") if getattr(ns, f) is not None]
    if len(lengths) > 1:
        errors.append(f"give only one of {', '.join('--' + f.replace('_', '-') for f in lengths)}")
    if ns.train_tokens is not None and not lengths:
        errors.append("--train-tokens is a token budget, as upstream's: training stops at --train-iters (or "
                      "--train-samples) or once it has consumed --train-tokens tokens, whichever comes first; "
                      "give --train-iters or --train-samples too")
    if ns.rampup_batch_size:
        start, increment, _ = ns.rampup_batch_size
        if ns.train_iters is not None:
            errors.append("--rampup-batch-size needs --train-samples, not --train-iters")
        if ns.global_batch_size is None:
            errors.append("--rampup-batch-size needs --global-batch-size (the batch it ramps up to)")
        elif start > ns.global_batch_size or (ns.global_batch_size - start) % increment:
            errors.append(f"--rampup-batch-size START {start} must be <= --global-batch-size "
                          f"{ns.global_batch_size} and reach it in steps of INCREMENT {increment}")
        if ns.lr_decay_iters is not None or ns.lr_warmup_iters:
            errors.append("with --rampup-batch-size the LR schedule counts samples: use --lr-decay-samples, "
                          "--lr-warmup-samples or --lr-warmup-fraction instead of --lr-*-iters")
    elif (ns.lr_decay_samples is not None or ns.lr_warmup_samples) and (ns.lr_decay_iters is not None
                                                                     or ns.lr_warmup_iters):
        errors.append("give the LR schedule's lengths in samples (--lr-decay-samples/--lr-warmup-samples) or in "
                      "iterations (--lr-decay-iters/--lr-warmup-iters), not both")
    if ns.lr < 0 or ns.min_lr < 0 or ns.min_lr > ns.lr:
        errors.append(f"need 0 <= --min-lr ({ns.min_lr}) <= --lr ({ns.lr})")
    if ns.lr_warmup_fraction is not None:
        if not 0.0 <= ns.lr_warmup_fraction < 1.0:
            errors.append(f"--lr-warmup-fraction must be in [0, 1) (got {ns.lr_warmup_fraction})")
        if ns.lr_warmup_iters or ns.lr_warmup_samples:
            errors.append("give only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
    for flag in ("lr_warmup_iters", "lr_warmup_samples", "num_workers", "eval_iters"):
        if (getattr(ns, flag) or 0) < 0:
            errors.append(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(ns, flag)})")
    if not 0.0 < ns.lr_wsd_decay_fraction <= 1.0:
        errors.append(f"--lr-wsd-decay-fraction must be in (0, 1] (got {ns.lr_wsd_decay_fraction})")
    if not (0.0 <= ns.adam_beta1 < 1.0 and 0.0 <= ns.adam_beta2 < 1.0):
        errors.append(f"--adam-beta1 ({ns.adam_beta1}) and --adam-beta2 ({ns.adam_beta2}) must be in [0, 1)")
    if ns.weight_decay < 0 or (ns.clip_grad or 0) < 0:
        errors.append("--weight-decay and --clip-grad must be >= 0")
    if ns.initial_loss_scale and not math.log2(ns.initial_loss_scale).is_integer():
        errors.append(f"--initial-loss-scale {ns.initial_loss_scale} must be a power of 2 (DeepSpeed's "
                      "initial_scale_power)")
    zero = ns.zero_stage or 0
    if zero >= 2 and ns.pipeline_model_parallel_size > 1:
        errors.append(f"--zero-stage {zero} does not work with DeepSpeed's pipeline engine "
                      f"(--pipeline-model-parallel-size {ns.pipeline_model_parallel_size}); use --zero-stage <= 1")
    if ns.cpu_optimizer and ns.zero_stage == 0:  # not given: the default stage 1 (as upstream), or the file's
        errors.append("--cpu-optimizer offloads ZeRO optimizer state: it needs --zero-stage >= 1")
    if ns.remote_device == "nvme":
        errors.append("--remote-device nvme is not supported; use cpu or none")
    elif ns.remote_device == "cpu" and zero != 3:
        errors.append("--remote-device cpu offloads ZeRO-3 parameters: it needs --zero-stage 3")
    if ns.save and ns.save_interval is None:
        errors.append("--save needs --save-interval (how many iterations between checkpoints)")
    if ns.mock_data and (ns.data_path or ns.data_file_list):
        errors.append("--mock-data and --data-path/--data-file-list both given; drop one")
    if ns.data_path and ns.data_file_list:
        errors.append("--data-path and --data-file-list both given; drop one")
    split_paths = [f"--{split}-data-path" for split in ("train", "valid", "test")
                   if getattr(ns, f"{split}_data_path")]
    if split_paths and (ns.data_path or ns.data_file_list or ns.mock_data):
        errors.append(f"{', '.join(split_paths)} and --data-path/--data-file-list/--mock-data both given: per-split "
                      "blends replace the single blend; drop one")
    elif split_paths and not ns.train_data_path:
        errors.append(f"{', '.join(split_paths)} without --train-data-path: give the train split's blend too")
    if ns.mock_data and not ns.vocab_size and not ns.tokenizer_type:
        errors.append("--mock-data needs --vocab-size (or a --tokenizer-type to take the size from)")
    errors += optimizer_flag_errors(ns)
    return errors


def _model_errors(ns: argparse.Namespace) -> list[str]:
    """The model shape's problems (as model_from_args reports them), for a command line already refused for other
    reasons. Best effort: flags refused or given bad values may leave no model to check, and then nothing is
    added (those flags are reported)."""
    import copy

    try:
        model_from_args(copy.copy(ns))
    except ConfigError as error:
        lines = str(error).splitlines()
        if lines[0] == "invalid model configuration:":
            return [line.strip()[2:] for line in lines[1:]]
        return [str(error)]
    except Exception:  # noqa: BLE001 (a namespace with refused or dropped flags: reported already)
        return []
    return []


def parse_args(argv: Optional[list[str]] = None, read_saved_args=None) -> RunConfig:
    """Parse Megatron-DeepSpeed flags into a RunConfig; raises ConfigError naming the flag and the fix.

    Every problem is reported at once (unknown flags, bad values, refused flags, conflicts), each flag
    spelled as the user typed it. read_saved_args: how --use-checkpoint-args reads a checkpoint's arguments
    (megatron.cli.parse_args passes it; see _adopt_checkpoint_args)."""
    parser = build_parser()
    typed_argv = list(sys.argv[1:] if argv is None else argv)
    argv = _normalize(typed_argv)
    typed = {}
    for before, after in zip(typed_argv, argv):
        if before.startswith("--"):
            typed.setdefault(after.split("=", 1)[0], before.split("=", 1)[0])
    ns, errors = _parse_collecting(parser, argv, typed)
    notices = []
    if ns.use_checkpoint_args and ns.load and not errors:
        _adopt_checkpoint_args(ns, notices, read_saved_args)
    errors += _check_flags(ns, typed)
    if errors:
        errors += [e for e in _model_errors(ns) if e not in errors]  # one launch reports the model's problems too
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(errors))
    if ns.deepspeed_config:
        _adopt_deepspeed_file(ns)
    # Defaults for the flags that a preset or a DeepSpeed file may fill, then the final values.
    for dest, default in (("micro_batch_size", 1), ("zero_stage", 1), ("cpu_optimizer", False),
                          ("bf16", False), ("fp16", False), ("clip_grad", 1.0),
                          ("initial_loss_scale", 2.0**16)):  # upstream's effective start (config/training.py)
        if getattr(ns, dest) is None:
            setattr(ns, dest, default)
    if ns.deepspeed_config:
        _file_decides_accumulation(ns, notices)
    if ns.cpu_optimizer and ns.zero_stage == 0:  # stage 0 from the --deepspeed_config file
        raise ConfigError(f"--cpu-optimizer offloads ZeRO optimizer state: it needs ZeRO stage >= 1, but "
                          f"{ns.deepspeed_config} has zero_optimization.stage = 0")
    file_states_zero = bool(ns.deepspeed_config) and \
        "zero_stage" in deepspeed_file_values(read_deepspeed_config(ns.deepspeed_config))
    if ns.bf16 and ns.accumulate_allreduce_grads_in_fp32 and ns.zero_stage == 0:
        if file_states_zero:
            raise ConfigError(ZERO0_FP32_ACCUMULATION)
        ns.zero_stage = 1
        notices.append(ZERO0_FP32_ACCUMULATION_NOTICE)
    if ns.no_save_optim and ns.zero_stage == 3:
        raise ConfigError("--no-save-optim with --zero-stage 3: a ZeRO-3 checkpoint holds the weights only in its "
                          "optimizer shards (DeepSpeed saves no gathered weights), so it would hold no weights at "
                          "all; drop --no-save-optim, or use --zero-stage 1 or 2")
    if ns.zero_stage >= 2 and ns.pipeline_model_parallel_size == 1:
        ns.no_pipeline_parallel = True
    if ns.fp32_residual_connection and not (ns.bf16 or ns.fp16):
        raise ConfigError("invalid arguments:\n  - --fp32-residual-connection keeps the residual stream in fp32 "
                          "under --bf16 or --fp16 (as upstream requires); this run is fp32 already: drop the flag "
                          "or add --bf16")
    model = model_from_args(ns)  # first: it sets the model flags' final values on ns
    return RunConfig(model=model, parallel=parallel_from_args(ns), data=data_from_args(ns),
                     training=training_from_args(ns), checkpoint=checkpoint_from_args(ns),
                     logging=logging_from_args(ns), args=dict(vars(ns)), reliability=reliability_from_args(ns),
                     profiling=profiling_from_args(ns), notices=notices)


# ---- derived values ------------------------------------------------------------------------------
def global_batch_size(run: RunConfig, dp_size: int) -> int:
    """The final global batch in samples: --global-batch-size, else micro batch × dp."""
    return run.training.global_batch_size or run.training.micro_batch_size * dp_size


def gradient_accumulation_steps(run: RunConfig, dp_size: int, global_batch: Optional[int] = None) -> int:
    """global / (micro × dp); a remainder is an error naming the three numbers."""
    micro = run.training.micro_batch_size
    batch = global_batch_size(run, dp_size) if global_batch is None else global_batch
    if batch % (micro * dp_size):
        raise ConfigError(
            f"--global-batch-size {batch} is not divisible by --micro-batch-size {micro} × data-parallel size "
            f"{dp_size} = {micro * dp_size}; choose a global batch that is a multiple of {micro * dp_size}")
    return batch // (micro * dp_size)


def global_batch_size_at(run: RunConfig, consumed_samples: int, dp_size: int) -> int:
    """Megatron's ramp-up: START + INCREMENT per (SAMPLES / number of increments) consumed samples, capped
    at the global batch and rounded down to a multiple of micro batch × dp."""
    final = global_batch_size(run, dp_size)
    if not run.training.rampup_batch_size:
        return final
    start, increment, ramp_samples = run.training.rampup_batch_size
    increments = (final - start) // increment
    if increments == 0 or consumed_samples >= ramp_samples:
        batch = final
    else:
        samples_per_increment = ramp_samples / increments
        batch = min(final, start + int(consumed_samples / samples_per_increment) * increment)
    unit = run.training.micro_batch_size * dp_size
    if batch < unit:
        raise ConfigError(f"--rampup-batch-size START {start} is smaller than --micro-batch-size "
                          f"{run.training.micro_batch_size} × data-parallel size {dp_size}")
    return batch // unit * unit


def train_samples(run: RunConfig, dp_size: int) -> int:
    """Samples the run trains on: --train-samples, or iters × global batch (--train-tokens may stop it earlier:
    `stops_at_train_tokens`)."""
    t = run.training
    if t.train_samples is not None:
        return t.train_samples
    if t.train_iters is not None:
        return t.train_iters * global_batch_size(run, dp_size)
    raise ConfigError("the run length is not set: give --train-iters or --train-samples")


def stops_at_train_tokens(run: RunConfig, consumed_samples: int) -> bool:
    """Upstream's loop condition: with --train-tokens, training stops once the consumed tokens (consumed samples
    × seq length) reach it, even before --train-iters."""
    tokens = run.training.train_tokens
    return tokens is not None and consumed_samples * run.model.seq_length >= tokens


def train_iters(run: RunConfig, dp_size: int) -> int:
    """Optimizer steps: --train-iters, or the samples (from --train-samples / --train-tokens) walked
    through the batch ramp-up. Every step is a whole global batch: a remainder smaller than one batch is not
    trained on (Megatron's update_train_iters rounds down likewise), so the last iteration and the final save
    always have their data."""
    if run.training.train_iters is not None:
        return run.training.train_iters
    samples = train_samples(run, dp_size)
    final = global_batch_size(run, dp_size)
    consumed, iters = 0, 0
    while run.training.rampup_batch_size:
        batch = global_batch_size_at(run, consumed, dp_size)
        if batch == final or consumed + batch > samples:
            break
        consumed += batch
        iters += 1
    iters += (samples - consumed) // final
    if iters == 0:
        flag = "--train-samples" if run.training.train_samples is not None else "--train-tokens"
        raise ConfigError(f"{flag} gives {samples} samples, fewer than one global batch ({final}): the run would "
                          "train 0 iterations")
    return iters


def validate_run(run: RunConfig, world_size: int) -> None:
    """Checks that need the world size: the layout, batch divisibility, run length and data source."""
    errors = layout_errors(world_size, run.parallel, run.model)
    if not errors:
        dp = run.parallel.data_parallel_size(world_size)
        for check in (lambda: gradient_accumulation_steps(run, dp), lambda: train_iters(run, dp),
                      lambda: global_batch_size_at(run, 0, dp)):
            try:
                check()
            except ConfigError as e:
                errors.append(str(e))
    if not (run.data.mock_data or run.data.data_path or run.data.data_file_list or run.data.train_data_path):
        errors.append("no training data: give --data-path, --data-file-list, --train-data-path, or --mock-data "
                      "with --vocab-size")
    if errors:
        raise ConfigError(f"invalid run for world size {world_size}:\n  - " + "\n  - ".join(errors))
