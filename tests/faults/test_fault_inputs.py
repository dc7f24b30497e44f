"""Bad input exits 2 with one message naming the input and the fix, and no traceback: a data list naming a
missing file is refused right after parsing (before the process group, model or engine exist), a .bin
truncated to an even length is named as the truncated file, a --load without checkpoint starts from
scratch with a warning unless --exit-on-missing-checkpoint."""

import os
import subprocess
import sys

import pytest

import engine_cases as ec
from faultrun import ROOT, _clean_env
from megatron.data.indexed_dataset import write_synthetic_dataset


def one_process(*flags: str):
    """pretrain_gpt.py as one process without a launcher: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py"), *flags], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_a_data_list_naming_a_missing_file_exits_2_before_anything_is_built(tmp_path, capsys, monkeypatch):
    import megatron.distributed
    import pretrain_gpt

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("the process group was set up before the data list was checked")

    monkeypatch.setattr(megatron.distributed, "initialize_distributed", no_heavy_work)
    listing = tmp_path / "list.txt"
    listing.write_text(f"1.0 {tmp_path / 'gone'} corpus\n")
    base = [a for a in ec.TINY if a not in ("--mock-data",)]
    code = pretrain_gpt.main(base + ["--data-file-list", str(listing), "--tokenizer-type", "NullTokenizer"])
    err = capsys.readouterr().err
    assert code == 2 and str(listing) in err and "gone" in err and "Traceback" not in err, err


def test_a_bin_truncated_to_an_even_length_is_named_and_exits_2(tmp_path):
    prefix = tmp_path / "corpus"
    write_synthetic_dataset(str(prefix), num_tokens=20000, num_documents=40, seed=3)
    os.truncate(f"{prefix}.bin", 20000)  # uint16 tokens: an even length, half the file
    base = [a for a in ec.TINY if a not in ("--mock-data",)]
    code, _, err = one_process(*base, "--data-path", str(prefix), "--tokenizer-type", "NullTokenizer",
                               "--train-iters", "2")
    assert code == 2 and "Traceback" not in err, err
    assert f"{prefix}.bin" in err and "truncated" in err, err


@pytest.mark.parametrize("exit_on_missing", [False, True])
def test_load_of_a_directory_without_checkpoint(tmp_path, exit_on_missing):
    load = tmp_path / "not-yet"
    extra = ["--exit-on-missing-checkpoint"] if exit_on_missing else []
    code, out, err = one_process(*ec.flags("--train-iters", "1", "--load", str(load), *extra))
    if exit_on_missing:
        assert code == 2 and f"--load {load} does not exist" in err and "Traceback" not in err, err
    else:
        assert code == 0, err
        assert f"--load {load} does not exist; training starts from scratch" in out + err
        assert "done at iteration 1" in out
