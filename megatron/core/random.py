"""Random-number streams for model parallelism, and activation recomputation that replays them.

Dropout on activations that are split over tensor-parallel ranks (attention probabilities of a
rank's heads, sequence-parallel shards) must differ between tp ranks; dropout on replicated
activations must match. Like Megatron's `model_parallel_cuda_manual_seed`, the default generator
is seeded from (seed, pp_rank) -- the same on every tp rank -- and a named "model-parallel" stream
from (seed, pp_rank, tp_rank); `tracker.fork()` swaps that stream in for a region. It works on
CPU (torch.get_rng_state) and on cuda/xpu (the device module's RNG state).
`checkpoint(fn, *args)` recomputes `fn` in backward with the same default *and* tracker streams,
so dropout masks are identical on recompute.

`activation_checkpoint_function(cpu, partition_group)` is the recompute function of upstream's
--checkpoint-in-cpu and --partition-activations: the input kept for each recomputed chunk (its first argument,
the hidden states; the rest -- positions, RoPE tables, masks -- are shared by every chunk and kept once) is
copied to the CPU, and/or cut to this rank's 1/n of its flattened elements (the hidden states entering a
layer are replicated over tp, so the n tp ranks together keep one copy and all-gather it for backward).
Upstream hands these options to deepspeed.checkpointing.configure and recomputes with DeepSpeed's
CheckpointFunction. Ours is its own reentrant Function, for three reasons: DeepSpeed's replays only its own
RNG tracker (the tp dropout streams here live in this module's tracker, so recomputed dropout masks would
differ), it partitions every floating argument (our RoPE tables, once per chunk) and asserts that each divides
by tp (ours pads), and it is configured through module globals rather than per model. Backward all-gathers the
slices (or copies the input back to the device), recomputes the chunk with the forward's RNG states, and
back-propagates through it, as DeepSpeed's and Megatron's reentrant checkpoints do.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from megatron.core import mappings

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


# ---- recomputation with the kept input on the CPU and/or split over ranks ----------------------------------
class _RNGSnapshot:
    """The CPU, device and tracker RNG states at one point, to run a block again from that point."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.cpu = torch.get_rng_state()
        self.device = None if device_type == "cpu" else get_rng_state(device_type)
        self.tracker = get_rng_tracker().get_states()

    @contextlib.contextmanager
    def restored(self):
        live = _RNGSnapshot(self.device_type)
        self._apply()
        try:
            yield
        finally:
            live._apply()

    def _apply(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            set_rng_state(self.device, self.device_type)
        get_rng_tracker().set_states(self.tracker)


class _InputStash:
    """How a recomputed chunk's input is kept between forward and backward."""

    def __init__(self, cpu: bool, group):
        self.cpu, self.group = cpu, group
        self.parts = mappings.group_size(group)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts > 1:  # this rank's 1/parts of the flattened elements (zero-padded to a multiple)
            flat = x.reshape(-1)
            per = math.ceil(flat.numel() / self.parts)
            flat = F.pad(flat, (0, per * self.parts - flat.numel()))
            x = flat[mappings.group_rank(self.group) * per:][:per].clone()
        if self.cpu and x.device.type != "cpu":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            x = host.copy_(x, non_blocking=True)  # the copy back to the device runs after it, on the same stream
        return x

    def unpack(self, x: torch.Tensor, shape, device) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if self.parts > 1:
            parts = [torch.empty_like(x) for _ in range(self.parts)]
            dist.all_gather(parts, x, group=self.group)
            x = torch.cat(parts)[:math.prod(shape)].view(shape)
        return x


class _StashedInputCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, stash, _anchor, first, *rest):
        ctx.run, ctx.stash = run, stash
        ctx.rng = _RNGSnapshot(first.device.type)
        with torch.no_grad():
            outputs = run(first, *rest)
        ctx.first = (stash.pack(first.detach()), first.shape, first.device, first.requires_grad)
        ctx.save_for_backward(*rest)
        outs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        ctx.mark_non_differentiable(*[o for o in outs if torch.is_tensor(o) and not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        kept, shape, device, requires_grad = ctx.first
        first = ctx.stash.unpack(kept, shape, device).detach().requires_grad_(requires_grad)
        rest = [t.detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in ctx.saved_tensors]
        with torch.enable_grad(), ctx.rng.restored():
            outputs = ctx.run(first, *rest)
        outs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        inputs = [first, *rest]
        return (None, None, None, *[t.grad if torch.is_tensor(t) and t.requires_grad else None for t in inputs])


# Makes every recomputed chunk's output require grad, so its backward (which also yields the parameters' grads)
# runs even when no input needs a gradient.
_ANCHOR = torch.empty(0, requires_grad=True)


def activation_checkpoint_function(cpu: bool = False, partition_group=None) -> Callable:
    """The recompute function `f(function, *args)` for upstream's --checkpoint-in-cpu (cpu) and
    --partition-activations (partition_group: the tp group); `checkpoint` itself when neither applies."""
    if not cpu and mappings.group_size(partition_group) <= 1:
        return checkpoint
    stash = _InputStash(cpu, partition_group)

    def checkpoint_stashed(function: Callable, *args):
        if not args or not torch.is_tensor(args[0]):
            raise TypeError("activation checkpointing with --checkpoint-in-cpu/--partition-activations needs the "
                            "hidden states as the first argument of the recomputed function")
        return _StashedInputCheckpoint.apply(function, stash, _ANCHOR, *args)

    return checkpoint_stashed
