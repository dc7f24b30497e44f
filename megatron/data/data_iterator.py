"""Feeds a data-parallel rank its micro-batches: the global sample stream sliced by dp rank, resumable.

Micro-step i covers the global samples [c + i*mbs*dp, c + (i+1)*mbs*dp) after c = consumed_samples,
and dp rank r takes the slice [r*mbs, (r+1)*mbs) of it. The union over ranks is the same global
stream for every dp size, so a run restarted from `consumed_samples` with another dp size continues it.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import weakref
from typing import Iterator, Optional

import numpy as np
import torch


class DataParallelBatchSampler:
    """Global-sample numbers for one dp rank, one micro-batch at a time (a torch batch_sampler)."""

    def __init__(self, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got micro_batch_size="
                             f"{micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is past the dataset's {total_samples} samples; "
                             "the run has used all its data (raise --train-samples / --train-iters)")
        self.total_samples = int(total_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.consumed_samples = int(consumed_samples)

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.samples_per_step
            yield list(range(start, start + self.micro_batch_size))


def _fetch(dataset, indices: list[int]) -> list[dict]:
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return [dataset[i] for i in indices]


def collate_tokens(samples: list[dict]) -> dict:
    """[{"tokens": array [seq+1]}, ...] -> {"tokens": LongTensor [mbs, seq+1]}."""
    return {"tokens": torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))}


def _ignore_job_signals(_worker_id: int) -> None:
    """In a DataLoader worker: ignore what a batch system or launcher sends to the whole job (torch's worker
    set-up makes SIGTERM fatal). The rank decides (--exit-signal-handler saves first) and shuts its workers
    down; a worker whose rank died exits by itself (torch's worker loop watches its parent)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with workers, for _stop_workers
_STOP_AT_EXIT: list = []


def _stop_workers() -> None:
    """At exit: shut the workers down (torch's own shutdown), then SIGKILL any left. They ignore SIGTERM, so
    the terminate() that torch and multiprocessing fall back to at exit could not end them."""
    for it in list(_LIVE_ITERATORS):
        with contextlib.suppress(Exception):
            it._shutdown_workers()
        for worker in getattr(it, "_workers", []):
            if worker.is_alive():
                worker.kill()


def build_data_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int,
                        num_workers: int = 0, multiprocessing_context: Optional[str] = None,
                        collate_fn=collate_tokens) -> Iterator[dict]:
    """Micro-batches {"tokens": LongTensor [micro_batch_size, seq+1]} for this dp rank, from consumed_samples.

    num_workers=0 reads in this process (a plain generator); > 0 uses a torch DataLoader with that many
    worker processes and the same batch sampler, so the samples are identical either way.
    multiprocessing_context (--multiprocessing-context): how those workers start, "fork" (upstream's default),
    "spawn" or "forkserver" (the dataset and worker_init_fn are pickled to them; both are module-level).
    collate_fn: how a list of items becomes a micro-batch (post-training: megatron.data.post_training.collate;
    a module-level function, so that spawned workers can unpickle it).
    Returns None when dataset is None (a split without data).
    """
    if dataset is None:
        return None
    sampler = DataParallelBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples)
    if hasattr(dataset, "prepare"):  # what the dataset computes once for a resume, before workers fork
        dataset.prepare(consumed_samples)
    if num_workers and num_workers > 0:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=collate_fn, pin_memory=False,
                                             persistent_workers=False, worker_init_fn=_ignore_job_signals,
                                             multiprocessing_context=multiprocessing_context)
        batches = iter(loader)
        if not _STOP_AT_EXIT:  # registered after multiprocessing's exit handler, so it runs before it
            atexit.register(_stop_workers)
            _STOP_AT_EXIT.append(True)
        _LIVE_ITERATORS.add(batches)
        return batches
    return (collate_fn(_fetch(dataset, indices)) for indices in sampler)
