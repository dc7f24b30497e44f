"""Per-parameter fp32 master weights and Adam moments from DeepSpeed's optimizer files of one model-parallel rank.

DeepSpeed stores them flattened and split over data-parallel ranks: ZeRO-1/2 and the bf16 optimizer
(`[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`, with `param_slice_mappings` telling which slice
of each partition belongs to which parameter), ZeRO-3 (every parameter split evenly over dp,
`param_shapes` giving the order), and no ZeRO (a torch optimizer state dict inside
`mp_rank_MM_model_states.pt`, indexed in the order the engine built its parameter groups).
Files are memory-mapped, so a parameter costs only its own bytes when it is read.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Optional

import torch

from megatron import deepspeed_compat as compat
from megatron.checkpoint.layout import ConversionError
from megatron.fileio import with_retries

OPTIM_FILE = compat.OPTIM_STATES_FILE
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


# Files a reader opened with remember=True in this process (the model-states file a resume describes), so that
# DeepSpeed's own load of the same file on this rank (deepspeed_io.CheckpointIO.load) takes the object instead of
# reading the file a second time. Keyed by path; an entry whose file changed since (inode, size, mtime) is stale.
_REMEMBERED: dict[str, tuple[tuple, object]] = {}
_REMEMBER_AT_MOST = 4


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


_READ_LOG: list = [print]  # where a retried read is reported (read_log sets it for the length of a resume)


@contextlib.contextmanager
def read_log(log: Callable[[str], None]):
    """Report the retries of the reads inside (a transient EIO/ESTALE on a parallel filesystem) through `log`."""
    _READ_LOG.append(log)
    try:
        yield
    finally:
        _READ_LOG.pop()


def _torch_load(path: str):
    from megatron.checkpoint.unpickle import safe_load

    try:
        return safe_load(path, mmap=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing checkpoint file (was the checkpoint copied completely?)") from None
    except RuntimeError:  # written without the zip format: no mmap
        return safe_load(path)


def load_mmap(path: str, remember: bool = False):
    """torch.load of a checkpoint file through the restricted unpickler (unpickle.safe_load: only the classes the
    trainers we read store are built), memory-mapped (a tensor costs its bytes only when read), retried on a
    transient OS error (fileio.with_retries); remember=True keeps the object for `take_remembered` (one read per
    file per resume)."""
    full = os.path.abspath(path)
    if remember and full in _REMEMBERED:
        key, obj = _REMEMBERED[full]
        try:
            if key == _file_key(full):
                return obj
        except OSError:
            pass
        del _REMEMBERED[full]
    obj = with_retries(lambda: _torch_load(path), path, log=lambda line: _READ_LOG[-1](line))
    if remember:
        remember_loaded(full, obj)
    return obj


def remember_loaded(path: str, obj) -> None:
    """Keep `obj`, just read from `path`, for `take_remembered` and `load_mmap(remember=True)` (DeepSpeed's load
    of a model-states file, which a reader of the same resume reads too)."""
    full = os.path.abspath(path)
    _REMEMBERED.pop(full, None)
    while len(_REMEMBERED) >= _REMEMBER_AT_MOST:
        del _REMEMBERED[next(iter(_REMEMBERED))]
    try:
        _REMEMBERED[full] = (_file_key(full), obj)
    except OSError:
        pass


def take_remembered(path: str):
    """The object a reader already loaded from `path` (and still current); None otherwise. It stays remembered
    (a reader of the same resume may need it again after DeepSpeed's load) until `forget_remembered`."""
    entry = _REMEMBERED.get(os.path.abspath(path))
    if entry is None:
        return None
    try:
        return entry[1] if entry[0] == _file_key(path) else None
    except OSError:
        return None


def forget_remembered() -> None:
    """Drop what readers remembered (after a resume: the engine holds its own copies now)."""
    _REMEMBERED.clear()


def optim_files(tag_dir: str, mp_rank: int) -> list[str]:
    """This mp rank's optimizer files, ordered by dp rank; an error naming the missing ones."""
    found = {}
    for name in os.listdir(tag_dir):
        m = OPTIM_FILE.match(name)
        if m and int(m.group(3)) == mp_rank:
            found[int(m.group(2))] = os.path.join(tag_dir, name)
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ConversionError(f"{tag_dir}: optimizer files of dp ranks {missing} for mp rank {mp_rank} are missing")
    return [found[r] for r in sorted(found)]


def _flat_slice(pieces: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start+numel) of the virtual concatenation of flat `pieces`."""
    out, offset = [], 0
    for piece in pieces:
        n = piece.numel()
        lo, hi = max(start, offset), min(start + numel, offset + n)
        if lo < hi:
            out.append(piece.reshape(-1)[lo - offset:hi - offset])
        offset += n
    if sum(t.numel() for t in out) != numel:
        raise ConversionError(f"optimizer partition too short: wanted elements [{start}, {start + numel})")
    return torch.cat(out) if len(out) > 1 else out[0]


def _group_states(base_state) -> list[dict]:
    """The per-group state dicts of the base optimizer (elastic checkpoints store a list)."""
    if isinstance(base_state, list):
        return [s.get("state", s) if isinstance(s, dict) else {} for s in base_state]
    state = base_state["state"]
    return [state.get(i, {}) for i in range(len(base_state["param_groups"]))]


def _step_of(state: dict) -> Optional[int]:
    step = state.get("step")
    if step is None:
        return None
    return int(step.item() if torch.is_tensor(step) else step)


class OptimizerShards:
    """fp32 / exp_avg / exp_avg_sq of each parameter of one mp rank (tp-shard shapes), with local names
    translated by `rename(local_name) -> full name`."""

    def __init__(self, tag_dir: str, mp_rank: int, shapes: dict[str, tuple], rename: Callable[[str], str],
                 zero_stage: int, model_state: Optional[dict] = None, torch_param_order: Optional[list] = None):
        self.tag_dir, self.mp_rank, self.rename = tag_dir, mp_rank, rename
        self.shapes = {rename(k): tuple(v) for k, v in shapes.items()}
        self.step: Optional[int] = None
        self._locate: dict[str, Callable[[str], torch.Tensor]] = {}
        files = optim_files(tag_dir, mp_rank)
        if files and zero_stage == 3:
            self._index_zero3(files, model_state)
        elif files:
            self._index_sliced(files)
        elif model_state is not None and model_state.get("optimizer") is not None:
            self._index_torch(model_state["optimizer"], torch_param_order or [])
        self.available = bool(self._locate)

    def names(self) -> list[str]:
        return list(self._locate)

    def get(self, full_name: str, key: str) -> torch.Tensor:
        if key not in STATE_KEYS:
            raise ValueError(f"optimizer state key must be one of {STATE_KEYS}, got {key!r}")
        if full_name not in self._locate:
            raise ConversionError(f"{self.tag_dir}: mp rank {self.mp_rank} has no optimizer state for {full_name}")
        return self._locate[full_name](key)

    # ZeRO-1/2 and the bf16 optimizer: each dp rank's flat partition holds contiguous slices of parameters.
    def _index_sliced(self, files: list[str]) -> None:
        fragments: dict[str, list] = {}
        for path in files:
            osd = load_mmap(path)["optimizer_state_dict"]
            fp32_groups = osd["single_partition_of_fp32_groups"]
            states = _group_states(osd["base_optimizer_state"])
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                state = states[g] if g < len(states) else {}
                self.step = self.step if self.step is not None else _step_of(state)
                if self.step is None and "base_optimizer_state_step" in osd:
                    self.step = int(osd["base_optimizer_state_step"])
                for local_name, address in mapping.items():
                    pieces = {"fp32": fp32_groups[g], "exp_avg": state.get("exp_avg"),
                              "exp_avg_sq": state.get("exp_avg_sq")}
                    fragments.setdefault(self.rename(local_name), []).append((pieces, address.start, address.numel))
        for name, frags in fragments.items():
            self._locate[name] = self._sliced_getter(name, frags)

    def _sliced_getter(self, name, frags):
        def get(key):
            parts = []
            for pieces, start, numel in frags:
                if pieces[key] is None:
                    raise ConversionError(f"{self.tag_dir}: the optimizer holds no {key!r} (not Adam?)")
                parts.append(pieces[key].reshape(-1)[start:start + numel])
            return torch.cat(parts).view(self.shapes[name]).clone()

        return get

    # ZeRO-3: every parameter is split evenly over the dp ranks (the last part zero-padded).
    def _index_zero3(self, files: list[str], model_state: Optional[dict]) -> None:
        if model_state is None or not model_state.get("param_shapes"):
            raise ConversionError(f"{self.tag_dir}: ZeRO-3 model states of mp rank {self.mp_rank} lack param_shapes")
        world = len(files)
        per_rank = []
        for path in files:
            osd = load_mmap(path)["optimizer_state_dict"]
            states = _group_states(osd["optimizer_state_dict"])
            self.step = self.step if self.step is not None else (_step_of(states[0]) if states else None)
            per_rank.append({"fp32": list(osd["fp32_flat_groups"]),
                             "exp_avg": [s.get("exp_avg") for s in states],
                             "exp_avg_sq": [s.get("exp_avg_sq") for s in states]})
        offset = 0
        for group in model_state["param_shapes"]:
            for local_name, shape in group.items():
                numel = math.prod(shape)
                part = math.ceil(numel / world)
                self._locate[self.rename(local_name)] = self._zero3_getter(per_rank, offset, part, numel, tuple(shape))
                offset += part

    @staticmethod
    def _zero3_getter(per_rank, offset, part, numel, shape):
        def get(key):
            pieces = [_flat_slice(rank_state[key], offset, part) for rank_state in per_rank]
            return torch.cat(pieces)[:numel].view(shape).clone()

        return get

    # No ZeRO: a torch optimizer state dict, parameters numbered in the engine's param-group order.
    def _index_torch(self, optimizer_state: dict, param_order: list[str]) -> None:
        indices = [i for group in optimizer_state["param_groups"] for i in group["params"]]
        if len(indices) != len(param_order):
            raise ConversionError(
                f"{self.tag_dir}: mp rank {self.mp_rank}'s optimizer has {len(indices)} parameters but the model "
                f"has {len(param_order)}; the checkpoint's optimizer grouping is not the one this tool knows")
        for index, local_name in zip(indices, param_order):
            state = optimizer_state["state"].get(index, {})
            self.step = self.step if self.step is not None else _step_of(state)
            self._locate[self.rename(local_name)] = self._torch_getter(state, self.rename(local_name))

    def _torch_getter(self, state, name):
        def get(key):
            if key == "fp32":
                raise ConversionError(f"{self.tag_dir}: without ZeRO the fp32 weights are the module weights")
            if key not in state:
                raise ConversionError(f"{self.tag_dir}: no {key!r} optimizer state for {name} (not Adam, or no step "
                                      "taken yet)")
            return state[key].view(self.shapes[name]).clone()

        return get


def torch_optimizer_param_order(names_in_param_order: list[str], shapes: dict[str, tuple]) -> list[str]:
    """The engine's optimizer order (training/engine.optimizer_param_groups): params with >= 2 dims (weight
    decay) first, then the rest, each in module order."""
    decay = [n for n in names_in_param_order if len(shapes[n]) >= 2]
    no_decay = [n for n in names_in_param_order if len(shapes[n]) < 2]
    return decay + no_decay
