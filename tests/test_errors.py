"""One base for the framework's errors (megatron/errors.py)."""

import ast
import importlib.util
from pathlib import Path

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
