"""Rank discovery from each launcher's environment, and device/backend checks (faked environments)."""

import pytest

from megatron.distributed import launcher
from megatron.distributed.device import BackendError, check_backend, default_backend
from megatron.distributed.launcher import LauncherError, discover


def no_mpi():
    return None


class FakeComm:
    """Enough of mpi4py's COMM_WORLD for discovery: sizes, a shared-memory split and bcast."""

    def __init__(self, rank, size, local_rank=None, local_size=None, bcast_value=None):
        self.rank, self.size = rank, size
        self.local = (local_rank if local_rank is not None else rank, local_size or size)
        self.bcast_value = bcast_value

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, _kind):
        return FakeComm(*self.local)

    def bcast(self, payload, root=0):
        return payload if self.rank == root else self.bcast_value


@pytest.fixture(autouse=True)
def no_shared_split(monkeypatch):
    monkeypatch.setattr(launcher, "_split_type_shared", lambda: "shared")


def test_torchrun_environment_is_read_as_is():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    info = discover(env, no_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert (info.launcher, info.master_addr, info.master_port) == ("torchrun", "node0", 1234)


def test_openmpi_environment():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    info = discover(env, no_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (3, 4, 3, 4, "openmpi")
    # single node, no mpi4py: loopback and a port every rank derives identically
    assert info.master_addr == "127.0.0.1" and info.master_port == launcher.DEFAULT_PORT


def test_mpich_hydra_environment():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_JOBID": "ab"}
    info = discover(env, no_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (1, 2, 1, 2, "mpich")
    assert info.master_port == launcher.DEFAULT_PORT + (ord("a") + ord("b")) % 1000


def test_aurora_pals_environment_uses_pals_ids_and_mpi4py_for_rendezvous():
    # Aurora: 2 nodes × 12 tiles; PALS gives rank and local rank, PMI gives the size.
    env = {"PALS_RANKID": "13", "PALS_LOCAL_RANKID": "1", "PMI_RANK": "13", "PMI_SIZE": "24",
           "PALS_LOCAL_SIZE": "12"}
    comm = FakeComm(13, 24, 1, 12, bcast_value=("10.0.0.1", 4567))
    info = discover(env, lambda: comm)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (13, 24, 1, 12, "pals")
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 4567)


def test_slurm_environment():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29600"}
    info = discover(env, no_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (6, 8, 2, 4, "slurm")


def test_mpi4py_last_resort_fills_everything_and_rank0_broadcasts_address():
    info0 = discover({}, lambda: FakeComm(0, 2))
    assert (info0.rank, info0.world_size, info0.launcher) == (0, 2, "mpi4py")
    assert info0.master_addr == "127.0.0.1" and info0.master_port > 0
    info1 = discover({}, lambda: FakeComm(1, 2, bcast_value=("127.0.0.1", 999)))
    assert (info1.rank, info1.master_port) == (1, 999)


def test_plain_python_is_a_single_rank():
    info = discover({}, no_mpi)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")


def test_multi_node_mpi_without_rendezvous_says_what_to_set():
    env = {"PMI_RANK": "0", "PMI_SIZE": "24", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "12"}
    with pytest.raises(LauncherError, match="MASTER_ADDR"):
        discover(env, no_mpi)


def test_missing_world_size_without_mpi4py_is_explained():
    with pytest.raises(LauncherError, match="mpi4py"):
        discover({"PALS_RANKID": "0", "PALS_LOCAL_RANKID": "0"}, no_mpi)


def test_inconsistent_rank_is_refused():
    with pytest.raises(LauncherError, match="outside world size"):
        discover({"RANK": "4", "WORLD_SIZE": "4"}, no_mpi)


def test_backend_choice_and_refusals_on_cpu():
    assert default_backend("cpu") == "gloo"
    check_backend("gloo", "cpu")
    for backend, word in (("nccl", "CUDA"), ("xccl", "XPU"), ("ccl", "oneccl"), ("bogus", "one of")):
        with pytest.raises(BackendError, match=word):
            check_backend(backend, "cpu")


def test_upstreams_ccl_means_xccl_on_xpu_when_the_oneccl_bindings_are_absent(monkeypatch):
    from megatron.distributed import device

    monkeypatch.setattr(device, "oneccl_bindings_available", lambda: False)
    monkeypatch.setattr(device, "xccl_available", lambda: True)
    assert device.resolve_backend("ccl", "xpu") == "xccl"
    assert device.resolve_backend("ccl", "cpu") == "ccl"  # then refused by check_backend, naming oneccl
    assert device.resolve_backend(None, "xpu") == "xccl" and device.resolve_backend("gloo", "xpu") == "gloo"
    monkeypatch.setattr(device, "oneccl_bindings_available", lambda: True)
    assert device.resolve_backend("ccl", "xpu") == "ccl"  # the bindings are there: use them
