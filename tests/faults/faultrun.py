"""Launch a tiny 2-rank pretrain_gpt.py job under torchrun, mpiexec or no launcher, and break it.

    job = Job.start(tmp_path, "torchrun", "--save", str(save), ...)
    job.wait_for("iteration=       3/")      # a line in the ranks' output
    job.signal_launcher(signal.SIGTERM)       # or signal_group / signal_rank(1) / rank_pid(1)
    codes = job.wait(timeout=90)              # launcher's (or each rank's) exit code; fails the test on a hang

Every job runs in its own process group so a test can signal the whole group, as PBS and Slurm do at
walltime. Nothing is left behind: `close()` SIGKILLs every process of the job (found by a marker in their
environment, so also the ranks torchrun puts in sessions of their own and any orphan), and `close_all()`
(the suite's conftest calls it after every test, pass or fail, and at exit) closes every job still open.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import uuid
import subprocess
import sys
import time
from pathlib import Path

import psutil

from engine_cases import rank_env
from multirank import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A tiny model that steps in milliseconds; workers > 0 so that DataLoader workers exist to be signalled.
TINY = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "1e-3", "--lr-decay-style", "constant", "--mock-data", "--vocab-size", "64",
        "--log-interval", "1", "--eval-iters", "0", "--seed", "1234", "--hidden-dropout", "0",
        "--attention-dropout", "0"]


def mpiexec() -> str | None:
    return shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")


def _clean_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra or {})
    return env


_OPEN: list = []  # jobs started and not closed yet


def close_all() -> None:
    """Close every job still open (a test that failed before its own close())."""
    while _OPEN:
        _OPEN[-1].close()


atexit.register(close_all)


class Job:
    def __init__(self, procs, logs, launcher, marker):
        self.procs, self.logs, self.launcher, self.marker = procs, logs, launcher, marker
        _OPEN.append(self)

    @classmethod
    def start(cls, tmp_path: Path, launcher: str, *flags: str, nprocs: int = 2, env: dict | None = None,
              preexec_fn=None, wrapper=()) -> "Job":
        marker = uuid.uuid4().hex  # in every process of the job's environment: finds them all, launcher or not
        env = {**(env or {}), "FAULTRUN_JOB": marker}
        argv = [str(ROOT / "pretrain_gpt.py"), *TINY, *flags]
        logs = [tmp_path / f"{launcher}.log"]
        if launcher == "torchrun":
            cmds = [[str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port()), *argv]]
            envs = [_clean_env(env)]
        elif launcher == "mpiexec":
            cmds = [[mpiexec(), "-n", str(nprocs), sys.executable, *argv]]
            envs = [_clean_env(env)]
        else:  # no launcher: each rank started by hand with the torch env variables
            port = free_port()
            cmds = [[*wrapper, sys.executable, *argv] for _ in range(nprocs)]
            envs = [_clean_env({**rank_env(r, nprocs, port), **(env or {})}) for r in range(nprocs)]
            logs = [tmp_path / f"rank{r}.log" for r in range(nprocs)]
        job = cls([], logs, launcher, marker)
        try:
            for cmd, e, log in zip(cmds, envs, logs):  # one process group for the whole job, as a batch job has
                group = {"process_group": 0 if not job.procs else job.procs[0].pid}  # the first one leads it
                with open(log, "w") as out:
                    job.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT,
                                                      preexec_fn=preexec_fn, **group))
        except BaseException:
            job.close()
            raise
        return job

    @classmethod
    def start_until(cls, tmp_path: Path, launcher: str, text: str, *flags: str, **kwargs) -> "Job":
        """start(), then wait_for(text); a start that lost its free port to another process (EADDRINUSE,
        other tests run beside this one) is retried with a new port (a MASTER_PORT given in env too)."""
        for attempt in range(3):
            job = cls.start(tmp_path, launcher, *flags, **kwargs)
            try:
                job.wait_for(text)
                return job
            except AssertionError:
                if "EADDRINUSE" not in job.output() or attempt == 2:
                    raise
                if "MASTER_PORT" in (kwargs.get("env") or {}):
                    kwargs["env"] = {**kwargs["env"], "MASTER_PORT": str(free_port())}
        raise AssertionError("unreachable")

    def output(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while text not in self.output():
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                self.close()
                raise AssertionError(f"never saw {text!r}:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> list[int]:
        """Exit codes; a job still running after `timeout` seconds is killed and fails the test (a hang)."""
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.time())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"still running after {timeout} s (a hang):\n{self.output()[-4000:]}")

    def _tree(self) -> list:
        out = []
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                out += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
        return out

    def rank_pids(self) -> list[int]:
        """The rank processes (not launchers, not DataLoader workers), by rank: they have RANK (torchrun, no
        launcher) or PMI_RANK (mpiexec) in their environment and their parent has not."""
        found = {}
        for p in self._tree():
            try:
                env, parent_env = p.environ(), p.parent().environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                continue
            rank = env.get("RANK") or env.get("PMI_RANK")
            if rank is not None and not (parent_env.get("RANK") or parent_env.get("PMI_RANK")):
                found[int(rank)] = p.pid
        return [found[r] for r in sorted(found)]

    def signal_rank(self, rank: int, sig: int) -> None:
        os.kill(self.rank_pids()[rank], sig)

    def signal_launcher(self, sig: int) -> None:
        self.procs[0].send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Every process of the job at once, launcher, ranks and DataLoader workers, as PBS and Slurm signal
        a job at walltime (torchrun puts ranks in sessions of their own, so a killpg would miss them)."""
        os.killpg(os.getpgid(self.procs[0].pid), sig)
        for p in self._marked():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def _marked(self) -> list:
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get("FAULTRUN_JOB") == self.marker:
                    out.append(p)
        return out

    def leftovers(self) -> list[str]:
        """Processes of the job still alive (an orphaned rank or DataLoader worker)."""
        out = []
        for p in self._marked():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
        return out

    def close(self) -> None:
        """SIGKILL everything the job started (torchrun puts each rank in its own session: walk the tree)."""
        if self in _OPEN:
            _OPEN.remove(self)
        for p in self._tree() + self._marked():
            with contextlib.suppress(psutil.Error):
                p.kill()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def pointer(save: Path) -> int | None:
    tracker = save / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else None
