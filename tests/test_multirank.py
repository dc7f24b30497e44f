"""tests/multirank.py's run_ranks, which every multi-rank test uses: ranks forked from the preloading fork server
see what a spawned interpreter would (the launching test's environment, working directory and output streams,
generators seeded afresh in each rank) and a failing rank raises in the test with its traceback."""

import os
import sys

import pytest

from multirank import run_ranks


def _probe(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    print(f"rank {rank} on stdout", flush=True)
    print(f"rank {rank} on stderr", file=sys.stderr, flush=True)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    return {"probe": os.environ.get("MULTIRANK_PROBE"), "rank_env": os.environ["RANK"], "cwd": os.getcwd(),
            "sum": float(total), "torch_seed": torch.initial_seed(), "preloaded": "deepspeed" in sys.modules}


def _fail(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 cannot go on")


def test_ranks_see_the_tests_environment_directory_and_streams_with_fresh_generators(monkeypatch, capfd,
                                                                                        tmp_path):
    monkeypatch.setenv("MULTIRANK_PROBE", "set by the test")
    monkeypatch.chdir(tmp_path)
    out = run_ranks(2, _probe)
    captured = capfd.readouterr()
    for rank, result in enumerate(out):
        assert result["probe"] == "set by the test" and result["rank_env"] == str(rank)
        assert result["cwd"] == str(tmp_path) and result["sum"] == 3.0 and result["preloaded"]
        assert f"rank {rank} on stdout" in captured.out and f"rank {rank} on stderr" in captured.err
    again = run_ranks(2, _probe)
    seeds = {result["torch_seed"] for result in out + again}
    assert len(seeds) == 4, "ranks share the fork server's generator state"


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 failed:.*ValueError: rank 1 cannot go on"):
        run_ranks(2, _fail)
