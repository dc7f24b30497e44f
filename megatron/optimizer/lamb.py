"""LAMB (You et al., 2019) whose per-tensor trust ratio uses the norms of whole tensors under tensor parallelism.

Why our own: LAMB scales each tensor's Adam update u by ||w|| / ||u||. A tp rank holds a shard of a split
weight, so a library LAMB (DeepSpeed FusedLamb, IPEX Lamb, pytorch_optimizer.Lamb) computes the ratio of the
shard and gives each shard a different step. None takes a process group. Here the squared norms of the
split tensors are summed over the tp group (one all-reduce of a small vector per step) before the ratio.
DeepSpeed's FusedLamb additionally needs its CUDA kernel (it does not build on CPU), and IPEX is an Intel
extension that is usually absent: `--optimizer ds.fusedlamb` runs this class with FusedLamb's bounds on the
ratio ([0.01, 10]), `ipex.lamb`/`ipex.fusedlamb` with IPEX's unbounded ratio.

Under ZeRO-1/2 and DeepSpeed's bf16 optimizer this class steps flat fp32 partitions: each data-parallel rank
holds a slice of one flat buffer per param group, cut at arbitrary offsets. `attach_partitions` (called by
the engine after `deepspeed.initialize`) reads DeepSpeed's map from each parameter to its fragment of the
partition (`param._hp_mapping`, checked against DeepSpeed 0.19.8); the squared norms are then summed per
parameter over its fragments, over dp and (for split tensors) over tp, so every fragment gets the
whole tensor's ratio.

Per tensor w with gradient g, at step t (bias-corrected Adam moments, decay inside the update):
    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g²
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd · w
    r = ||w|| / ||u||  (1 when either norm is 0), clamped to [min_coeff, max_coeff]
    w = w - lr · r · u
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


def update_moments(state: dict, p: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments of `p` in `state` (fp32 "exp_avg" / "exp_avg_sq", created at zero), moved by p.grad."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    grad = p.grad.float()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return m, v


def sum_split_rows_over_tp(rows: torch.Tensor, split, tp_group) -> torch.Tensor:
    """rows[i] holds partial sums (e.g. squared norms) of tensor i; the rows of tp-split tensors (`split[i]`)
    are summed over `tp_group` in one all-reduce, the others (whole on every tp rank) are kept as they are."""
    split = torch.as_tensor(split, dtype=torch.bool, device=rows.device)
    if not bool(split.any()):
        return rows
    partial = torch.where(split[:, None], rows, torch.zeros_like(rows))
    dist.all_reduce(partial, group=tp_group)
    return torch.where(split[:, None], partial, rows)


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 min_coeff: Optional[float] = None, max_coeff: Optional[float] = None, tp_group=None,
                 tp_size: int = 1):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"LAMB betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_coeff, self.max_coeff = min_coeff, max_coeff
        self.tp_group, self.tp_size = tp_group, tp_size
        self._fragments = None  # ZeRO/bf16: {id(flat partition): [(key, start, numel)]}, see attach_partitions
        self._num_keys, self._split_keys, self._dp_group = 0, [], None

    def attach_partitions(self, fragments: dict, num_keys: int, split_keys: list, dp_group) -> None:
        """Step flat partitions: `fragments[id(flat)]` lists (parameter key, start, numel) inside that flat
        fp32 tensor; keys number the model's parameters the same way on every rank; split_keys[k] says
        whether parameter k is split over tp."""
        self._fragments, self._num_keys, self._split_keys, self._dp_group = fragments, num_keys, split_keys, dp_group

    def _split(self, p) -> bool:
        return self.tp_size > 1 and getattr(p, "tensor_model_parallel", False)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Lamb.step takes no closure")
        entries = []  # (param, update, group)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                t = state["step"]
                m, v = update_moments(state, p, beta1, beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1 ** t)).div_(denom)
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                entries.append((p, update, group))
        if self._fragments is not None:
            self._apply_partitioned(entries)
            return None
        if not entries:
            return None
        # squared norms [w_0, u_0, w_1, u_1, ...]; split tensors' entries summed over tp
        squares = torch.stack([torch.stack([p.float().pow(2).sum(), u.pow(2).sum()]) for p, u, _ in entries])
        squares = sum_split_rows_over_tp(squares, [self._split(p) for p, _, _ in entries], self.tp_group)
        norms = squares.sqrt().tolist()
        for (p, update, group), (w_norm, u_norm) in zip(entries, norms):
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if self.min_coeff is not None:
                ratio = max(ratio, self.min_coeff)
            if self.max_coeff is not None:
                ratio = min(ratio, self.max_coeff)
            self.state[p]["trust_ratio"] = ratio
            p.add_(update.to(p.dtype), alpha=-group["lr"] * ratio)
        return None

    def _apply_partitioned(self, entries: list) -> None:
        squares = None
        for p, update, _ in entries:
            if squares is None:
                squares = torch.zeros(self._num_keys, 2, dtype=torch.float32, device=p.device)
            w, u = p.detach().float(), update
            for key, start, numel in self._fragments.get(id(p), ()):
                squares[key, 0] += w.narrow(0, start, numel).pow(2).sum()
                squares[key, 1] += u.narrow(0, start, numel).pow(2).sum()
        if squares is None:
            squares = torch.zeros(self._num_keys, 2, dtype=torch.float32)
        if self._dp_group is not None and dist.get_world_size(self._dp_group) > 1:
            dist.all_reduce(squares, group=self._dp_group)  # the fragments of one tensor sit on several dp ranks
        if self.tp_size > 1:
            squares = sum_split_rows_over_tp(squares, self._split_keys, self.tp_group)
        norms = squares.sqrt().tolist()
        ratios = [self._bounded(w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0) for w_norm, u_norm in norms]
        for p, update, group in entries:
            scale = torch.ones_like(update)  # alignment padding keeps ratio 1 (it holds zeros)
            for key, start, numel in self._fragments.get(id(p), ()):
                scale.narrow(0, start, numel).fill_(ratios[key])
            p.add_((update * scale).to(p.dtype), alpha=-group["lr"])

    def _bounded(self, ratio: float) -> float:
        if self.min_coeff is not None:
            ratio = max(ratio, self.min_coeff)
        if self.max_coeff is not None:
            ratio = min(ratio, self.max_coeff)
        return ratio


def attach_deepspeed_partitions(engine, lamb: "Lamb", ps) -> None:
    """Give `lamb` DeepSpeed's parameter → flat-partition fragment map (ZeRO-1/2, bf16 optimizer)."""
    from megatron import deepspeed_compat as compat

    params = list(engine.module.parameters())
    flats = [group["params"] for group in lamb.param_groups]
    fragments: dict = {}
    for key, param in enumerate(params):
        mapping = compat.hp_mapping(param)
        if mapping is None:
            continue  # no fragment of this parameter on this dp rank
        flat_list = flats[mapping.param_group_index]
        if len(flat_list) != 1:
            raise RuntimeError(f"expected one flat fp32 partition per param group from DeepSpeed, found "
                               f"{len(flat_list)}; LAMB under ZeRO was checked against DeepSpeed 0.19.8")
        address = mapping.hp_fragment_address
        fragments.setdefault(id(flat_list[0]), []).append((key, int(address.start), int(address.numel)))
    if not fragments:
        raise RuntimeError("LAMB found no parameter fragments in DeepSpeed's flat partitions; "
                           "this DeepSpeed optimizer wrapper is not supported (checked: ZeRO-1/2 in DeepSpeed 0.19.8)")
    split = [bool(ps.tp_size > 1 and getattr(p, "tensor_model_parallel", False)) for p in params]
    dp_group = compat.zero_partition_group(engine.optimizer) or ps.dp_group  # ZeRO's own partition group
    lamb.attach_partitions(fragments, len(params), split, dp_group)
