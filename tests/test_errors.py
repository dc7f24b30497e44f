"""One base for the framework's errors (megatron/errors.py), and a refusal every rank reaches said once for the
job whichever rank exits first (megatron/distributed/refusal.py; the 2-rank torchrun runs are in
tests/faults/test_fault_refusals.py)."""

import ast
import datetime
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron.distributed.refusal import say_once
from megatron.errors import CheckpointError, ConfigError, MegatronError

ROOT = Path(__file__).resolve().parents[1]


def _error_classes():
    """(path, class name) of every class named *Error / *Failure defined in megatron/ and tools/."""
    for path in sorted([*(ROOT / "megatron").rglob("*.py"), *(ROOT / "tools").glob("*.py")]):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Failure")):
                yield path, node.name


def _load(path: Path):
    relative = path.relative_to(ROOT).with_suffix("")
    if relative.parts[0] == "megatron":
        return importlib.import_module(".".join(relative.parts))
    spec = importlib.util.spec_from_file_location(f"_errors_test_{relative.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_error_class_derives_from_megatron_error_and_keeps_its_builtin_base():
    found = list(_error_classes())
    assert len(found) >= 14, found  # the two of errors.py, the twelve beside the code that detects them
    for path, name in found:
        cls = getattr(_load(path), name)
        assert issubclass(cls, MegatronError), f"{path}: {name} does not derive from MegatronError"
        builtin = [base for base in cls.__mro__ if base.__module__ == "builtins" and base not in (object,
                                                                                                 BaseException,
                                                                                                 Exception)]
        assert cls is MegatronError or builtin, f"{path}: {name} lost its builtin base (ValueError, RuntimeError)"


def test_exit_codes_and_which_verdicts_are_the_same_on_every_rank():
    from megatron.data.data_list import DataListError
    from megatron.data.indexed_dataset import IndexedDatasetError, MissingFileError
    from megatron.data.tokenizers import TokenizerError
    from megatron.training.engine import EngineConfigError
    from megatron.training.watchdog import EXIT_HANG, CollectiveFailure

    assert ConfigError.same_on_every_rank and EngineConfigError.same_on_every_rank
    for cls in (CheckpointError, DataListError, IndexedDatasetError, MissingFileError, TokenizerError):
        assert not cls.same_on_every_rank, cls
        assert cls.exit_code == 2
    assert CollectiveFailure.exit_code == EXIT_HANG == 3
    assert issubclass(DataListError, ValueError) and issubclass(CheckpointError, RuntimeError)


def _ranks(world_size, store, wait, delays=None, absent=()):
    """say_once on `world_size` threads sharing `store`; rank r starts after delays[r] s; returns the lines
    printed, in order, and each rank's time to return."""
    lines, took, lock = [], {}, threading.Lock()

    def printer(line):
        with lock:
            lines.append(line)

    def rank(r):
        time.sleep((delays or {}).get(r, 0.0))
        start = time.monotonic()
        say_once("refused", r, world_size, store=store, wait=wait, printer=printer)
        took[r] = time.monotonic() - start

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size) if r not in absent]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return lines, took


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch):
    """Each test is a new job: the refusal counts of the ranks it simulates start at 0."""
    import megatron.distributed.refusal as refusal

    monkeypatch.setattr(refusal, "_said", {})


def _store():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=30))
    return store


def test_a_refusal_is_said_once_when_rank_0_comes_last():
    lines, took = _ranks(4, _store(), wait=10.0, delays={0: 1.0})
    assert lines == ["refused"]  # the other ranks waited for rank 0 instead of exiting first, silent
    assert all(t < 5.0 for t in took.values()), took


def test_a_refusal_is_said_once_when_rank_0_comes_first():
    lines, took = _ranks(3, _store(), wait=10.0, delays={1: 0.5, 2: 1.0})
    assert lines == ["refused"]
    assert took[0] >= 0.3, took  # rank 0 stayed until every rank had seen its confirmation


def test_without_rank_0_every_other_rank_says_it_after_the_bounded_wait():
    lines, took = _ranks(3, _store(), wait=0.5, absent=(0,))
    assert lines == ["refused", "refused"]
    assert all(0.4 <= t < 5.0 for t in took.values()), took


def test_without_a_store_rank_0_says_it_and_so_does_each_other_rank():
    lines, _ = _ranks(2, None, wait=0.2)
    assert lines == ["refused", "refused"]


def test_one_rank_says_it_at_once():
    lines = []
    say_once("refused", 0, 1, store=None, printer=lines.append)
    assert lines == ["refused"]


def test_two_refusals_in_one_process_group_each_wait_for_their_own_confirmation():
    store = _store()
    assert _ranks(2, store, wait=10.0)[0] == ["refused"]
    lines, took = _ranks(2, store, wait=0.5, absent=(0,))  # rank 0 does not come this time
    assert lines == ["refused"] and took[1] >= 0.4, (lines, took)
