"""Refusals and checkpoint-pointer errors of the training engine: clear messages naming flags and paths."""

import json

import pytest
import torch

from engine_cases import flags
from megatron.config.arguments import parse_args
from megatron.checkpoint.format import publish_directory, write_pointers
from megatron.checkpoint.format import read_latest_tag
from megatron.errors import CheckpointError
from megatron.training.engine import EngineConfigError, check_engine_config, position_ids_and_loss_mask

CPU = torch.device("cpu")


def refusal(*extra):
    with pytest.raises(EngineConfigError) as info:
        check_engine_config(parse_args(flags(*extra)), CPU)
    return str(info.value)


def test_pipeline_with_zero2_is_refused_naming_both_flags(capsys):
    import pretrain_gpt

    # From the command line: refused at parse time, before any rank starts.
    assert pretrain_gpt.main(flags("--pipeline-model-parallel-size", "2", "--zero-stage", "2")) == 2
    err = capsys.readouterr().err
    assert "--zero-stage 2" in err and "--pipeline-model-parallel-size 2" in err
    # A RunConfig built another way: the engine refuses it too.
    run = parse_args(flags("--pipeline-model-parallel-size", "2", "--zero-stage", "1"))
    run.training.zero.zero_stage = 2
    with pytest.raises(EngineConfigError) as info:
        check_engine_config(run, CPU)
    assert "--zero-stage 2" in str(info.value) and "--pipeline-model-parallel-size 2" in str(info.value)


def test_fp16_on_cpu_is_refused_with_the_alternatives():
    message = refusal("--fp16")
    assert "--fp16" in message and "CPU" in message and "--bf16" in message


def test_deepspeed_config_file_disagreeing_with_flags_exits_2_naming_both_sides(tmp_path, capsys):
    import pretrain_gpt

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    code = pretrain_gpt.main(flags("--deepspeed_config", str(path), "--zero-stage", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "--zero-stage" in err and str(path) in err


def test_load_without_pointer_files_names_the_directory(tmp_path):
    (tmp_path / ".tmp-global_step5").mkdir()  # an interrupted save leaves only this
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt") as info:
        read_latest_tag(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_with_pointer_to_missing_dir_names_the_missing_path(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="global_step7") as info:
        read_latest_tag(str(tmp_path))
    assert str(tmp_path / "global_step7") in str(info.value)


def test_publish_renames_the_finished_dir_then_moves_both_pointers(tmp_path):
    (tmp_path / ".tmp-global_step4").mkdir()
    (tmp_path / ".tmp-global_step4" / "f.pt").write_text("x")
    publish_directory(str(tmp_path / ".tmp-global_step4"), str(tmp_path / "global_step4"))
    write_pointers(str(tmp_path), 4)
    assert read_latest_tag(str(tmp_path)) == "global_step4"
    assert (tmp_path / "latest").read_text() == "global_step4"
    assert (tmp_path / "global_step4" / "f.pt").exists() and not (tmp_path / ".tmp-global_step4").exists()


def test_reset_position_ids_restart_after_eod_and_eod_mask_loss_masks_eod_inputs():
    tokens = torch.tensor([[5, 9, 1, 9, 9, 3]])
    positions, mask = position_ids_and_loss_mask(tokens, eod_token=9, reset_position_ids=True, eod_mask_loss=True)
    assert positions.tolist() == [[0, 1, 0, 1, 0, 0]]
    assert mask.tolist() == [[1, 0, 1, 0, 0, 1]]
