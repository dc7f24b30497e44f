"""The DeepSpeed adapter (megatron/deepspeed_compat.py): every assumption it makes holds for the installed DeepSpeed,
a broken one is reported naming the adapter and the assumption, the save-time writes DeepSpeed does outside its
checkpoint engine (the recovery scripts) become save errors, and a stale foreign JIT build of a DeepSpeed op in
torch's shared default directory does not break a start."""

from __future__ import annotations

import errno
import os
import warnings

import pytest

from megatron import deepspeed_compat as compat


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
