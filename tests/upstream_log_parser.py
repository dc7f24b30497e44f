"""A log parser for argonne-lcf/Megatron-DeepSpeed's CURRENT output, written from its printing code (not from
ours), to check that parsers written for upstream read our logs.

Upstream's source (main, ffa3456d, March 2026) prints:

megatron/training_log.py, training_log(), every --log-interval iterations (log.info, rank 0):
    log_string = f" iteration={iteration:8d}/{args.train_iters:8d} |"
    log_string += f" consumed_samples={args.consumed_train_samples:12d} |"
    log_string += f" consumed_tokens={args.consumed_train_tokens:12d} |"
    log_string += " elapsed_time_per_iteration_ms=" f"{elapsed_time_per_iteration * 1000.0:.1f} |"
    log_string += f" learning_rate={learning_rate:.6g} |"
    log_string += f" global_batch_size={batch_size:5d} |"
    for key in total_loss_dict: ...  if avg > 0.0: log_string += " {}={:.6f} |".format(key, avg)
    if loss_scale is not None: log_string += " loss_scale={:.1f} |".format(loss_scale)
    if grad_norm is not None: log_string += " grad_norm={:.3f} |".format(grad_norm)
    if num_zeros_in_grad is not None: log_string += " num_zeros={:.1f} |".format(num_zeros_in_grad)
    if params_norm is not None: log_string += " params_norm={:.3f} |".format(params_norm)
    (curriculum:) log_string += " curriculum_seqlen={:5d} |" ; (random_ltd:) " random_ltd reserved_length={:5d} |"
    log_string += " actual_seqlen={:5d} |".format(seq_len)
    log_string += " number_of_skipped_iterations={:3d} |".format(...)
    log_string += " number_of_nan_iterations={:3d} |".format(...)
    log_string += " samples_per_second={:.3f} |".format(samples_per_sec)
    log_string += " tokens_per_gpu_per_second_tgs={:.3f} |".format(tokens_per_gpu_per_second)
    log_string += " TFLOPs={:.2f} |".format(tflops_lm_per_gpu)

megatron/training.py, evaluate_and_print_results(prefix, ..., test=False), framed by "-" * (len(string) + 1):
    string = " validation loss at {} | ".format(prefix)
    for key in total_loss_dict:
        string += f"{key} value={total_loss_dict[key].item():.6f}"
        string += f"{key} PPL={ppl:.6f}"
  with prefix "iteration {iteration}" during training (train(): every --eval-interval), and at the end of
  pretrain(): f"iteration {iteration} on {args.eval_iters * args.global_batch_size}-sample draw from validation set"
  then the same "... from test set" (the test set's line also starts with " validation loss at").

Upstream's logger puts its own prefix before each line ("[2025-11-10 09:43:36,161992][I][megatron/training_log:402:
training_log]"), so the patterns search inside a line rather than match whole lines.
"""

from __future__ import annotations

import re
from typing import Optional

_NUM = r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"

# the fields in upstream's order; (name, value pattern, optional?)
_TRAIN_FIELDS = [
    ("iteration", r"\s*(?P<iteration>\d+)/\s*(?P<train_iters>\d+)", False),
    ("consumed_samples", r"\s*(?P<consumed_samples>\d+)", False),
    ("consumed_tokens", r"\s*(?P<consumed_tokens>\d+)", False),
    ("elapsed_time_per_iteration_ms", rf"(?P<elapsed_time_per_iteration_ms>{_NUM})", False),
    ("learning_rate", rf"(?P<learning_rate>{_NUM})", False),
    ("global_batch_size", r"\s*(?P<global_batch_size>\d+)", False),
]
_TRAIN_TAIL = [
    ("loss_scale", rf"(?P<loss_scale>{_NUM})", True),
    ("grad_norm", rf"(?P<grad_norm>{_NUM})", True),
    ("num_zeros", rf"(?P<num_zeros>{_NUM})", True),
    ("params_norm", rf"(?P<params_norm>{_NUM})", True),
    ("curriculum_seqlen", r"\s*(?P<curriculum_seqlen>\d+)", True),
    ("random_ltd reserved_length", r"\s*(?P<random_ltd_reserved_length>\d+)", True),
    ("actual_seqlen", r"\s*(?P<actual_seqlen>\d+)", False),
    ("number_of_skipped_iterations", r"\s*(?P<number_of_skipped_iterations>\d+)", False),
    ("number_of_nan_iterations", r"\s*(?P<number_of_nan_iterations>\d+)", False),
    ("samples_per_second", rf"(?P<samples_per_second>{_NUM})", False),
    ("tokens_per_gpu_per_second_tgs", rf"(?P<tokens_per_gpu_per_second_tgs>{_NUM})", False),
    ("TFLOPs", rf"(?P<TFLOPs>{_NUM})", False),
]


def _field(name: str, value: str, optional: bool) -> str:
    part = rf" {re.escape(name)}={value} \|"
    return f"(?:{part})?" if optional else part


# the losses (" lm loss=2.697780 |", " moe loss=... |"): any "key=float |" between global_batch_size and the tail
_LOSSES = rf"(?P<losses>(?: [a-z][a-z ]*?={_NUM} \|)*?)"
TRAIN_LINE = re.compile(
    "".join(_field(n, v, o) for n, v, o in _TRAIN_FIELDS).lstrip() + _LOSSES
    + "".join(_field(n, v, o) for n, v, o in _TRAIN_TAIL))
_LOSS_ITEM = re.compile(rf" (?P<key>[a-z][a-z ]*?)=(?P<value>{_NUM}) \|")

EVAL_LINE = re.compile(
    r" validation loss at iteration (?P<iteration>\d+)"
    r"(?: on (?P<draw>\d+)-sample draw from (?P<set>validation|test) set)? \| "
    rf"(?P<values>(?:.+? value=(?:{_NUM}).+? PPL=(?:{_NUM}))+)$")
_EVAL_ITEM = re.compile(rf"(?P<key>.+?) value=(?P<value>{_NUM})(?P=key) PPL=(?P<ppl>{_NUM})")

_INTS = {"iteration", "train_iters", "consumed_samples", "consumed_tokens", "global_batch_size", "actual_seqlen",
         "number_of_skipped_iterations", "number_of_nan_iterations", "curriculum_seqlen",
         "random_ltd_reserved_length"}


def parse_training_line(line: str) -> Optional[dict]:
    """The fields of an upstream training log line (ints and floats; the losses under their keys, e.g.
    "lm loss"), or None when the line is not one."""
    m = TRAIN_LINE.search(line)
    if m is None:
        return None
    out = {}
    for key, value in m.groupdict().items():
        if value is None or key == "losses":
            continue
        out[key] = int(value) if key in _INTS else float(value)
    for item in _LOSS_ITEM.finditer(m.group("losses") or ""):
        out[item.group("key")] = float(item.group("value"))
    return out


def parse_eval_line(line: str) -> Optional[dict]:
    """{"iteration", "set" ("validation" during training and at the end, "test" at the end), "draw" (samples, or
    None during training), and per loss key {"lm loss": (value, ppl)}}, or None."""
    m = EVAL_LINE.search(line.rstrip("\n"))
    if m is None:
        return None
    losses = {item.group("key"): (float(item.group("value")), float(item.group("ppl")))
              for item in _EVAL_ITEM.finditer(m.group("values"))}
    return {"iteration": int(m.group("iteration")), "set": m.group("set") or "validation",
            "draw": int(m.group("draw")) if m.group("draw") else None, "end_of_training": m.group("draw") is not None,
            "losses": losses}


def parse_log(text: str) -> dict:
    """{"train": [...], "validation": [...], "test": [...]} from a whole log, in order."""
    out = {"train": [], "validation": [], "test": []}
    for line in text.splitlines():
        train = parse_training_line(line)
        if train is not None:
            out["train"].append(train)
            continue
        evaluation = parse_eval_line(line)
        if evaluation is not None:
            out[evaluation["set"]].append(evaluation)
    return out
