"""The whole-matrix optimizers' state (muon, muonclip, dshampooadamw, galoreadamw, adam8bit; megatron/optimizer/
full_matrix.py, format full_matrix/2) at any layout: read per parameter from a checkpoint, kept in one layout-free
form, and cut for a rank of another tp × pp × dp (reshard.py, universal.py, convert/to_universal.py).

What a checkpoint holds. Each tp × pp rank's model-states file carries the optimizer's state dict: every
parameter of that stage numbered by its place in the optimizer's param groups (weights first, then norms and
biases, each in module order: `DeepSpeedCheckpoint.model_states`), its inner optimizer's state and, under bf16 /
fp16, its fp32 master. The inner optimizer saw one of two tensors:
  - gathered ("matrix" kind and split over tp: Muon's, Shampoo's, GaLore's hidden matrices, every tp-split tensor
    of adam8bit): the single-rank tensor, identical on every tp rank. Its state is the single-rank optimizer's,
    whatever its form (Muon's momentum, Shampoo's preconditioner objects, GaLore's projector and low-rank moments,
    8-bit codes and per-block absmax), so it is tp-independent: taken from tp rank 0 and moved as it is.
  - as it is (everything else): a replicated tensor (its state is the single-rank one, again), or a tp shard of a
    norm-free tensor the elementwise AdamW steps (the embedding and output layer of muon and the others, the qkv
    bias). AdamW's state is elementwise (exp_avg, exp_avg_sq of the shard's shape) plus a step, so the shards'
    states are merged like the weight (`merge_shards` with the layout's segments) and are then the single-rank
    state. A shard's state that is not of the shard's shape cannot be merged; it is refused, naming the key.
The layout-free form (`ParameterState`) is each parameter's state of the single-rank tensor with the vocabulary
padding rows removed, and its fp32 master (the checkpoint's master, or the weight itself in fp32), full and
unpadded. Cutting it for a rank re-pads the vocabulary rows for the new tp (new padding rows: zero state, zero
master) and keeps the rank's shard of what its optimizer steps as a shard.

Vocabulary padding of 8-bit state. adam8bit gathers the embedding and output layer whole, padding rows included
(padded_vocab_size(tp) rows), and bitsandbytes quantises its moments in blocks of 256 consecutive elements of the
flat tensor, each block with its own absmax. The real rows come first, so the blocks that hold real elements are
the same blocks, holding the same elements, at every padding; padding rows never get a gradient, so their moments
are 0. Trimming keeps the codes of the blocks that hold real elements (and their absmax); re-padding appends
code 0 with absmax 0 for blocks of padding only (what bitsandbytes holds there: 0 · anything) and the code of 0 for
padding elements inside the last live block. The real elements' codes and every block's absmax are unchanged bit
for bit, so the dequantised state is exact; a dropped element that does not dequantise to 0 (padding rows trained
by --loss-over-padded-vocab) is refused. bitsandbytes keeps tensors under 4,096 elements in 32 bits: a padded
tensor that crosses that size between the two layouts would need its state quantised (or dequantised), which is
not exact, and is refused naming the layouts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.checkpoint.layout import ConversionError, expected_shapes, layer_prefixes, strip_vocab_padding
from megatron.checkpoint.unpickle import safe_load
from megatron.config.model import TransformerConfig
from megatron.core.layers import merge_shards, shard_tensor
from megatron.model.sharding import partition_of, repad_vocab

FORMAT = "full_matrix/2"  # FullMatrixOptimizer.state_dict's marker
EIGHT_BIT_BLOCK = 256  # bitsandbytes' blockwise quantisation block (Optimizer2State.init_state, 0.50)
EIGHT_BIT_MIN_SIZE = 4096  # bitsandbytes' default min_8bit_size: smaller tensors keep 32-bit state
EIGHT_BIT_CODES = (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2"))
# bitsandbytes' state_dict nests each parameter's state1/state2 (and 8-bit codes' qmap/absmax) under this key
BNB_NESTED = "__bnb_optimizer_quant_state__"


@dataclass
class ParameterState:
    """One parameter's optimizer state in the layout-free form (module docstring)."""

    kind: Optional[str]  # "matrix" / "other": the inner optimizer that steps it; None: no state yet (no step taken)
    state: dict  # the inner optimizer's state of the single-rank tensor, vocabulary padding rows removed
    elementwise: tuple = ()  # keys of `state` that are tensors of the parameter's (unpadded) shape
    eight_bit_elements: Optional[int] = None  # 8-bit vocabulary state: the elements its codes were trimmed to
    nested: tuple = ()  # keys the inner optimizer's state_dict keeps under BNB_NESTED (flattened here)


# ---- our checkpoints -----------------------------------------------------------------------------------------

class SavedFullMatrixState:
    """The full_matrix/2 state of one of our checkpoints (DeepSpeedCheckpoint), per parameter name."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._ranks: dict[tuple[int, int], tuple[dict, dict, dict]] = {}

    def _rank(self, tp_rank: int, stage: int):
        """(optimizer state dict, {full name: state number}, {full name: local shape}) of one tp × pp rank."""
        key = (tp_rank, stage)
        if key not in self._ranks:
            model_state, order = self.ckpt.model_states(tp_rank, stage)
            osd = model_state.get("optimizer")
            if not isinstance(osd, dict) or osd.get("format") != FORMAT:
                raise ConversionError(
                    f"{self.ckpt.tag_dir}: the optimizer state of tp rank {tp_rank}, pipeline stage {stage} is not a "
                    f"whole-matrix optimizer's ({FORMAT}, megatron/optimizer/full_matrix.py); resume it at its own "
                    "layout, or pass --no-load-optim")
            self._ranks[key] = (osd, {name: i for i, (name, _) in enumerate(order)}, dict(order))
        return self._ranks[key]

    def _entries(self, name: str):
        """(partition, split, [(inner entry, master, local shape) per tp rank needed])."""
        ckpt = self.ckpt
        part = partition_of(name, ckpt.config)
        split = part.dim is not None and ckpt.tp > 1
        stage = ckpt.stage_of(name)
        entries = []
        for t in range(ckpt.tp if split else 1):
            osd, numbers, local = self._rank(t, stage)
            if name not in numbers:
                raise ConversionError(f"{ckpt.tag_dir}: tp rank {t}, stage {stage} holds no parameter {name}")
            number = numbers[name]
            entry = osd["state"].get(number)
            if entry is not None:
                entry = (entry[0], _flatten(entry[1])[0])
            entries.append((entry, (osd.get("masters") or {}).get(number), local[name]))
        return part, split, entries

    def _trim(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return strip_vocab_padding(name, tensor, self.ckpt.config, self.ckpt.description,
                                   self.ckpt.keep_vocab_padding)

    def master(self, name: str) -> torch.Tensor:
        """The fp32 master of `name`, full and unpadded (the weight itself when the run kept no masters)."""
        part, split, entries = self._entries(name)
        masters = [master for _, master, _ in entries]
        if masters[0] is None:
            return self.ckpt.full_optimizer_tensor(name, "fp32").float()
        local = entries[0][2]
        if split and tuple(masters[0].shape) == tuple(local):  # shards: the optimizer stepped them as they are
            if any(m is None for m in masters):
                raise ConversionError(f"{self.ckpt.tag_dir}: some tp ranks hold no fp32 master of {name}")
            full = merge_shards(masters, part.dim, part.segments)
        else:
            full = masters[0]
        return self._trim(name, full.float())

    def parameter_state(self, name: str) -> ParameterState:
        ckpt = self.ckpt
        part, split, entries = self._entries(name)
        first = entries[0][0]
        if first is None:
            return ParameterState(kind=None, state={})
        kind, inner = first
        nested = _flatten(self._raw_state(name))[1]
        local = tuple(entries[0][2])
        gathered = split and kind == "matrix"
        shard = split and not gathered
        shape = _whole_shape(local, part.dim, ckpt.tp) if gathered else local  # what the inner optimizer saw
        state, elementwise, eight_bit = {}, [], None
        quantised = _is_eight_bit(inner)  # 8-bit codes are not values: they move with their blocks' absmax
        for key, value in inner.items():
            if quantised and key in ("state1", "state2", "absmax1", "absmax2"):
                if shard:  # a shard's blocks are not the single-rank tensor's (full_matrix.py gathers them)
                    raise ConversionError(f"{ckpt.tag_dir}: {name} holds 8-bit optimizer state of its tp shard "
                                          f"{local}, which cannot be merged exactly; resume at tp {ckpt.tp}, or pass "
                                          "--no-load-optim")
                state[key] = value
                continue
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == shape:
                if shard:
                    parts = []
                    for t, (entry, _, _) in enumerate(entries):
                        if entry is None or entry[0] != kind or key not in entry[1]:
                            raise ConversionError(f"{ckpt.tag_dir}: tp rank {t} holds no optimizer state "
                                                  f"{key!r} for {name}, rank 0 does")
                        parts.append(entry[1][key])
                    value = merge_shards(parts, part.dim, part.segments)
                state[key] = self._trim(name, value) if part.vocab else value
                elementwise.append(key)
            elif shard and (_holds_tensor(value) and not (torch.is_tensor(value) and value.dim() == 0)):
                what = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
                raise ConversionError(
                    f"{ckpt.tag_dir}: the optimizer state {key!r} of {name} ({what} on each of its tp {ckpt.tp} "
                    f"shards of shape {local}) is not elementwise, so the shards' states cannot be merged into the "
                    f"single-rank one; resume at tp {ckpt.tp}, or pass --no-load-optim")
            else:
                state[key] = value
        if quantised and part.vocab:
            rows = ckpt.config.vocab_size if not ckpt.keep_vocab_padding else shape[0]
            eight_bit = rows * math.prod(shape[1:])
            for codes, absmax, qmap in EIGHT_BIT_CODES:
                state[codes], state[absmax] = _trim_codes(inner[codes], inner[absmax], inner[qmap], eight_bit,
                                                          f"{ckpt.tag_dir}: {name} {codes!r}")
        return ParameterState(kind=kind, state=state, elementwise=tuple(elementwise), eight_bit_elements=eight_bit,
                              nested=nested)

    def _raw_state(self, name: str) -> dict:
        osd, numbers, _ = self._rank(0, self.ckpt.stage_of(name))
        return osd["state"][numbers[name]][1]

    def groups(self) -> tuple[dict, dict]:
        """({wd_mult: outer group settings}, {(wd_mult, kind): inner group settings}) over every stage."""
        outer, inner = {}, {}
        for stage in range(self.ckpt.pp):
            osd = self._rank(0, stage)[0]
            mults = [_group_key(g, i) for i, g in enumerate(osd["param_groups"])]
            for mult, group in zip(mults, osd["param_groups"]):
                outer.setdefault(mult, group)
            for (index, kind), settings in osd["inner_groups"].items():
                inner.setdefault((mults[index], kind), settings)
        return outer, inner


def _group_key(group: dict, index: int):
    """Which of the optimizer's param groups this is, the same at any layout (optimizer_param_groups: wd_mult)."""
    return group.get("wd_mult", index)


def _whole_shape(local: tuple, dim: Optional[int], tp: int) -> tuple:
    shape = list(local)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def _flatten(inner: dict) -> tuple[dict, tuple]:
    """(the inner state with BNB_NESTED's entries lifted to the top, the lifted keys)."""
    if BNB_NESTED not in inner:
        return dict(inner), ()
    flat = {k: v for k, v in inner.items() if k != BNB_NESTED}
    nested = inner[BNB_NESTED]
    clash = set(flat) & set(nested)
    if clash:
        raise ConversionError(f"optimizer state keys {sorted(clash)} appear both in and outside {BNB_NESTED}")
    flat.update(nested)
    return flat, tuple(nested)


def _unflatten(flat: dict, nested: tuple) -> dict:
    if not nested:
        return flat
    out = {k: v for k, v in flat.items() if k not in nested}
    out[BNB_NESTED] = {k: flat[k] for k in nested}
    return out


def _holds_tensor(value) -> bool:
    if torch.is_tensor(value):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _is_eight_bit(inner: dict) -> bool:
    return torch.is_tensor(inner.get("state1")) and inner["state1"].dtype == torch.uint8 and "absmax1" in inner


def _zero_code(qmap: torch.Tensor) -> int:
    return int(qmap.abs().argmin())


def _trim_codes(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, elements: int, what: str):
    """(flat codes of the blocks holding the first `elements` elements, their absmax); refused when a dropped
    element does not dequantise to 0."""
    flat = codes.reshape(-1)
    blocks = -(-elements // EIGHT_BIT_BLOCK)
    keep = min(flat.numel(), blocks * EIGHT_BIT_BLOCK)
    if flat.numel() > keep:
        scales = absmax.repeat_interleave(EIGHT_BIT_BLOCK)[keep:flat.numel()]
        if bool((qmap[flat[keep:].long()] * scales).ne(0).any()):
            raise ConversionError(
                f"{what}: the vocabulary padding rows hold 8-bit optimizer state (trained with "
                "--loss-over-padded-vocab), which another padding cannot carry exactly; resume at the checkpoint's "
                "tensor-parallel size, or pass --no-load-optim")
    return flat[:keep].clone(), absmax[:blocks].clone()


def _pad_codes(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, elements: int, shape: tuple):
    """Inverse of _trim_codes for a tensor of `shape`: code 0 / absmax 0 in blocks of padding only, the code of 0
    for padding inside the last live block."""
    numel = math.prod(shape)
    blocks = -(-numel // EIGHT_BIT_BLOCK)
    out = torch.zeros(numel, dtype=codes.dtype)
    keep = min(codes.numel(), numel)
    out[:keep] = codes[:keep]
    live_end = min(numel, absmax.numel() * EIGHT_BIT_BLOCK)
    if live_end > keep:
        out[keep:live_end] = _zero_code(qmap)
    scales = torch.zeros(blocks, dtype=absmax.dtype)
    scales[:absmax.numel()] = absmax
    return out.view(shape), scales


# ---- cutting the layout-free form for one rank ---------------------------------------------------------------

def cut_for_rank(pstate: ParameterState, name: str, config: TransformerConfig, tp: int, tp_rank: int, whole: bool,
                 min_8bit_size: int = EIGHT_BIT_MIN_SIZE) -> dict:
    """The inner optimizer state of `name` on tp rank `tp_rank` of `tp` (whole: its optimizer steps the
    single-rank tensor; else this rank's tensor as it is)."""
    part = partition_of(name, config)
    state = dict(pstate.state)
    for key in pstate.elementwise:
        state[key] = cut_tensor(state[key], name, config, tp, tp_rank, whole)
    numel = math.prod(_target_shape(name, config, tp, whole, pstate))
    if part.vocab and "state1" in state and "step" in state:  # bitsandbytes: 8 or 32 bits by the tensor's size
        eight_bit_here = numel >= min_8bit_size
        if eight_bit_here != (pstate.eight_bit_elements is not None):
            have = "8-bit" if pstate.eight_bit_elements is not None else "32-bit"
            raise ConversionError(
                f"{name}: its optimizer state is {have} (bitsandbytes keeps tensors under {min_8bit_size} elements "
                f"in 32 bits), but at tp {tp} the padded tensor has {numel} elements and would hold "
                f"{'8' if eight_bit_here else '32'}-bit state; converting between them is not exact. Resume at a "
                "tensor-parallel size whose padded vocabulary stays on the same side of that size (or another "
                "--make-vocab-size-divisible-by), or pass --no-load-optim")
    if pstate.eight_bit_elements is not None:
        shape = _target_shape(name, config, tp, whole, pstate)
        for codes, absmax, qmap in EIGHT_BIT_CODES:
            state[codes], state[absmax] = _pad_codes(state[codes], state[absmax], state[qmap],
                                                     pstate.eight_bit_elements, shape)
    return _unflatten(state, pstate.nested)


def _target_shape(name: str, config: TransformerConfig, tp: int, whole: bool, pstate: ParameterState) -> tuple:
    """The shape of the tensor the inner optimizer steps for `name` at tp (whole or this rank's shard)."""
    prefix = next(p for p in layer_prefixes(config) if name in expected_shapes(config, p))
    shape = list(expected_shapes(config, prefix)[name])
    part = partition_of(name, config)
    if part.vocab:
        shape[0] = config.padded_vocab_size(tp)
    if part.dim is not None and tp > 1 and not whole:
        shape[part.dim] //= tp
    return tuple(shape)


def cut_tensor(full: torch.Tensor, name: str, config: TransformerConfig, tp: int, tp_rank: int,
               whole: bool) -> torch.Tensor:
    """A full, unpadded tensor of `name`'s shape as rank `tp_rank` of `tp` holds it: the vocabulary re-padded for
    tp, then whole or this rank's shard."""
    part = partition_of(name, config)
    if part.vocab:
        full = repad_vocab(name, full, config, tp)
    if part.dim is None or tp == 1 or whole:
        return full.clone()
    return shard_tensor(full, part.dim, tp, tp_rank, part.segments)


# ---- universal folders --------------------------------------------------------------------------------------
#
# convert/to_universal.py writes a whole-matrix optimizer's checkpoint as a universal folder (DeepSpeed's
# ds_to_universal cannot: it reads ZeRO's flat optimizer files, which these runs, on DeepSpeed's stage 0, do not
# write). Per parameter, zero/<GPTModel name>/ holds, in DeepSpeed's file format ({"param": full tensor}, the
# vocabulary unpadded):
#     fp32.pt                 the fp32 master
#     <key>.pt                every inner state entry that is a tensor of the parameter's shape, under its own
#                             key: exp_avg.pt, exp_avg_sq.pt (AdamW), momentum_buffer.pt (Muon), momentum.pt
#                             (Shampoo), state1.pt / state2.pt (adam8bit's 32-bit state of tensors under 4,096
#                             elements; 8-bit codes are not values and stay in full_matrix.state)
#     full_matrix.state       everything else of the inner state (torch.save of UNIVERSAL_PARAMETER_FORMAT: kind,
#                             the non-elementwise entries as the inner optimizer holds them, the elementwise keys,
#                             the 8-bit trim), e.g. Shampoo's preconditioner and graft objects, GaLore's projector
#                             and low-rank moments, 8-bit codes with their absmax and quantisation maps, steps
# and zero/full_matrix.state the optimizer's name and its outer and inner param-group settings
# (UNIVERSAL_FOLDER_FORMAT). The `.state` names do not match DeepSpeed's `(.+).pt`, so its universal loader never
# opens them; it would read fp32.pt and every <key>.pt as optimizer state of that name.

UNIVERSAL_STATE_FILE = "full_matrix.state"
UNIVERSAL_PARAMETER_FORMAT = "full_matrix_universal_parameter/1"
UNIVERSAL_FOLDER_FORMAT = "full_matrix_universal/1"


def write_universal_parameter(folder: str, pstate: ParameterState, master: torch.Tensor, vocab: bool) -> None:
    """One parameter's folder zero/<name>/ (the layout above) inside a folder that is published when complete."""
    from deepspeed.checkpoint.constants import PARAM, VOCAB_TENSOR

    os.makedirs(folder, exist_ok=True)

    def tensor_file(key: str, tensor: torch.Tensor) -> None:
        entry = {PARAM: tensor.contiguous()}
        if vocab:
            entry[VOCAB_TENSOR] = True
        torch.save(entry, os.path.join(folder, f"{key}.pt"))

    tensor_file("fp32", master.float())
    for key in pstate.elementwise:
        tensor_file(key, pstate.state[key])
    rest = {k: v for k, v in pstate.state.items() if k not in pstate.elementwise}
    torch.save({"format": UNIVERSAL_PARAMETER_FORMAT, "kind": pstate.kind, "state": rest,
                "elementwise": list(pstate.elementwise), "eight_bit_elements": pstate.eight_bit_elements,
                "nested": list(pstate.nested)},
               os.path.join(folder, UNIVERSAL_STATE_FILE))


class UniversalFullMatrixState:
    """The whole-matrix optimizer state of a universal folder written by convert/to_universal.py."""

    def __init__(self, universal):
        self.universal = universal
        path = os.path.join(universal.zero_dir, UNIVERSAL_STATE_FILE)
        folder = safe_load(path)
        if folder.get("format") != UNIVERSAL_FOLDER_FORMAT:
            raise ConversionError(f"{path}: not a {UNIVERSAL_FOLDER_FORMAT} file")
        self.optimizer = folder["optimizer"]
        self._outer, self._inner = folder["param_groups"], folder["inner_groups"]

    def master(self, name: str) -> torch.Tensor:
        return self.universal.full_optimizer_tensor(name, "fp32").float()

    def parameter_state(self, name: str) -> ParameterState:
        folder = self.universal.folder_of(name)
        path = os.path.join(folder, UNIVERSAL_STATE_FILE)
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is missing: the universal folder holds no whole-matrix optimizer state "
                                  f"for {name}; was the conversion complete?")
        saved = safe_load(path)
        if saved.get("format") != UNIVERSAL_PARAMETER_FORMAT:
            raise ConversionError(f"{path}: not a {UNIVERSAL_PARAMETER_FORMAT} file")
        state = dict(saved["state"])
        for key in saved["elementwise"]:
            state[key] = safe_load(os.path.join(folder, f"{key}.pt"))["param"]
        return ParameterState(kind=saved["kind"], state=state, elementwise=tuple(saved["elementwise"]),
                              eight_bit_elements=saved["eight_bit_elements"], nested=tuple(saved["nested"]))

    def groups(self) -> tuple[dict, dict]:
        return self._outer, self._inner


def write_universal_folder_state(zero_dir: str, optimizer: str, groups: tuple[dict, dict]) -> None:
    outer, inner = groups
    torch.save({"format": UNIVERSAL_FOLDER_FORMAT, "optimizer": optimizer, "param_groups": outer,
                "inner_groups": inner}, os.path.join(zero_dir, UNIVERSAL_STATE_FILE))


def state_source(ckpt):
    """The full_matrix/2 state of an opened checkpoint (ours, or a universal folder written by
    convert/to_universal.py), per parameter; an error naming what holds none."""
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint

    if isinstance(ckpt, DeepSpeedCheckpoint):
        return SavedFullMatrixState(ckpt)
    reader = getattr(ckpt, "full_matrix_state", None)
    if reader is not None:
        return reader()
    raise ConversionError(f"{ckpt.description} holds no whole-matrix optimizer state ({FORMAT}); pass "
                          "--no-load-optim to start the optimizer fresh")


# ---- loading into an engine's FullMatrixOptimizer ------------------------------------------------------------

def load_full_matrix_state(optimizer, names: dict, source, config: TransformerConfig, tp: int, tp_rank: int,
                           masters_read: Optional[dict] = None) -> None:
    """Give `optimizer` (a FullMatrixOptimizer of this rank) the state `source` holds (SavedFullMatrixState or a
    universal folder's), each parameter found by its full name (`names`: id(param) -> GPTModel name;
    `masters_read`: full masters the caller already read from `source`, by name)."""
    masters_read = masters_read or {}
    min_8bit = getattr(getattr(getattr(optimizer, "matrix", None), "args", None), "min_8bit_size",
                       EIGHT_BIT_MIN_SIZE)
    state, masters = {}, {}
    for number, param, kind, whole in optimizer.owned_layout():
        name = names[id(param)]
        pstate = source.parameter_state(name)
        if pstate.kind is not None:
            if pstate.kind != kind:
                raise ConversionError(f"{name}: the checkpoint's optimizer stepped it as {pstate.kind!r}, this run's "
                                      f"as {kind!r}: another --optimizer's state")
            state[number] = (kind, cut_for_rank(pstate, name, config, tp, tp_rank, whole, min_8bit))
        full = masters_read[name] if name in masters_read else source.master(name)
        masters[number] = cut_tensor(full, name, config, tp, tp_rank, whole)
    outer, inner = source.groups()
    param_groups, inner_groups = [], {}
    for index, group in enumerate(optimizer.param_groups):
        key = _group_key(group, index)
        if key not in outer:
            raise ConversionError(f"the checkpoint's optimizer has no parameter group like this run's group {index} "
                                  f"(wd_mult {key})")
        param_groups.append({k: v for k, v in outer[key].items() if k != "params"})
        for kind in ("matrix", "other"):
            if (key, kind) in inner:
                inner_groups[(index, kind)] = inner[(key, kind)]
    optimizer.load_state_dict({"format": FORMAT, "state": state, "inner_groups": inner_groups, "masters": masters,
                               "param_groups": param_groups})
