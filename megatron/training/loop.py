"""The training loop: set-up, then per step: batch -> engine step -> metrics -> maybe eval -> maybe save -> maybe exit.

`train(run, ps, device)` runs a whole training (or its continuation from --load) and returns a
`TrainResult` with every step's loss, so tests can call it several times inside one process launch.
Distributed initialisation and the ParallelState belong to the caller (pretrain_gpt.py).
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from megatron.config.arguments import RunConfig, global_batch_size, global_batch_size_at, stops_at_train_tokens, \
    train_iters, train_samples, validate_run
from megatron.distributed.parallel_state import ParallelState
from megatron.checkpoint.format import TrainingProgress
from megatron.data.tokenizers import NullTokenizer
from megatron.checkpoint.resume import Checkpointer
from megatron.training.engine import TrainingEngine, build_engine, check_engine_config
from megatron.training.preflight import resolve_vocab  # noqa: F401 (imported from here too)
from megatron.optimizer.lr_schedule import check_lr_schedule
from megatron.training.metrics import throughput
from megatron.training.out_of_memory import is_out_of_memory, out_of_memory_error
from megatron.training.numerics import EXIT_NUMERICAL, NanCheck, guard_plain_optimizer
from megatron.training.signals import ExitConditions, job_start_time
from megatron.training.run_control import IterationSkipper, StepProfiler, kill_switch_found
from megatron.training.timers import Timers
from megatron.training.watchdog import (CollectiveFailure, Watchdog, instrument_engine, is_collective_failure,
                                        track_batches)
from megatron.training.tracking import Tracker, default_wandb_dir


@dataclass
class TrainResult:
    losses: dict = field(default_factory=dict)  # iteration -> training loss (global-batch mean)
    grad_norms: dict = field(default_factory=dict)  # iteration -> grad norm (None when not reported)
    metrics: dict = field(default_factory=dict)  # iteration -> the task's metrics (DPO: TRL's rewards/*, logps/*)
    eval_metrics: dict = field(default_factory=dict)  # iteration -> the task's metrics on the validation set
    eval_losses: dict = field(default_factory=dict)  # iteration -> validation loss
    test_loss: Optional[float] = None
    final_valid_loss: Optional[float] = None  # the end-of-training validation evaluation (upstream's)
    start_iteration: int = 0
    iteration: int = 0
    consumed_samples: int = 0
    exit_reason: str = ""
    saved: list = field(default_factory=list)  # checkpoint directories written
    exit_code: int = 0  # pretrain_gpt.py's: 0, or numerics.EXIT_NUMERICAL after too many NaN/Inf steps


# ---- set-up -----------------------------------------------------------------------------------------

def seed_everything(seed: int, ps: ParallelState, device: torch.device,
                    data_parallel_random_init: bool = False) -> None:
    """python/numpy from the seed; torch's default stream from (seed, pp rank) and the tp stream (core.random),
    and with --data-parallel-random-init from the dp rank too (see seed_model_parallel_rng)."""
    from megatron.core.random import seed_model_parallel_rng

    random.seed(seed)
    np.random.seed(seed)
    seed_model_parallel_rng(seed, ps, device.type, data_parallel_random_init=data_parallel_random_init)


def memory_in_use_mb(device: torch.device) -> float:
    """Device memory allocated by torch on cuda/xpu; this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if device.type == "xpu":
        return torch.xpu.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is what getrusage offers (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _isolated_rng(fn: Callable):
    """Run fn without moving torch's default RNG (a DataLoader draws its worker seed from it), so a
    resumed run and an uninterrupted one draw the same dropout masks."""
    with torch.random.fork_rng(devices=[]):
        return fn()


# ---- logging ----------------------------------------------------------------------------------------

def megatron_log_line(iteration: int, total_iters: int, consumed_samples: int, consumed_tokens: int,
                      ms_per_iteration: float, learning_rate: float, global_batch: int, loss: Optional[float],
                      loss_scale: Optional[float], grad_norm: Optional[float], actual_seqlen: int, skipped: int,
                      nan_iterations: int, samples_per_s: float, tokens_per_gpu_per_s: float, tflops: float,
                      mfu: Optional[float], hfu: Optional[float], memory_mb: float,
                      params_norm: Optional[float] = None, task_metrics: Optional[dict] = None) -> str:
    """argonne-lcf/Megatron-DeepSpeed's training log line (its megatron/training_log.py, `key=value` since 2024):
    the same fields in the same order with the same number formats, so its users' log parsers and plotting
    scripts read ours. `loss` is the mean over the interval's applied steps, shown only when > 0 as upstream
    does; our extra fields (MFU and HFU in percent of --peak-tflops, memory in MiB) come last, in the same style.
    `task_metrics`: a post-training task's metrics over the interval (DPO: TRL's rewards/* and logps/*), right
    after the loss."""
    line = f" iteration={iteration:8d}/{total_iters:8d} |"
    line += f" consumed_samples={consumed_samples:12d} |"
    line += f" consumed_tokens={consumed_tokens:12d} |"
    line += f" elapsed_time_per_iteration_ms={ms_per_iteration:.1f} |"
    line += f" learning_rate={learning_rate:.6g} |"
    line += f" global_batch_size={global_batch:5d} |"
    if loss is not None and loss > 0.0:
        line += f" lm loss={loss:.6f} |"
    for name, value in (task_metrics or {}).items():
        line += f" {name}={value:.6f} |"
    if loss_scale is not None:
        line += f" loss_scale={loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad_norm={grad_norm:.3f} |"
    if params_norm is not None:  # --log-params-norm, where upstream puts it
        line += f" params_norm={params_norm:.3f} |"
    line += f" actual_seqlen={actual_seqlen:5d} |"
    line += f" number_of_skipped_iterations={skipped:3d} |"
    line += f" number_of_nan_iterations={nan_iterations:3d} |"
    line += f" samples_per_second={samples_per_s:.3f} |"
    line += f" tokens_per_gpu_per_second_tgs={tokens_per_gpu_per_s:.3f} |"
    line += f" TFLOPs={tflops:.2f} |"
    if mfu is not None:
        line += f" MFU_percent={100 * mfu:.2f} | HFU_percent={100 * hfu:.2f} |"
    line += f" memory_MB={memory_mb:.0f} |"
    return line


def loss_scale_of(engine) -> Optional[float]:
    """The loss scale upstream's log shows: DeepSpeed's optimizer's current scale where it has one (fp16's dynamic
    scale; 1.0 for the ZeRO optimizers), 1.0 under bf16 (nothing is scaled), None otherwise (fp32 without ZeRO)."""
    from megatron import deepspeed_compat as compat

    scale = compat.loss_scale(engine.optimizer)
    if scale is None and engine.bfloat16_enabled():
        return 1.0
    return scale


class IntervalLog:
    """Accumulates the steps between two log lines and prints upstream's per-interval line on rank 0; writes
    upstream's wandb metrics (megatron/training_log.py) to the tracker: the per-iteration ones every
    --tensorboard-log-interval iterations, the per-interval ones (throughput/*, loss/*, training/*) with the line."""

    def __init__(self, run: RunConfig, ps: ParallelState, device: torch.device, tracker: Tracker, total_iters: int,
                 printer: Callable[[str], None], timers: Optional[Timers] = None):
        self.run, self.ps, self.device, self.tracker = run, ps, device, tracker
        self.timers = timers or Timers(0)
        self.total_iters, self.printer = total_iters, printer
        self.reset()

    def reset(self) -> None:
        # applied steps' losses; every iteration (applied or skipped); skipped ones; skipped ones with a NaN/Inf
        # loss (upstream's "nan iterations"); samples and seconds of all of them
        self.losses, self.iterations, self.skipped, self.nan_iterations = [], 0, 0, 0
        self.samples, self.seconds = 0, 0.0
        self.metrics: dict = {}  # the task's metrics of the applied steps: name -> list

    def add(self, loss: float, samples: int, seconds: float, skipped: bool = False,
            loss_is_known: bool = True, metrics: Optional[dict] = None) -> None:
        """One iteration. `skipped`: its update was not applied (fp16 overflow, a NaN/Inf step, or
        --train-iters-to-skip, which has no loss: loss_is_known=False). `metrics`: the task's (StepResult)."""
        self.iterations += 1
        self.samples += samples
        self.seconds += seconds
        if not skipped:
            self.losses.append(loss)
            for name, value in (metrics or {}).items():
                self.metrics.setdefault(name, []).append(value)
        else:
            self.skipped += 1
            self.nan_iterations += int(loss_is_known and not math.isfinite(loss))

    def iteration_scalars(self, iteration: int, step, consumed_samples: int, loss_scale: Optional[float],
                          engine=None) -> None:
        """This iteration's scalars, every --tensorboard-log-interval iterations (upstream's training_log). The
        learning rate is the one after the step, as upstream logs it."""
        lg = self.run.logging
        if iteration % lg.tensorboard_log_interval:
            return
        tokens = consumed_samples * self.run.model.seq_length
        lr = step.next_learning_rate
        if lg.log_optimizer_states_to_tensorboard and engine is not None:  # collective: before the rank-0 filter
            from megatron.training.optimizer_stats import optimizer_state_stats

            stats = optimizer_state_stats(engine, self.ps, self.device)
            self.tracker.log({"optimizer/learning_rate": lr, "optimizer/iteration": iteration,
                              "optimizer/consumed_train_tokens": tokens, **stats}, iteration)
        scalars = {}
        if lg.log_learning_rate_to_tensorboard:
            scalars |= {"learning-rate/iteration": iteration, "learning-rate/learning-rate": lr}
        scalars |= {"lm-loss-training/iteration": iteration, "lm-loss-training/consumed_train_tokens": tokens,
                    "lm-loss-training/lm loss": step.loss, "training/grad-norm": step.grad_norm}
        scalars |= step.metrics  # a post-training task's, under TRL's names (rewards/chosen, ...)
        # ours, where upstream's training_log has none (Megatron's TensorBoard names)
        scalars["batch-size/batch-size"] = step.num_samples
        if lg.log_loss_scale_to_tensorboard and loss_scale is not None:
            scalars["loss-scale/loss-scale"] = loss_scale
        if lg.log_world_size_to_tensorboard:
            scalars["world-size/world-size"] = self.ps.world_size
        self.tracker.log(scalars, iteration)

    def emit(self, iteration: int, step, consumed_samples: int, loss_scale: Optional[float] = None,
             engine=None) -> None:
        """The interval's line and metrics. Collective when --log-params-norm (the norm is summed over the
        model-parallel ranks): every rank calls it; rank 0 prints."""
        run, ps = self.run, self.ps
        params_norm = engine.params_norm() if run.logging.log_params_norm and engine is not None else None
        seq = run.model.seq_length
        tokens = consumed_samples * seq
        iterations = max(1, self.iterations)
        seconds_per_iteration = max(self.seconds, 1e-9) / iterations
        rates = throughput(run.model, max(self.seconds, 1e-9), self.samples, ps.world_size, seq,
                           run.logging.peak_tflops)
        loss = sum(self.losses) / len(self.losses) if self.losses else None  # upstream: over the applied steps
        task_metrics = {name: sum(values) / len(values) for name, values in self.metrics.items()}
        memory = memory_in_use_mb(self.device)
        timers = self.timers.gather(normalizer=iterations) if self.timers.level else {}
        if run.logging.log_timers_to_tensorboard:
            self.tracker.log({"timers/iteration": iteration,
                              **{f"timers/{name}-time": max(ms) for name, ms in timers.items()}}, iteration)
        dp = ps.dp_size
        # upstream's names and values (megatron/training_log.py), its quirks included so that runs compare in
        # one wandb project: iteration-time and elapsed_ms_per_iteration are in seconds, tflops-new in FLOP/s
        scalars = {
            "throughput/iteration": iteration,
            "throughput/iteration-time": seconds_per_iteration,
            "throughput/samples_per_sec": rates.samples_per_s,
            "throughput/samples_per_sec_per_replica": rates.samples_per_s / dp,
            "throughput/tokens_per_sec": rates.tokens_per_s,
            "throughput/tokens_per_sec_per_replica": rates.tokens_per_s / dp,
            "throughput/tokens_per_gpu_per_sec": rates.tokens_per_s_per_device,
            "throughput/tokens_per_gpu_per_sec_per_replica": rates.tokens_per_s_per_device / dp,
            "throughput/tflops": rates.hardware_tflops_per_device,
            "throughput/tflops-new": rates.tflops_per_device * ps.world_size * 1e12,
            "throughput/tflops-lm": rates.tflops_per_device,
            "throughput/approx_params_in_billions": run.model.num_parameters() / 1e9,
            "throughput/elapsed_ms_per_iteration": seconds_per_iteration,
            "loss/iteration": iteration,
            "loss/lm loss": step.loss,
            "loss/loss_scale": loss_scale,
            "loss/grad_norm": step.grad_norm,
            "loss/params_norm": params_norm,
            "training/params-norm": params_norm,
            "training/iteration": iteration,
            "training/iteration_time": seconds_per_iteration,
            "training/iteration_time_vs_tokens": seconds_per_iteration / max(1, tokens),
            "training/iteration_time_vs_samples": seconds_per_iteration / max(1, consumed_samples),
            "training/consumed_samples": consumed_samples,
            "training/consumed_tokens": tokens,
            "training/skiped_iterations": self.skipped,  # sic: upstream's spelling
            "training/nan_iterations": self.nan_iterations,
            # ours, where upstream has none
            "throughput/mfu": rates.mfu, "throughput/hfu": rates.hfu,
            "throughput/hardware_tflops_per_device": rates.hardware_tflops_per_device,
            "memory/in_use_mb": memory,
        }
        if loss is not None and loss > 0.0:
            scalars["loss/lm loss_avg"] = loss
        self.tracker.log(scalars, iteration)
        if ps.rank == 0:
            self.printer(megatron_log_line(
                iteration, self.total_iters, consumed_samples, tokens, 1000 * seconds_per_iteration,
                step.next_learning_rate, step.num_samples, loss, loss_scale, step.grad_norm, seq, self.skipped,
                self.nan_iterations, rates.samples_per_s, rates.tokens_per_s_per_device, rates.tflops_per_device,
                rates.mfu, rates.hfu, memory, params_norm, task_metrics))
            for line in self.timers.log_lines(timers):
                self.printer(line)
        self.reset()


# ---- evaluation -------------------------------------------------------------------------------------

def evaluate(te: TrainingEngine, batches, eval_iters: int, metrics: Optional[dict] = None) -> float:
    """Mean validation loss over `eval_iters` global batches; `metrics` receives the means of the task's metrics
    (DPO: rewards/accuracies, ... of the held-out pairs)."""
    losses, sums = [], {}
    for _ in range(eval_iters):
        losses.append(te.eval_step(batches))
        for name, value in te.task.step_metrics(te, training=False).items():
            sums[name] = sums.get(name, 0.0) + value
    if metrics is not None:
        metrics.update({name: value / eval_iters for name, value in sums.items()})
    return sum(losses) / len(losses)


def _report_eval(data: str, prefix: str, iteration: int, consumed_samples: int, seq_length: int, loss: float,
                 ps: ParallelState, tracker: Tracker, printer) -> None:
    """Upstream's evaluate_and_print_results (megatron/training.py): `data` is "validation" or "test"; the line
    reads " validation loss at <prefix> | lm loss value=X.XXXXXXlm loss PPL=Y.YYYYYY" for both (upstream writes
    "validation loss" for the test set too, and no separator between the two fields), framed by dashes. wandb
    gets upstream's val/* or test/* names; TensorBoard gets those and upstream's lm-loss-validation/* ones,
    also against consumed samples and tokens."""
    ppl = math.exp(min(20.0, loss))
    key = "test" if data == "test" else "val"
    name = f"lm-loss-validation/lm loss {data}"
    tracker.log({f"{key}/iteration": iteration, f"{key}/lm loss": loss, f"{key}/ppl_lm loss": ppl, name: loss},
                iteration)
    tracker.log({f"{name} vs samples": loss}, consumed_samples, tensorboard_only=True)
    tracker.log({f"{name} vs tokens": loss}, consumed_samples * seq_length, tensorboard_only=True)
    if ps.rank == 0:
        line = f" validation loss at {prefix} | lm loss value={loss:.6f}lm loss PPL={ppl:.6f}"
        printer("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1))


def _draw(eval_iters: int, global_batch: int, data: str) -> str:
    """The end-of-training prefix: "iteration N on K-sample draw from validation set" without N."""
    return f"on {eval_iters * global_batch}-sample draw from {data} set"


# ---- the loop ---------------------------------------------------------------------------------------

def train(run: RunConfig, ps: ParallelState, device: torch.device, tracker: Optional[Tracker] = None,
          printer: Callable[[str], None] = lambda line: print(line, flush=True),
          start_time: Optional[float] = None, task=None) -> TrainResult:
    """Train `run` on this rank (collective: every rank of `ps` calls it). Returns the losses of this call.

    `task`: what the run optimises (training/task.py; None: pretraining; finetune_gpt.py passes SFT or DPO).

    `start_time`: where --exit-duration-in-mins counts from (the entry points pass megatron.START_TIME, the
    process's start, as upstream); None: this call. The earliest rank's counts."""
    start_time = time.time() if start_time is None else start_time
    validate_run(run, ps.world_size)
    run, tokenizer = resolve_vocab(run)
    # Refuse what would fail later before the (slow, collective) model build: the LR schedule's shape, what a
    # resume cannot do (checkpoint.resume plans it), the save directory, and what the engine cannot run.
    check_lr_schedule(run, ps.dp_size)
    checkpointer = Checkpointer(run, ps, device, log=printer)
    run = checkpointer.prepare()  # the run to build: the checkpoint's hyperparameters where the policy says
    if isinstance(tokenizer, NullTokenizer) and tokenizer.vocab_size != run.model.vocab_size:
        tokenizer = NullTokenizer(run.data.vocab_size, eod_in_vocab_size=True)  # an older checkpoint's convention
    check_engine_config(run, device)
    seed_everything(run.training.seed, ps, device, run.training.data_parallel_random_init)

    session = _Session(run, ps, device, checkpointer, tracker, printer, eod=getattr(tokenizer, "eod", None),
                       start_time=start_time, task=task)
    try:
        session.load()
        session.loop()
        session.finish()
        return session.result
    except RuntimeError as error:
        if not is_collective_failure(error) or ps.world_size == 1:
            raise
        raise CollectiveFailure(session.watchdog.describe_failure(error), session.watchdog.end_stopped_ranks) \
            from error
    finally:
        session.close()


class _Session:
    """One call of `train`: the engine and everything around it (tracker, exit conditions, watchdog), the
    position (iteration, consumed samples) and the result."""

    def __init__(self, run: RunConfig, ps: ParallelState, device: torch.device, checkpointer: Checkpointer,
                 tracker: Optional[Tracker], printer: Callable[[str], None], eod: Optional[int],
                 start_time: Optional[float] = None, task=None):
        t, rel = run.training, run.reliability
        self.run, self.ps, self.device, self.checkpointer, self.printer = run, ps, device, checkpointer, printer
        self.total_iters = train_iters(run, ps.dp_size)
        self.timers = Timers(run.logging.timing_log_level, run.logging.timing_log_option, device)
        self.te = build_engine(run, ps, device, eod_token=eod, timers=self.timers, task=task)
        self.task = self.te.task
        self.own_tracker = tracker is None
        self.tracker = tracker or Tracker(run.logging, ps.rank, config=run.args,
                                          wandb_dir=default_wandb_dir(run.checkpoint.save))
        self.result = TrainResult()
        start = time.time() if start_time is None else start_time
        if t.exit_duration_in_mins is not None:  # the earliest rank's start (collective), as upstream
            start = job_start_time(start, device)
        self.exits = ExitConditions(t.exit_signal_handler, t.exit_duration_in_mins, t.exit_interval, device=device,
                                    signals=rel.signal_numbers(), start_time=start).install()  # before workers fork
        self.watchdog = Watchdog(ps.rank, ps.world_size, rel.hang_watchdog_factor, rel.hang_watchdog_min_seconds,
                                 rel.distributed_timeout_minutes * 60)
        self.rng_tracker = _rng_tracker()
        self.iteration = self.consumed = self.consumed_valid = 0
        self.sample_order = run.data.sample_mode  # set by load(): the order this run reads
        self.last_saved: Optional[int] = None

    def say(self, line: str) -> None:
        if self.ps.rank == 0:
            self.printer(line)

    # ---- set-up: the checkpoint, the data, fault handling ----
    def load(self) -> None:
        run, ps, t, rel = self.run, self.ps, self.run.training, self.run.reliability
        progress = self.checkpointer.load(self.te, set_tracker_states=self.rng_tracker.set_states)
        self.iteration, self.consumed = progress.iteration, progress.consumed_samples
        self.consumed_valid = 0 if run.checkpoint.finetune else int(progress.extra.get("consumed_valid_samples", 0))
        # what the checkpoint's run saved beside the weights, for the task (DPO: its reference's identity)
        self.resumed_state = {} if run.checkpoint.finetune or not self.checkpointer.resuming else progress.extra
        self.result.start_iteration = self.iteration
        self.last_saved = self.iteration if self.checkpointer.resuming else None

        self.progress_extra = progress.extra  # what the checkpoint saved beside the weights (sample order, ...)
        train_ds, valid_ds, self.test_ds = self.task.build_datasets(self, requested_samples(run, ps.dp_size))
        self.datasets = (train_ds, valid_ds, self.test_ds)
        self.train_batches, self.valid_batches = _isolated_rng(lambda: (
            _iterator(run, ps, train_ds, self.consumed, self.task.collate),
            _iterator(run, ps, valid_ds, self.consumed_valid, self.task.collate)))
        # Fault handling: phases for the hang watchdog, NaN/Inf steps skipped (training/numerics.py).
        self.train_batches = track_batches(self.train_batches, self.watchdog)
        instrument_engine(self.te.engine, self.watchdog)
        self.nan_check = NanCheck(rel.check_for_nan_in_loss_and_grad, rel.max_consecutive_nan_steps, ps.rank,
                                  self.printer if ps.rank == 0 else _quiet, fp16=t.precision.fp16)
        if rel.check_for_nan_in_loss_and_grad:
            guard_plain_optimizer(self.te.engine.optimizer, self.device)
        self.task.before_training(self.te, self)  # e.g. DPO's reference pass, on the loaded engine
        self.watchdog.start()

    # ---- the loop ----
    def loop(self) -> None:
        run, t = self.run, self.run.training
        self.log = IntervalLog(run, self.ps, self.device, self.tracker, self.total_iters, self.printer, self.timers)
        self.skipper = IterationSkipper(t.train_iters_to_skip, t.train_range_to_skip)
        profiler = StepProfiler(run.profiling.profile, run.profiling.profile_steps, run.profiling.profile_ranks,
                                run.profiling.trace_dir, self.ps.rank, self.ps.world_size, self.device)
        with self.exits:
            while self.iteration < self.total_iters and not t.skip_train \
                    and not stops_at_train_tokens(run, self.consumed):  # --train-tokens: upstream's budget
                profiler.before_step()
                step, skipped_by_user = self.step()
                profiler.after_step()
                stop = None if skipped_by_user else self.nan_check.after_step(self.iteration, step.loss,
                                                                              step.grad_norm, step.skipped)
                if stop:
                    self.result.exit_code = EXIT_NUMERICAL
                    self.stop(stop)
                    break
                if self.valid_batches is not None and t.eval_interval and self.iteration % t.eval_interval == 0:
                    self.validate()
                if run.checkpoint.save and run.checkpoint.save_interval \
                        and self.iteration % run.checkpoint.save_interval == 0:
                    self.save()
                reason = self.exit_reason()
                if reason:
                    self.stop(reason)
                    break
        profiler.close()

    def step(self):
        """One iteration (trained, or skipped by --train-iters-to-skip); its logging. (StepResult, skipped?)"""
        run, te, it = self.run, self.te, self.iteration + 1
        te.set_global_batch_size(global_batch_size_at(run, self.consumed, self.ps.dp_size))  # batch ramp-up
        if run.training.rampup_batch_size:
            te.lr_scheduler.increment = te.global_batch_size  # the schedule counts samples then
            te.lr_scheduler.tokens_per_step = te.global_batch_size * run.model.seq_length
        start = time.time()
        self.watchdog.phase("data", it)
        skipped = self.skipper.skips(it)
        if skipped:
            step = te.skip_step(self.train_batches)
            self.say(f"iteration {it} skipped (--train-iters-to-skip/--train-range-to-skip): its batch was read, "
                     "the LR schedule advanced, the model was not updated")
        else:
            try:
                step = te.train_step(self.train_batches)
            except (RuntimeError, MemoryError) as error:  # the allocator's: say which memory options would help
                if not is_out_of_memory(error):
                    raise
                raise out_of_memory_error(error, run, self.ps, it) from error
        # upstream counts both kinds of skipped iteration in its interval (a user-skipped one has no loss)
        self.log.add(step.loss, step.num_samples, time.time() - start, skipped=step.skipped, loss_is_known=not skipped,
                     metrics=step.metrics)
        self.watchdog.step_done(time.time() - start)
        self.iteration, self.consumed = it, self.consumed + step.num_samples
        self.result.losses[it], self.result.grad_norms[it] = step.loss, step.grad_norm
        if step.metrics:
            self.result.metrics[it] = step.metrics
        scale = loss_scale_of(te.engine)
        self.log.iteration_scalars(it, step, self.consumed, scale, te.engine)
        if self.log.iterations and (it % run.logging.log_interval == 0 or it == self.total_iters):
            self.log.emit(it, step, self.consumed, scale, te)
        return step, skipped

    def validate(self) -> None:
        t = self.run.training
        self.watchdog.phase("eval")
        with self.te.eval_weights():  # schedule-free optimizers: evaluate the averaged weights
            metrics = {}
            loss = evaluate(self.te, self.valid_batches, t.eval_iters, metrics)
        self.watchdog.phase("idle")
        self.consumed_valid += t.eval_iters * self.te.global_batch_size
        self.result.eval_losses[self.iteration] = loss
        if metrics:
            self.result.eval_metrics[self.iteration] = metrics
            self.tracker.log({f"val/{name}": value for name, value in metrics.items()}, self.iteration)
            self.say(" validation " + " | ".join(f"{name}={value:.6f}" for name, value in metrics.items()) + " |")
        _report_eval("validation", f"iteration {self.iteration}", self.iteration, self.consumed,
                     self.run.model.seq_length, loss, self.ps, self.tracker, self.printer)

    def save(self) -> None:
        self.watchdog.phase("save")
        state = TrainingProgress(iteration=self.iteration, consumed_samples=self.consumed,
                                 consumed_tokens=self.consumed * self.run.model.seq_length, args=self.run.args)
        self.result.saved.append(self.checkpointer.save(self.te, state, tracker_states=self.rng_tracker.get_states,
                                                        extra_state={"consumed_valid_samples": self.consumed_valid,
                                                                     "sample_order": self.sample_order,
                                                                     **self.task.checkpoint_state()}))
        self.last_saved = self.iteration
        self.watchdog.phase("idle")

    def exit_reason(self) -> Optional[str]:
        """Why to stop after this iteration (a signal, --exit-interval, --exit-duration-in-mins, the kill
        switch file), or None."""
        decision = self.exits.check(self.iteration)
        if decision.should_exit:
            return decision.reason
        kill_switch = self.run.training.kill_switch_file
        if kill_switch_found(kill_switch, self.device):
            return f"found the kill switch file {kill_switch}"
        return None

    def stop(self, reason: str) -> None:
        self.result.exit_reason = reason
        self.say(f"exiting at iteration {self.iteration}: {reason}")

    # ---- the end: the final save, then upstream's end-of-training validation and test evaluations ----
    def finish(self) -> None:
        """As upstream's pretrain() after train(): save, then evaluate --eval-iters batches of the validation set
        and of the test set (also with --skip-train, at the loaded iteration); not after an early exit (a
        signal, --exit-*, the kill switch, too many NaN steps), where upstream exits inside its loop."""
        run, t, result, it = self.run, self.run.training, self.result, self.iteration
        if t.skip_train:
            result.exit_reason = f"--skip-train: evaluated at iteration {it}"
            self.last_saved = it  # nothing trained: nothing to save
        if run.checkpoint.save and self.last_saved != it:
            self.save()
        if not result.exit_reason or t.skip_train:
            result.exit_reason = result.exit_reason or (
                f"consumed --train-tokens {t.train_tokens} tokens" if it < self.total_iters
                and stops_at_train_tokens(run, self.consumed) else f"trained {self.total_iters} iterations")
            final_batch = global_batch_size(run, self.ps.dp_size)
            if self.valid_batches is not None and t.eval_iters:
                with self.te.eval_weights():  # schedule-free optimizers: evaluate the averaged weights
                    result.final_valid_loss = evaluate(self.te, self.valid_batches, t.eval_iters)
                self.consumed_valid += t.eval_iters * self.te.global_batch_size
                if t.skip_train:
                    result.eval_losses[it] = result.final_valid_loss
                _report_eval("validation", f"iteration {it} {_draw(t.eval_iters, final_batch, 'validation')}", it,
                             self.consumed, run.model.seq_length, result.final_valid_loss, self.ps, self.tracker,
                             self.printer)
            if self.test_ds is not None:
                test_batches = _isolated_rng(lambda: _iterator(run, self.ps, self.test_ds, 0, self.task.collate))
                with self.te.eval_weights():
                    result.test_loss = evaluate(self.te, test_batches, t.eval_iters)
                _report_eval("test", f"iteration {it} {_draw(t.eval_iters, final_batch, 'test')}", it,
                             self.consumed, run.model.seq_length, result.test_loss, self.ps, self.tracker,
                             self.printer)
        result.iteration, result.consumed_samples = it, self.consumed
        self.tracker.flush()

    def close(self) -> None:
        self.watchdog.stop()
        self.exits.restore()
        self.te.destroy()
        if self.own_tracker:
            self.tracker.close()


def _quiet(_line: str) -> None:
    pass


def _rng_tracker():
    from megatron.core.random import get_rng_tracker

    return get_rng_tracker()


def requested_samples(run: RunConfig, dp_size: int) -> tuple[int, int, int]:
    """The (train, valid, test) samples the run asks of its datasets, by upstream's arithmetic (its
    training.py): train = --train-samples or --train-iters x final global batch; valid = (train iterations
    // --eval-interval + 1) x --eval-iters x batch; test = --eval-iters x batch (0 without evaluation)."""
    t = run.training
    final_batch = global_batch_size(run, dp_size)
    evals = (train_iters(run, dp_size) // t.eval_interval + 1) * t.eval_iters if t.eval_interval and t.eval_iters \
        else 0
    return train_samples(run, dp_size), evals * final_batch, t.eval_iters * final_batch if evals else 0


def _iterator(run: RunConfig, ps: ParallelState, dataset, consumed_samples: int, collate):
    """This dp rank's micro-batches from `consumed_samples` on (every tp/sp/pp rank of it reads the same)."""
    from megatron.data.data_iterator import build_data_iterator

    return build_data_iterator(dataset, run.training.micro_batch_size, ps.dp_rank, ps.dp_size, consumed_samples,
                               num_workers=run.data.num_workers,
                               multiprocessing_context=run.data.multiprocessing_context, collate_fn=collate)
