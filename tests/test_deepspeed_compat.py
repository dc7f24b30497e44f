"""The DeepSpeed adapter (megatron/deepspeed_compat.py): every assumption it makes holds for the installed DeepSpeed,
a broken one is reported naming the adapter and the assumption, the save-time writes DeepSpeed does outside its
checkpoint engine (the recovery scripts) become save errors, and a stale foreign JIT build of a DeepSpeed op in
torch's shared default directory does not break a start."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

from megatron import deepspeed_compat as compat
from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("what", compat.assumptions())
def test_the_installed_deepspeed_keeps_every_assumption_of_the_adapter(what):
    """If this fails, DeepSpeed changed something megatron/deepspeed_compat.py relies on: fix the function the
    message names there (and CHECKED_VERSION / constraints.txt once it is checked again)."""
    problems = compat.check_assumptions(only=[what])
    assert not problems, "\n".join(problems)
    if compat.deepspeed_version() != compat.CHECKED_VERSION:
        warnings.warn(f"DeepSpeed {compat.deepspeed_version()} is installed; {compat.ADAPTER} was checked against "
                      f"{compat.CHECKED_VERSION} (constraints.txt pins it): run tools/setup_env.sh")


def test_a_broken_assumption_is_reported_naming_the_adapter_and_what_broke(monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert compat.check_assumptions() == []
    monkeypatch.delattr(DeepSpeedZeroOptimizer_Stage3, "_get_param_partition_rank")
    monkeypatch.delattr(PipelineModule, "_synchronize_tied_weights")
    real = DeepSpeedEngine._get_ckpt_name
    monkeypatch.setattr(DeepSpeedEngine, "_get_ckpt_name",
                        lambda self, *a, **k: real(self, *a, **k).replace("model_states", "model"))
    problems = compat.check_assumptions()
    assert len(problems) == 3, problems
    assert all(p.startswith("megatron/deepspeed_compat.py: DeepSpeed ") for p in problems)
    joined = "\n".join(problems)
    assert "_get_param_partition_rank" in joined and "'PipelineModule._synchronize_tied_weights()'" in joined
    assert "mp_rank_00_model.pt, we expect mp_rank_00_model_states.pt" in joined


def test_the_file_names_are_the_ones_the_convert_and_checkpoint_code_parses():
    assert compat.model_states_name(3) == "mp_rank_03_model_states.pt"
    assert compat.zero3_model_states_name(5, 1) == "zero_pp_rank_5_mp_rank_01_model_states.pt"
    assert compat.layer_states_name(12, 1) == "layer_12-model_01-model_states.pt"
    assert compat.optim_states_name(2, 0, bf16=True) == "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    assert compat.global_step_tag(300) == "global_step300" and compat.LATEST_FILENAME == "latest"


class _Engine:
    """What CheckpointIO touches on a DeepSpeedEngine, with DeepSpeed's own _copy_recovery_script."""

    def __init__(self, inner):
        self.checkpoint_engine = inner

    def _copy_recovery_script(self, save_path):
        from deepspeed.runtime.engine import DeepSpeedEngine

        return DeepSpeedEngine._copy_recovery_script(self, save_path)

    def _change_recovery_script_permissions(self, dst):
        from deepspeed.runtime.engine import DeepSpeedEngine

        return DeepSpeedEngine._change_recovery_script_permissions(self, dst)


def test_a_failed_recovery_script_copy_is_a_save_error_naming_the_path_and_errno(tmp_path, monkeypatch):
    """DeepSpeed copies zero_to_fp32.py with shutil.copyfile on rank 0 of a ZeRO save, outside its checkpoint
    engine: on a full disk that raised past our save-error handling (exit 1 with a traceback)."""
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    def full_disk(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    engine = _Engine(TorchCheckpointEngine())
    with compat.CheckpointIO(engine) as io:
        engine._copy_recovery_script(str(tmp_path))  # works: both scripts copied, nothing recorded
        assert io.errors == [] and sorted(os.listdir(tmp_path)) == sorted(compat.RECOVERY_SCRIPTS)
        monkeypatch.setattr(ds_engine, "copyfile", full_disk)
        engine._copy_recovery_script(str(tmp_path))  # raises nothing: recorded, like a failed checkpoint file
    assert [(path, error.errno) for path, error in io.errors] == [(str(tmp_path / "zero_to_fp32.py"), errno.ENOSPC)]
    assert "_copy_recovery_script" not in vars(engine) and isinstance(engine.checkpoint_engine, TorchCheckpointEngine)
    with pytest.raises(OSError):  # outside a save DeepSpeed's own method is back
        engine._copy_recovery_script(str(tmp_path))


def test_the_extensions_dir_is_set_per_environment_once_and_never_over_a_users(tmp_path, monkeypatch):
    monkeypatch.setattr(compat, "_announced", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/users/own")
    said = []
    (tmp_path / "built" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "built" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "built"))
    assert compat.ensure_torch_extensions_dir(0, said.append) == str(tmp_path / "built") and said == []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/users/own")  # not built yet: the first start compiles, said once
    assert compat.ensure_torch_extensions_dir(0, said.append) == "/users/own"
    assert len(said) == 1 and "/users/own" in said[0] and "25 s" in said[0]
    said.clear()
    monkeypatch.setattr(compat, "_announced", False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert compat.ensure_torch_extensions_dir(1, said.append) == compat.torch_extensions_dir_for_environment()
    chosen = os.environ["TORCH_EXTENSIONS_DIR"]
    assert said == [] and chosen.startswith(str(tmp_path / "torch_extensions" / "megatron-py"))
    assert f"ds{compat.deepspeed_version()}" in chosen and os.path.realpath(sys.prefix) not in chosen
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    compat.ensure_torch_extensions_dir(0, said.append)
    compat.ensure_torch_extensions_dir(0, said.append)
    assert len(said) == 1 and chosen in said[0]


_FOREIGN_OP = r"""
#include <Python.h>
/* Another DeepSpeed version's shm comm op: initialize() but no vector_kernel_level(). */
static PyObject *initialize(PyObject *self, PyObject *args) { Py_RETURN_NONE; }
static PyMethodDef methods[] = {{"initialize", initialize, METH_VARARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "deepspeed_shm_comm", NULL, -1, methods};
PyMODINIT_FUNC PyInit_deepspeed_shm_comm(void) { return PyModule_Create(&module); }
"""


def _built_shm_op() -> Path:
    """This environment's build of DeepSpeed's shm comm op, in the suite's TORCH_EXTENSIONS_DIR (tests/conftest.py
    sets it); built there first (~1 min, once for the whole suite) when no start has built it yet."""
    op = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    if not (op / "deepspeed_shm_comm.so").is_file() or not (op / ".ninja_log").is_file():
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    return op


# torch's build lock files: a copy taken while another process (e.g. a concurrent test run sharing
# TORCH_EXTENSIONS_DIR) is building the op would carry its lock and make the copy's start wait forever
_NO_LOCKS = shutil.ignore_patterns("lock", ".ninja_lock")


def test_a_stale_foreign_jit_build_in_torchs_default_directory_does_not_break_a_start(tmp_path):
    """torch's default, ~/.cache/torch_extensions/py311_cpu, holds another DeepSpeed's deepspeed_shm_comm (ninja
    sees it up to date: same build.ninja, log and deps); a start without TORCH_EXTENSIONS_DIR used to load it and
    die with "module 'deepspeed_shm_comm' has no attribute 'vector_kernel_level'"."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (to build the foreign op, as DeepSpeed needs one to build its own)")
    built = _built_shm_op()
    cache = tmp_path / "cache"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_cpu"
    stale = cache / "torch_extensions" / tag / "deepspeed_shm_comm"
    shutil.copytree(built, stale, ignore=_NO_LOCKS)  # keeps the mtimes: ninja finds nothing to rebuild
    (tmp_path / "op.c").write_text(_FOREIGN_OP)
    subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(tmp_path / "op.c"), "-o",
                    str(stale / "deepspeed_shm_comm.so")], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    env.update(XDG_CACHE_HOME=str(cache), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    keyed = Path(subprocess.run([sys.executable, "-c", "from megatron.deepspeed_compat import "
                                 "torch_extensions_dir_for_environment as f; print(f())"], env=env, cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout.strip())
    assert keyed.parent == cache / "torch_extensions" and keyed.name != tag
    # this environment's own build: no ~1 min compile here
    shutil.copytree(built, keyed / "deepspeed_shm_comm", ignore=_NO_LOCKS)
    done = subprocess.run([sys.executable, "pretrain_gpt.py", "--model-preset", "tiny", "--mock-data", "--vocab-size",
                           "256", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
                           "--train-iters", "1", "--eval-iters", "0", "--num-workers", "0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "vector_kernel_level" not in out and "done at iteration 1" in out
    # the keyed directory was used (its build is there: nothing to compile, nothing said); the stale default one
    # would have failed with vector_kernel_level above
    assert "JIT-compiles" not in out and os.environ.get("TORCH_EXTENSIONS_DIR") != str(keyed)


_ADAPTER_ONLY = {"_get_fp32_opt_state_partition", "_get_param_partition_rank", "_hp_optimizer_states_linked",
                 "_lazy_init_hp_params_optimizer_state", "_synchronize_tied_weights", "_hp_mapping", "_INSTRUCTION_MAP",
                 "_copy_recovery_script", "checkpoint_engine", "single_partition_of_fp32_groups",
                 "fp32_groups_flat_partition", "fp32_partitioned_groups_flat", "cur_scale", "param_names",
                 "clip_fp32_gradients", "enable_backward_allreduce", "pipeline_enable_backward_allreduce",
                 "dp_process_group", "bwd_allreduce_microstep", "latest", "latest_universal"}


def test_the_adapter_is_a_leaf_and_the_only_module_reaching_into_deepspeed():
    import ast

    def names(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        # messages (what a raise says) and keys of saved dicts (osd["single_partition_of_fp32_groups"]) are not uses
        spoken = {id(c) for node in ast.walk(tree) if isinstance(node, ast.Raise) for c in ast.walk(node)}
        spoken |= {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
        found = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings | spoken:
                found.add(n.value)
                found.update(p for p in ("_model_states.pt", "_optim_states.pt", "global_step") if p in n.value)
        return found

    adapter = ROOT / "megatron" / "deepspeed_compat.py"
    tree = ast.parse(adapter.read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in top if m.startswith("megatron")} <= {"megatron.errors", "megatron.fileio"}
    assert not [m for m in top if m.startswith("deepspeed")]  # imported lazily, inside functions
    reaching = {str(p.relative_to(ROOT)): sorted(names(p) & (_ADAPTER_ONLY | {"_model_states.pt", "_optim_states.pt"}))
                for p in (ROOT / "megatron").rglob("*.py") if p != adapter}
    assert {p: n for p, n in reaching.items() if n} == {}
