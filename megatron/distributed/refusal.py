"""Say a refusal that every rank reaches once, whichever rank exits first.

An error every rank detects (bad flags, the layout, the LR schedule against the checkpoint's) is printed by rank
0 only, not once per rank. But under a launcher that ends the whole job when one rank exits (torchrun and
mpiexec SIGTERM the others), a rank that exits first would end rank 0 before it printed, and the user would see
exit 2 and no message. So no rank exits before the message is out:

- rank 0 prints, confirms in the job's store, and waits (bounded) until every other rank has seen the
  confirmation: where rank 0 hosts the store, leaving earlier would take it away from a rank still waiting;
- every other rank waits (bounded, `wait_s()`) for that confirmation before it exits, and prints the message
  itself when the confirmation does not come (rank 0 died, is stuck, or did not reach the same verdict) or
  the store cannot be reached. The message then appears more than once only in that rare case.

The store: once torch.distributed is initialised, the default group's; before (a refusal of the flags), the
job's rendezvous TCPStore at MASTER_ADDR:MASTER_PORT, hosted by torchrun's agent, or else by rank 0, as
init_process_group would host it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Callable, Optional

import torch.distributed as dist

from megatron.distributed.launcher import LauncherError, discover
from megatron.errors import MegatronError

WAIT_ENV = "MEGATRON_REFUSAL_WAIT_S"
DEFAULT_WAIT_S = 30.0
_said: dict = {}  # {rank: refusals said}: each refusal has keys of its own (tests call main() several times)


def wait_s(env=None) -> float:
    """How long a rank waits for the others (seconds): MEGATRON_REFUSAL_WAIT_S, else 30."""
    env = os.environ if env is None else env
    try:
        return max(0.0, float(env.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        return DEFAULT_WAIT_S


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _keys(rank: int, env=None) -> tuple[str, str, str]:
    """(printed, seen count, all seen) for `rank`'s next refusal, in this launch attempt (torchrun keeps its
    store across --max-restarts: an earlier attempt's confirmation is never read as this one's)."""
    env = os.environ if env is None else env
    _said[rank] = _said.get(rank, 0) + 1
    prefix = f"megatron_refusal/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_said[rank]}"
    return f"{prefix}/printed", f"{prefix}/seen", f"{prefix}/all_seen"


def job_store(rank: int, world_size: int, master_addr: Optional[str], master_port: Optional[int],
              timeout_s: float):
    """A store every rank of the job reaches: the default group's once torch.distributed is initialised, else
    the rendezvous TCPStore (this rank hosts it when it is rank 0 and torchrun's agent does not); None when
    there is none or it cannot be created or reached within `timeout_s`."""
    if not dist.is_available():
        return None
    if dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store

        try:
            return _get_default_store()
        except (RuntimeError, ValueError):  # a group made without a store (the mpi backend)
            return None
    if not master_addr or not master_port:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        return dist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0 and not agent_hosts_it,
                             timeout=datetime.timedelta(seconds=max(timeout_s, 0.1)), wait_for_workers=False)
    except (RuntimeError, OSError, ValueError):  # the port is taken, or rank 0's store never came up
        return None


def say_once(message: str, rank: int, world_size: int, store=None, wait: Optional[float] = None,
             printer: Callable[[str], None] = _stderr) -> None:
    """Print `message`, which every rank reached, once for the whole job (see the module docstring). `store` is
    a torch.distributed Store every rank shares, or a callable returning one (or None), called with the time
    left; call it on every rank that refuses, before torch.distributed is torn down."""
    wait = wait_s() if wait is None else wait
    if world_size <= 1:
        printer(message)
        return
    deadline = time.monotonic() + wait

    def left() -> datetime.timedelta:
        return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.01))

    printed, seen, all_seen = _keys(rank)
    if rank == 0:
        printer(message)
        try:
            store = store(left().total_seconds()) if callable(store) else store
            if store is not None:
                store.set(printed, "1")
                store.wait([all_seen], left())
        except (RuntimeError, OSError):  # a rank that did not come in time prints for itself
            pass
        return
    try:
        store = store(left().total_seconds()) if callable(store) else store
        if store is None:
            raise RuntimeError("no store")
        store.wait([printed], left())
    except (RuntimeError, OSError):  # no confirmation from rank 0: it may never print, so this rank does
        printer(message)
        return
    try:
        if store.add(seen, 1) == world_size - 1:
            store.set(all_seen, "1")
    except (RuntimeError, OSError):
        pass


def say_refusal(error, rank: int, world_size: int, same_on_every_rank: bool, master_addr=None,
                master_port=None, prog: str = "pretrain_gpt.py") -> None:
    """A refusal every rank reaches is printed once for the job, whichever rank exits first (rank 0 prints it;
    the others wait, bounded, for it to confirm and print it themselves if it does not): `say_once`. One that
    may concern this rank's files only, every rank that sees it says, naming itself."""
    if not same_on_every_rank:
        print(f"{prog} (rank {rank}): {error}", file=sys.stderr, flush=True)
        return
    say_once(f"{prog}: {error}", rank, world_size,
             store=lambda timeout_s: job_store(rank, world_size, master_addr, master_port, timeout_s))


def run_entry_point(prog: str, body: Callable[[], int]) -> int:
    """The exit code of an entry point's `body()`: a MegatronError it raises is said with `say_refusal` (once for
    the job when every rank reaches it, else by each rank with its rank) and becomes its exit code (2), without
    a traceback. The job's place (rank, world size, rendezvous) comes from torch.distributed once it is
    initialised, else from the launcher's environment (a refusal of the flags, before any process group)."""
    try:
        return body()
    except MegatronError as error:
        rank, world_size, master_addr, master_port = _place()
        say_refusal(error, rank, world_size, error.same_on_every_rank, master_addr, master_port, prog=prog)
        return error.exit_code


def _place() -> tuple:
    """(rank, world size, master address, master port) of this process: 0 of 1 when no launcher says more."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), None, None  # the default group's store is used
    try:
        launch = discover()
    except (LauncherError, ValueError, RuntimeError):
        launch = None
    if launch is None:
        return 0, 1, None, None
    return launch.rank, launch.world_size, launch.master_addr, launch.master_port
