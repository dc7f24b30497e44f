"""Who am I in this job? Rank, local rank, world size and rendezvous address from any launcher.

Checked in order: torchrun (RANK/LOCAL_RANK/WORLD_SIZE), OpenMPI (OMPI_COMM_WORLD_*),
Slurm (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS), MPICH / Intel MPI / PALS on Aurora
(PMI_RANK/PMI_SIZE with MPI_LOCALRANKID or PALS_LOCAL_RANKID), and finally mpi4py, which
also supplies what the environment lacks: rank 0 broadcasts its address and a free port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from megatron.errors import MegatronError

DEFAULT_PORT = 29500


class LauncherError(MegatronError, RuntimeError):
    """The launch environment is incomplete or contradictory; the message says what to set."""


@dataclass
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun, openmpi, slurm, mpich, pals, mpi4py, single
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LauncherError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _from_env(env: Mapping[str, str]) -> Optional[LaunchInfo]:
    """The launcher's variables, without any communication; None when no launcher is recognised."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, torch.distributed.launch, or set by hand
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE")
        return LaunchInfo(rank, world, rank if local is None else local,
                          world if local_world is None else local_world, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                          _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
                          _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1, "openmpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "PMI_RANK" not in env:
        return LaunchInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID") or 0,
                          _slurm_tasks_on_node(env), "slurm")
    if "PALS_RANKID" in env or "PMI_RANK" in env or "PMIX_RANK" in env:  # MPICH, Intel MPI, Cray PALS
        rank = _int(env, "PALS_RANKID", "PMI_RANK", "PMIX_RANK")
        world = _int(env, "PMI_SIZE", "PALS_SIZE", "MPI_NRANKS")
        local = _int(env, "PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        local_world = _int(env, "PALS_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
        launcher = "pals" if "PALS_RANKID" in env else "mpich"
        if world is None:
            return LaunchInfo(rank, -1, local if local is not None else -1, local_world or -1, launcher)
        return LaunchInfo(rank, world, local if local is not None else -1, local_world or -1, launcher)
    return None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": the first node's count is what a homogeneous job has.
    value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    return int(value.split("(")[0].split(",")[0])


def _mpi_comm():
    try:
        from mpi4py import MPI
    except Exception:  # not installed, or no MPI library behind it
        return None
    return MPI.COMM_WORLD


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _routable_address() -> str:
    """This host's address as other nodes see it (falls back to the hostname)."""
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return hostname


def discover(env: Optional[Mapping[str, str]] = None, mpi_comm_factory: Callable = _mpi_comm) -> LaunchInfo:
    """Rank, sizes and rendezvous of this process; fills gaps with mpi4py when a launcher left them."""
    env = os.environ if env is None else env
    info = _from_env(env)
    comm = None
    if info is None or info.world_size < 0 or info.local_rank < 0:
        comm = mpi_comm_factory()
        if comm is not None and comm.Get_size() > 1:
            local = comm.Split_type(_split_type_shared())
            info = LaunchInfo(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(),
                              info.launcher if info else "mpi4py")
        elif info is None:
            info = LaunchInfo(0, 1, 0, 1, "single")
        else:
            raise LauncherError(
                f"the {info.launcher} environment gives this rank ({info.rank}) but not the world size or local "
                "rank, and mpi4py cannot fill them in: install mpi4py in this environment, or set WORLD_SIZE "
                "and LOCAL_RANK"
            )
    _check(info)
    info.master_addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    info.master_port = port
    if info.master_addr is None or info.master_port is None:
        _fill_rendezvous(info, env, comm if comm is not None else (mpi_comm_factory() if info.world_size > 1 else None))
    return info


def _split_type_shared():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _check(info: LaunchInfo) -> None:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LauncherError(f"{info.launcher}: rank {info.rank} is outside world size {info.world_size}")
    if info.local_world_size < 1 or not 0 <= info.local_rank < info.local_world_size:
        raise LauncherError(
            f"{info.launcher}: local rank {info.local_rank} is outside local world size {info.local_world_size}"
        )


def _fill_rendezvous(info: LaunchInfo, env: Mapping[str, str], comm) -> None:
    if info.world_size == 1:
        info.master_addr = info.master_addr or "127.0.0.1"
        info.master_port = info.master_port or free_port("127.0.0.1")
        return
    if comm is not None and comm.Get_size() == info.world_size:
        # Rank 0 decides; everyone agrees. A single-node job stays on loopback.
        if info.rank == 0:
            addr = info.master_addr or ("127.0.0.1" if info.local_world_size == info.world_size else _routable_address())
            port = info.master_port or free_port()
            payload = (addr, port)
        else:
            payload = None
        info.master_addr, info.master_port = comm.bcast(payload, root=0)
        return
    if info.local_world_size == info.world_size:
        # One node and no way to talk: loopback and a port every rank derives from the same job id.
        job = env.get("PALS_APID") or env.get("PMI_JOBID") or env.get("SLURM_JOB_ID") or env.get("OMPI_MCA_ess_base_jobid") or ""
        info.master_addr = info.master_addr or "127.0.0.1"
        info.master_port = info.master_port or (DEFAULT_PORT + (sum(map(ord, job)) % 1000 if job else 0))
        return
    raise LauncherError(
        f"{info.launcher} launched {info.world_size} ranks on several nodes but MASTER_ADDR/MASTER_PORT are not "
        "set and mpi4py is not available to agree on them: export MASTER_ADDR=<first node's address> and "
        "MASTER_PORT=<free port> before launching, or install mpi4py"
    )


def export(info: LaunchInfo) -> None:
    """Write the standard variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) for torch and DeepSpeed."""
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size), "MASTER_ADDR": str(info.master_addr),
        "MASTER_PORT": str(info.master_port),
    })
