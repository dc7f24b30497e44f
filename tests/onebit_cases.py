"""Run targets for tests/test_onebit_lamb.py (spawned gloo ranks): OnebitLamb stepped on fixed tensors, and
trainings through the engine with a small freeze_step that count DeepSpeed's gradient all-reduces."""

from __future__ import annotations

import io

import torch

SHAPES = [(5, 3), (7,)]  # 22 elements: the flat momentum is padded to 32 at dp=2
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, freeze_step=2, max_coeff=0.3,
             min_coeff=0.01, coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1)


def initial_weights() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def local_grads(step: int, rank: int) -> list:
    """The gradients rank `rank` computes at step `step` (1-based): different on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _optimizer(weights):
    from megatron.optimizer.onebit_lamb import OnebitLamb

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    return params, OnebitLamb([{"params": params}], **HYPER)


def _step(opt, params, step: int, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    for p, g in zip(params, local_grads(step, rank)):
        p.grad = g.clone()
    if opt.needs_gradient_allreduce():  # what the engine's backward all-reduce does in the warmup stage
        for p in params:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
    opt.step()


def step_fixed_tensors(rank: int, world_size: int, steps: int, save_after: list) -> dict:
    """`steps` steps from initial_weights(); the weights after each; and for each k in save_after the final
    weights of a run that saved after step k, rebuilt a fresh optimizer from the saved state and continued."""
    params, opt = _optimizer(initial_weights())
    history, saved = [], {}
    for step in range(1, steps + 1):
        _step(opt, params, step, rank, world_size)
        history.append([p.detach().clone() for p in params])
        if step in save_after:
            buffer = io.BytesIO()
            torch.save({"weights": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}, buffer)
            saved[step] = buffer.getvalue()
    resumed = {}
    for step, blob in saved.items():
        state = torch.load(io.BytesIO(blob), weights_only=False)
        params2, opt2 = _optimizer(state["weights"])
        opt2.load_state_dict(state["optimizer"])
        for later in range(step + 1, steps + 1):
            _step(opt2, params2, later, rank, world_size)
        resumed[step] = [p.detach().clone() for p in params2]
    # tensors travel back as torch.save bytes (shared-memory tensors would not outlive the rank's process)
    buffer = io.BytesIO()
    torch.save({"history": history, "resumed": resumed, "worker_error": opt.worker_error}, buffer)
    return buffer.getvalue()


def train_counting_allreduces(rank: int, world_size: int, cases: list, freeze_step: int) -> dict:
    """optimizer_cases.train_logged with 1-bit LAMB's freeze_step set, plus when DeepSpeed's engine
    all-reduced the gradients in each case
    ("allreduce_steps": the optimizer steps, counted from 0, whose gradients DeepSpeed all-reduced)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import megatron.optimizer as mo
    import optimizer_cases as oc

    mo.ONEBIT_LAMB_DEFAULTS = {**mo.ONEBIT_LAMB_DEFAULTS, "freeze_step": freeze_step}
    steps = []
    real = DeepSpeedEngine.allreduce_gradients

    def counting(self, *args, **kwargs):
        steps.append(self.global_steps)  # optimizer steps completed before this all-reduce
        return real(self, *args, **kwargs)

    DeepSpeedEngine.allreduce_gradients = counting
    from megatron.optimizer.onebit_lamb import OnebitLamb

    built = []
    real_init = OnebitLamb.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    OnebitLamb.__init__ = recording
    out = {}
    for name, argv in cases:
        steps.clear()
        built.clear()
        out[name] = oc.train_logged(rank, world_size, [(name, argv)])[name]
        out[name]["allreduce_steps"] = sorted(set(steps))
        if built and "error" not in out[name]:
            out[name]["copies_agree"] = _copies_agree(built[-1])
    return out


def _copies_agree(opt) -> bool:
    """Whether every copy of a replicated weight is the same on all ranks holding one: all weights over the dp
    group, the tp-duplicated weights over the tp group, the pipeline-tied weights (compressed alone) over all
    ranks holding them."""
    import torch.distributed as dist

    def fingerprint(params):
        return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()])
                            for p in params]) if params else torch.zeros(0, 2, dtype=torch.float64)

    every_param = fingerprint(opt._params())  # the dp ranks end with the same weights (one averaged momentum)
    every = [torch.empty_like(every_param) for _ in range(opt.dp_size)]
    dist.all_gather(every, every_param, group=opt.dp_group)
    agree = all(torch.equal(e, every_param) for e in every)
    if opt.tp_size > 1:
        mine = fingerprint([p for p in opt._params() if not opt._split(p)])
        every = [torch.empty_like(mine) for _ in range(opt.tp_size)]
        dist.all_gather(every, mine, group=opt.tp_group)
        agree = agree and all(torch.equal(e, mine) for e in every)
    tied = fingerprint(opt.own_buffer).reshape(-1)
    width = torch.tensor([tied.numel()])
    widths = [torch.empty_like(width) for _ in range(dist.get_world_size())]
    dist.all_gather(widths, width)
    longest = max(int(w) for w in widths)
    padded = torch.full((longest,), float("nan"), dtype=torch.float64)
    padded[:tied.numel()] = tied
    every = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(every, padded)
    held = [e for e, w in zip(every, widths) if int(w) > 0]
    return agree and all(torch.equal(e, held[0]) for e in held)


# tp=2 on fixed tensors: a split matrix whose two row halves differ 10x in scale (so a shard's norms, and
# maximum, are not the whole tensor's) and a tp-duplicated vector
TP_SHAPES = [(4, 3), (7,)]


def tp_weights() -> list:
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(s, generator=g) for s in TP_SHAPES]
    w[0][:2] *= 10.0
    return w


def tp_grads(step: int) -> list:
    """The (already dp-averaged) gradients of step `step`: the split matrix's halves swap scale each step."""
    g = torch.Generator().manual_seed(77 + step)
    grads = [torch.randn(s, generator=g) for s in TP_SHAPES]
    grads[0][(step % 2) * 2:(step % 2) * 2 + 2] *= 30.0
    return grads


def step_tp2_fixed_tensors(rank: int, steps: int) -> list:
    """OnebitLamb at tp=2 (the world of 2 ranks as the tp group, dp=1) for `steps` steps from tp_weights():
    this rank's weights after each step (its rows of the split matrix, and the whole vector)."""
    import torch.distributed as dist

    from megatron.optimizer.onebit_lamb import OnebitLamb

    singles = [dist.new_group([r]) for r in range(2)]  # collective: both ranks create both groups
    rows = slice(2 * rank, 2 * rank + 2)
    w = tp_weights()
    params = [torch.nn.Parameter(w[0][rows].clone()), torch.nn.Parameter(w[1].clone())]
    params[0].tensor_model_parallel = True
    opt = OnebitLamb([{"params": params}], dp_group=singles[rank], tp_group=None, tp_size=2, **HYPER)
    history = []
    for step in range(1, steps + 1):
        grads = tp_grads(step)
        params[0].grad, params[1].grad = grads[0][rows].clone(), grads[1].clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    buffer = io.BytesIO()
    torch.save(history, buffer)
    return buffer.getvalue()


def dp2_checks(rank: int, world_size: int, steps: int, save_after: list, cases: list, freeze_step: int) -> dict:
    """step_fixed_tensors, step_tp2_fixed_tensors and train_counting_allreduces in one launch (spawning ranks
    costs more than all three)."""
    return {"fixed": step_fixed_tensors(rank, world_size, steps, save_after),
            "tp2_fixed": step_tp2_fixed_tensors(rank, steps),
            "trainings": train_counting_allreduces(rank, world_size, cases, freeze_step)}
