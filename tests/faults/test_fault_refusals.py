"""A refusal that every rank reaches reaches the user exactly once, whichever rank exits first (issue 18).

Under torchrun, the first rank to exit non-zero makes torchrun SIGTERM the others. A refusal printed by rank 0
only was lost when rank 1 exited 2 first: exit code 2 and no message. Here rank 0 is made slow to print (a
sitecustomize on PYTHONPATH, for these jobs only, delays rank 0's writes of "pretrain_gpt.py: " lines to stderr)
for a refusal of the flags (before any process group) and one found after the groups exist (--load-tag naming
a checkpoint that is not there); and rank 0 is made to never print in time, where rank 1 must say it instead.
"""

import os
import time

import pytest

from faultrun import Job

SLOW_RANK_0 = '''\
import os, sys, time
_delay = float(os.environ.get("FAULTRUN_RANK0_REPORT_DELAY_S", "0"))
if _delay and os.environ.get("RANK") == "0":
    class _SlowReport:
        def __init__(self, stream):
            self._stream = stream
        def write(self, text):
            if "pretrain_gpt.py: " in text:
                time.sleep(_delay)
            return self._stream.write(text)
        def __getattr__(self, name):
            return getattr(self._stream, name)
    sys.stderr = _SlowReport(sys.stderr)
'''

# (flags, a line of the message): refused by parse_args on every rank; refused on every rank after
# initialize_distributed (the checkpoint --load-tag names is not there).
CASES = {
    "flags": (["--num-layers", "0"], "--num-layers: must be > 0, got 0"),
    "after_groups": (["--train-iters", "2", "--load", "{tmp}/ckpt", "--load-tag", "iter_0000003"],
                     "--load-tag iter_0000003: {tmp}/ckpt/iter_0000003 does not exist"),
}


def _refuse(tmp_path, case, delay_s, wait_s=None):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK_0)
    flags, line = CASES[case]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
           "FAULTRUN_RANK0_REPORT_DELAY_S": str(delay_s)}
    if wait_s is not None:
        env["MEGATRON_REFUSAL_WAIT_S"] = str(wait_s)
    started = time.time()
    job = Job.start(tmp_path, "torchrun", *[f.format(tmp=tmp_path) for f in flags], env=env)
    try:
        codes = job.wait(timeout=120)
        out = job.output()
    finally:
        job.close()
    return codes, out, line.format(tmp=tmp_path), time.time() - started


def _said_once(codes, out, line):
    assert codes != [0], out[-4000:]
    assert "exitcode  : 2" in out and "exitcode  : 1" not in out, out[-4000:]  # torchrun's report of the ranks
    assert out.count(line) == 1, out[-4000:]
    assert 'pretrain_gpt.py", line' not in out, out[-4000:]  # no traceback of ours (torchrun prints its own)


@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_is_printed_once_when_rank_0_is_slow_to_print_it(tmp_path, case):
    codes, out, line, _ = _refuse(tmp_path, case, delay_s=5)
    _said_once(codes, out, line)


@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_rank_0_never_prints_in_time_is_printed_by_another_rank(tmp_path, case):
    codes, out, line, took = _refuse(tmp_path, case, delay_s=300, wait_s=3)
    _said_once(codes, out, line)
    assert took < 100, out[-4000:]


@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_is_printed_once(tmp_path, case):
    codes, out, line, _ = _refuse(tmp_path, case, delay_s=0)
    _said_once(codes, out, line)
