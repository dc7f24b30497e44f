"""What a training run optimises: the task hook that the loop and the engine call (pretraining by default).

The loop (training/loop.py) and the engine (training/engine.py) are the same for every task; a task says
- which datasets to read and how their items stack into a micro-batch (`build_datasets`, `collate`);
- the loss of one micro-batch from the model's per-token cross entropy (`micro_loss`; under pipeline
  parallelism the same function runs inside the pipe loss on the last stage, fed by `pipe_targets`);
- whether it needs the whole global batch before the first forward (`whole_batch_first`: a loss normalised over
  every micro-batch of every dp rank), and then `start_global_batch` sees the micro-batches first (collective);
- the extra metrics of a step (`step_metrics`, collective) that the log line, TensorBoard and wandb show;
- work before the first step (`before_training`, e.g. DPO's reference pass).

DeepSpeed averages the micro-batch losses over the gradient-accumulation steps and the dp ranks (the gradients by
its 1/GAS loss scaling and its dp all-reduce mean); a task that wants sum/count over the whole global batch returns
for each micro-batch  sum_mb * GAS * dp / count_global,  whose mean over micro-batches and ranks is exactly
sum_global / count_global -- for the gradients and for the reported loss alike.

Post-training tasks (SFT, DPO) live in megatron/post_training/ and are handed to `train(..., task=...)`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class PretrainingTask:
    """Next-token prediction on the blended GPT datasets; each micro-batch's loss is its masked token mean."""

    name = "pretraining"
    whole_batch_first = False
    metric_names: tuple = ()

    def build_datasets(self, session, num_samples: tuple):
        """(train, valid, test) datasets (None for a split without data) of num_samples[i] samples each.
        session: the loop's _Session (run, ps, checkpointer, printer, tracker, progress_extra, sample_order)."""
        from megatron.data.gpt_dataset import build_datasets
        from megatron.data.upstream_order import choose_sample_mode

        run, ps = session.run, session.ps
        plan = session.checkpointer.plan
        mode, why = choose_sample_mode(run.data, run.checkpoint.load,
                                       plan is not None and plan.description.kind == "argonne",
                                       session.progress_extra.get("sample_order"))
        session.sample_order = mode  # saved with each checkpoint, so that its resume keeps the order
        if why:
            session.say(why)
        datasets = build_datasets(run.data, run.model.seq_length, run.training.seed, num_samples,
                                  run.model.vocab_size, ps.rank, ps.world_size, sample_mode=mode)
        for dataset in datasets:
            if hasattr(dataset, "summary"):  # upstream's order: its shape, in place of the blend report
                session.say(f"sample order: {dataset.summary()}")
        if ps.rank == 0:
            from megatron.data.blend_report import publish_blend_report

            publish_blend_report(datasets, run.data.blend_epochs_warning, session.printer, session.tracker,
                                 run.checkpoint.save)
        return datasets

    @property
    def collate(self) -> Callable:
        from megatron.data.data_iterator import collate_tokens

        return collate_tokens

    def start_global_batch(self, te, micro_batches: list, training: bool) -> list:
        """Called with the global batch's micro-batches of this rank before the first forward (collective over
        every rank) when whole_batch_first; returns the micro-batches to run (the same, or reshaped)."""
        return micro_batches

    def micro_loss(self, per_token_nll: torch.Tensor, x, batch: dict, ps) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, loss to report) of one micro-batch."""
        from megatron.training.engine import masked_mean_loss

        return masked_mean_loss(per_token_nll, x.loss_mask, ps)

    def pipe_targets(self, x, batch: dict) -> tuple:
        """What the pipe loss receives besides the logits (DeepSpeed's labels)."""
        return (x.labels, x.loss_mask)

    def pipe_loss(self, ps) -> Optional[Callable]:
        """reduce(per-token loss [b, s], targets after the labels) -> the micro-batch's loss, which the pipe loss
        (model/pipeline.py MaskedMeanLoss) runs on the last stage; None: its masked mean."""
        return None

    def step_metrics(self, te, training: bool) -> dict:
        """{name: value} of the global batch just run, the same on every rank (collective)."""
        return {}

    def before_training(self, te, session) -> None:
        """Work on the built and loaded engine before the first step (collective). session: the loop's _Session
        (run, checkpointer, datasets, resumed_state: what a resumed checkpoint saved for the task)."""

    def run_args(self) -> dict:
        """The task's settings, added to the run's arguments (saved in each checkpoint, compared on resume by
        checkpoint/resume.py's TASK_ARGS, shown by the tracker's config); pretraining has none beyond its flags."""
        return {}

    def describe(self) -> list:
        """Lines for --dry-run: what the task will do."""
        return []

    def checkpoint_state(self) -> dict:
        """What the task saves in each checkpoint (client state beside the weights); read back as
        session.resumed_state."""
        return {}
