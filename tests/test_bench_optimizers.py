"""benchmarks/bench_optimizers.py's bf16 rows count optimizer memory from the tensors each rank holds, and
benchmarks/device_check.sh (the GPU-only checks) is valid bash that refuses cleanly where no GPU is visible."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_optimizers", ROOT / "benchmarks" / "bench_optimizers.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False))


def _step(optimizer, model):
    model(torch.randn(4, 16)).square().sum().backward()
    optimizer.step()


def test_adamw_state_is_two_fp32_moments_a_parameter_and_no_masters():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(optimizer, model)
    n = sum(p.numel() for p in model.parameters())
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert bench.optimizer_memory(optimizer, model) == {"state": 8 * n + steps, "masters": 0}


class _MixedPrecisionWrapper:
    """Stands in for DeepSpeed's bf16/ZeRO wrappers: the torch optimizer steps fp32 copies, held as .optimizer."""

    def __init__(self, model):
        self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
        self.optimizer = torch.optim.SGD(self.masters, lr=0.1, momentum=0.9)


def test_fp32_masters_are_counted_apart_from_the_state_and_shared_storage_once():
    model = _model().to(torch.bfloat16)
    wrapper = _MixedPrecisionWrapper(model)
    for master in wrapper.masters:
        master.grad = torch.ones_like(master)
    wrapper.optimizer.step()
    n = sum(p.numel() for p in model.parameters())
    assert bench.optimizer_memory(wrapper, model) == {"state": 4 * n, "masters": 4 * n}  # momentum; fp32 copies
    moment = torch.zeros(10)
    assert bench.state_bytes({"a": moment, "b": [moment, moment[:5]]}) == 40 + 20  # a view of other elements counts


def test_muon_holds_one_momentum_on_the_matrices_where_adamw_holds_two():
    model = _model()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    muon = torch.optim.Muon(matrices, lr=1e-3)
    _step(muon, model)
    adamw = torch.optim.AdamW(matrices, lr=1e-3)
    _step(adamw, model)
    m = sum(p.numel() for p in matrices)
    assert bench.optimizer_memory(muon, model)["state"] == 4 * m
    assert bench.optimizer_memory(adamw, model)["state"] >= 8 * m


def test_paired_ratio_is_the_median_of_per_round_ratios_with_their_interquartile_range():
    base = {"round_s": [1.0, 2.0, 4.0, 1.0, 3.0]}  # a loaded machine: AdamW's rounds vary fourfold
    other = {"round_s": [1.1, 2.4, 4.0, 1.3, 3.0]}  # ratios 1.1, 1.2, 1.0, 1.3, 1.0
    mid, low, high = bench.paired(other, base)
    assert (round(mid, 6), round(low, 6), round(high, 6)) == (1.1, 1.0, 1.2)
    assert bench.paired({"round_s": [3.0, 1.0]}, {"round_s": [2.0, 2.0]}) == (1.0, 0.5, 1.5)  # under 4: range


def test_device_check_is_bash_and_refuses_without_a_gpu():
    script = ROOT / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr and "nothing was run" in done.stderr
    assert done.stdout == ""  # it stops before any item


def test_bf16_rows_at_dp_2_split_the_state_and_masters_of_adamw_and_muon_between_the_ranks(tmp_path):
    """One launch of 2 gloo ranks (the benchmark's own launcher), a 1-layer model, 3 steps of each optimizer."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_optimizers.py"), "--mock-data", "--optimizers", "none",
         "--bf16-optimizers", "adamw,muon", "--bf16-dp", "2", "--bf16-steps", "3", "--layers", "1", "--hidden", "64",
         "--heads", "4", "--ffn", "128", "--seq", "32", "--batch", "4", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["bf16"]["2"]
    adamw, muon = rows["adamw"], rows["muon"]
    assert len(adamw) == len(muon) == 2 and "refused" not in muon[0]
    assert len(muon[0]["losses"]) == 3 and len(muon[0]["round_s"]) == 1  # 2 warmup steps, then 1 paired round
    params = adamw[0]["parameters"]
    for r in adamw:  # DeepSpeed's ZeRO-1 splits the flat fp32 buffers in two (up to alignment padding and the
        # groups' step counters)
        assert 0.45 * 8 * params <= r["held_state"] <= 0.55 * 8 * params + 64
        assert 0.45 * 4 * params <= r["held_masters"] <= 0.55 * 4 * params
    # Muon by whole parameters: each fp32 master on one rank, one momentum on the matrices (AdamW's two elsewhere)
    assert sum(r["held_masters"] for r in muon) == 4 * params
    assert sum(r["held_state"] for r in muon) < sum(r["held_state"] for r in adamw)
    held = [r["held_state"] + r["held_masters"] for r in muon]
    assert max(held) <= 0.6 * sum(held)
    assert "| muon |" in done.stdout and "Muon state <= AdamW's" in done.stdout
