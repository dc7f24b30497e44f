"""Which accelerator and which communication backend: cuda/xpu/mps/cpu and nccl/xccl/ccl/gloo.

Picked from what this machine has; `--distributed-backend` (or MEGATRON_DEVICE for the
device) overrides, and a backend that cannot work on the device is refused with the reason.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron.errors import MegatronError

DEVICE_TYPES = ("cuda", "xpu", "mps", "cpu")
BACKENDS = ("nccl", "xccl", "ccl", "gloo", "mpi")
# The DeepSpeed accelerator name for each device type (DS_ACCELERATOR).
DS_ACCELERATOR = {"cuda": "cuda", "xpu": "xpu", "mps": "mps", "cpu": "cpu"}


class BackendError(MegatronError, ValueError):
    """A device/backend choice that cannot work here; the message names the flag and the fix."""


def xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def oneccl_bindings_available() -> bool:
    return importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None


def xccl_available() -> bool:
    probe = getattr(dist, "is_xccl_available", None)
    return bool(probe and probe())


def detect_device_type() -> str:
    forced = os.environ.get("MEGATRON_DEVICE")
    if forced:
        if forced not in DEVICE_TYPES:
            raise BackendError(f"MEGATRON_DEVICE={forced!r} is not one of {DEVICE_TYPES}")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if xpu_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    """The device this rank drives: one GPU / XPU tile per local rank, or the CPU."""
    if device_type == "cuda":
        count = torch.cuda.device_count()
        return torch.device("cuda", local_rank % count)
    if device_type == "xpu":
        count = torch.xpu.device_count()
        return torch.device("xpu", local_rank % count)
    if device_type == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def default_backend(device_type: str) -> str:
    if device_type == "cuda":
        return "nccl"
    if device_type == "xpu":
        if xccl_available():
            return "xccl"
        if oneccl_bindings_available():
            return "ccl"
        raise BackendError(
            "this torch has no xccl backend and oneccl_bindings_for_pytorch is not installed, so XPU ranks "
            "cannot communicate: use a torch with native XPU (2.8+), install the oneCCL bindings, or pass "
            "--distributed-backend gloo"
        )
    return "gloo"


def check_backend(backend: str, device_type: str) -> None:
    """Refuse a backend that cannot carry this device's tensors, saying why and what to use."""
    if backend not in BACKENDS:
        raise BackendError(f"--distributed-backend {backend!r} is not one of {BACKENDS}")
    if backend == "nccl" and (device_type != "cuda" or not dist.is_nccl_available()):
        raise BackendError(
            f"--distributed-backend nccl needs CUDA GPUs and a torch built with NCCL (device here: {device_type}); "
            f"use --distributed-backend {default_backend_safe(device_type)}"
        )
    if backend == "xccl" and (device_type != "xpu" or not xccl_available()):
        raise BackendError(
            f"--distributed-backend xccl needs Intel XPUs and a torch with the xccl backend (device here: "
            f"{device_type}); use --distributed-backend {default_backend_safe(device_type)}"
        )
    if backend == "ccl" and not oneccl_bindings_available():
        raise BackendError(
            "--distributed-backend ccl needs oneccl_bindings_for_pytorch, which is not installed; on XPU with "
            "torch 2.8+ use xccl, elsewhere gloo"
        )
    if backend == "mpi" and not dist.is_mpi_available():
        raise BackendError("--distributed-backend mpi: this torch was built without MPI; use gloo (CPU) instead")


def default_backend_safe(device_type: str) -> str:
    try:
        return default_backend(device_type)
    except BackendError:
        return "gloo"


def resolve_backend(backend: Optional[str], device_type: str) -> str:
    """The backend to initialise: the one asked for, or the device's default. Upstream's recipes pass
    `--distributed-backend ccl` on Aurora; torch 2.8+ has the same oneCCL library built in as `xccl`, so on XPU
    without the oneccl_bindings_for_pytorch package ccl means xccl."""
    if backend is None:
        return default_backend(device_type)
    if backend == "ccl" and device_type == "xpu" and not oneccl_bindings_available() and xccl_available():
        return "xccl"
    return backend


def select(backend: Optional[str], local_rank: int) -> tuple[torch.device, str]:
    """(device, backend) for this rank; also points DeepSpeed at the matching accelerator."""
    device_type = detect_device_type()
    backend = resolve_backend(backend, device_type)
    check_backend(backend, device_type)
    os.environ.setdefault("DS_ACCELERATOR", DS_ACCELERATOR[device_type])
    if backend == "ccl":
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the ccl backend)
    device = device_for_rank(device_type, local_rank)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    elif device_type == "xpu":
        torch.xpu.set_device(device)
    return device, backend


def empty_cache(device: torch.device) -> bool:
    """Return the caching allocator's unused blocks on `device` to the driver (torch.cuda/xpu/mps.empty_cache);
    True when there was such a cache. CPU tensors are not cached by torch: nothing to release, False."""
    backend = {"cuda": getattr(torch, "cuda", None), "xpu": getattr(torch, "xpu", None),
               "mps": getattr(torch, "mps", None)}.get(device.type)
    if backend is None or not hasattr(backend, "empty_cache"):
        return False
    backend.empty_cache()
    return True
