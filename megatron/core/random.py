"""Random-number streams for model parallelism, and activation recomputation that replays them.

Dropout on activations that are split over tensor-parallel ranks (attention probabilities of a
rank's heads, sequence-parallel shards) must differ between tp ranks; dropout on replicated
activations must match. Like Megatron's `model_parallel_cuda_manual_seed`, the default generator
is seeded from (seed, pp_rank) -- the same on every tp rank -- and a named "model-parallel" stream
from (seed, pp_rank, tp_rank); `tracker.fork()` swaps that stream in for a region. It works on
CPU (torch.get_rng_state) and on cuda/xpu (the device module's RNG state).
`checkpoint(fn, *args)` recomputes `fn` in backward with the same default *and* tracker streams,
so dropout masks are identical on recompute.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Callable, Optional

import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
TENSOR_PARALLEL_SEED_OFFSET = 2718  # Megatron's offset between the default and the tp stream
PIPELINE_SEED_STRIDE = 100  # Megatron's per-stage offset of the seed
DATA_PARALLEL_SEED_STRIDE = 10  # Megatron's per-dp-rank offset with --data-parallel-random-init


def derive_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for a named object (e.g. one parameter), independent of build order."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def _device_module(device_type: str):
    if device_type == "cpu":
        return None
    return getattr(torch, device_type)


def get_rng_state(device_type: str = "cpu") -> torch.Tensor:
    module = _device_module(device_type)
    return torch.get_rng_state() if module is None else module.get_rng_state()


def set_rng_state(state: torch.Tensor, device_type: str = "cpu") -> None:
    module = _device_module(device_type)
    if module is None:
        torch.set_rng_state(state)
    else:
        module.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states that `fork(name)` swaps in place of the default generator of a device."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states.clear()
        self.seeds.clear()

    def is_initialized(self, name: str = MODEL_PARALLEL_RNG) -> bool:
        return name in self.states

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"RNG seed {seed} is already used by another stream of this tracker")
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() before re-seeding")
        saved = get_rng_state(self.device_type)
        try:
            if self.device_type == "cpu":
                torch.manual_seed(seed)
            else:
                _device_module(self.device_type).manual_seed(seed)
            self.states[name] = get_rng_state(self.device_type)
        finally:
            set_rng_state(saved, self.device_type)
        self.seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with stream `name` as the device's default generator, then put it back."""
        if name not in self.states:
            raise RuntimeError(
                f"RNG stream {name!r} was never seeded; call megatron.core.random.seed_model_parallel_rng"
                "(seed, ps) once after building the ParallelState (before running dropout in parallel regions)"
            )
        saved = get_rng_state(self.device_type)
        set_rng_state(self.states[name], self.device_type)
        try:
            yield
        finally:
            self.states[name] = get_rng_state(self.device_type)
            set_rng_state(saved, self.device_type)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process's tracker (RNG state is per process, like torch's own generators)."""
    return _TRACKER


def seed_model_parallel_rng(seed: int, ps, device_type: str = "cpu", data_parallel_random_init: bool = False) -> None:
    """Seed the default generator from (seed, pp_rank) and the tp stream from (seed, pp_rank, tp_rank).

    Call once per process after the ParallelState exists; every tp rank of a stage then draws the
    same default stream (replicated dropout matches) and a different tp stream. Data-parallel replicas
    draw the same streams, unless `data_parallel_random_init` (upstream's --data-parallel-random-init):
    then the seed also moves by 10 per dp rank (upstream's _set_random_seed), so dropout differs between
    replicas. Weights do not come from these generators (each is drawn from its own derive_seed), so they
    stay identical on every dp rank, as upstream's broadcast from dp rank 0 leaves them.
    """
    stage_seed = int(seed) + PIPELINE_SEED_STRIDE * ps.pp_rank
    if data_parallel_random_init:
        stage_seed += DATA_PARALLEL_SEED_STRIDE * ps.dp_rank
    torch.manual_seed(stage_seed)  # also seeds every cuda/xpu device
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.device_type = device_type
    tracker.add(MODEL_PARALLEL_RNG, stage_seed + TENSOR_PARALLEL_SEED_OFFSET + ps.tp_rank)


def tensor_parallel_rng(tp_size: int, needed: bool = True):
    """Context for dropout on tp-split activations: the tracker's tp stream when tp > 1.

    With one tp rank there is nothing to decorrelate, so an unseeded tracker is allowed and the
    default generator is used; with tp > 1 an unseeded tracker is an error (see fork()).
    """
    tracker = get_rng_tracker()
    if not needed or (tp_size == 1 and not tracker.is_initialized()):
        return contextlib.nullcontext()
    return tracker.fork()


class _ReplayTrackerStates:
    """Forward: remember the tracker states. Recompute: restore them, then put the live ones back."""

    def __init__(self):
        self.snapshot: Optional[dict] = None

    def forward_context(self):
        self.snapshot = get_rng_tracker().get_states()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def recompute_context(self):
        tracker = get_rng_tracker()
        live = tracker.get_states()
        tracker.set_states(self.snapshot)
        try:
            yield
        finally:
            tracker.set_states(live)


def checkpoint(function: Callable, *args):
    """Activation checkpointing (non-reentrant) that replays default and tracker RNG streams.

    Usable as PipelineModule's `activation_checkpoint_func`.
    """
    replay = _ReplayTrackerStates()

    def contexts():
        return replay.forward_context(), replay.recompute_context()

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts
    )
