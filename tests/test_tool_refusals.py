"""The serving tools refuse as pretrain_gpt.py does (megatron/distributed/refusal.py's run_entry_point): a
refusal every rank reaches is printed once for the job, with the tool's name, exit code 2 and no traceback."""

import os
import subprocess
import sys

from tests.multirank import free_port, rank_env
from tests.serve_fixtures import ROOT


def test_a_bad_flag_of_the_server_is_said_once_by_two_ranks_with_exit_code_2(tmp_path):
    master = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
                               "--load", str(tmp_path), "--max-batch-size", "0", "--batch-wait-ms", "-1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT, **rank_env(rank, 2, master)))
             for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    err = "".join(e for _, e in outputs)
    message = ("run_text_generation_server.py: --max-batch-size must be >= 1, got 0; --batch-wait-ms must be >= 0, "
               "got -1.0")
    assert err.count(message) == 1 and "Traceback" not in err, err


def test_generate_and_evaluate_refuse_with_their_name_and_exit_code_2(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import evaluate
    import generate

    assert generate.main(["--hf", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate.py: --hf ") and "no such directory" in err and "Traceback" not in err
    assert evaluate.main(["--load", str(tmp_path / "missing"), "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py") and str(tmp_path / "missing") in err and "Traceback" not in err
