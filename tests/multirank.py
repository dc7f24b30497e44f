"""Run a function on N CPU ranks with gloo and collect what each rank returns (for multi-rank tests).

    results = run_ranks(4, my_check, arg1, arg2)   # my_check(rank, world_size, *args) -> picklable

`my_check` must be a module-level function (it is pickled into the rank processes). Each rank has
torch.distributed initialised with gloo on 127.0.0.1 and RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set,
so `deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)` also works inside.
A failure on any rank raises here with that rank's traceback.

Ranks are forked from multiprocessing's fork server, which imports torch, DeepSpeed and the training stack once
per test session (PRELOAD): a rank that spawned a fresh interpreter spent several seconds on those imports, and the
suite starts well over a hundred ranks on 2 cores. The server has run no torch operation (one thread, no OpenMP pool),
so forking it is safe. Each rank gets what a spawned one would: this process's environment, working directory,
sys.path, stdout and stderr (so pytest captures rank output into the running test's report), and freshly seeded
torch and numpy generators.
The modules in PRELOAD are imported once, in the server's environment (the first launch's): a module that read
an environment variable at import time would keep that value in every later rank (none of ours does; a test that
needs one set before import must set it before the first launch, or use a subprocess).
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp
from multiprocessing import reduction

from megatron.distributed.launcher import free_port as _free_port

# imported once in the fork server; each module a rank would otherwise import itself (a module missing here is
# imported by the rank as before: ImportErrors are ignored by the server)
PRELOAD = ["torch", "torch.distributed", "deepspeed", "megatron.training.loop"]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    return _free_port("127.0.0.1")


def rank_env(rank: int, world_size: int, port: int) -> dict:
    return {
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
    }


class _ParentStreams:
    """This process's stdout and stderr, handed to a rank as file descriptors (the fork server has its own)."""

    def __reduce__(self):
        return _attach_streams, (reduction.DupFd(1), reduction.DupFd(2))


def _attach_streams(out, err) -> None:
    for fd, inherited in ((1, out), (2, err)):
        os.dup2(inherited.detach(), fd)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # effective when the server starts: the first launch of the session
    return ctx


def _worker(rank, world_size, port, fn, args, queue, environ, streams):
    import numpy
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)  # the launching test's environment, not the fork server's
    os.environ.update(rank_env(rank, world_size, port))
    torch.seed()  # fresh default generators, as in a new interpreter (not the fork server's state, shared by all)
    numpy.random.seed()
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return results by rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ, _ParentStreams()),
                         daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 2)
            if p.is_alive():
                p.terminate()
                p.join(5)
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
