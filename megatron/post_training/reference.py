"""DPO's reference log-probabilities: one forward pass of the loaded model over the pairs, at the start of the run
when no stored pass fits, with the training engine itself (the same layout: tp, pp, ZeRO-3), then stored beside
the data so that training holds one model.

The stored file (<data prefix>.dpo_reference.pt, or --ref-logps-path) holds a [examples, 2] float64 table of
(chosen, rejected) sequence log-probabilities indexed by the pair's global example number (the micro-batch's
"pair_ids"), and the key it was made from:
    data       the data prefix and the sha256 of its P_text_document.post_training.json
    reference  the checkpoint --load named (kind, real path, iteration, a sha256 of its file names and sizes),
               or the seed of a model initialised from scratch
    sequences  --seq-length, --packing and --overlong-examples (how the pairs became rows)
A stored file with another key is refused, naming both keys and the fix (--recompute-ref-logps, another
--ref-logps-path, or the right --load / --data-path). A resumed DPO run compares the stored key with the one its
checkpoint recorded: the reference stays the model the run started from, not the checkpoint it resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
import torch.distributed as dist

from megatron.errors import MegatronError

FORMAT = 1


class DPOReferenceError(MegatronError, ValueError):
    """A stored reference that does not belong to this run, or a missing one that cannot be recomputed."""


def default_path(prefix: str) -> str:
    return f"{prefix}.dpo_reference.pt"


def _listing_digest(path: str) -> str:
    digest = hashlib.sha256()
    entries = []
    if os.path.isfile(path):
        entries.append((os.path.basename(path), os.path.getsize(path)))
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            entries.append((os.path.relpath(full, path), os.path.getsize(full)))
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


def checkpoint_key(session) -> dict:
    """The reference model's identity: the checkpoint --load named, or the initialisation seed without one."""
    plan = session.checkpointer.plan
    if plan is None:
        return {"kind": "initialisation", "seed": session.run.training.seed}
    d = plan.description
    return {"kind": d.kind, "path": os.path.realpath(d.path), "iteration": session.result.start_iteration,
            "files_sha256": _listing_digest(d.path)}


def sequences_key(task, run) -> dict:
    """How the pairs became rows: the sequence length and overlong rule (they decide which tokens a log-probability
    sums) and whether they were packed (packed rows sum each sequence inside a row; the reference is kept per
    pair, but one made with another packing is not this run's)."""
    return {"seq_length": run.model.seq_length, "packing": bool(task.config.packing),
            "overlong_examples": task.config.overlong_examples}


def _describe(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def prepare_reference(task, te, session) -> None:
    """Load the stored reference of this run, or compute and store it (collective: every rank calls it)."""
    run, ps = session.run, session.ps
    prefix = task.data_prefix(run) if task.data_key_override is None else None
    path = task.config.ref_logps_path or default_path(prefix)
    data = task.data_key_override or {"prefix": os.path.realpath(prefix),
                                      "post_training_json_sha256": task.data.fingerprint}
    fresh = {"data": data, "reference": checkpoint_key(session), "sequences": sequences_key(task, run)}
    recorded = session.resumed_state.get("dpo_reference")
    if recorded is not None and "sequences" in recorded and recorded["sequences"] != fresh["sequences"]:
        raise DPOReferenceError(
            f"this DPO run resumes a checkpoint whose reference log-probabilities were made from sequences "
            f"{_describe(recorded['sequences'])}, but this run cuts them as {_describe(fresh['sequences'])}; resume "
            "with the --seq-length, --packing and --overlong-examples the run started with, or start a new DPO run "
            "from the reference checkpoint (--finetune)")
    expected = recorded or fresh
    stored = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
    if stored is not None and stored.get("format") != FORMAT:
        raise DPOReferenceError(f"{path} is not a DPO reference file of format {FORMAT}: remove it or give another "
                             "--ref-logps-path")
    if stored is not None and stored["key"] == _describe(expected):
        task.reference, task.reference_key = stored["logps"].double(), expected
        if ps.rank == 0:
            session.printer(f"finetune_gpt.py: DPO reference log-probabilities from {path}")
        return
    if recorded is not None:
        found = "is missing" if stored is None else f"was made from {stored['key']}"
        raise DPOReferenceError(
            f"this DPO run resumes a checkpoint whose reference log-probabilities were made from {_describe(recorded)}, "
            f"but {path} {found}; they cannot be recomputed from the resumed (trained) policy: restore that file, "
            "give its --ref-logps-path, or start a new DPO run from the reference checkpoint (--finetune)")
    if stored is not None and not task.config.recompute_ref_logps:
        raise DPOReferenceError(
            f"{path} holds reference log-probabilities made from {stored['key']}, but this run's data and reference "
            f"checkpoint are {_describe(fresh)}: give --recompute-ref-logps to replace it, another --ref-logps-path, "
            "or the --data-path / --load it was made from")
    if ps.rank == 0:
        session.printer(f"finetune_gpt.py: computing the DPO reference log-probabilities with the loaded model "
                        f"({ps.describe()}) into {path}")
    with torch.random.fork_rng(devices=[]):  # a resumed run skips this pass: it must not move any RNG
        table = compute_reference(task, te, session.datasets, session.run.training.micro_batch_size)
    if ps.rank == 0:
        from megatron.fileio import torch_save_atomically

        torch_save_atomically({"format": FORMAT, "key": _describe(fresh), "logps": table}, path)
    if ps.world_size > 1:
        dist.barrier()
    task.reference, task.reference_key = table, fresh


def compute_reference(task, te, datasets, micro_batch_size: int) -> torch.Tensor:
    """[examples, 2] (chosen, rejected) log-probabilities of every pair the datasets hold (NaN for a pair none
    holds), forward only, with the engine's model; every dp rank takes its share of each dataset's items."""
    ps = te.ps
    task.recording = {}
    try:
        with torch.no_grad():
            for dataset in datasets:
                if dataset is None or len(dataset) == 0:
                    continue
                micro_batches = _micro_batches(dataset, task.collate, micro_batch_size, ps.dp_rank, ps.dp_size,
                                               _first_epoch(dataset))
                if te.is_pipeline:
                    gas = te.gradient_accumulation_steps
                    for start in range(0, len(micro_batches), gas):
                        chunk = micro_batches[start:start + gas]
                        te.engine.eval_batch(te._pipeline_batches(iter(chunk)), return_logits=False,
                                             compute_loss=True, reduce_output="avg", bcast_loss=False,
                                             num_micro_batches=len(chunk))
                else:
                    te.engine.eval()
                    for batch in task.trim(te, micro_batches):  # as the training steps cut them
                        x = te._inputs(batch)
                        task.micro_loss(te.engine(x.tokens, **x.model_kwargs()), x, batch, ps)
        recorded = task.recording
    finally:
        task.recording = None
        te.engine.train()
    holds = ps.tp_rank == 0 and (not te.is_pipeline or ps.is_pipeline_last_stage)
    mine = sorted(recorded.items()) if holds else []
    gathered = [mine]
    if ps.world_size > 1:
        gathered = [None] * ps.world_size
        dist.all_gather_object(gathered, mine)
    examples = 1 + max((pair for part in gathered for pair, _ in part), default=-1)
    if task.data is not None:
        examples = max(examples, task.data.num_examples)
    table = torch.full((examples, 2), math.nan, dtype=torch.float64)
    for part in gathered:
        for pair, (chosen, rejected) in part:
            table[pair, 0], table[pair, 1] = chosen, rejected
    return table


def _first_epoch(dataset) -> int:
    """Items that hold every pair of the dataset once: its first epoch (megatron/data/post_training.py's rows)."""
    rows = getattr(dataset, "rows", None)
    return min(len(dataset), rows.num_rows) if rows is not None else len(dataset)


def _micro_batches(dataset, collate, micro_batch_size: int, dp_rank: int, dp_size: int, total: int) -> list:
    """This dp rank's micro-batches covering items [0, total) of `dataset` (the last step wraps around to the
    start, so every rank runs the same number of forwards)."""
    per_step = micro_batch_size * dp_size
    batches = []
    for step in range(math.ceil(total / per_step)):
        first = step * per_step + dp_rank * micro_batch_size
        batches.append(collate([dataset[(first + j) % total] for j in range(micro_batch_size)]))
    return batches
