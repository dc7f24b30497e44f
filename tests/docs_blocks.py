"""The shell blocks of README.md and docs/*.md marked `<!-- cpu-runnable -->` (issue 25), and how the tests run them:
in a scratch directory that sees the repository's files, shrunk by the environment variables the README documents
(TRAIN_ITERS, SHARDS, MAX_MB, VOCAB_SIZE). tests/test_docs_run.py runs the blocks; tests/test_launch.py runs the
README's launch block (torchrun, then mpiexec) one launch at a time, to check what each launch prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- cpu-runnable -->"
SHRINK = {"TRAIN_ITERS": "2", "SHARDS": "1", "MAX_MB": "0.2", "VOCAB_SIZE": "1024"}


def runnable_blocks(text: str) -> list[str]:
    """The ```bash blocks right after a cpu-runnable mark."""
    return [m.group(1) for m in re.finditer(re.escape(MARK) + r"\s*\n```(?:bash|sh)\n(.*?)\n```", text, re.S)]


def launch_block() -> str:
    """The README's block that launches pretrain_gpt.py under torchrun and mpiexec (run by tests/test_launch.py)."""
    blocks = [block for block in runnable_blocks((ROOT / "README.md").read_text()) if "torchrun " in block]
    assert len(blocks) == 1, f"expected one cpu-runnable README block with torchrun, found {len(blocks)}"
    return blocks[0]


def scratch(tmp_path: Path) -> Path:
    """A directory whose top-level entries link to the repository's, so that relative paths (data/, runs/) land
    in it; .venv links to the running interpreter's environment."""
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "data", "runs", ".venv"}:
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).resolve().parents[1] if not (ROOT / ".venv").exists()
                                    else ROOT / ".venv")
    return tmp_path


def env() -> dict:
    env = dict(os.environ, **SHRINK, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PMI_RANK", "PMI_SIZE"):
        env.pop(name, None)
    return env


def run_block(block: str, cwd: Path, what: str) -> subprocess.CompletedProcess:
    """Run `block` with bash -euo pipefail in `cwd`; fail naming `what` unless it exits 0 without a traceback."""
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{what}: exit {result.returncode}\n$ {block}\n" \
        f"{(result.stdout + result.stderr)[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return result
