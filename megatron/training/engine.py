"""The one place where the model meets DeepSpeed: build model + optimizer + LR schedule, `deepspeed.initialize`, step.

`build_engine(run, ps, device)` returns a `TrainingEngine` whose `train_step(batches)` runs one
global batch (gradient accumulation, or DeepSpeed's 1F1B pipeline schedule when pp > 1) and whose
`eval_step(batches)` returns one batch's loss. Layout rules DeepSpeed cannot run (ZeRO-2/3 with
the pipeline engine, fp16 on CPU, Ulysses with pp > 1) are refused here, naming the flags.

Megatron sequence parallelism (--sequence-parallel): norms, row-parallel biases and position embeddings
see only this tp rank's part of the sequence, so their gradients must be summed over tp before the
optimizer uses them. DeepSpeed offers no single point between backward and step that works for every
configuration: ZeRO-2/3 move each gradient into flat dp partitions from accumulate-grad hooks *during*
`engine.backward`, and the pipeline engine runs backward and step inside `train_batch`. So instead of
calling megatron.model's `allreduce_sequence_parallel_grads` after backward, we install its
`register_sequence_parallel_grad_hooks` once: a tensor hook sums each such gradient over tp as autograd
produces it, before it is accumulated into .grad and before DeepSpeed's hooks see it (same result, every
ZeRO stage, pipe or not).

Gradient clipping in fp32 without ZeRO is ours too (TrainingEngine._clip_fp32_gradients replaces the engine's
clip_fp32_gradients): DeepSpeed's version miscounts parameters under pipeline parallelism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron.config.model import TransformerConfig
from megatron.distributed.parallel_state import ParallelState
from megatron.errors import MegatronError
from megatron.training.timers import Timers


class EngineConfigError(MegatronError, ValueError):
    """A combination of flags the engine cannot run; the message names the flags and the fix."""

    same_on_every_rank = True


# ---- what runs where --------------------------------------------------------------------------------

def uses_pipeline_engine(run) -> bool:
    """DeepSpeed's PipelineEngine runs whenever the model is split into stages (pp > 1).

    With pp == 1 the plain engine is used whether or not --no-pipeline-parallel is given: a one-stage
    pipeline would only cost speed and forbid ZeRO-2/3.
    """
    return run.parallel.pp > 1


def engine_config_errors(run, device: torch.device) -> list[str]:
    """Every reason the engine cannot run `run` on `device`, each naming the flags; empty when it can."""
    from megatron.training.ds_config import precision_errors

    from megatron.optimizer import deepspeed_zero_stage

    zero = run.training.zero
    errors = list(precision_errors(run, device.type))
    if uses_pipeline_engine(run) and deepspeed_zero_stage(run) >= 2:
        errors.append(
            f"--zero-stage {zero.zero_stage} cannot be combined with --pipeline-model-parallel-size "
            f"{run.parallel.pp}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use --zero-stage 1, "
            "or --pipeline-model-parallel-size 1 --no-pipeline-parallel to keep ZeRO-2/3")
    if run.parallel.sp > 1 and run.parallel.pp > 1:
        errors.append(
            f"--ds-sequence-parallel-size {run.parallel.sp} (Ulysses) needs --pipeline-model-parallel-size 1 "
            f"(got {run.parallel.pp})")
    if zero.zero_stage not in (0, 1, 2, 3):
        errors.append(f"--zero-stage must be 0, 1, 2 or 3 (got {zero.zero_stage})")
    if zero.offload_param and zero.zero_stage != 3:
        errors.append(f"parameter offload (--remote-device cpu) needs --zero-stage 3 (got {zero.zero_stage})")
    from megatron.optimizer import optimizer_errors

    errors += optimizer_errors(run, device.type)  # --optimizer and the layouts it can run exactly
    if run.model.vocab_size <= 0:
        errors.append("the model's vocabulary size is unknown: give --tokenizer-type (or --vocab-size with "
                      "--mock-data / NullTokenizer)")
    return errors


def check_engine_config(run, device: torch.device) -> None:
    errors = engine_config_errors(run, device)
    if errors:
        raise EngineConfigError("cannot build the training engine:\n  - " + "\n  - ".join(errors))


# ---- model and optimizer ----------------------------------------------------------------------------

def build_model(model_config: TransformerConfig, ps: ParallelState, pipeline: bool, seed: int,
                pipe_loss_reduce=None) -> torch.nn.Module:
    """GPTModel, or its layers as DeepSpeed's PipelineModule (collective when pipeline: all ranks call it).
    pipe_loss_reduce: a task's loss from the per-token loss on the last stage (model/pipeline.py MaskedMeanLoss)."""
    if pipeline:
        from megatron.model.pipeline import MaskedMeanLoss, build_pipeline_module

        loss_fn = None if pipe_loss_reduce is None else MaskedMeanLoss(model_config, ps, pipe_loss_reduce)
        return build_pipeline_module(model_config, ps, seed=seed, loss_fn=loss_fn)
    from megatron.model import GPTModel

    return GPTModel(model_config, ps, seed=seed)


def build_optimizer(run, model: torch.nn.Module, ps: Optional[ParallelState] = None,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """The --optimizer (megatron/optimizer); DeepSpeedCPUAdam with --cpu-optimizer."""
    from megatron.optimizer import build_optimizer as build

    return build(run, model, ps, device_type)


# ---- batches ----------------------------------------------------------------------------------------

@dataclass
class ModelInputs:
    tokens: torch.Tensor  # [b, s_local]
    position_ids: torch.Tensor  # [b, s_local], positions in the full sequence
    labels: torch.Tensor  # [b, s_local]
    loss_mask: torch.Tensor  # [b, s_local] float
    document_ids: Optional[torch.Tensor] = None  # [b, s] with --reset-attention-mask (document-wise attention)

    def model_kwargs(self) -> dict:
        """Keyword arguments of GPTModel.forward besides the tokens."""
        extra = {} if self.document_ids is None else {"document_ids": self.document_ids}
        return dict(position_ids=self.position_ids, labels=self.labels, **extra)

    def pipe_inputs(self) -> tuple:
        """The PipelineModule's inputs: (tokens, position_ids[, document_ids])."""
        return (self.tokens, self.position_ids) + (() if self.document_ids is None else (self.document_ids,))


def position_ids_and_loss_mask(tokens: torch.Tensor, eod_token: Optional[int], reset_position_ids: bool,
                               eod_mask_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's rules: with --reset-position-ids positions restart after each EOD token; with
    --eod-mask-loss the positions whose input is EOD carry no loss."""
    b, s = tokens.shape
    index = torch.arange(s, dtype=torch.long, device=tokens.device).unsqueeze(0).expand(b, s)
    loss_mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    if (reset_position_ids or eod_mask_loss) and eod_token is None:
        raise EngineConfigError("--reset-position-ids / --eod-mask-loss need a tokenizer with an EOD token")
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    if not reset_position_ids:
        return index.clone(), loss_mask
    # A document starts right after each EOD: position = index - (start of the current document).
    after_eod = torch.where(tokens == eod_token, index + 1, torch.zeros_like(index))
    doc_start = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=tokens.device), after_eod[:, :-1]], dim=1)
    return index - torch.cummax(doc_start, dim=1).values, loss_mask


def prepare_batch(batch: dict, ps: ParallelState, device: torch.device, eod_token: Optional[int] = None,
                  reset_position_ids: bool = False, eod_mask_loss: bool = False,
                  reset_attention_mask: bool = False) -> ModelInputs:
    """{"tokens": [b, s+1]} -> inputs and labels shifted by one, cut to this Ulysses rank's part of the sequence.

    With reset_attention_mask (Megatron's --reset-attention-mask) the inputs carry per-token document numbers
    (a new document after each EOD token): attention is then causal within each document only.
    A post-training batch (megatron/data/post_training.py) brings its own "loss_mask" [b, s] (of the labels) and,
    packed, its "position_ids" and "document_ids" [b, s]: these replace the EOD-derived ones."""
    if "tokens" not in batch:
        raise KeyError(f"a training batch must hold 'tokens' [b, seq+1]; got keys {sorted(batch)}")
    data = batch["tokens"].long()
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    if "loss_mask" in batch:
        loss_mask = batch["loss_mask"].float()
        position_ids = batch["position_ids"].long() if "position_ids" in batch else \
            torch.arange(tokens.shape[1], dtype=torch.long).unsqueeze(0).expand_as(tokens).clone()
    else:
        position_ids, loss_mask = position_ids_and_loss_mask(tokens, eod_token, reset_position_ids, eod_mask_loss)
    document_ids = None
    if "document_ids" in batch:
        document_ids = batch["document_ids"].long().to(device)
    elif reset_attention_mask:
        if eod_token is None:
            raise EngineConfigError("--reset-attention-mask needs a tokenizer with an EOD token")
        if ps.sp_size > 1:
            raise EngineConfigError("--reset-attention-mask is not supported with --ds-sequence-parallel-size > 1")
        from megatron.model.attention import document_ids_from_tokens

        document_ids = document_ids_from_tokens(tokens, eod_token).to(device)
    if ps.sp_size > 1:  # every sp rank got the full sample from the data iterator: keep our chunk
        s = tokens.shape[1]
        if s % ps.sp_size:
            raise EngineConfigError(f"sequence length {s} is not divisible by --ds-sequence-parallel-size {ps.sp_size}")
        chunk = s // ps.sp_size
        part = slice(ps.sp_rank * chunk, (ps.sp_rank + 1) * chunk)
        tokens, labels, position_ids, loss_mask = tokens[:, part], labels[:, part], position_ids[:, part], \
            loss_mask[:, part]
    return ModelInputs(tokens.contiguous().to(device), position_ids.contiguous().to(device),
                       labels.contiguous().to(device), loss_mask.contiguous().to(device), document_ids)


def masked_mean_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, ps: ParallelState):
    """(loss to backpropagate, loss to report) for one micro-batch: the mean over tokens with loss_mask 1.

    Under Ulysses each sp rank holds part of the sequence: it backpropagates its token-loss sum divided by
    the token count of the whole sequence. DeepSpeed sums gradients over sp (it divides the sequence-data
    group's sum by dp only), which gives the gradient of the full sequence's mean. The reported loss is
    that mean, all-reduced over sp.
    """
    mask = loss_mask.float()
    local_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum().detach().clone()
    if ps.sp_size > 1:
        dist.all_reduce(count, group=ps.sp_group)
    loss = local_sum / count.clamp(min=1.0)
    report = loss.detach().clone()
    if ps.sp_size > 1:
        dist.all_reduce(report, group=ps.sp_group)
    return loss, report


# ---- the engine -------------------------------------------------------------------------------------

def quiet_deepspeed_timer_log(engine) -> None:
    """DeepSpeed (checked against 0.19.8) prints its wall-clock timers at every micro-step when
    wall_clock_breakdown is on; we read them (get_wall_clock_timers) into our own report instead, so its
    print is replaced by a reset of the same timers."""
    from megatron import deepspeed_compat as compat

    timers = engine.timers

    def reset_only(names, *args, **kwargs):
        for name in names:
            if name in timers.get_timers():
                timers(name).reset()

    compat.replace_timer_log(engine, reset_only)


@dataclass
class StepResult:
    loss: float  # mean over the global batch (every micro-batch of every dp rank)
    grad_norm: Optional[float]  # before clipping, of the whole model; None when nobody computed it
    learning_rate: float  # the lr this step used
    skipped: bool  # fp16 overflow: the optimizer step was skipped
    num_samples: int  # samples in this global batch
    next_learning_rate: Optional[float] = None  # the lr after the step's schedule step (what upstream's log shows)
    metrics: dict = field(default_factory=dict)  # the task's extra metrics of this batch (DPO's rewards/*, ...)


@dataclass
class TrainingEngine:
    engine: object  # deepspeed.DeepSpeedEngine, or deepspeed.runtime.pipe.PipelineEngine when is_pipeline
    ps: ParallelState
    device: torch.device
    model_config: TransformerConfig
    ds_config: dict
    is_pipeline: bool
    eod_token: Optional[int] = None
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    reset_attention_mask: bool = False
    hook_handles: list = field(default_factory=list)
    destroyed: bool = False
    last_clip_grad_norm: Optional[float] = None  # set by _clip_fp32_gradients at each optimizer step
    timers: Optional[Timers] = None  # per-phase timers (--timing-log-level); None: not timed
    empty_unused_memory_level: int = 0  # --empty-unused-memory-level: when to release the allocator's cache
    task: object = None  # training/task.py: what the run optimises (None: pretraining)

    def __post_init__(self):
        if self._fp32_without_zero():  # an instance attribute: DeepSpeed's _take_model_step calls ours
            from megatron import deepspeed_compat as compat

            compat.replace_fp32_gradient_clipping(self.engine, self._clip_fp32_gradients)
        if self.timers is None:
            self.timers = Timers(0)
        if self.task is None:
            from megatron.training.task import PretrainingTask

            self.task = PretrainingTask()
        if self.engine.wall_clock_breakdown():
            quiet_deepspeed_timer_log(self.engine)

    def _add_reduce_time(self) -> None:
        """The dp gradient reduction DeepSpeed timed in this micro-step's backward (wall_clock_breakdown)."""
        from megatron.deepspeed_compat import BACKWARD_REDUCE_TIMER

        ms = self.engine.get_wall_clock_timers().get(BACKWARD_REDUCE_TIMER)
        if ms is not None:
            self.timers("grads-all-reduce", 1).add(ms / 1000.0)

    @property
    def lr_scheduler(self):
        return self.engine.lr_scheduler

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def global_batch_size(self) -> int:
        return self.engine.train_batch_size()

    def set_global_batch_size(self, batch: int) -> None:
        """Batch ramp-up: change the number of accumulated micro-batches (the micro batch stays)."""
        if batch != self.global_batch_size:
            self.engine.set_train_batch_size(batch)

    @property
    def _schedule_free(self):
        """(schedule-free optimizer, DeepSpeed wrapper holding its fp32 partitions or None), or None.

        Under ZeRO-1/2 (and bf16) DeepSpeed steps our optimizer on flat fp32 partitions and copies them into the
        model after each step; the eval/train switch moves those partitions, so the model is refreshed from
        them the same way (the wrapper's update_lp_params: copy + all-gather over dp)."""
        optimizer = getattr(self.engine, "optimizer", None)
        if hasattr(optimizer, "in_train_mode"):
            return optimizer, None
        inner = getattr(optimizer, "optimizer", None)
        if hasattr(inner, "in_train_mode"):
            return inner, optimizer
        return None

    def _switch(self, to_eval: bool) -> None:
        optimizer, wrapper = self._schedule_free
        optimizer.eval() if to_eval else optimizer.train()
        if wrapper is not None:
            wrapper.update_lp_params()

    @contextlib.contextmanager
    def eval_weights(self):
        """Inside: the parameters are what evaluation and export should see (a schedule-free optimizer's
        averaged x; every other optimizer's parameters as they are)."""
        if self._schedule_free is None:
            yield
            return
        self._switch(to_eval=True)
        try:
            yield
        finally:
            self._switch(to_eval=False)

    def train_weights(self) -> None:
        """After a load: a schedule-free optimizer saved in eval mode goes back to its training weights."""
        if self._schedule_free is not None:
            self._switch(to_eval=False)

    def _inputs(self, batch: dict) -> ModelInputs:
        return prepare_batch(batch, self.ps, self.device, self.eod_token, self.reset_position_ids,
                             self.eod_mask_loss, self.reset_attention_mask)

    def _pipeline_batches(self, batches: Iterator[dict]):
        """The ((tokens, position_ids[, document_ids]), (labels, loss_mask, ...)) tuples the PipelineModule takes
        (the targets are the task's)."""
        for batch in batches:
            x = self._inputs(batch)
            yield x.pipe_inputs(), self.task.pipe_targets(x, batch)

    def _global_batch(self, batches: Iterator[dict], training: bool) -> Iterator[dict]:
        """The micro-batches of one global batch: read lazily, or (a task that normalises over the whole global
        batch) read first and shown to the task (collective)."""
        if not self.task.whole_batch_first:
            return batches
        with self.timers("batch-generator", 1):
            micro_batches = [next(batches) for _ in range(self.gradient_accumulation_steps)]
        return iter(self.task.start_global_batch(self, micro_batches, training))

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _fp32_without_zero(self) -> bool:
        # DeepSpeed computes the norm (and clips) inside its ZeRO / bf16 / fp16 optimizers only.
        return (self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled()
                and not self.engine.fp16_enabled())

    def _optimizer_owns_gradients(self) -> bool:
        """A whole-matrix optimizer in bf16/fp16 or at ZeRO-2 (megatron/optimizer/mixed_precision.py) reduces,
        unscales, checks and clips the gradients in its step and reports the norm (`last_grad_norm`)."""
        return bool(getattr(self.engine.optimizer, "owns_gradients", False))

    def _needs_own_grad_norm(self) -> bool:
        # Without clipping DeepSpeed never calls clip_fp32_gradients, so we compute the norm to report it
        # (not of 1-bit LAMB's local, unaveraged gradients in its compression stage: no rank has the average).
        return not self.is_pipeline and self._fp32_without_zero() and self.engine.gradient_clipping() == 0 \
            and self._optimizer_wants_gradient_allreduce() and not self._optimizer_owns_gradients()

    def _optimizer_wants_gradient_allreduce(self) -> bool:
        wants = getattr(self.engine.optimizer, "needs_gradient_allreduce", None)
        return True if wants is None else wants()

    def _set_gradient_allreduce(self) -> None:
        """1-bit LAMB (--optimizer ds.onebitlamb) averages compressed momentum itself after its freeze_step: DeepSpeed's
        all-reduce of the gradients over dp (ZeRO-0) runs only while the optimizer asks for it. The pipeline engine
        keeps `enable_backward_allreduce` off and reduces in its schedule's ReduceGrads instruction, switched by
        `pipeline_enable_backward_allreduce` (the tied-embedding reduce over the stages stays on: that is model
        parallelism, not dp)."""
        if getattr(self.engine.optimizer, "needs_gradient_allreduce", None) is None:
            return
        from megatron.deepspeed_compat import set_gradient_allreduce

        wanted = self.ps.dp_size * self.ps.sp_size > 1 and self._optimizer_wants_gradient_allreduce()
        set_gradient_allreduce(self.engine, wanted, pipeline=self.is_pipeline)

    def _grad_norm_of_reduced_grads(self) -> float:
        """L2 norm of the dp-reduced gradients of the whole model, each parameter counted once.

        tp-replicated parameters (norms, biases of row-parallel layers) count on tp rank 0 only, the copy of
        a tied embedding on a later pipeline stage (DeepSpeed marks it ds_pipe_replicated) not at all; the
        sum of squares is then added up over the model-parallel group (tp × pp).
        """
        consumed = getattr(self.engine.optimizer, "consumed_grad_norm", None)
        if consumed is not None:  # optimizer-in-backward (one rank): the hooks consumed and freed the gradients
            return consumed
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for param in self.engine.module.parameters():
            if param.grad is None or getattr(param, "ds_pipe_replicated", False):
                continue
            if getattr(param, "tensor_model_parallel", False) or self.ps.tp_rank == 0:
                squares += param.grad.detach().float().pow(2).sum()
        if self.ps.tp_size * self.ps.pp_size > 1:
            dist.all_reduce(squares, group=self.ps.groups["mp"])
        return float(squares.sqrt().item())

    def params_norm(self) -> float:
        """L2 norm of all the model's parameters (--log-params-norm), each counted once: tp-replicated ones (norms,
        row-parallel biases) on tp rank 0 only, the tied embedding's copy on the last pipeline stage not at all,
        ZeRO-3 parameters through this rank's partition (summed over the partition group). Collective over the
        model-parallel group (and ZeRO-3's partition group): every rank calls it and gets the same value."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        partitioned = torch.zeros((), dtype=torch.float32, device=self.device)
        partition_group = None
        for param in self.engine.module.parameters():
            if getattr(param, "ds_pipe_replicated", False):
                continue
            if not (getattr(param, "tensor_model_parallel", False) or self.ps.tp_rank == 0):
                continue
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank holds one slice of the flattened parameter
                partition_group = param.ds_process_group
                size = param.ds_tensor.ds_numel
                start = size * dist.get_rank(group=partition_group)
                valid = max(0, min(size, param.ds_numel - start))  # the last slice's padding is not the parameter
                partitioned += param.ds_tensor.detach().narrow(0, 0, valid).float().pow(2).sum()
            else:
                squares += param.detach().float().pow(2).sum()
        if partition_group is not None:
            dist.all_reduce(partitioned, group=partition_group)
        squares += partitioned
        if self.ps.tp_size * self.ps.pp_size > 1:
            dist.all_reduce(squares, group=self.ps.groups["mp"])
        return float(squares.sqrt().item())

    def _release_memory(self, level: int) -> None:
        """--empty-unused-memory-level >= `level`: hand the allocator's unused cached blocks back to the device."""
        if self.empty_unused_memory_level >= level:
            from megatron.distributed.device import empty_cache

            empty_cache(self.device)

    def _clip_fp32_gradients(self) -> None:
        """Replaces DeepSpeedEngine.clip_fp32_gradients (fp32, ZeRO-0): clip by the norm of the whole model.

        DeepSpeed's own version (runtime.utils.clip_grad_norm_) counts replicated parameters only on
        model-parallel rank 0 of the tp × pp group, so under pipeline parallelism the later stages' norms and
        biases are left out and the tied embedding is counted twice: every stage then clips by a wrong norm
        and the loss drifts from the single-rank run's.
        """
        if self._optimizer_owns_gradients():
            return  # it clips the reduced, unscaled gradients in its step
        norm = self._grad_norm_of_reduced_grads()
        self.last_clip_grad_norm = norm
        coefficient = min(1.0, self.engine.gradient_clipping() / (norm + 1e-6))
        if coefficient < 1.0:
            for param in self.engine.module.parameters():
                if param.grad is not None:
                    param.grad.detach().mul_(coefficient)

    def train_step(self, batches: Iterator[dict]) -> StepResult:
        """One optimizer step over `gradient_accumulation_steps` micro-batches pulled from `batches`."""
        skipped_before = self.engine.skipped_steps
        lr = self._lr()
        grad_norm = None
        self.last_clip_grad_norm = None
        timers = self.timers
        batches = self._global_batch(batches, training=True)
        if self.is_pipeline:  # DeepSpeed's 1F1B schedule runs forward, backward and the optimizer step in one call
            self._set_gradient_allreduce()
            with timers("forward-backward", 1):
                loss = float(self.engine.train_batch(data_iter=self._pipeline_batches(batches)).item())
            self._release_memory(1)  # forward, backward and step are one call here: levels 1 and 2 alike
        else:
            self.engine.train()
            gas = self.gradient_accumulation_steps
            self._set_gradient_allreduce()
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            forward_backward = timers("forward-backward", 1)
            forward_backward.start()
            for micro_step in range(gas):
                # The boundary is the last micro-batch of this global batch. DeepSpeed's own count
                # ((micro_steps + 1) % gas) is not restored by a resume, so after a resume inside a batch
                # ramp-up it would fall mid-batch once the batch grows.
                self.engine.set_gradient_accumulation_boundary(micro_step == gas - 1)
                with timers("batch-generator", 1):
                    batch = next(batches)
                x = self._inputs(batch)
                with timers("forward-compute", 2):
                    per_token = self.engine(x.tokens, **x.model_kwargs())
                    loss, report = self.task.micro_loss(per_token, x, batch, self.ps)
                if self._optimizer_owns_gradients():
                    loss = self.engine.optimizer.scale_loss(loss)  # fp16: the loss scale (1 otherwise)
                with timers("backward-compute", 2):
                    self.engine.backward(loss)  # at the last micro-batch: gradients reduced over dp (sdp)
                if self.engine.is_gradient_accumulation_boundary():
                    if self._needs_own_grad_norm():
                        grad_norm = self._grad_norm_of_reduced_grads()
                    forward_backward.stop()
                    self._release_memory(1)  # upstream's level 1: after the global batch's forward-backward
                    with timers("optimizer", 1):
                        self.engine.step()  # steps the optimizer and the LR schedule
                    self._release_memory(2)  # level 2: after the optimizer step too
                else:
                    self.engine.step()  # between boundaries: only counts the micro-step
                if self.engine.wall_clock_breakdown():
                    self._add_reduce_time()
                total += report
            total /= gas
            if self.ps.dp_size > 1:
                dist.all_reduce(total, group=self.ps.dp_group)
                total /= self.ps.dp_size
            loss = float(total.item())
        if grad_norm is None:
            grad_norm = self.last_clip_grad_norm
        if grad_norm is None and self._optimizer_owns_gradients():
            grad_norm = self.engine.optimizer.last_grad_norm
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)
        return StepResult(loss=loss, grad_norm=grad_norm, learning_rate=lr,
                          skipped=self.engine.skipped_steps > skipped_before, num_samples=self.global_batch_size,
                          next_learning_rate=self._lr(), metrics=self.task.step_metrics(self, training=True))

    def skip_step(self, batches: Iterator[dict]) -> StepResult:
        """Upstream's --train-iters-to-skip/--train-range-to-skip step: read this global batch's micro-batches,
        advance the LR schedule and DeepSpeed's step counters (counted as a skipped step); no compute."""
        lr = self._lr()
        for _ in range(self.gradient_accumulation_steps):
            next(batches)
        engine = self.engine
        engine.skipped_steps += 1
        engine.global_steps += 1
        engine.micro_steps += self.gradient_accumulation_steps
        engine.global_samples += self.global_batch_size
        self.lr_scheduler.step()
        return StepResult(loss=float("nan"), grad_norm=None, learning_rate=lr, skipped=True,
                          num_samples=self.global_batch_size, next_learning_rate=self._lr())

    @torch.no_grad()
    def eval_step(self, batches: Iterator[dict]) -> float:
        """Mean loss over one global batch from `batches`; no gradients, no optimizer step."""
        batches = self._global_batch(batches, training=False)
        if self.is_pipeline:
            loss = self.engine.eval_batch(self._pipeline_batches(batches), return_logits=False, compute_loss=True,
                                          reduce_output="avg", bcast_loss=True)
            self._release_memory(1)
            return float(loss.item())
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.gradient_accumulation_steps):
            batch = next(batches)
            x = self._inputs(batch)
            per_token = self.engine(x.tokens, **x.model_kwargs())
            total += self.task.micro_loss(per_token, x, batch, self.ps)[1]
        total /= self.gradient_accumulation_steps
        self._release_memory(1)  # upstream's level 1: after each evaluation batch's forward
        if self.ps.dp_size > 1:
            dist.all_reduce(total, group=self.ps.dp_group)
            total /= self.ps.dp_size
        self.engine.train()
        return float(total.item())

    def destroy(self) -> None:
        """Release DeepSpeed's optimizer state and threads; call before tearing down the process group."""
        if self.destroyed:
            return
        self.destroyed = True
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def build_engine(run, ps: ParallelState, device: torch.device, ds_config: Optional[dict] = None,
                 lr_scheduler_factory=None, eod_token: Optional[int] = None,
                 timers: Optional[Timers] = None, task=None) -> TrainingEngine:
    """Model, optimizer, LR schedule and DeepSpeed engine for `run` on this rank (collective).

    ds_config: default build_deepspeed_config(run, dp) -- generated from the flags or the user's file, checked.
    lr_scheduler_factory(optimizer) -> scheduler: default lr_schedule.build_lr_scheduler(optimizer, run, dp).
    DeepSpeed steps the scheduler at every optimizer step and saves/loads it with the checkpoint.
    """
    from megatron import deepspeed_compat as compat

    compat.ensure_torch_extensions_dir(ps.rank)  # before any DeepSpeed op (comm, Adam) can JIT-build
    import deepspeed

    check_engine_config(run, device)
    if ds_config is None:
        from megatron.training.ds_config import build_deepspeed_config

        ds_config = build_deepspeed_config(run, ps.dp_size, device.type)
    pipeline = uses_pipeline_engine(run)
    if task is None:
        from megatron.training.task import PretrainingTask

        task = PretrainingTask()
    model = build_model(run.model, ps, pipeline, run.training.seed, pipe_loss_reduce=task.pipe_loss(ps))
    from megatron.checkpoint.universal import universal_checkpoint_info

    # DeepSpeed saves this attribute of the module in every checkpoint; ds_to_universal merges tp shards by it.
    model.universal_checkpoint_info = universal_checkpoint_info(run.model, ps.tp_size, pipeline)
    from megatron.optimizer import model_dtype, owns_gradients

    owns = owns_gradients(run)
    if owns:  # DeepSpeed runs fp32 ZeRO-0 over the 16-bit model; the optimizer keeps the fp32 masters
        model.to(model_dtype(run))
    optimizer = build_optimizer(run, model, ps, device.type)
    if lr_scheduler_factory is None:
        from megatron.optimizer.lr_schedule import build_lr_scheduler

        scheduler = build_lr_scheduler(optimizer, run, ps.dp_size)
    else:
        scheduler = lr_scheduler_factory(optimizer)
    handles = []
    if run.parallel.sequence_parallel:
        from megatron.model import register_sequence_parallel_grad_hooks

        handles = register_sequence_parallel_grad_hooks(model, ps)
    kwargs = dict(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if not pipeline and ps.world_size > 1:
        # A PipelineModule brings its own topology (DeepSpeed refuses both); one rank needs no groups.
        kwargs["mpu"] = ps.mpu()
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    from megatron.optimizer import attach_to_engine

    attach_to_engine(engine, optimizer, ps)  # LAMB under ZeRO/bf16: where each tensor's fragments are
    if owns:  # the optimizer reduces the gradients over sp x dp itself (by owner: mixed_precision.py)
        compat.set_gradient_allreduce(engine, False, pipeline=pipeline)
    if not pipeline and ps.dp_size * ps.sp_size == 1 and engine.zero_optimization_stage() == 0:
        # DeepSpeed's gradient all-reduce group (dp x sp) has one rank: its ZeRO-0 reduction would only
        # flatten every gradient into one buffer, "reduce" it and copy it back (exact no-op, ~3% of a step).
        compat.set_gradient_allreduce(engine, False, pipeline=False)
    return TrainingEngine(engine=engine, ps=ps, device=device, model_config=run.model, ds_config=ds_config,
                          is_pipeline=pipeline, eod_token=eod_token, reset_position_ids=run.data.reset_position_ids,
                          eod_mask_loss=run.data.eod_mask_loss, reset_attention_mask=run.data.reset_attention_mask,
                          hook_handles=handles, timers=timers,
                          empty_unused_memory_level=run.training.empty_unused_memory_level, task=task)
