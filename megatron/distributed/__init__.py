"""Run anywhere: launcher discovery, device and backend choice, process groups.

    env = initialize_distributed()            # torchrun, mpiexec (MPICH/OpenMPI/PALS), srun, or plain python
    ps = ParallelState.build(parallel, model)  # tp / sp / dp / pp groups, ps.mpu() for DeepSpeed
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.distributed import device as _device
from megatron.distributed import launcher as _launcher
from megatron.distributed.device import BackendError
from megatron.distributed.launcher import LauncherError, LaunchInfo
from megatron.distributed.parallel_state import DeepSpeedMPU, ParallelState


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    device: torch.device
    backend: str
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def initialize_distributed(backend: Optional[str] = None, timeout_minutes: float = 30.0,
                           use_deepspeed: bool = True) -> DistEnv:
    """Discover the launch, pick device and backend, and initialise torch.distributed (via DeepSpeed).

    Safe to call when a process group already exists (tests): it is then reused.
    """
    info = _launcher.discover()
    _launcher.export(info)
    device, backend = _device.select(backend, info.local_rank)
    if backend == "gloo" and info.local_world_size == info.world_size:  # one node: talk over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    set_default_group_timeout(timeout)
    if use_deepspeed:  # before DeepSpeed's comm JIT-builds its shared-memory op
        from megatron.deepspeed_compat import ensure_torch_extensions_dir

        ensure_torch_extensions_dir(info.rank)
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            with _rank_zero_prints(info.rank):
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                           rank=info.rank, world_size=info.world_size)
        else:
            dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    elif use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher,
                   device, backend, info.master_addr, info.master_port)


@contextlib.contextmanager
def _rank_zero_prints(rank: int):
    """DeepSpeed's start-up prints the same notices on every rank ("DeepSpeed deepspeed_shm_comm_op built
    successfully" on CPU): rank 0 says them once, the others' print()s go nowhere. Errors still raise."""
    if rank == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on: ours (ParallelState) and the
    ones DeepSpeed creates without passing a timeout (torch's new_group falls back to a module default,
    30 minutes for gloo, 10 for NCCL). Checked against torch 2.13: `distributed_c10d.default_pg_timeout` and
    `default_pg_nccl_timeout` are what `_get_default_timeout` returns."""
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(c10d, name):
            raise RuntimeError(f"torch {torch.__version__} has no torch.distributed.distributed_c10d.{name}; "
                               "--distributed-timeout-minutes cannot reach every process group: update "
                               "megatron/distributed/__init__.py:set_default_group_timeout for this torch")
        if name == "default_pg_timeout" or isinstance(getattr(c10d, name), datetime.timedelta):
            setattr(c10d, name, timeout)


def _loopback_interface() -> str:
    return "lo" if os.path.exists("/sys/class/net/lo") else "lo0"


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "BackendError", "DeepSpeedMPU", "DistEnv", "LaunchInfo", "LauncherError", "ParallelState",
    "destroy_distributed", "initialize_distributed",
]
