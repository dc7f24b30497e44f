"""Shared pytest set-up: tests run on CPU, offline, with DeepSpeed's JIT ops cached inside .venv."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- the fast layer: `pytest -m "not slow"` ------------------------------------------------------------------
# A test is slow when it starts processes: multi-rank runs (tests/multirank.py's run_ranks), torchrun / mpiexec /
# subprocess runs of pretrain_gpt.py or the tools, and everything under tests/faults/. They are marked at
# collection, from the source: a test function, or a fixture it uses, that refers to run_ranks, subprocess,
# Popen, faultrun's Job (or to a function of its module, or of a helper module of tests/, that does). What the
# source does not show, the guard below catches: a test not marked slow whose own code starts a process fails,
# naming the call, so a new multi-rank test cannot land in the fast layer unnoticed. @pytest.mark.slow marks
# any other test by hand.

import ast  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

TESTS = ROOT / "tests"
STARTS_PROCESSES = {"run_ranks", "subprocess", "Popen", "Job", "Process", "spawn", "start_processes"}
_spawning_in: dict = {}  # {module path: names of its functions and fixtures that start processes}


def _names_used(node) -> set:
    return ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)})


def _spawning(path: Path, known: set) -> set:
    """The module-level functions (fixtures included) and classes of `path` that start processes, directly or
    through another one: they use a name of `known` or of this set."""
    defined = [n for n in ast.parse(path.read_text()).body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    used = {node: _names_used(node) for node in defined}
    found: set = set()
    while True:
        more = {node.name for node in defined if node.name not in found and used[node] & (known | found)}
        if not more:
            return found
        found |= more


def _spawning_names(path: Path) -> set:
    if path not in _spawning_in:
        if "helpers" not in _spawning_in:  # the helper modules of tests/ (multirank.py, engine_cases.py, ...)
            helpers: set = set()
            for helper in [*TESTS.glob("*.py"), *TESTS.glob("faults/*.py")]:
                if not helper.name.startswith(("test_", "conftest")):
                    helpers |= _spawning(helper, STARTS_PROCESSES)
            _spawning_in["helpers"] = helpers
        _spawning_in[path] = _spawning(path, STARTS_PROCESSES | _spawning_in["helpers"])
    return _spawning_in[path]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (multi-rank runs, torchrun/mpiexec/subprocess "
                                       "runs, tests/faults/); `pytest -m 'not slow'` runs the unit layer")
    _guard_process_starts()


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path))
        if TESTS / "faults" in path.parents or (
                path.suffix == ".py" and ({getattr(item, "originalname", item.name), *item.fixturenames}
                                          & _spawning_names(path))):
            item.add_marker(pytest.mark.slow)


_running: list = [None]  # the test being run (setup, call and teardown)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        yield
    finally:
        _running[0] = None


_STDLIB = sysconfig.get_paths()["stdlib"]


def _check_process_start(what: str) -> None:
    """Fail a test not marked slow whose own code (a file of tests/) starts a process. Processes that library
    code starts (DataLoader workers, DeepSpeed's probes, a tool's worker pool) do not count."""
    item = _running[0]
    if item is None or item.get_closest_marker("slow") is not None:
        return
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_STDLIB) or f"{os.sep}torch{os.sep}multiprocessing{os.sep}" in name):
            break
        frame = frame.f_back
    if frame is not None and TESTS in Path(frame.f_code.co_filename).resolve().parents:
        pytest.fail(f"{item.nodeid} starts a process ({what} at {frame.f_code.co_filename}:{frame.f_lineno}) but "
                    "is not marked slow: mark it @pytest.mark.slow (tests/conftest.py did not see it in the "
                    "source)", pytrace=False)


def _guard_process_starts() -> None:
    import multiprocessing.process
    import subprocess

    execute_child = subprocess.Popen._execute_child
    start = multiprocessing.process.BaseProcess.start

    def guarded_execute_child(self, *args, **kwargs):
        _check_process_start("subprocess")
        return execute_child(self, *args, **kwargs)

    def guarded_start(self):
        _check_process_start("multiprocessing")
        return start(self)

    subprocess.Popen._execute_child = guarded_execute_child
    multiprocessing.process.BaseProcess.start = guarded_start
