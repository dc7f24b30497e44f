"""`pretrain_gpt.py --dry-run` and the ALCF recipes' DRY_RUN=1: the resolved run, printed, nothing launched.

    print(dry_run_report(run, world_size=24))

Sections: the layout (parallel sizes, batch, run length), the DeepSpeed config the flags generate, the blend
summary (megatron/data/blend_report.py: reads the files' headers, so a missing file fails here, before a job
waits in a queue), and the parameter count with an estimate of memory per device.

Memory per device (an estimate, in the spirit of Korthikanti et al. 2022, "Reducing Activation Recomputation"):
  weights        P_dev × (2 bytes bf16/fp16, 4 fp32), / dp under ZeRO-3
  gradients      P_dev × (weight bytes; 4 with fp32 accumulation), / dp under ZeRO-2/3
  optimizer      the state --optimizer keeps (Adam's two fp32 moments, Muon's one momentum on the hidden
                 matrices, 8-bit Adam's quantised moments, ...: megatron/optimizer/memory.py), on the tensors it
                 steps (whole gathered matrices on every tp rank for the whole-matrix optimizers), / (sp × dp)
                 under ZeRO >= 1; 0 on the device with --cpu-optimizer
  fp32 masters   the fp32 copies the optimizer steps: DeepSpeed's flat copy under bf16/fp16 and its fp32
                 partitions at ZeRO >= 1 (/ sp × dp); the whole-matrix optimizers' gathered copies and, in
                 bf16/fp16, masters of the rest (by whole parameters / sp × dp at ZeRO-1/2)
  activations    per layer and micro-batch s·b·h·(10 + 24/tp) bytes (attention scores are not kept: SDPA), of
                 which 16/tp are the MLP's 4h-wide intermediates (none kept with --tiled-mlp); 2·s·b·h for a
                 recomputed layer's input (0 with --checkpoint-in-cpu, /tp with --partition-activations);
                 × layers per stage × micro-batches in flight (pp under 1F1B); plus the fp32 logits s·b·V/tp × 4
                 bytes twice (softmax and its gradient), one tile of them with --tiled-logits-loss
P_dev counts this device's share: the layers of one pipeline stage and the embedding, tp-split tensors over tp.
"""

from __future__ import annotations

import json
from typing import Optional

from megatron.config.arguments import (
    RunConfig, global_batch_size, gradient_accumulation_steps, train_iters, train_samples, validate_run,
)
from megatron.optimizer.memory import optimizer_memory, stage_parameters


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_per_device(run: RunConfig, world_size: int) -> dict[str, float]:
    """Bytes per device by kind (see the module docstring); 'total' is their sum."""
    m, p, t = run.model, run.parallel, run.training
    tp, pp = p.tp, p.pp
    dp = p.data_parallel_size(world_size)
    h, s, b, L = m.hidden_size, m.seq_length, t.micro_batch_size, m.num_layers
    vocab = m.padded_vocab_size(tp) if m.vocab_size else 0
    layers_per_stage = -(-L // pp)
    params = sum(q.local_numel for q in stage_parameters(m, tp, pp))
    mixed = t.precision.bf16 or t.precision.fp16
    weight_bytes = 2 if mixed else 4
    grad_bytes = 4 if (t.precision.bf16 and t.precision.accumulate_allreduce_grads_in_fp32) else weight_bytes
    zero = t.zero.zero_stage
    optimizer = optimizer_memory(run, world_size)
    out = {
        "weights": params * weight_bytes / (dp if zero >= 3 else 1),
        "gradients": params * grad_bytes / (dp if zero >= 2 else 1),
        "optimizer": optimizer["state"],
        "fp32 masters": optimizer["masters"],
    }
    gas = gradient_accumulation_steps(run, dp)
    in_flight = min(pp, gas) if pp > 1 else 1
    full_layer = s * b * h * (10 + (8 if m.tiled_mlp else 24) / tp)
    recomputed = m.recomputed_layers if pp == 1 else (layers_per_stage if m.checkpoint_activations else 0)
    recomputed = min(recomputed, layers_per_stage)
    kept_input = 0 if m.checkpoint_in_cpu else 2 * s * b * h / (tp if m.partition_activations else 1)
    kept = (layers_per_stage - recomputed) * full_layer + recomputed * kept_input + (full_layer if recomputed else 0)
    logit_rows = b * min(s, m.sequence_tile_length(b)) if m.tiled_logits_loss else s * b
    out["activations"] = kept * in_flight + 2 * 4 * logit_rows * vocab / tp
    out["total"] = sum(out.values())
    return out


def dry_run_report(run: RunConfig, world_size: int, launch_line: Optional[str] = None,
                   task_lines: Optional[list] = None) -> str:
    """The resolved run as text (raises ConfigError for a run that would not start). task_lines: a training
    task's own settings (finetune_gpt.py's), printed under "== task"."""
    from megatron.training.ds_config import build_deepspeed_config

    validate_run(run, world_size)
    lines = []
    if launch_line:
        lines += ["== launch", launch_line, ""]
    p, t, m = run.parallel, run.training, run.model
    dp = p.data_parallel_size(world_size)
    iters = train_iters(run, dp)
    if task_lines:
        lines += ["== task", *task_lines, ""]
    lines += [
        "== layout",
        f"world {world_size} = tp {p.tp} × sp {p.sp} × dp {dp} × pp {p.pp}; ZeRO stage {t.zero.zero_stage}"
        f"{' (optimizer on CPU)' if t.zero.cpu_optimizer else ''}; "
        f"{'bf16' if t.precision.bf16 else 'fp16' if t.precision.fp16 else 'fp32'}",
        f"micro batch {t.micro_batch_size} × dp {dp} × accumulation {gradient_accumulation_steps(run, dp)} = "
        f"global batch {global_batch_size(run, dp)} samples of {m.seq_length} tokens",
        f"{iters} iterations = {iters * global_batch_size(run, dp)} samples = "
        f"{iters * global_batch_size(run, dp) * m.seq_length} tokens{_length_source(run, dp)}" + (
            f"; --train-tokens {t.train_tokens} stops it once that many tokens are consumed"
            if t.train_tokens is not None else ""),
        "",
        "== DeepSpeed config",
        json.dumps(build_deepspeed_config(run, dp), indent=2, sort_keys=True),
        "",
        "== blend",
    ]
    run, vocab_note = _with_vocab(run)
    lines.append(_blend_summary(run, dp, iters))
    lines += ["", "== model"]
    m = run.model
    total = m.num_parameters(include_embeddings=bool(m.vocab_size))
    lines.append(f"parameters: {total:,}{'' if m.vocab_size else ' (embeddings not counted: ' + vocab_note + ')'}")
    memory = memory_per_device(run, world_size)
    lines.append("memory per device (estimate): " + ", ".join(f"{k} {_gib(v)}" for k, v in memory.items()))
    for notice in run.notices:
        lines.append(f"note: {notice}")
    return "\n".join(lines)


def _length_source(run: RunConfig, dp: int) -> str:
    """Where the run length comes from, when it is not --train-iters: the flag and the samples it gives."""
    t = run.training
    if t.train_iters is not None:
        return " (--train-iters)"
    flag = "--train-samples" if t.train_samples is not None else "--train-tokens"
    return f" ({flag} gives {train_samples(run, dp)} samples; whole global batches are trained)"


def _with_vocab(run: RunConfig):
    """(run with the tokenizer's vocabulary size when it can be built here, why not otherwise)."""
    from megatron.training.loop import resolve_vocab

    try:
        return resolve_vocab(run)[0], ""
    except Exception as e:  # a tokenizer that needs the network or a missing file: report, do not fail
        return run, f"the tokenizer could not be built here: {e}"


def _blend_summary(run: RunConfig, dp: int, iters: int) -> str:
    if run.data.mock_data:
        return "mock data: random tokens (--mock-data), no files"
    from megatron.data.blend_report import blend_report_for_config

    t = run.training
    batch = global_batch_size(run, dp)
    evals = (iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval and t.eval_iters else 0
    report = blend_report_for_config(run.data, run.model.seq_length, t.seed,
                                     (train_samples(run, dp), evals * batch, t.eval_iters * batch if evals else 0),
                                     run.data.blend_epochs_warning, run.model.vocab_size or None)
    return report.table()
