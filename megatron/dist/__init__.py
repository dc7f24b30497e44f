"""Run anywhere: launcher discovery, device and backend choice, process groups.

    env = initialize_distributed()            # torchrun, mpiexec (MPICH/OpenMPI/PALS), srun, or plain python
    ps = ParallelState.build(parallel, model)  # tp / sp / dp / pp groups, ps.mpu() for DeepSpeed
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.dist import device as _device
from megatron.dist import launcher as _launcher
from megatron.dist.device import BackendError
from megatron.dist.launcher import LauncherError, LaunchInfo
from megatron.dist.parallel_state import DeepSpeedMPU, ParallelState


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
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                       rank=info.rank, world_size=info.world_size)
        else:
            dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    elif use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher,
                   device, backend, info.master_addr, info.master_port)


def _loopback_interface() -> str:
    return "lo" if os.path.exists("/sys/class/net/lo") else "lo0"


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "BackendError", "DeepSpeedMPU", "DistEnv", "LaunchInfo", "LauncherError", "ParallelState",
    "destroy_distributed", "initialize_distributed",
]
