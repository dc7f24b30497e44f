"""The ALCF recipes' flag builder (ALCF/common.sh) produces flags pretrain_gpt.py accepts, and the
launch scripts are valid bash."""

import subprocess
from pathlib import Path

import pytest

from megatron.config.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]


def recipe_flags(env: dict) -> list[str]:
    script = f'source "{ROOT}/ALCF/common.sh"; megatron_flags; printf "%s\\n" "${{MEGATRON_FLAGS[@]}}"'
    out = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("env, expect", [
    ({"MODEL_PRESET": "auroragpt-7b", "TP": "2", "PP": "2", "ZERO_STAGE": "1", "MOCK_DATA": "1",
      "GLOBAL_BATCH": "64", "TRAIN_ITERS": "10"},
     dict(tp=2, pp=2, zero=1, layers=32, kv=8, bf16=True)),
    ({"MODEL_PRESET": "auroragpt-2b", "SP": "2", "ZERO_STAGE": "3", "CPU_OPTIMIZER": "1", "ACT_CKPT": "1",
      "DATA_FILE_LIST": "/lus/list.txt", "TOKENIZER_MODEL": "/lus/tok.model", "DTYPE": "fp32",
      "TRAIN_TOKENS": "2000000000000"},
     dict(tp=1, pp=1, zero=3, layers=12, kv=4, bf16=False)),
])
def test_recipe_flags_parse_into_the_intended_run(env, expect):
    run = parse_args(recipe_flags(env))
    assert run.parallel.tp == expect["tp"] and run.parallel.pp == expect["pp"]
    assert run.training.zero.zero_stage == expect["zero"]
    assert run.model.num_layers == expect["layers"] and run.model.num_key_value_heads == expect["kv"]
    assert run.training.precision.bf16 == expect["bf16"]


def test_a_bad_dtype_is_refused_by_the_recipe():
    script = f'source "{ROOT}/ALCF/common.sh"; DTYPE=fp8 megatron_flags'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "DTYPE=fp8" in proc.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "ALCF").glob("*.sh")))
def test_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "ALCF" / script)], check=True)
