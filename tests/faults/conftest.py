"""The fault-injection suite (issue #10): each case breaks a real 2-rank pretrain_gpt.py run on CPU and checks
the exit codes, the messages, what is on disk, and that nothing hangs past its bound."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
