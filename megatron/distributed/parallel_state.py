"""One object that owns every process group of a layout (tp, sp, dp, pp and their unions).

Rank order (Megatron's, extended by Ulysses): tensor-parallel fastest, then Ulysses
sequence-parallel, then data-parallel, then pipeline:

    rank = tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank))

so a tp group is `tp` consecutive ranks, and the (pipe, data, model) order matches
DeepSpeed's `PipeModelDataParallelTopology` when sp == 1 (with sp > 1 its "data" axis is sp × dp,
model/pipeline.py). With tp == 1 the sp groups are consecutive ranks and the sp × dp groups are
blocks of sp·dp ranks, as upstream's initialize_model_parallel makes them (upstream allows sp only
with tp == pp == 1). Nothing here is global: build a
`ParallelState` once and pass it to whatever needs groups. `ParallelState.single()` is the
layout of one process, which needs no torch.distributed at all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron.config.model import TransformerConfig
from megatron.config.parallel import ParallelConfig, validate_layout

AXES = ("tp", "sp", "dp", "pp")  # fastest-varying first


@dataclass
class Coordinates:
    tp: int
    sp: int
    dp: int
    pp: int


@dataclass
class ParallelState:
    world_size: int
    rank: int
    tp_size: int = 1
    pp_size: int = 1
    sp_size: int = 1
    groups: dict = field(default_factory=dict)  # name -> ProcessGroup (None when world size is 1)
    group_ranks: dict = field(default_factory=dict)  # name -> list of global ranks of my group

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def single(cls) -> "ParallelState":
        """The layout of one process: every group is just this rank; no torch.distributed needed."""
        ps = cls(world_size=1, rank=0)
        ps.group_ranks = {name: [0] for name in ("tp", "sp", "dp", "pp", "sdp", "mp", "embedding", "world")}
        ps.groups = {name: None for name in ps.group_ranks}
        return ps

    @classmethod
    def build(
        cls,
        parallel: ParallelConfig,
        model: Optional[TransformerConfig] = None,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> "ParallelState":
        """Validate the layout, then create every group (collectively: all ranks must call this)."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        validate_layout(world_size, parallel, model)
        ps = cls(world_size=world_size, rank=rank, tp_size=parallel.tp, pp_size=parallel.pp,
                 sp_size=parallel.sp)
        if world_size == 1:
            single = cls.single()
            ps.groups, ps.group_ranks = single.groups, single.group_ranks
            return ps
        if not dist.is_initialized():
            raise RuntimeError(
                f"ParallelState.build for world size {world_size} needs torch.distributed to be initialized "
                "first (megatron.distributed.initialize_distributed)"
            )
        for name, varying in (("tp", ("tp",)), ("sp", ("sp",)), ("dp", ("dp",)), ("pp", ("pp",)),
                              ("sdp", ("sp", "dp")), ("mp", ("tp", "pp"))):
            ps._make_groups(name, varying)
        ps._make_embedding_groups()
        ps.groups["world"] = dist.group.WORLD
        ps.group_ranks["world"] = list(range(world_size))
        return ps

    def _sizes(self) -> dict:
        return {"tp": self.tp_size, "sp": self.sp_size, "dp": self.dp_size, "pp": self.pp_size}

    def rank_of(self, tp: int = 0, sp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp_size * (sp + self.sp_size * (dp + self.dp_size * pp))

    def coordinates(self, rank: Optional[int] = None) -> Coordinates:
        r = self.rank if rank is None else rank
        tp = r % self.tp_size
        r //= self.tp_size
        sp = r % self.sp_size
        r //= self.sp_size
        dp = r % self.dp_size
        return Coordinates(tp=tp, sp=sp, dp=dp, pp=r // self.dp_size)

    def all_groups(self, varying: tuple) -> list[list[int]]:
        """Every group in which exactly the axes in `varying` change, in a fixed order."""
        sizes = self._sizes()
        fixed = [a for a in AXES if a not in varying]
        out = []
        for fixed_vals in itertools.product(*(range(sizes[a]) for a in fixed)):
            coords = dict(zip(fixed, fixed_vals))
            ranks = []
            for var_vals in itertools.product(*(range(sizes[a]) for a in reversed(varying))):
                coords.update(zip(reversed(varying), var_vals))
                ranks.append(self.rank_of(**coords))
            out.append(sorted(ranks))
        return out

    def _make_groups(self, name: str, varying: tuple) -> None:
        for ranks in self.all_groups(varying):
            group = dist.new_group(ranks)  # collective: every rank creates every group, in one order
            if self.rank in ranks:
                self.groups[name] = group
                self.group_ranks[name] = ranks

    def _make_embedding_groups(self) -> None:
        # First and last pipeline stage of each pp group: they hold the tied embedding/output weight.
        for pp_ranks in self.all_groups(("pp",)):
            ranks = sorted({pp_ranks[0], pp_ranks[-1]})
            group = dist.new_group(ranks)
            if self.rank in ranks:
                self.groups["embedding"] = group
                self.group_ranks["embedding"] = ranks
        if "embedding" not in self.groups:
            self.groups["embedding"] = None
            self.group_ranks["embedding"] = []

    # ---- sizes and ranks ------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size * self.sp_size)

    @property
    def tp_rank(self) -> int:
        return self.coordinates().tp

    @property
    def sp_rank(self) -> int:
        return self.coordinates().sp

    @property
    def dp_rank(self) -> int:
        return self.coordinates().dp

    @property
    def pp_rank(self) -> int:
        return self.coordinates().pp

    @property
    def tp_group(self):
        return self.groups["tp"]

    @property
    def sp_group(self):
        return self.groups["sp"]

    @property
    def dp_group(self):
        return self.groups["dp"]

    @property
    def pp_group(self):
        return self.groups["pp"]

    @property
    def sdp_group(self):
        """Sequence × data parallel: where ZeRO shards and gradients are averaged when Ulysses is on."""
        return self.groups["sdp"]

    @property
    def embedding_group(self):
        return self.groups["embedding"]

    @property
    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp_size} × sp {self.sp_size} × dp {self.dp_size} × "
                f"pp {self.pp_size}; rank {self.rank} = {self.coordinates()}")

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The object DeepSpeed takes as `mpu`: Megatron's parallel_state function names over a ParallelState.

    "Model parallel" is tp × pp, as in Megatron-DeepSpeed; Ulysses' "sequence data parallel"
    group (sp × dp) is where ZeRO partitions and gradients are reduced.
    """

    def __init__(self, ps: ParallelState):
        self.ps = ps

    def _size(self, name):
        return len(self.ps.group_ranks[name])

    def _rank(self, name):
        return self.ps.group_ranks[name].index(self.ps.rank)

    # tensor / model parallel
    def get_tensor_model_parallel_group(self):
        return self.ps.groups["tp"]

    def get_tensor_model_parallel_world_size(self):
        return self.ps.tp_size

    def get_tensor_model_parallel_rank(self):
        return self.ps.tp_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.group_ranks["tp"][0]

    def get_model_parallel_group(self):
        return self.ps.groups["mp"]

    def get_model_parallel_world_size(self):
        return self._size("mp")

    def get_model_parallel_rank(self):
        return self._rank("mp")

    def get_slice_parallel_group(self):
        return self.ps.groups["tp"]

    def get_slice_parallel_world_size(self):
        return self.ps.tp_size

    def get_slice_parallel_rank(self):
        return self.ps.tp_rank

    # data parallel
    def get_data_parallel_group(self):
        return self.ps.groups["dp"]

    def get_data_parallel_world_size(self):
        return self.ps.dp_size

    def get_data_parallel_rank(self):
        return self.ps.dp_rank

    def get_data_parallel_group_ranks(self):
        return list(self.ps.group_ranks["dp"])

    # pipeline
    def get_pipe_parallel_group(self):
        return self.ps.groups["pp"]

    def get_pipe_parallel_world_size(self):
        return self.ps.pp_size

    def get_pipe_parallel_rank(self):
        return self.ps.pp_rank

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    # Ulysses sequence parallel
    def get_sequence_parallel_group(self):
        return self.ps.groups["sp"]

    def get_sequence_parallel_world_size(self):
        return self.ps.sp_size

    def get_sequence_parallel_rank(self):
        return self.ps.sp_rank

    def get_sequence_data_parallel_group(self):
        return self.ps.groups["sdp"]

    def get_sequence_data_parallel_world_size(self):
        return self._size("sdp")

    def get_sequence_data_parallel_rank(self):
        return self._rank("sdp")
