"""The fault-injection suite (issue #10): each case breaks a real 2-rank pretrain_gpt.py run on CPU and checks
the exit codes, the messages, what is on disk, and that nothing hangs past its bound."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultrun import close_all  # noqa: E402  (after the path is set)


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """Every process a fault test started is SIGKILLed when the test ends, pass or fail."""
    yield
    close_all()
