"""1-bit LAMB (Li et al., 2021, "1-bit LAMB: Communication Efficient Large-Scale Large-Batch Training with
LAMB's Convergence Speed", arXiv:2104.06069): `--optimizer ds.onebitlamb`.

Why our own: upstream runs DeepSpeed's OnebitLamb (deepspeed/runtime/fp16/onebit/lamb.py), which the pinned
DeepSpeed (0.19.x) no longer ships; it was also CUDA-only (cupy / NCCL backends). This module implements the
same algorithm with torch.distributed collectives, so it runs on any backend (gloo on CPU included).

Two stages, counted in optimizer steps t = 1, 2, ...:

warmup (t <= freeze_step): LAMB on the data-parallel average of the gradients (the engine's ordinary
full-precision all-reduce), as DeepSpeed's 1-bit LAMB computes it (no bias correction):
    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g²
    u = m / (sqrt(v) + eps) + wd · w
    c = ||w|| / ||u|| clamped to [min_coeff, max_coeff] (1 when a norm is 0)
    w = w - lr · c · u
and per tensor the running coefficient c_frozen = coeff_beta · c_frozen + (1 - coeff_beta) · c (updated when
c != 1). At t = freeze_step the variance v is frozen and a copy v_fresh keeps being updated.

compression (t > freeze_step): the engine does NOT all-reduce the gradients (the engine's training step
turns DeepSpeed's backward all-reduce off, `needs_gradient_allreduce`). Each rank updates its momentum with
its local gradient, scales every tensor's momentum by scaling_coeff (fixed at the first compression step:
the mean over tensors of ||m|| / sqrt(numel) divided by this tensor's, so all tensors compress at similar
magnitudes), and the flat momentum of all tensors is averaged over the data-parallel group by
error-compensated 1-bit compression (`compressed_average`):
    worker: x = m + e_w; s_w = ||x|| / sqrt(n); e_w = x - s_w · sign(x); send sign bits (packed) and s_w
    server: rank r owns chunk r of the flat buffer: y = mean over workers of s_w · sign(x_w)[chunk r] + e_s;
            s_s = ||y|| / sqrt(n / dp); e_s = y - s_s · sign(y); send sign bits and s_s
    every rank: m = concatenation over chunks of s_s · sign(y)         (sign(0) counts as +1)
The bits and scales travel by all_gather (any dp size, any backend). From the averaged momentum the global
gradient is reconstructed, g~ = (m - b1 m_prev) / (1 - b1), to update v_fresh; the step uses the frozen v and
    u_pre = m / (sqrt(v) + eps)        u = u_pre + wd · w
    f = max(elementwise (sqrt(v) + eps) / (sqrt(v_fresh) + eps))
    with wd: r = min(1, ||u_pre|| / ||u||), f = f · r + (1 - r)
    f clamped to [factor_min, factor_max], then to last_f · [1 - factor_threshold, 1 + factor_threshold]
    w = w - lr · c_frozen · f · u
At dp = 1 nothing is compressed (there is nothing to average), as in DeepSpeed.

Differences from DeepSpeed's class, on purpose: its first call only allocated communication buffers and did
not move the weights (an implementation artefact); here every call is a step. Its checkpoints dropped the
error-feedback buffers (each rank's differ); here `state_dict` gathers every data-parallel rank's buffers
(collective over the dp group: DeepSpeed calls it on every rank when saving), so a resume at the same dp size
continues bit for bit, and another dp size is refused (the buffers belong to ranks that no longer exist).

Layout: fp32, ZeRO-0, any tp / pp, no Ulysses, no gradient clipping (after freeze_step no rank holds the
averaged gradient to clip by); everything else is refused in megatron/optimizer/__init__.py. ZeRO is refused
because the compression averages each rank's whole momentum tensors, which ZeRO partitions; DeepSpeed refused
its own 1-bit optimizers with ZeRO as well (deepspeed/runtime/engine.py, `_configure_basic_optimizer`:
"1bit-Lamb is not compatible with ZeRO", and the same for 1-bit Adam). Under tensor
parallelism the norms (trust ratio, the weight-decay rule, the per-tensor scaling) and the factor's maximum are
the whole tensor's: reduced over the tp group for shards (`tensor_model_parallel`), duplicated tensors counted
once. The momentum is compressed over the dp group in separate buffers (`_segments`): tp shards, tp-duplicated
tensors, and each weight tied over pipeline stages, so replicated copies get identical results.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.optimizer.lamb import sum_split_rows_over_tp, update_moments

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Bits x >= 0 of a 1-D tensor whose length is a multiple of 8, packed 8 to a byte (first = high bit)."""
    bits = (x >= 0).to(torch.uint8).view(-1, 8)
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """±1.0 (float32) for each bit of `packed`, inverse of pack_signs."""
    bits = (packed.unsqueeze(1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1).to(torch.float32).mul_(2.0).sub_(1.0)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _all_gather_signs(x: torch.Tensor, scale: torch.Tensor, group, size: int) -> tuple[list, list]:
    """Every rank's packed signs of `x` and its scale."""
    packed = pack_signs(x)
    all_packed = [torch.empty_like(packed) for _ in range(size)]
    all_scales = [torch.empty(1, dtype=torch.float32, device=x.device) for _ in range(size)]
    dist.all_gather(all_packed, packed, group=group)
    dist.all_gather(all_scales, scale.reshape(1).to(torch.float32), group=group)
    return all_packed, all_scales


def compressed_average(buffer: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor, group,
                       size: int, rank: int) -> torch.Tensor:
    """Error-compensated 1-bit average of the flat fp32 `buffer` over `group` (`size` ranks, this one `rank`).
    len(buffer) is a multiple of 8 · size; worker_error (same length) and server_error (len / size) are
    updated in place. Returns the average every rank agrees on."""
    n = buffer.numel()
    chunk = n // size
    x = buffer + worker_error
    worker_scale = x.norm() / math.sqrt(n)
    worker_error.copy_(x - worker_scale * _sign(x))
    all_packed, all_scales = _all_gather_signs(x, worker_scale, group, size)
    lo = rank * chunk // 8
    y = torch.zeros(chunk, dtype=torch.float32, device=buffer.device)
    for p, s in zip(all_packed, all_scales):
        y += unpack_signs(p[lo:lo + chunk // 8]) * s
    y.div_(size).add_(server_error)
    server_scale = y.norm() / math.sqrt(chunk)
    server_error.copy_(y - server_scale * _sign(y))
    chunks, scales = _all_gather_signs(y, server_scale, group, size)
    return torch.cat([unpack_signs(c) * s for c, s in zip(chunks, scales)])


class OnebitLamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100000, max_coeff: float = 10.0, min_coeff: float = 0.01,
                 coeff_beta: float = 0.9, factor_max: float = 4.0, factor_min: float = 0.5,
                 factor_threshold: float = 0.1, dp_group=None, tp_group=None, tp_size: int = 1, own_buffer=()):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"1-bit LAMB betas must be in [0, 1), got {betas}")
        if freeze_step < 1:
            raise ValueError(f"1-bit LAMB freeze_step must be >= 1, got {freeze_step}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.freeze_step, self.max_coeff, self.min_coeff = freeze_step, max_coeff, min_coeff
        self.coeff_beta, self.factor_max, self.factor_min = coeff_beta, factor_max, factor_min
        self.factor_threshold = factor_threshold
        self.dp_group = dp_group
        self.tp_group, self.tp_size = tp_group, tp_size
        self.own_buffer = list(own_buffer)  # parameters compressed alone (weights tied over pipeline stages)
        up = dist.is_available() and dist.is_initialized()
        self.dp_size = dist.get_world_size(dp_group) if up else 1
        self.dp_rank = dist.get_rank(dp_group) if up else 0
        self.onebit_step = 0
        self.worker_error = None  # flat, padded; created at the first compression step (dp > 1)
        self.server_error = None

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def needs_gradient_allreduce(self) -> bool:
        """Whether the coming step expects the engine to average the gradients over dp (the warmup stage)."""
        return self.onebit_step < self.freeze_step

    def _segments(self) -> list:
        """The parameters, cut into the flat buffers compressed one by one, each padded to a multiple of
        8 · dp: at tp = 1 without a pipeline-tied weight, one buffer of all parameters. Under tensor
        parallelism the tp shards form one buffer and the tp-duplicated parameters another, so the duplicated
        ones are compressed from the same input with the same scales on every tp rank and stay identical;
        a weight tied over pipeline stages (the word embedding on the first and last stage) is a buffer of its
        own for the same reason."""
        params = self._params()
        tied = {id(p) for p in self.own_buffer}
        cuts = [[p for p in params if self._split(p) and id(p) not in tied],
                [p for p in params if not self._split(p) and id(p) not in tied]]
        cuts += [[p] for p in params if id(p) in tied]
        unit = 8 * self.dp_size
        return [(cut, (sum(p.numel() for p in cut) + unit - 1) // unit * unit) for cut in cuts if cut]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("OnebitLamb.step takes no closure")
        compress = not self.needs_gradient_allreduce()
        self.onebit_step += 1
        if compress:
            self._compression_step()
        else:
            self._warmup_step()
        return None

    def _split(self, p) -> bool:
        """Whether `p` is a tensor-parallel shard (Megatron's `tensor_model_parallel` attribute): its norms are
        summed, and its factor maximised, over the tp group; a tp-duplicated tensor (a norm, a bias of a
        row-parallel layer) is whole on every tp rank and counted once."""
        return self.tp_size > 1 and getattr(p, "tensor_model_parallel", False)

    def _whole_tensor_sums(self, params: list, rows: list) -> list:
        """rows[i]: 1-D tensor of partial sums of squares of params[i]; returns them as floats, summed over
        the tp group for the tp-split parameters (one all-reduce for all)."""
        if not rows:
            return []
        return sum_split_rows_over_tp(torch.stack(rows), [self._split(p) for p in params], self.tp_group).tolist()

    def _warmup_step(self) -> None:
        entries = []  # (param, update, group)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["lamb_coeff_freeze"] = 0.0
                    state["last_factor"] = 1.0
                m, v = update_moments(state, p, beta1, beta2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                entries.append((p, update, group))
        squares = self._whole_tensor_sums(
            [p for p, _, _ in entries],
            [torch.stack([p.float().pow(2).sum(), u.pow(2).sum()]) for p, u, _ in entries])
        for (p, update, group), (w_sq, u_sq) in zip(entries, squares):
            state = self.state[p]
            coeff = self._coefficient(math.sqrt(w_sq), math.sqrt(u_sq))
            if coeff != 1.0:
                state["lamb_coeff_freeze"] = (self.coeff_beta * state["lamb_coeff_freeze"]
                                              + (1 - self.coeff_beta) * coeff)
            p.add_(update.to(p.dtype), alpha=-group["lr"] * coeff)
        if self.onebit_step == self.freeze_step:
            for p in self._params():
                if self.state[p]:
                    self.state[p]["exp_avg_sq_fresh"] = self.state[p]["exp_avg_sq"].clone()

    def _coefficient(self, w_norm: float, u_norm: float) -> float:
        if w_norm == 0 or u_norm == 0:
            return 1.0
        return min(max(w_norm / u_norm, self.min_coeff), self.max_coeff)

    def _compression_step(self) -> None:
        params = self._params()
        for p in params:
            if p.grad is None or "exp_avg_sq_fresh" not in self.state[p]:
                raise RuntimeError("1-bit LAMB's compression stage averages the momentum of every parameter over "
                                   "the data-parallel ranks, so every parameter needs a gradient at every step "
                                   f"(a parameter of shape {tuple(p.shape)} has none)")
        if "scaling_coeff" not in self.state[params[0]]:
            squares = self._whole_tensor_sums(params, [self.state[p]["exp_avg"].pow(2).sum().reshape(1)
                                                       for p in params])
            scales = [math.sqrt(sq) / math.sqrt(p.numel() * (self.tp_size if self._split(p) else 1))
                      for p, (sq,) in zip(params, squares)]
            united = sum(scales) / len(scales)
            alone = {id(p) for p in self.own_buffer}  # a buffer of one tensor needs no common magnitude
            for p, s in zip(params, scales):
                self.state[p]["scaling_coeff"] = united / s if s > 0 and id(p) not in alone else 1.0
        previous = []
        for group in self.param_groups:
            beta1, _ = group["betas"]
            for p in group["params"]:
                m = self.state[p]["exp_avg"]
                previous.append(m.clone())
                m.mul_(beta1).add_(p.grad.float(), alpha=1 - beta1)
        if self.dp_size > 1:
            segments = self._segments()
            if self.worker_error is None:
                total = sum(size for _, size in segments)
                self.worker_error = torch.zeros(total, dtype=torch.float32, device=params[0].device)
                self.server_error = torch.zeros(total // self.dp_size, dtype=torch.float32, device=params[0].device)
            start = 0
            for cut, size in segments:
                flat = torch.zeros(size, dtype=torch.float32, device=params[0].device)
                offset = 0
                for p in cut:
                    state = self.state[p]
                    flat[offset:offset + p.numel()] = state["exp_avg"].reshape(-1) * state["scaling_coeff"]
                    offset += p.numel()
                averaged = compressed_average(flat, self.worker_error[start:start + size],
                                              self.server_error[start // self.dp_size:(start + size) // self.dp_size],
                                              self.dp_group, self.dp_size, self.dp_rank)
                start += size
                offset = 0
                for p in cut:
                    m = self.state[p]["exp_avg"]
                    m.copy_(averaged[offset:offset + p.numel()].view_as(m)).div_(self.state[p]["scaling_coeff"])
                    offset += p.numel()
        entries = []  # (param, group, update, update_prelim, factor before the weight-decay rule)
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                m, v, v_fresh = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_sq_fresh"]
                grad = (m - previous[index] * beta1) / (1 - beta1)  # the averaged gradient, from the momentum
                index += 1
                v_fresh.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = v.sqrt() + group["eps"]
                update_prelim = m / denom
                update = update_prelim + group["weight_decay"] * p.float() if group["weight_decay"] else update_prelim
                entries.append((p, group, update, update_prelim, (denom / (v_fresh.sqrt() + group["eps"])).max()))
        if not entries:
            return
        factors = torch.stack([e[4] for e in entries])
        split = torch.tensor([self._split(e[0]) for e in entries], device=factors.device)
        if bool(split.any()):  # the factor is a maximum over the whole tensor
            partial = torch.where(split, factors, torch.full_like(factors, -math.inf))
            dist.all_reduce(partial, op=dist.ReduceOp.MAX, group=self.tp_group)
            factors = torch.where(split, partial, factors)
        squares = self._whole_tensor_sums(
            [e[0] for e in entries], [torch.stack([pre.pow(2).sum(), u.pow(2).sum()]) for _, _, u, pre, _ in entries])
        for (p, group, update, _, _), factor, (pre_sq, u_sq) in zip(entries, factors.tolist(), squares):
            state = self.state[p]
            if group["weight_decay"]:
                ratio = min(1.0, math.sqrt(pre_sq) / math.sqrt(u_sq)) if u_sq > 0 else 1.0
                factor = factor * ratio + (1.0 - ratio)
            factor = min(max(factor, self.factor_min), self.factor_max)
            last = state["last_factor"]
            factor = min(max(factor, last * (1.0 - self.factor_threshold)), last * (1.0 + self.factor_threshold))
            state["last_factor"] = factor
            p.add_(update.to(p.dtype), alpha=-group["lr"] * state["lamb_coeff_freeze"] * factor)

    # ---- checkpoints: the step counter and every dp rank's error-feedback buffers -------------------------

    def state_dict(self):
        sd = super().state_dict()
        extra = {"step": self.onebit_step, "dp_size": self.dp_size, "worker_errors": None, "server_errors": None}
        if self.worker_error is not None:  # the same on every dp rank: the collective is entered by all
            workers = [torch.empty_like(self.worker_error) for _ in range(self.dp_size)]
            servers = [torch.empty_like(self.server_error) for _ in range(self.dp_size)]
            dist.all_gather(workers, self.worker_error, group=self.dp_group)
            dist.all_gather(servers, self.server_error, group=self.dp_group)
            extra["worker_errors"], extra["server_errors"] = torch.stack(workers), torch.stack(servers)
        sd["onebit"] = extra
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("onebit", None)
        if extra is None:
            raise ValueError("this optimizer state has no 1-bit LAMB part (it was saved by another --optimizer); "
                             "resume with that --optimizer, or pass --no-load-optim")
        if extra["worker_errors"] is not None and extra["dp_size"] != self.dp_size:
            raise ValueError(f"--optimizer ds.onebitlamb: this checkpoint was saved in the compression stage at "
                             f"data-parallel size {extra['dp_size']}, and its per-rank error-feedback buffers "
                             f"cannot be given to {self.dp_size} ranks; resume at data-parallel size "
                             f"{extra['dp_size']}, or pass --no-load-optim")
        super().load_state_dict(state_dict)
        self.onebit_step = int(extra["step"])
        if extra["worker_errors"] is None:
            self.worker_error = self.server_error = None
        else:
            device = self._params()[0].device
            self.worker_error = extra["worker_errors"][self.dp_rank].to(device, torch.float32).clone()
            self.server_error = extra["server_errors"][self.dp_rank].to(device, torch.float32).clone()
