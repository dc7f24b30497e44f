"""SFT and DPO as tasks of the training loop (megatron/training/task.py): their datasets, micro-batch losses under
every layout (the plain engine and the pipe loss on the last stage), and DPO's metrics.

Normalisation over the whole global batch (training/task.py derives the scale): before the first forward of a
global batch every rank counts what its micro-batches hold (SFT: loss tokens; DPO: pairs, and chosen tokens for
the RPO term) and all-reduces the counts over dp; micro-batch m then returns  sum_m * GAS * dp / count_global.
Every micro-batch has the same scale, so it travels to the pipe loss as one more target.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.config.post_training import PostTrainingConfig
from megatron.errors import ConfigError
from megatron.post_training.losses import DPO_METRICS, dpo_metric_sums, dpo_pair_losses, pair_logps, split_pairs
from megatron.training.task import PretrainingTask


def _sum_over_dp(values: list[float], ps, device) -> list[float]:
    counts = torch.tensor(values, dtype=torch.float64, device=device)
    if ps.dp_size > 1:
        dist.all_reduce(counts, group=ps.dp_group)
    return counts.tolist()


def check_layout(run, ps) -> None:
    """What post-training does not run (yet), refused by name before the engine is built."""
    if ps.sp_size > 1:
        raise ConfigError(f"finetune_gpt.py does not support --ds-sequence-parallel-size {ps.sp_size} (Ulysses): "
                          "the response masks and pair log-probabilities would need summing over the sequence "
                          "shards; use tensor or pipeline parallelism")


class PostTrainingTask(PretrainingTask):
    """What SFT and DPO share: the post-training datasets (megatron/data/post_training.py) and their collate."""

    whole_batch_first = True

    def __init__(self, config: PostTrainingConfig, datasets: Optional[tuple] = None, collate: Optional[Callable] = None):
        self.config = config
        self._datasets, self._collate = datasets, collate  # tests hand-build them; None: from --data-path
        self.data_report = None
        self.data_key_override: Optional[dict] = None  # hand-built datasets: their identity (reference.py)
        self.data = None  # the opened PostTrainingData (megatron/data/post_training.py)

    @property
    def name(self) -> str:
        return self.config.task

    def data_prefix(self, run) -> str:
        paths = [p for p in run.data.data_path if not _is_number(p)]
        if len(paths) != 1 or run.data.data_file_list or run.data.train_data_path:
            raise ConfigError(f"finetune_gpt.py --task {self.config.task} reads one preprocessed prefix: give "
                              "--data-path PREFIX (tools/preprocess_data.py --task ... --output-prefix P writes "
                              f"P_text_document), got --data-path {' '.join(run.data.data_path) or '(none)'}")
        return paths[0]

    def run_args(self) -> dict:
        """The post-training flags, saved with the run's arguments in each checkpoint and compared on resume
        (checkpoint/resume.py TASK_ARGS); DPO's only for --task dpo."""
        c = self.config
        args = {"task": c.task, "packing": c.packing, "overlong_examples": c.overlong_examples}
        if c.task == "dpo":
            args.update(dpo_beta=c.dpo_beta, dpo_loss=c.dpo_loss, label_smoothing=c.label_smoothing,
                        rpo_alpha=c.rpo_alpha, ref_logps_path=c.ref_logps_path)
        return args

    def describe(self) -> list:
        c = self.config
        lines = [f"--task {c.task}; sequences {'packed' if c.packing else 'padded'} (--packing), overlong "
                 f"examples: {c.overlong_examples} (--overlong-examples)"]
        if c.task == "dpo":
            loss = c.dpo_loss + (f" with label smoothing {c.label_smoothing}" if c.label_smoothing else "")
            lines.append(f"DPO: --dpo-beta {c.dpo_beta}, --dpo-loss {loss}, --rpo-alpha "
                         f"{'off' if c.rpo_alpha is None else c.rpo_alpha}; reference log-probabilities in "
                         f"{c.ref_logps_path or 'beside the data (<data prefix>.dpo_reference.pt)'}"
                         + (", recomputed at the start (--recompute-ref-logps)" if c.recompute_ref_logps else ""))
        return lines

    def adopt(self, args: dict) -> None:
        """Take the settings the resume plan decided (run.args: the flags', or the checkpoint's under
        --use-checkpoint-opt_param-scheduler)."""
        fields = {key: args[key] for key in ("dpo_beta", "dpo_loss", "label_smoothing", "rpo_alpha", "packing",
                                             "overlong_examples") if key in args and key in self.run_args()}
        self.config = dataclasses.replace(self.config, **fields)

    def build_datasets(self, session, num_samples: tuple):
        self.adopt(session.run.args or {})
        if self._datasets is not None:
            return self._datasets
        run, ps, printer = session.run, session.ps, session.printer
        from megatron.data.post_training import build_post_training_datasets, open_post_training_data
        from megatron.data.tokenizers import build_tokenizer_from_config

        if not run.data.tokenizer_type:
            raise ConfigError(f"finetune_gpt.py --task {self.config.task} needs the tokenizer the data was "
                              "preprocessed with: give --tokenizer-type and its files")
        tokenizer = build_tokenizer_from_config(run.data)
        pad = getattr(tokenizer, "pad", None)
        self.data = open_post_training_data(self.data_prefix(run))
        datasets, report = build_post_training_datasets(
            self.data, self.config.task, run.model.seq_length, pack=self.config.packing,
            overlong=self.config.overlong_examples, split=run.data.split, seed=run.training.seed, eod=tokenizer.eod,
            pad=tokenizer.eod if pad is None or pad < 0 else pad,
            num_samples=[n if n > 0 else 0 for n in num_samples])
        self.data_report = report
        if ps.rank == 0:
            for line in report.lines():
                printer(line)
        self._datasets = tuple(datasets)
        return self._datasets

    def trim(self, te, micro_batches: list) -> list:
        """Cut each micro-batch after its last loss token (on an accelerator rounded up to a multiple of 8, for its
        matrix units; a multiple of tp under sequence parallelism): the padding after it changes no loss or
        log-probability (attention is causal) but costs compute. Not under pipeline parallelism, whose engine fixes
        the activation shape at its first micro-batch."""
        if te.is_pipeline:
            return micro_batches
        quantum = (1 if te.device.type == "cpu" else 8) * (te.ps.tp_size if te.model_config.sequence_parallel else 1)
        trimmed = []
        for batch in micro_batches:
            mask = batch["loss_mask"]
            columns = mask.any(dim=0).nonzero()
            full = mask.shape[1]
            keep = min(full, quantum * -(-(int(columns[-1]) + 1 if len(columns) else 1) // quantum))
            if keep == full:
                trimmed.append(batch)
                continue
            cut = {key: value[..., :keep] for key, value in batch.items() if key in ("loss_mask", "document_ids",
                                                                                    "position_ids")}
            trimmed.append({**batch, **cut, "tokens": batch["tokens"][:, :keep + 1]})
        return trimmed

    @property
    def collate(self) -> Callable:
        if self._collate is not None:
            return self._collate
        from megatron.data.post_training import collate

        return collate


class SFTTask(PostTrainingTask):
    """The masked next-token loss over the response tokens, normalised by the global batch's loss-token count."""

    scale = 1.0

    def start_global_batch(self, te, micro_batches: list, training: bool) -> list:
        micro_batches = self.trim(te, micro_batches)
        local = float(sum(float(mb["loss_mask"].sum()) for mb in micro_batches))
        (count,) = _sum_over_dp([local], te.ps, te.device)
        self.scale = len(micro_batches) * te.ps.dp_size / max(count, 1.0)
        return micro_batches

    def micro_loss(self, per_token_nll, x, batch, ps):
        loss = (per_token_nll.float() * x.loss_mask).sum() * self.scale
        return loss, loss.detach().clone()

    def pipe_targets(self, x, batch):
        return (x.labels, x.loss_mask, torch.tensor(self.scale, dtype=torch.float64))

    def pipe_loss(self, ps):
        def sft_loss(per_token_nll, targets):
            loss_mask, scale = targets
            return (per_token_nll.float() * loss_mask.float()).sum() * scale.float()

        return sft_loss


class DPOTask(PostTrainingTask):
    """DPO against stored reference log-probabilities (reference.py); the loss is the mean over the global batch's
    pairs, the RPO term the mean NLL over its chosen tokens; TRL's metrics of the batch."""

    metric_names = DPO_METRICS

    def __init__(self, config: PostTrainingConfig, datasets=None, collate=None):
        super().__init__(config, datasets, collate)
        self.reference: Optional[torch.Tensor] = None  # [examples, 2] float64: (chosen, rejected) log-probs
        self.pair_scale = self.token_scale = 0.0
        self.sums = torch.zeros(len(DPO_METRICS) + 1, dtype=torch.float64)  # the metrics' sums, then pairs
        self.recording: Optional[dict] = None  # the reference pass: {pair id: (chosen, rejected)}
        self.reference_key: Optional[dict] = None  # what the stored reference was made from (reference.py)

    # ---- the global batch ----
    def start_global_batch(self, te, micro_batches: list, training: bool) -> list:
        micro_batches = self.trim(te, micro_batches)
        pairs = float(sum(int((mb["pair_ids"] >= 0).sum()) for mb in micro_batches))  # packed: -1 is no pair
        chosen_tokens = float(sum(float(split_pairs(mb["loss_mask"])[0].sum()) for mb in micro_batches))
        pairs, chosen_tokens = _sum_over_dp([pairs, chosen_tokens], te.ps, te.device)
        scale = len(micro_batches) * te.ps.dp_size
        self.pair_scale = scale / max(pairs, 1.0)
        self.token_scale = scale / max(chosen_tokens, 1.0)
        self.sums = torch.zeros_like(self.sums)  # step_metrics reads this global batch's
        return micro_batches

    def _reference_of(self, pair_ids: torch.Tensor) -> torch.Tensor:
        """[2m]: the stored reference log-probabilities of these pairs, chosen ones first (packed pair_ids [n, k]:
        its pairs in row order, -1 skipped, as losses.pair_logps orders them)."""
        if self.reference is None:
            raise RuntimeError("DPO's reference log-probabilities are not loaded (DPOTask.before_training)")
        pair_ids = pair_ids.long().cpu()
        ref = self.reference[pair_ids[pair_ids >= 0]]
        return torch.cat([ref[:, 0], ref[:, 1]])

    def _loss(self, per_token_nll, loss_mask, reference, pair_ids, pair_scale, token_scale, document_ids=None):
        policy_chosen, policy_rejected, tokens_chosen, tokens_rejected, pairs = pair_logps(
            per_token_nll, loss_mask, pair_ids, document_ids)
        if self.recording is not None:  # the reference pass: remember, no loss
            for pair, c, r in zip(pairs.tolist(), policy_chosen.detach().double().cpu().tolist(),
                                  policy_rejected.detach().double().cpu().tolist()):
                self.recording[pair] = (c, r)
            return per_token_nll.sum() * 0.0
        ref_chosen, ref_rejected = split_pairs(reference.to(policy_chosen.device, torch.float32))
        c = self.config
        per_pair = dpo_pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=c.dpo_beta,
                                   loss_type=c.dpo_loss, label_smoothing=c.label_smoothing,
                                   chosen_tokens=tokens_chosen, rejected_tokens=tokens_rejected)
        loss = per_pair.sum() * pair_scale
        if c.rpo_alpha:  # every sequence of the chosen rows is a chosen response
            chosen_nll = split_pairs(per_token_nll.float() * loss_mask.float())[0].sum()
            loss = loss + c.rpo_alpha * chosen_nll * token_scale
        sums = dpo_metric_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, c.dpo_beta)
        self.sums += torch.cat([sums.double().cpu(), torch.tensor([float(policy_chosen.numel())], dtype=torch.float64)])
        return loss

    def micro_loss(self, per_token_nll, x, batch, ps):
        pair_ids = batch["pair_ids"]
        reference = None if self.recording is not None else self._reference_of(pair_ids)
        loss = self._loss(per_token_nll, x.loss_mask, reference, pair_ids, self.pair_scale, self.token_scale,
                          x.document_ids if pair_ids.dim() == 2 else None)
        return loss, loss.detach().clone()

    def pipe_targets(self, x, batch):
        pair_ids = batch["pair_ids"].long()
        reference = torch.zeros(2 * int((pair_ids >= 0).sum()), dtype=torch.float64) if self.recording is not None \
            else self._reference_of(pair_ids)
        packed = (x.document_ids,) if pair_ids.dim() == 2 else ()  # the last stage sums each document
        return (x.labels, x.loss_mask, reference, pair_ids,
                torch.tensor([self.pair_scale, self.token_scale], dtype=torch.float64)) + packed

    def pipe_loss(self, ps):
        def dpo_loss(per_token_nll, targets):
            loss_mask, reference, pair_ids, scales, *packed = targets
            return self._loss(per_token_nll, loss_mask, reference, pair_ids.cpu(), float(scales[0]), float(scales[1]),
                              packed[0] if packed else None)

        return dpo_loss

    def step_metrics(self, te, training: bool) -> dict:
        """TRL's metrics of the global batch: the last pipeline stage's sums, over every dp rank."""
        ps = te.ps
        sums = self.sums.to(te.device)
        if ps.pp_size > 1:
            if not ps.is_pipeline_last_stage:
                sums = torch.zeros_like(sums)
            dist.all_reduce(sums, group=ps.pp_group)
        if ps.dp_size > 1:
            dist.all_reduce(sums, group=ps.dp_group)
        sums = sums.cpu()
        self.sums = torch.zeros_like(self.sums)
        pairs = max(float(sums[-1]), 1.0)
        return {name: float(value) / pairs for name, value in zip(DPO_METRICS, sums[:-1].tolist())}

    # ---- the reference, and its identity in the checkpoints ----
    def before_training(self, te, session) -> None:
        from megatron.post_training.reference import prepare_reference

        prepare_reference(self, te, session)

    def checkpoint_state(self) -> dict:
        return {"dpo_reference": self.reference_key} if self.reference_key else {}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_task(config: PostTrainingConfig, datasets=None, collate=None) -> PostTrainingTask:
    return SFTTask(config, datasets, collate) if config.task == "sft" else DPOTask(config, datasets, collate)
