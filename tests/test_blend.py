"""The arithmetic blended index and its keyed permutation: the five properties users rely on."""

from pathlib import Path

import numpy as np
import pytest

from megatron.data.blend import BlendedIndex, floor_sum
from megatron.data.permutation import KeyedPermutation, derive_key, permute, shuffled_range

DOLMA_LIST = Path(__file__).resolve().parents[2] / "shared" / "data-lists" / "aurora-dolma-v1.7.txt"  # ../shared


def dolma_weights():
    if not DOLMA_LIST.exists():
        pytest.skip(f"{DOLMA_LIST} not on this machine")
    return np.loadtxt(DOLMA_LIST, usecols=0)


def test_keyed_permutation_is_a_bijection_for_many_sizes_and_keys():
    for n in [1, 2, 3, 5, 16, 17, 1000, 4097, 65536, 100003]:
        for key in range(3):
            values = KeyedPermutation(n, derive_key(key, n)).materialize()
            assert np.array_equal(np.sort(values), np.arange(n)), (n, key)


def test_shuffled_range_is_a_keyed_permutation_the_same_in_every_thread():
    import threading

    first = shuffled_range(5000, 7)
    assert first.dtype == np.int64 and np.array_equal(np.sort(first), np.arange(5000))
    assert np.array_equal(first, shuffled_range(5000, 7))  # a pure function of (n, key) ...
    assert not np.array_equal(first, shuffled_range(5000, 8)) and np.mean(first == np.arange(5000)) < 0.01
    assert np.array_equal(shuffled_range(1, 3), [0]) and shuffled_range(0, 3).size == 0
    results = {}

    def draw(name):  # ... in any thread, interleaved with others (each thread has its own generator)
        for key in range(50):
            results.setdefault(name, []).append(shuffled_range(300, key))

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert all(np.array_equal(a, shuffled_range(300, key)) for key, a in enumerate(results[i]))


def test_keyed_permutation_depends_on_the_key_and_mixes_well():
    a = KeyedPermutation(1000, derive_key(1)).materialize()
    b = KeyedPermutation(1000, derive_key(2)).materialize()
    assert not np.array_equal(a, b)
    assert np.mean(a == np.arange(1000)) < 0.02  # not close to the identity
    # elementwise form with different sizes and keys per element agrees with the scalar form
    sizes = np.array([1000, 7, 1000])
    keys = derive_key([1, 5, 2])
    mixed = permute([10, 3, 10], sizes, keys)
    assert mixed[0] == a[10] and mixed[2] == b[10] and 0 <= mixed[1] < 7
    with pytest.raises(IndexError):
        permute([7], 7, derive_key(0))


def test_floor_sum_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m, a = int(rng.integers(0, 300)), int(rng.integers(1, 2000)), int(rng.integers(0, 5000))
        b = rng.integers(0, 5000, size=4)
        expected = [sum((a * i + int(bb)) // m for i in range(n)) for bb in b]
        assert floor_sum(n, m, a, b).tolist() == expected


def _window_counts(files, window, num_files):
    return np.stack([np.bincount(files[k * window:(k + 1) * window], minlength=num_files)
                     for k in range(len(files) // window)])


def test_every_window_gives_each_file_its_weight_within_one_sample():
    rng = np.random.default_rng(1)
    weights = rng.random(60) ** 4 + 1e-4  # very uneven, some files far below one sample per window
    index = BlendedIndex(rng.integers(1, 500, 60), weights, seed=7, window=256)
    location = index.locate(np.arange(256 * 300))
    counts = _window_counts(location.file, 256, 60)
    quota = index.weights * 256
    assert np.all(np.abs(counts - quota) < 1)
    assert np.all(counts.sum(axis=1) == 256)
    # the closed forms agree with the samples: per-window counts and running counts per file
    for k in (0, 1, 17, 299):
        assert np.array_equal(counts[k], index.counts_in_window(k))
        assert np.array_equal(counts[:k].sum(axis=0), index.samples_before_window(np.arange(60), k))
    # the extra samples rotate: running counts stay close to k * quota (docs/ARCHITECTURE.md states the drift)
    running = np.cumsum(counts, axis=0)
    drift = np.abs(running - np.arange(1, 301)[:, None] * quota)
    assert drift.max() < 3


def test_dolma_weights_in_4096_sample_windows_are_within_one_sample():
    weights = dolma_weights()
    sizes = np.maximum((weights / weights.sum() * 2e12 / 4096).astype(np.int64), 1)
    index = BlendedIndex(sizes, weights, seed=1234)
    assert index.window == 4096
    for k in (0, 1, 5000, 123456):  # windows far into training cost the same as the first
        files = index.locate(np.arange(k * 4096, (k + 1) * 4096)).file
        counts = np.bincount(files, minlength=len(weights))
        assert np.all(np.abs(counts - index.weights * 4096) < 1), k
        assert np.array_equal(counts, index.counts_in_window(k))


def test_no_sample_of_a_file_repeats_before_all_its_samples_are_used():
    sizes = np.array([37, 5, 200, 1])
    index = BlendedIndex(sizes, [0.4, 0.3, 0.2, 0.1], seed=3, window=64)
    location = index.locate(np.arange(64 * 40))
    for f, n in enumerate(sizes):
        samples, epochs = location.sample[location.file == f], location.epoch[location.file == f]
        assert np.all(np.diff(epochs) >= 0)
        for epoch in np.unique(epochs):
            chosen = samples[epochs == epoch]
            assert len(np.unique(chosen)) == len(chosen)
            if epoch < epochs.max():
                assert np.array_equal(np.sort(chosen), np.arange(n))
        if epochs.max() >= 2 and n > 3:  # a new order each epoch
            assert not np.array_equal(samples[epochs == 0], samples[epochs == 1])


def test_order_is_a_function_of_the_seed_and_differs_between_seeds():
    sizes, weights = [100, 300, 50], [0.5, 0.3, 0.2]
    g = np.arange(2000)
    a = BlendedIndex(sizes, weights, seed=11, window=128).locate(g)
    b = BlendedIndex(sizes, weights, seed=11, window=128).locate(g)
    c = BlendedIndex(sizes, weights, seed=12, window=128).locate(g)
    assert np.array_equal(a.file, b.file) and np.array_equal(a.sample, b.sample)
    assert not np.array_equal(a.sample, c.sample)
    assert not np.array_equal(a.file, c.file)


def test_mapping_is_pointwise_so_any_order_or_sharding_gives_the_same_stream():
    rng = np.random.default_rng(5)
    index = BlendedIndex(rng.integers(1, 1000, 40), rng.random(40), seed=9, window=512)
    g = np.arange(50_000, 53_000)
    whole = index.locate(g)
    shuffled = rng.permutation(g.size)
    pieces = index.locate(g[shuffled])
    assert np.array_equal(pieces.file, whole.file[shuffled])
    assert np.array_equal(pieces.sample, whole.sample[shuffled])
    for i in (0, 1234, 2999):
        assert index[int(g[i])] == (int(whole.file[i]), int(whole.sample[i]))


def test_bad_blend_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="0 samples"):
        BlendedIndex([10, 0], [0.5, 0.5], seed=1)
    with pytest.raises(ValueError, match="positive"):
        BlendedIndex([10, 10], [0.5, -0.5], seed=1)
    with pytest.raises(IndexError):
        BlendedIndex([10], [1.0], seed=1).locate([-1])
