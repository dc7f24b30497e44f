"""The cheap pieces of benchmarks/bench_long_sequence.py: the doubling + bisection search (on a fake fits()), the
memory cap (parsing, and RLIMIT_DATA refusing an allocation past it in a child process), the linear / quadratic
verdict of the memory fit, and how a trial's end is classified. No training step runs here."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_long_sequence.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_long_sequence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def threshold_fits(limit, calls):
    def fits(n):
        calls.append(n)
        return n <= limit
    return fits


def test_search_doubles_then_bisects_to_the_tolerance(bench):
    calls = []
    lo, hi, probes = bench.longest_fitting(threshold_fits(5000, calls), 1024, 64, 0.125, 1 << 20)
    assert calls[:4] == [1024, 2048, 4096, 8192]  # doubling until the first failure
    assert lo <= 5000 < hi and hi - lo <= 0.125 * lo
    assert lo % 64 == 0 and hi % 64 == 0
    assert [n for n, _ in probes] == calls and all(ok == (n <= 5000) for n, ok in probes)
    assert len(calls) <= 4 + 3  # bisection halves a 4096 gap to <= 512 in three probes


def test_search_halves_from_a_start_that_does_not_fit(bench):
    calls = []
    lo, hi, _ = bench.longest_fitting(threshold_fits(700, calls), 4096, 64, 0.05, 1 << 20)
    assert calls[:3] == [4096, 2048, 1024] and calls[3] == 512
    assert lo <= 700 < hi and hi - lo <= 64


def test_search_edges_nothing_fits_everything_fits_and_errors(bench):
    assert bench.longest_fitting(lambda n: False, 1024, 64, 0.1, 1 << 20)[:2] == (None, 64)
    calls = []  # everything fits: 1000 rounds down to 960, doubled while under --max-seq
    lo, hi, _ = bench.longest_fitting(threshold_fits(10**9, calls), 1000, 64, 0.1, 8192)
    assert calls == [960, 1920, 3840, 7680] and (lo, hi) == (7680, None)

    def broken(n):
        raise bench.TrialError("refused")
    with pytest.raises(bench.TrialError):
        bench.longest_fitting(broken, 1024, 64, 0.1, 1 << 20)
    with pytest.raises(ValueError, match="bad search bounds"):
        bench.longest_fitting(lambda n: True, 1024, 0, 0.1, 1 << 20)


def test_cap_sizes_parse_in_binary_units_and_bad_ones_name_the_input(bench):
    assert bench.parse_size("1GiB") == 1 << 30
    assert bench.parse_size("1536M") == bench.parse_size("1536MiB") == bench.parse_size("1.5G") == 1536 << 20
    assert bench.parse_size("4096") == 4096 and bench.parse_size("64 kb") == 65536
    for bad in ("", "1.5X", "GiB", "-1G", "1 iB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            bench.parse_size(bad)
    with pytest.raises(ValueError, match="positive"):
        bench.set_memory_cap(0)


def test_rlimit_data_cap_refuses_an_allocation_past_it_in_a_child(bench):
    # A child process (the cap cannot be lifted again in this one): 64 MiB fits under 256 MiB, 512 MiB does not.
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r})\n"
            "b = importlib.util.module_from_spec(spec); sys.modules['b'] = b; spec.loader.exec_module(b)\n"
            "assert b.set_memory_cap(b.parse_size('256MiB')) == 256 << 20\n"
            "small = bytearray(64 << 20)\n"
            "try:\n"
            "    big = bytearray(512 << 20)\n"
            "except MemoryError:\n"
            "    print('refused'); sys.exit(0)\n"
            "print('allowed'); sys.exit(1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stdout + out.stderr


def test_fit_tells_linear_from_quadratic_growth(bench):
    seqs = [1024, 2048, 3072, 4096, 6144, 8192]
    linear = [700e6 + 300e3 * s + (5e6 if i % 2 else -5e6) for i, s in enumerate(seqs)]  # RSS noise ±5 MB
    fit = bench.fit_memory(seqs, linear)
    assert fit.verdict == "linear" and abs(fit.b - 300e3) < 30e3
    quadratic = [700e6 + 50e3 * s + 20.0 * s * s for s in seqs]  # attention scores materialised: 20 B per s²
    fit = bench.fit_memory(seqs, quadratic)
    assert fit.verdict == "quadratic" and fit.quadratic_share > 0.5 and abs(fit.c - 20.0) < 1e-3
    concave = [700e6 + 300e3 * s - 5.0 * s * s for s in seqs]
    assert bench.fit_memory(seqs, concave).verdict == "linear"
    assert bench.fit_memory(seqs[:3], linear[:3]).verdict == "too few points"
    assert bench.fit_memory(seqs + seqs[:1], linear + [None]).points == 6  # a failed trial has no peak


def test_trial_ends_are_classified_by_cause(bench):
    fits = {"status": "fits", "peak_rss": 1, "rss_before_step": 1}
    assert bench.classify([0, 0], [fits, fits], ["", ""], False)[0] == "fits"
    assert bench.classify([0, None], [fits, None], ["", ""], True)[0] == "timeout"
    status, reason = bench.classify([3, None], [{"status": "oom", "reason": "can't allocate memory"}, None],
                                    ["", ""], False)
    assert status == "oom" and reason.startswith("rank 0")
    assert bench.classify([None, -signal.SIGKILL], [None, None], ["", ""], False)[0] == "oom"
    assert bench.classify([-signal.SIGABRT], [None], ["terminate called after 'std::bad_alloc'"], False)[0] == "oom"
    assert bench.classify([2, None], [None, None], ["pretrain_gpt.py: --foo is refused", ""], False)[0] == "refused"
    status, reason = bench.classify([1], [None], ["Traceback\nKeyError: 'x'"], False)
    assert status == "error" and "KeyError" in reason
