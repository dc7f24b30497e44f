"""The cheap pieces of benchmarks/bench_long_sequence.py: the doubling + bisection search (on a fake fits()), the
start predicted from fewer ranks, the memory cap (parsing, and RLIMIT_DATA refusing an allocation past it in a child process), the linear / quadratic
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
    assert calls == [960, 1920, 3840, 7680, 8192] and (lo, hi) == (8192, None)  # the last step: max_seq itself

    def broken(n):
        raise bench.TrialError("refused")
    with pytest.raises(bench.TrialError):
        bench.longest_fitting(broken, 1024, 64, 0.1, 1 << 20)
    with pytest.raises(ValueError, match="bad search bounds"):
        bench.longest_fitting(lambda n: True, 1024, 0, 0.1, 1 << 20)


def test_search_start_is_predicted_from_the_same_row_on_fewer_ranks(bench):
    S = bench.Search
    assert bench.predict_start([], 2, 1024) == 1024  # nothing measured yet: --start
    assert bench.predict_start([S("tp", 1, longest=2048, first_failure=2560)], 2, 1024) == 3072  # 1.5x a doubling
    grown = [S("tp", 1, longest=2048, first_failure=2560), S("tp", 2, longest=3072, first_failure=3584)]
    assert bench.predict_start(grown, 4, 1024) == 4608  # the 1.5x it grew from 1 to 2 ranks, again
    assert bench.predict_start(grown, 8, 1024) == 6656  # two doublings: 3072 x 2.25 = 6912, down to 512s
    shrunk = [S("tp", 1, longest=2048, first_failure=2560), S("tp", 2, longest=1024, first_failure=1536)]
    assert bench.predict_start(shrunk, 4, 1024) == 1024  # growth clipped at 1x
    doubled = [S("u", 1, longest=1024, first_failure=1280), S("u", 2, longest=4096, first_failure=5120)]
    assert bench.predict_start(doubled, 4, 1024) == 8192  # clipped at 2x
    bounded = [S("u", 1, longest=20480, first_failure=None)]  # every probe fitted up to the bound
    assert bench.predict_start(bounded, 2, 1024) == 20480
    assert bench.predict_start([S("u", 1)], 2, 1024) == 1024  # nothing fitted: --start


def test_quiet_wall_time_divides_each_trials_cpu_by_the_cores_its_ranks_use(bench):
    trials = [bench.Trial("tp", 1, 1024, "fits", cpu_seconds=10.0),
              bench.Trial("tp", 8, 1024, "fits", cpu_seconds=80.0)]
    assert bench.quiet_wall_seconds(trials, 2) == 10.0 + 40.0
    assert bench.quiet_wall_seconds(trials, 16) == 10.0 + 10.0


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
    # 900 MB ± 15 MB of noise over 1-16k tokens: flat, whatever sign the noise gives the s² term
    flat = bench.fit_memory([1024, 2048, 4096, 8192, 16384], [900e6, 915e6, 885e6, 890e6, 912e6])
    assert flat.verdict == "flat" and abs(flat.spread - 30e6) < 1


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


def test_table_reads_back_a_runs_json_and_shortens_allocator_messages(bench):
    trials = [bench.Trial("tp", 2, n, "fits", cpu_seconds=5.0, peak_rss=[p, p - 1], rss_before_step=[300, 300],
                          param_bytes=[16 << 20] * 2, optimizer_bytes=[32 << 20] * 2)
              for n, p in ((1024, 500 << 20), (2048, 600 << 20), (3072, 700 << 20), (4096, 800 << 20))]
    trials.append(bench.Trial("tp", 2, 5120, "oom", reason="rank 0: RuntimeError: [enforce fail at alloc_cpu.cpp:127]"
                              " err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 262144000"
                              " bytes"))
    s = bench.Search("tp", 2, longest=4096, first_failure=5120, note="5,120 failed: oom: " + trials[-1].reason,
                     trials=trials)
    doc = {"cap_bytes": 900 << 20, "searches": [dict(bench.asdict(s), trials=[bench.asdict(t) for t in trials])]}
    back = bench.load_searches(doc)
    assert back[0].longest == 4096 and back[0].trials[-1].status == "oom" and back[0].fit.verdict == "linear"
    text = bench.table(back, doc["cap_bytes"])
    assert "| tp only | 2 | 4,096 | 5,120 | 800 MiB |" in text and "16 MiB / 32 MiB" in text
    assert "can't allocate memory: you tried to allocate 262144000 bytes" in text and "enforce fail" not in text


def test_a_failed_extension_build_is_an_error_not_memory(bench):
    # DeepSpeed compiles its shm comm op at run time when the shared build is stale; the compiler can fail (even
    # of memory, under the cap): that says nothing about the step, so the row stops instead of counting it
    reason = "RuntimeError: Error building extension 'deepspeed_shm_comm': cc1plus: out of memory allocating"
    status, text = bench.classify([3, None], [{"status": "oom", "reason": reason}, None],
                                  ["rank 0: out of memory under the cap: " + reason, ""], False)
    assert status == "error" and "deepspeed_shm_comm" in text
