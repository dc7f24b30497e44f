"""The bytes each `--optimizer` keeps on one device, from the flags alone (`pretrain_gpt.py --dry-run`).

    optimizer_memory(run, world_size)  ->  {"state": bytes, "masters": bytes}

The device's parameters are listed by shape (`stage_parameters`: one pipeline stage's layers plus one
[vocabulary, hidden] embedding tensor, as the dry run counts a stage; whole shapes and how tp splits them), and
each is given the state its optimizer really keeps, as the library code allocates it:

  adam, adamw, apex.adam, adopt, LAMB   exp_avg + exp_avg_sq: 8 bytes an element (fp32)
  sophiag                               exp_avg: 4 (upstream's rule keeps no Hessian estimate)
  sgd                                   momentum buffer: 4 with --sgd-momentum > 0, else nothing
  adamwschedulefree / sgdschedulefree   z + exp_avg_sq: 8 / z: 4
  ds.onebitlamb                         8, after freeze_step + the fresh exp_avg_sq, the worker error (4 each)
                                        and the server error (4 / dp)
  muon, muonclip                        hidden matrices: one momentum (4); the rest: AdamW (8)
  galoreadamw                           hidden [m, n] matrices: the projector [r, n] (m >= n) or [m, r] and two
                                        moments of the projected gradient [m, r] or [r, n], r = min(rank, m, n),
                                        fp32; the rest AdamW
  galoreadamw8bit(perlayer)             as galoreadamw with 8-bit moments (below)
  dshampooadamw                         hidden matrices: momentum + the RMSProp graft's momentum and statistics
                                        (3 × 4) and, unless a side exceeds max(8192, block), per block [a, b] of
                                        --dshampooadamw-max-preconditioner-dim the statistics and preconditioner
                                        of each side, 2 × (a² + b²) × 4 (+ a [1, 1] pair when the library views
                                        [m, n] as [1, m, n]); the rest AdamW
  adam8bit                              bitsandbytes Adam8bit: a tensor of >= 4096 elements keeps 1 byte per
                                        moment + one fp32 absmax per 256-element block per moment; a smaller one
                                        32-bit moments (8); plus the two 256-entry quantisation maps

Where the state lives (megatron/optimizer/__init__.py and full_matrix.py):
  - elementwise optimizers (DeepSpeed owns them): the state of this rank's shards; under bf16/fp16 DeepSpeed's
    optimizers keep a flat fp32 copy (4 bytes an element), and at ZeRO-1/2 a flat fp32 partition whatever the
    precision; state and copies / (sp × dp) at ZeRO >= 1;
  - whole-matrix optimizers (muon, muonclip, galore*, dshampooadamw, adam8bit): the tensors they gather (hidden
    matrices; every parameter for adam8bit) are stepped as whole fp32 copies on every tp rank, with their state
    on the whole tensor; the others as this rank's shards, with an fp32 master under bf16/fp16; at ZeRO-1/2 each
    rank of the sp × dp group keeps the parameters it owns (whole parameters, largest first to the least loaded
    rank: full_matrix.owners), and the estimate is the most loaded rank's;
  - --cpu-optimizer: nothing on the device.
Scalars (step counters) are not counted. Checked against a real run's tensors in tests/test_dry_run_memory.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from megatron.optimizer import EIGHT_BIT, GALORE_DEFAULTS, WHOLE_MATRIX

FP32 = 4
EIGHT_BIT_MIN = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
EIGHT_BIT_BLOCK = 256  # bitsandbytes' blockwise quantisation: one fp32 absmax per block
QUANTISATION_MAPS = 2 * 256 * FP32  # the signed and unsigned dynamic maps, shared by an optimizer's tensors
ELEMENTWISE_STATE = {"adam": 8, "adamw": 8, "apex.adam": 8, "adopt": 8, "ds.fusedlamb": 8, "ipex.lamb": 8,
                     "ipex.fusedlamb": 8, "sophiag": 4, "adamwschedulefree": 8, "sgdschedulefree": 4}


@dataclass(frozen=True)
class StageParameter:
    """One parameter of the device's pipeline stage: its whole (single-rank) shape, the tp ranks it is split
    over along `dim` (1: every rank holds all of it), and whether it is an embedding-side tensor (word or
    position embedding, output layer), which the whole-matrix optimizers leave to AdamW."""

    shape: tuple
    split: int = 1
    dim: int = 0
    embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.numel // self.split

    @property
    def local_shape(self) -> tuple:
        return tuple(d // self.split if i == self.dim else d for i, d in enumerate(self.shape))


def stage_parameters(model, tp: int, pp: int) -> list[StageParameter]:
    """The parameters of the device's stage in the optimizer's order (2-D and larger first, then the rest, each
    in model order, as optimizer_param_groups puts them): ceil(layers / pp) transformer layers, the word
    embedding (and the learned positions), the final norm, and the untied output layer at pp = 1."""
    h, f = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    bias, layernorm = model.add_bias_linear, model.normalization == "layernorm"
    vocab = model.padded_vocab_size(tp) if model.vocab_size else 0

    def norm() -> list[StageParameter]:
        return [StageParameter((h,))] + ([StageParameter((h,))] if layernorm else [])

    def linear(rows: int, cols: int, column_parallel: bool) -> list[StageParameter]:
        weight = StageParameter((rows, cols), tp, 0 if column_parallel else 1)
        if not bias:
            return [weight]
        return [weight, StageParameter((rows,), tp if column_parallel else 1)]

    params = []
    if vocab:
        params.append(StageParameter((vocab, h), tp, 0, embedding=True))
    if model.position_embedding_type == "learned_absolute":
        params.append(StageParameter((model.max_position_embeddings, h), embedding=True))
    for _ in range(-(-model.num_layers // pp)):
        params += norm() + linear(q + 2 * kv, h, True) + linear(h, q, False) + norm()
        params += linear((2 if model.swiglu else 1) * f, h, True) + linear(h, f, False)
    params += norm()
    if vocab and model.untie_embeddings_and_output_weights and pp == 1:
        params.append(StageParameter((vocab, h), tp, 0, embedding=True))
    return [p for p in params if len(p.shape) > 1] + [p for p in params if len(p.shape) == 1]


def _eight_bit_moments(numel: int, moments: int) -> int:
    if numel < EIGHT_BIT_MIN:
        return moments * FP32 * numel
    return moments * (numel + FP32 * -(-numel // EIGHT_BIT_BLOCK))


def _galore(shape: tuple, rank: int, eight_bit: bool) -> int:
    m, n = shape
    r = min(rank, m, n)
    projector, projected = (r * n, m * r) if m >= n else (m * r, r * n)
    moments = _eight_bit_moments(projected, 2) if eight_bit else 2 * FP32 * projected
    return FP32 * projector + moments


def _shampoo(shape: tuple, block: int) -> int:
    """pytorch_optimizer's ScalableShampoo on one matrix: its momentum and the RMSProp graft's momentum and
    statistics (4 bytes an element each), and, unless a side exceeds the no-preconditioning bound, a statistics
    and a preconditioner [d, d] for each side d of each block of the shape as it reshapes it (its
    merge_small_dims: [m, n] with m > block is seen as [1, m, n], so each block also has a [1, 1] pair)."""
    state = 3 * FP32 * math.prod(shape)
    if any(d > max(8192, block) for d in shape):
        return state
    merged, product = [], 1
    for d in shape:  # merge_small_dims(shape, block)
        product *= d
        if product > block:
            merged.append(product // d)
            product = d
    merged.append(product)
    if len(merged) < 2:
        return state
    sides = [[block] * ((d - 1) // block) + [d - (d - 1) // block * block] if 0 < block < d else [d]
             for d in merged]
    for sizes in itertools.product(*sides):
        state += 2 * FP32 * sum(d * d for d in sizes)
    return state


def _whole_matrix_state(name: str, param: StageParameter, opt) -> tuple[int, bool]:
    """(state bytes, stepped as a gathered whole copy) of one parameter under a whole-matrix optimizer."""
    if name == "adam8bit":
        gathered = param.split > 1
        return _eight_bit_moments(param.numel if gathered else param.local_numel, 2), gathered
    if len(param.shape) != 2 or param.embedding:  # AdamW on the shard
        return 2 * FP32 * param.local_numel, False
    if name in ("muon", "muonclip"):
        state = FP32 * param.numel
    elif name in ("galoreadamw", "galoreadamw8bit"):
        state = _galore(param.shape, GALORE_DEFAULTS["rank"], name in EIGHT_BIT)
    else:  # dshampooadamw
        state = _shampoo(param.shape, opt.dshampooadamw_max_preconditioner_dim)
    return state, param.split > 1


def _elementwise_state(name: str, param: StageParameter, opt, sdp: int) -> int:
    n = param.local_numel
    if name in ("sgd", "apex.sgd"):
        return FP32 * n if opt.sgd_momentum > 0 else 0
    if name == "ds.onebitlamb":
        return int(n * (8 + 4 + 4 + 4 / max(1, sdp)))
    if name == "galoreadamw8bitperlayer":
        if len(param.shape) == 2 and not param.embedding:
            return _galore(param.shape, GALORE_DEFAULTS["rank"], eight_bit=True)
        return 2 * FP32 * n
    return ELEMENTWISE_STATE[name] * n


def optimizer_memory(run, world_size: int) -> dict[str, float]:
    """{"state": the optimizer state's bytes, "masters": the fp32 copies' bytes} on the most loaded device."""
    t, p = run.training, run.parallel
    if t.zero.cpu_optimizer:
        return {"state": 0.0, "masters": 0.0}
    name, opt = t.optimizer.optimizer, t.optimizer
    if opt.ds_fused_adam:  # build_optimizer then runs DeepSpeed's FusedAdam whatever --optimizer says
        name = "adam"
    mixed = t.precision.bf16 or t.precision.fp16
    sdp = p.data_parallel_size(world_size) * p.sp
    params = stage_parameters(run.model, p.tp, p.pp)
    zero = t.zero.zero_stage
    if name not in WHOLE_MATRIX:
        state = sum(_elementwise_state(name, q, opt, sdp) for q in params)
        local = sum(q.local_numel for q in params)
        masters = FP32 * local if (mixed or zero >= 1) else 0
        divisor = sdp if zero >= 1 else 1
        if name == "galoreadamw8bitperlayer" or name == "ds.onebitlamb":
            divisor = 1  # ZeRO-0 only (refused otherwise)
        return {"state": state / divisor, "masters": masters / divisor}
    ranks = sdp if zero in (1, 2) else 1
    from megatron.optimizer.full_matrix import owners  # full_matrix imports torch.distributed: only when needed

    owner = owners([q.local_numel for q in params], ranks)
    state, masters, eight_bit = [0] * ranks, [0] * ranks, [False] * ranks
    for q, rank in zip(params, owner):
        size, gathered = _whole_matrix_state(name, q, opt)
        state[rank] += size
        if gathered:
            masters[rank] += FP32 * q.numel
        elif mixed:
            masters[rank] += FP32 * q.local_numel
        eight_bit[rank] |= name == "adam8bit" and (q.numel if gathered else q.local_numel) >= EIGHT_BIT_MIN
    for rank in range(ranks):
        state[rank] += QUANTISATION_MAPS if eight_bit[rank] else 0
    worst = max(range(ranks), key=lambda r: state[r] + masters[r])
    return {"state": float(state[worst]), "masters": float(masters[worst])}
