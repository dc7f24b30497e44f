"""Run a matrix-aware optimizer (Muon, GaLore, Shampoo) or a blockwise 8-bit one on whole tensors under tp.

Muon's orthogonalisation, GaLore's SVD projection and Shampoo's preconditioners are functions of the whole
matrix: for W = [W_0; W_1] split over two tp ranks, update(W) is not [update(W_0); update(W_1)]. bitsandbytes'
8-bit Adam quantises its state in blocks of each tensor's flat elements (and keeps tensors under 4096
elements in 32 bits), so a shard gets other blocks than the whole tensor. No library optimizer takes a
process group, so this wrapper gives it the single-rank tensors ("gather", docs in DESIGN.md):

  1. each tp-split tensor has a full-size fp32 copy on every rank of its tp group, built by an all-gather of
     the shards merged as on one rank (on the first step and after a checkpoint load);
  2. at each step the shard gradients are all-gathered into the copies' .grad the same way (one all-gather
     per tensor);
  3. the library optimizer steps the copies; every tp rank computes the same update, so the copies stay equal;
  4. each rank writes its shard of the updated copy back into its parameter.

"Merged as on one rank": a fused weight is split segment by segment (q | k | v of the qkv projection, with
grouped-query k and v smaller than q; gate | up of SwiGLU's fc1), so rank r holds [q_r | k_r | v_r]. Each
parameter records how it was split where it is created (`partition_dim` and `partition_segments`,
megatron/core/layers.py `mark_partition`); the gather is `merge_shards` with those segments and the
write-back `shard_tensor`, so the optimizer sees exactly the single-rank tensor, row for row: Shampoo's
blocks (--dshampooadamw-max-preconditioner-dim) and 8-bit blocks cut where they cut on one rank.
Vocabulary-split tensors (embedding, output layer) carry tp-dependent padding rows after the real ones
(padded_vocab_size(tp)); the real rows come first and padding rows have zero gradients, so they do not
change the update of the real rows.

Which parameters are gathered is the caller's `is_matrix`: Muon / GaLore / Shampoo take the hidden matrices
and leave the rest (norms, biases, embeddings, the output layer) to an elementwise optimizer that is never
gathered; adam8bit takes every parameter (its non-split ones as they are).
Costs: one extra full copy per gathered tensor and its optimizer state on every tp rank (tp-fold redundancy
for those tensors); one all-gather per gathered tensor per step.

Checkpoints hold the library optimizers' state dicts (over full matrices, identical on every tp rank);
megatron/checkpoint/full_matrix_state.py reads them by parameter name and cuts them for another layout
(`owned_layout` says what each rank's optimizer steps).

ZeRO. DeepSpeed's ZeRO-1/2 and its bf16/fp16 optimizers hand the optimizer one flat fp32 partition per param
group per dp rank, cut at arbitrary offsets, so no rank holds a whole matrix (nor whole rows of one).
DeepSpeed 0.19's own "Muon in ZeRO-1/2" (stage_1_and_2 with its MuonWithAuxAdam, selected through a DeepSpeed
config 'optimizer' section) orthogonalises each local gradient tensor before partitioning it: under tp that
tensor is a shard, its Newton-Schulz runs in fp16/bf16, and it is Muon only (not GaLore, Shampoo or
torch.optim.Muon's update), so it is not the single-rank step. Here --zero-stage 1 partitions the optimizer
state by whole parameters instead ("own whole matrices" of DESIGN.md, over the sp × dp group):
  - DeepSpeed runs stage 0 (`deepspeed_zero_stage`): it all-reduces every gradient, as ZeRO-1 does;
  - each parameter is owned by one rank (largest first, to the least loaded rank); the inner optimizers hold
    the owned parameters only, with their state and (tp-split matrices) their full copies: ~1/dp of the state;
  - each rank steps what it owns, then the owners' parameters are all-gathered over the group (one
    collective per parameter dtype per step), so every replica holds the single-rank update;
  - `state_dict` numbers each parameter's state by its place in the param groups and gathers the owners'
    states (all_gather_object over the group), so the checkpoint layout is the same at any dp size and at
    ZeRO-0, and `load_state_dict` keeps the owned entries.
ZeRO-2 (gradient partitions) / ZeRO-3 and bf16/fp16 stay refused by `optimizer_errors`, naming the flags.
The same holds for 8-bit Adam: DeepSpeed's ZeRO-1 would quantise flat partitions, so --zero-stage 1 runs it
here by whole parameters too.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.core.layers import merge_shards, shard_tensor
from megatron.optimizer.mixed_precision import GradientPlan, global_norm, reduce_by_owner

SYNCED_KEYS = ("lr", "weight_decay")  # what the LR / weight-decay schedule changes on the outer groups


def is_hidden_matrix(param: torch.nn.Parameter, embedding_ids: set) -> bool:
    """A 2-D weight of a transformer layer (not the embedding or the output layer)."""
    return param.ndim == 2 and id(param) not in embedding_ids


def embedding_parameter_ids(model: torch.nn.Module) -> set:
    from megatron.model.embedding import Embedding, OutputLayer

    ids = set()
    for module in model.modules():
        if isinstance(module, (Embedding, OutputLayer)):
            ids.update(id(p) for p in module.parameters())
    return ids


class FullMatrixOptimizer(torch.optim.Optimizer):
    """Outer optimizer over the real parameters; steps `matrix` (a library optimizer over whole-matrix copies)
    and `other` (an elementwise optimizer over the remaining parameters as they are).

    make_matrix(groups) / make_other(groups) build the inner optimizers from param groups whose 'params' are
    the copies / the parameters; each outer group's lr and weight_decay are copied to its inner groups
    before every step, so the LR and weight-decay schedules act on the outer groups as usual.

    dp_group / dp_size / dp_rank (ZeRO-1 by whole parameters, see the module docstring): each parameter is
    owned by one rank of that group (largest first, to the least loaded rank); the inner optimizers hold
    only the owned parameters (and their state), and after the step the group all-gathers the owners' parameters.
    """

    def __init__(self, param_groups: list[dict], is_matrix: Callable[[torch.nn.Parameter], bool],
                 make_matrix: Callable[[list[dict]], torch.optim.Optimizer],
                 make_other: Callable[[list[dict]], torch.optim.Optimizer],
                 tp_group=None, tp_size: int = 1, tp_rank: int = 0,
                 dp_group=None, dp_size: int = 1, dp_rank: int = 0, gradients: Optional[GradientPlan] = None):
        super().__init__(param_groups, {})
        self.gradients = gradients  # None: DeepSpeed reduces the gradients and the parameters are fp32
        if gradients is not None:
            if dp_size > 1 and (gradients.size != dp_size):
                raise ValueError("FullMatrixOptimizer: the gradient group must be the partition group")
            self.overflow = False  # DeepSpeed's engine reads it after step(): a skipped step
            self.last_grad_norm: Optional[float] = None
        self.tp_group, self.tp_size, self.tp_rank = tp_group, tp_size, tp_rank
        self.dp_group, self.dp_size, self.dp_rank = dp_group, dp_size, dp_rank
        self._params = [p for group in self.param_groups for p in group["params"]]  # the state's numbering
        self._owner = owners([p.numel() for p in self._params], dp_size)
        owned = {id(p) for p, owner in zip(self._params, self._owner) if owner == dp_rank}
        self._owned = owned
        # id(param) -> its fp32 tensor the inner optimizer steps: the full-size copy of an owned tp-split matrix
        # (gathered, in `_gathered`), or (mixed precision) the fp32 master of an owned 16-bit parameter
        self._copies: dict[int, torch.Tensor] = {}
        self._gathered: set[int] = set()
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (param, copy or param itself), owned
        self._numbers: dict[str, list[int]] = {"matrix": [], "other": []}  # inner param order -> state number
        number = {id(p): i for i, p in enumerate(self._params)}
        matrix_groups, other_groups, self._links = [], [], []
        for index, group in enumerate(self.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            mine = [p for p in group["params"] if id(p) in owned]
            for kind, params, inner_groups in (("matrix", [p for p in mine if is_matrix(p)], matrix_groups),
                                               ("other", [p for p in mine if not is_matrix(p)], other_groups)):
                if not params:
                    continue
                proxies = [self._proxy(p, gather=kind == "matrix") for p in params]
                inner_groups.append({**hyper, "params": proxies})
                self._numbers[kind].extend(number[id(p)] for p in params)
                self._links.append((index, kind, len(inner_groups) - 1))
        self.matrix = make_matrix(matrix_groups) if matrix_groups else None
        self.other = make_other(other_groups) if other_groups else None
        self._stale = True  # copies must be (re)gathered from the shards before the next step
        self._buckets = None  # _sync_buckets(), built at the first step that needs it

    def _split(self, param) -> bool:
        return self.tp_size > 1 and getattr(param, "tensor_model_parallel", False)

    def _proxy(self, param: torch.nn.Parameter, gather: bool) -> torch.Tensor:
        """What the inner optimizer steps for `param`: the parameter itself (fp32, not gathered), its full-size
        fp32 copy (gather and tp-split), or its fp32 master (mixed precision)."""
        whole = gather and self._split(param)
        if not whole and (self.gradients is None or param.dtype == torch.float32):
            self._pairs.append((param, param))
            return param
        shape = list(param.shape)
        if whole:
            shape[param.partition_dim] *= self.tp_size
            self._gathered.add(id(param))
        copy = torch.zeros(shape, dtype=torch.float32, device=param.device)
        self._copies[id(param)] = copy
        self._pairs.append((param, copy))
        return copy

    # ---- gather / scatter --------------------------------------------------------------------
    def _gather(self, param, shard: torch.Tensor) -> torch.Tensor:
        """The single-rank tensor from the tp shards of `param` (its segments merged as on one rank)."""
        parts = [torch.empty_like(shard) for _ in range(self.tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.tp_group)
        return merge_shards(parts, param.partition_dim, getattr(param, "partition_segments", None))

    def _whole(self, param, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (of `param`'s shape) as the inner optimizer sees it: gathered whole when `param` is, fp32."""
        tensor = tensor.detach().float()
        return self._gather(param, tensor) if id(param) in self._gathered else tensor

    def _refresh_copies(self) -> None:
        for param, copy in self._pairs:
            if copy is not param:
                copy.copy_(self._whole(param, param))
        self._stale = False

    def _slice(self, param, copy: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the single-rank tensor `copy` (inverse of `_gather`)."""
        if id(param) not in self._gathered:
            return copy
        return shard_tensor(copy, param.partition_dim, self.tp_size, self.tp_rank,
                            getattr(param, "partition_segments", None))

    def _sync_buckets(self) -> list[tuple[torch.dtype, list[list[torch.nn.Parameter]], int]]:
        """For each parameter dtype: the parameters of each owner (in the param groups' order) and the largest
        owner's element count, which every rank's part of the all-gather is padded to."""
        by_dtype: dict[torch.dtype, list[list[torch.nn.Parameter]]] = {}
        for p, owner in zip(self._params, self._owner):
            by_dtype.setdefault(p.dtype, [[] for _ in range(self.dp_size)])[owner].append(p)
        return [(dtype, per_owner, max(sum(p.numel() for p in params) for params in per_owner))
                for dtype, per_owner in by_dtype.items()]

    def _all_gather_owned(self) -> None:
        """Every rank of the dp group gets the parameters the others stepped: one all-gather per dtype of each
        owner's parameters, flattened and padded to the largest owner's count (what one broadcast per owner
        would send, in one collective)."""
        if self._buckets is None:
            self._buckets = self._sync_buckets()
        for dtype, per_owner, width in self._buckets:
            device = per_owner[self.dp_rank][0].device if per_owner[self.dp_rank] else self._params[0].device
            mine = torch.empty(width, dtype=dtype, device=device)
            count = sum(p.numel() for p in per_owner[self.dp_rank])
            if count:
                torch.cat([p.detach().reshape(-1) for p in per_owner[self.dp_rank]], out=mine[:count])
            if count < width:
                mine[count:].zero_()
            gathered = torch.empty(width * self.dp_size, dtype=dtype, device=device)
            dist.all_gather(list(gathered.split(width)), mine, group=self.dp_group)
            for owner, params in enumerate(per_owner):
                if owner == self.dp_rank:
                    continue
                offset = owner * width
                for p in params:
                    p.detach().copy_(gathered[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FullMatrixOptimizer.step takes no closure")
        for index, kind, inner_index in self._links:
            inner = self.matrix if kind == "matrix" else self.other
            for key in SYNCED_KEYS:
                if key in self.param_groups[index]:
                    inner.param_groups[inner_index][key] = self.param_groups[index][key]
        if self._stale:
            self._refresh_copies()
        if self.gradients is None:
            for param, copy in self._pairs:
                if copy is not param:
                    copy.grad = None if param.grad is None else self._whole(param, param.grad)
        elif not self._own_gradients():
            return None
        if self.matrix is not None:
            self.matrix.step()
        if self.other is not None:
            self.other.step()
        self._after_update()
        for param, copy in self._pairs:
            if copy is not param:
                param.copy_(self._slice(param, copy))  # mixed precision: the fp32 master rounded to 16 bits
            if copy is not param or self.gradients is not None:
                copy.grad = None
        if self.dp_size > 1:
            self._all_gather_owned()

    def _after_update(self) -> None:
        """After the inner optimizers stepped the owned copies, before they are written back (MuonClip clips)."""

    def _counted(self, param) -> bool:
        """Whether this rank counts `param`'s (whole or shard) gradient in the global norm: once per parameter."""
        if getattr(param, "ds_pipe_replicated", False):  # the tied embedding's copy on the last pipeline stage
            return False
        shard = self._split(param) and id(param) not in self._gathered
        return shard or self.tp_rank == 0

    def _own_gradients(self) -> bool:
        """Steps 1-5 of mixed_precision.py up to the update: reduce, unscale, norm, skip or clip. False: skipped."""
        plan = self.gradients
        reduced = reduce_by_owner(self._params, self._owner, plan, self.dp_rank)
        for param in self._params:
            param.grad = None  # the reduced gradients replace them (non-owners keep nothing)
            param.main_grad = None
        scale = 1.0 if plan.scaler is None else float(plan.scaler.loss_scale)
        counted = []
        for param, copy in self._pairs:
            grad = self._whole(param, reduced[id(param)])
            if scale != 1.0:
                grad = grad / scale
            copy.grad = grad
            if self._counted(param):
                counted.append(grad)
        device = self._params[0].device if self._params else torch.device("cpu")
        norm = global_norm(counted, plan, device, partitioned=self.dp_size > 1)
        self.last_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if plan.scaler is not None and getattr(plan.scaler, "dynamic", False):
            plan.scaler.update_scale(self.overflow)
        if self.overflow:
            for _, copy in self._pairs:
                copy.grad = None
            return False
        if plan.clip_grad > 0:
            coefficient = plan.clip_grad / (norm + 1e-6)
            if coefficient < 1.0:
                for _, copy in self._pairs:
                    copy.grad.mul_(coefficient)
        return True

    @property
    def owns_gradients(self) -> bool:
        """True when this optimizer reduces, unscales, checks and clips the gradients itself (mixed_precision.py);
        the engine then leaves them alone and reads `last_grad_norm`."""
        return self.gradients is not None

    @property
    def cur_scale(self) -> Optional[float]:
        """The loss scale the training log shows (deepspeed_compat.loss_scale): fp16's, 1.0 in bf16, None in fp32."""
        if self.gradients is None or self.gradients.half == torch.float32:
            return None
        return 1.0 if self.gradients.scaler is None else float(self.gradients.scaler.loss_scale)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: multiplied by fp16's loss scale (unchanged otherwise)."""
        if self.gradients is None or self.gradients.scaler is None:
            return loss
        return loss * float(self.gradients.scaler.loss_scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """One layout whatever the dp partitioning: each parameter's inner state under its number (its place
        in the outer param groups), and each outer group's inner group settings (collective over dp when
        partitioned: the owners' states are gathered)."""
        local = {"state": {}, "groups": {}}
        for kind, inner in (("matrix", self.matrix), ("other", self.other)):
            if inner is None:
                continue
            packed = inner.state_dict()
            for position, saved in packed["state"].items():
                local["state"][self._numbers[kind][position]] = (kind, _to_cpu(saved))
        for index, kind, inner_index in self._links:
            inner = self.matrix if kind == "matrix" else self.other
            local["groups"][(index, kind)] = {k: v for k, v in inner.param_groups[inner_index].items()
                                              if k != "params"}
        local["masters"] = {}
        if self.gradients is not None:  # the fp32 masters (whole where the inner optimizer sees them whole)
            if self._stale:
                self._refresh_copies()
            number = {id(p): i for i, p in enumerate(self._params)}
            for param, copy in self._pairs:
                if copy is not param:
                    local["masters"][number[id(param)]] = copy.detach().cpu().clone()
        if self.dp_size > 1:
            parts = [None] * self.dp_size
            dist.all_gather_object(parts, local, group=self.dp_group)
            merged = {"state": {}, "groups": {}}
            merged["masters"] = {}
            for part in parts:
                merged["state"].update(part["state"])
                merged["masters"].update(part["masters"])
                for key, value in part["groups"].items():
                    merged["groups"].setdefault(key, value)
            local = merged
        return {"format": "full_matrix/2", "state": local["state"], "inner_groups": local["groups"],
                "masters": local["masters"],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def owned_layout(self) -> list[tuple[int, torch.nn.Parameter, str, bool]]:
        """(state number, parameter, kind, whole) of each parameter this rank steps, in state-number order: what
        `load_state_dict` reads for it. kind: "matrix" or "other" (which inner optimizer steps it); whole: the
        inner optimizer sees the single-rank tensor (tp shards gathered), else this rank's tensor as it is
        (megatron/checkpoint/full_matrix_state.py cuts a checkpoint's state to this)."""
        whole = {number: id(self._params[number]) in self._gathered for kind in self._numbers
                 for number in self._numbers[kind]}
        return sorted(((number, self._params[number], kind, whole[number])
                       for kind, numbers in self._numbers.items() for number in numbers), key=lambda t: t[0])

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "full_matrix/2":
            raise ValueError("optimizer state was not written by this optimizer (megatron.optimizer.full_matrix, "
                             "format full_matrix/2)")
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError("optimizer state holds other parameter groups than this model's")
        for kind, inner in (("matrix", self.matrix), ("other", self.other)):
            if inner is None:
                continue
            packed = {"state": {}, "param_groups": []}
            for position, number in enumerate(self._numbers[kind]):
                if number in state["state"]:
                    saved_kind, saved = state["state"][number]
                    if saved_kind != kind:
                        raise ValueError("optimizer state holds other parameter kinds than this model's")
                    packed["state"][position] = saved
            position = 0
            for index, link_kind, inner_index in self._links:
                if link_kind != kind:
                    continue
                count = len(inner.param_groups[inner_index]["params"])
                saved = state["inner_groups"].get((index, kind))
                if saved is None:
                    raise ValueError("optimizer state holds other parameter kinds than this model's")
                packed["param_groups"].append({**saved, "params": list(range(position, position + count))})
                position += count
            inner.load_state_dict(packed)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self._stale = True  # the shards were (or are about to be) loaded: gather the copies again
        masters = state.get("masters") or {}
        if self.gradients is not None and masters:
            # mixed precision: the checkpoint's fp32 masters, not the 16-bit parameters, continue the run
            number = {id(p): i for i, p in enumerate(self._params)}
            missing = [number[id(p)] for p, copy in self._pairs if copy is not p and number[id(p)] not in masters]
            if missing:
                raise ValueError("optimizer state holds no fp32 master weights for some of this model's parameters "
                                 "(saved at another precision or layout)")
            for param, copy in self._pairs:
                if copy is not param:
                    saved = masters[number[id(param)]]
                    if saved.shape != copy.shape:
                        raise ValueError(f"optimizer state holds an fp32 master of shape {tuple(saved.shape)} for a "
                                         f"parameter whose master here is {tuple(copy.shape)}")
                    copy.copy_(saved)
            self._stale = False


def owners(sizes: list[int], ranks: int) -> list[int]:
    """The rank that owns each parameter: largest first, each to the least loaded rank (ties: lowest rank)."""
    load, owner = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


def _to_cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def tp_arguments(ps: Optional[object]) -> dict:
    if ps is None or ps.tp_size == 1:
        return {}
    return {"tp_group": ps.tp_group, "tp_size": ps.tp_size, "tp_rank": ps.tp_rank}
