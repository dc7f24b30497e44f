"""The arithmetic blended index: global sample number -> (file, sample within file), with no per-sample arrays.

Start-up is O(number of files); mapping a sample is O(log files) arithmetic, the same on every rank
given (sample counts per file, weights, seed, window). The top level of the data stack
(indexed file -> GPT dataset -> blend); megatron/data/gpt_dataset.py reads the tokens it names.

How a global sample g is placed (W = `window`, default 4096 samples; weights w_f sum to 1):

1. Window k = g // W, position p = g % W. Every window holds q_f = w_f * W samples of file f, rounded:
   c_f(k) = base_f + extra_f(k), base_f = floor(q_f), extra_f(k) in {0, 1}, so |c_f(k) - q_f| < 1 in
   every aligned window [kW, (k+1)W), and sum_f c_f(k) = W exactly.
2. Which files get the R = W - sum_f base_f extra samples of window k: lay the fractions
   frac_f = q_f - base_f end to end on [0, R), scaled by P = 2**30 to integers (file f owns
   [G_f, G_f + A_f) with G_f = round(P * sum_{j<f} frac_j), A_f ~ P * frac_f, G_F = R * P exactly),
   and drop R points U_k, U_k + P, ..., U_k + (R-1)P
   with U_k = (k * M + S) mod P, M odd and close to P / golden ratio, S from the seed. A file whose
   interval holds a point gets an extra sample (systematic sampling: exactly R per window). Over P
   windows every offset occurs once, so file f gets exactly A_f extras per P windows; the golden-ratio
   step spreads them evenly: the running count drifts from k * q_f only slowly (logarithmically; with
   the Dolma weights at most 3.1 samples in the first 1,000 windows, ~10 by window 2**28; see
   docs/ARCHITECTURE.md).
3. The file's running count before window k is arithmetic:
       C_f(k) = k * base_f + N_f(k),   N_f(k) = #{k' < k : (k'M + S - G_f) mod P < A_f}
   and [x mod P < A] = floor(x / P) - floor((x - A) / P), so N_f(k) is a difference of two
   floor sums sum_{i<k} floor((M i + b) / P), each computed in O(log P) by the Euclid-like recursion.
4. Inside the window, files own consecutive blocks [B_f(k), B_f(k) + c_f(k)) of a slot number
   s = (p * J + shift_k) mod W (J coprime to W, close to W / golden ratio: a low-discrepancy
   interleaving, so a file's samples are spread over the window). B_f(k) = sum_{j<f} base_j +
   ceil((G_f - U_k) / P)^+ needs no table, and the file owning slot s is found by binary search.
   The sample's rank among its file's samples in the window, r = #{p' < p : slot(p') in f's block},
   is again a difference of two floor sums (modulus W), so file-local numbers grow with g.
5. The file-local number is j = C_f(k) + r; epoch e = j // n_f and the sample is
   permute(j % n_f) with a Feistel bijection keyed by (seed, file, epoch): no sample of a file repeats
   before all n_f were used, and every epoch has a fresh order.

Worked example: weights (0.5, 0.3, 0.2) and W = 10 give base (5, 3, 2), R = 0: every window of 10
samples holds exactly 5, 3 and 2 samples of the three files; weights (0.55, 0.45) give base (5, 4),
R = 1, and the extra sample alternates between the files at the golden-ratio rhythm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron.data.permutation import derive_key, mix64, permute

DEFAULT_WINDOW = 4096
PHASE_BITS = 30
PHASE_PERIOD = 1 << PHASE_BITS  # P: the extra-sample schedule repeats exactly every P windows
MAX_GLOBAL_SAMPLES = 1 << 40  # keeps every intermediate of the floor sums inside int64
_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def golden_step(period: int) -> int:
    """The integer coprime to `period` closest to period / golden ratio (a low-discrepancy rotation)."""
    step = max(1, round(period * _GOLDEN_FRACTION))
    for delta in range(period):
        for candidate in (step - delta, step + delta):
            if 0 < candidate < period and math.gcd(candidate, period) == 1:
                return candidate
    return 1


def floor_sum(count, modulus: int, multiplier: int, offsets) -> np.ndarray:
    """sum_{i=0}^{count-1} floor((multiplier * i + offset) / modulus), elementwise over count/offsets arrays.

    The classic Euclid-like recursion (O(log modulus) steps); count, offset >= 0. The (modulus,
    multiplier) chain is the same for every element, so the loop is vectorised with a mask.
    """
    n = np.array(count, dtype=np.int64, copy=True, ndmin=1)
    b = np.array(offsets, dtype=np.int64, copy=True, ndmin=1)
    n, b = np.broadcast_arrays(n, b)
    n, b = n.copy(), b.copy()
    total = np.zeros(n.shape, dtype=np.int64)
    active = np.ones(n.shape, dtype=bool)
    m, a = int(modulus), int(multiplier)
    while active.any():
        if a >= m:
            total[active] += (n[active] * (n[active] - 1) // 2) * (a // m)
            a %= m
        total[active] += n[active] * (b[active] // m)
        b[active] %= m
        y_max = a * n + b
        active &= y_max >= m
        n[active], b[active] = y_max[active] // m, y_max[active] % m
        m, a = a, m
        if m == 0:
            break
    return total


@dataclass
class BlendLocation:
    """Where global samples live: file index, sample within the file, and the file-local epoch."""
    file: np.ndarray
    sample: np.ndarray
    epoch: np.ndarray


class BlendedIndex:
    """Maps global sample numbers to (file, sample within file) by arithmetic; see the module docstring.

        index = BlendedIndex(samples_per_file=[1000, 50, 7], weights=[0.6, 0.3, 0.1], seed=1234)
        loc = index.locate(np.arange(1024))    # loc.file, loc.sample, loc.epoch: int64 arrays
        f, s = index[17]

    Files with 0 samples must be left out by the caller (they cannot honour a weight).
    """

    def __init__(self, samples_per_file, weights, seed: int, window: int = DEFAULT_WINDOW, salt: int = 0):
        sizes = np.asarray(samples_per_file, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        if sizes.ndim != 1 or sizes.shape != weights.shape or sizes.size == 0:
            raise ValueError(f"BlendedIndex: need equal-length, non-empty sample counts and weights, "
                             f"got {sizes.shape} and {weights.shape}")
        if np.any(sizes < 1):
            bad = int(np.flatnonzero(sizes < 1)[0])
            raise ValueError(f"BlendedIndex: file {bad} has {int(sizes[bad])} samples; leave empty files out")
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise ValueError(f"BlendedIndex: weights must be finite and positive, got {weights[weights <= 0][:5]}")
        if not 1 <= window <= 1 << 20:
            raise ValueError(f"BlendedIndex: window {window} must be in [1, 2**20]")
        self.samples_per_file = sizes
        self.num_files = sizes.size
        self.weights = weights / weights.sum()
        self.window = int(window)
        self.seed = int(seed)
        self.salt = int(salt)

        quotas = self.weights * self.window
        self.base = np.floor(quotas).astype(np.int64)
        fractions = np.clip(quotas - self.base, 0.0, None)
        self.num_extras = int(self.window - self.base.sum())  # R
        if not 0 <= self.num_extras <= self.num_files:
            raise AssertionError(f"rounding produced {self.num_extras} extras for {self.num_files} files")
        # integer interval starts G_f on [0, R * P]; G_F == R * P exactly
        cumulative = np.concatenate([[0.0], np.cumsum(fractions)])
        total = cumulative[-1]
        scale = self.num_extras * PHASE_PERIOD
        if self.num_extras and total > 0:
            starts = np.rint(cumulative / total * scale).astype(np.int64)
        else:
            starts = np.zeros(self.num_files + 1, dtype=np.int64)
        starts[-1] = scale
        self.interval_start = starts[:-1]
        self.interval_length = np.diff(starts)  # A_f in [0, P]
        self.base_before = np.concatenate([[0], np.cumsum(self.base)[:-1]])  # sum_{j<f} base_j
        self.phase_step = golden_step(PHASE_PERIOD)  # M
        key = derive_key(self.seed, self.salt, 0x5EED)
        self.phase_offset = int(key[0] % np.uint64(PHASE_PERIOD))  # S
        self.slot_step = golden_step(self.window)  # J
        self.shift_key = derive_key(self.seed, self.salt, 0x5A1F)

    # ---- the schedule, window by window ----------------------------------------------------
    def _phase(self, windows: np.ndarray) -> np.ndarray:
        """U_k = (k M + S) mod P (exact in int64 for k < 2**33)."""
        return (windows % PHASE_PERIOD * self.phase_step + self.phase_offset) % PHASE_PERIOD

    def _extras_before(self, files: np.ndarray, phases: np.ndarray) -> np.ndarray:
        """Number of extra samples window (phase U) gives to files < f: points U + mP below G_f."""
        return np.maximum(self.interval_start[files] - phases + PHASE_PERIOD - 1, 0) // PHASE_PERIOD

    def _block_start(self, files: np.ndarray, phases: np.ndarray) -> np.ndarray:
        """B_f(k): the first slot of file f in window k; B_F(k) = W."""
        files = np.asarray(files)
        inside = np.minimum(files, self.num_files - 1)
        start = self.base_before[inside] + self._extras_before(inside, phases)
        return np.where(files >= self.num_files, self.window, start)

    def _extra_windows_before(self, files: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """N_f(k) = #{k' < k : (k'M + S - G_f) mod P < A_f}, via two floor sums."""
        offsets = (self.phase_offset - self.interval_start[files]) % PHASE_PERIOD
        lengths = self.interval_length[files]
        first = floor_sum(windows, PHASE_PERIOD, self.phase_step, offsets)
        second = floor_sum(windows, PHASE_PERIOD, self.phase_step, offsets - lengths + PHASE_PERIOD)
        return first - second + windows

    def counts_in_window(self, window: int) -> np.ndarray:
        """c_f(k) for every file (O(files); for inspection and tests)."""
        phase = self._phase(np.array([window], dtype=np.int64))
        starts = self._block_start(np.arange(self.num_files + 1), phase)
        return np.diff(starts)

    def samples_before_window(self, files, window: int) -> np.ndarray:
        """C_f(k): how many samples of each file in `files` the windows before `window` hold."""
        files = np.asarray(files, dtype=np.int64)
        windows = np.full(files.shape, window, dtype=np.int64)
        return windows * self.base[files] + self._extra_windows_before(files, windows)

    def samples_before(self, count: int) -> np.ndarray:
        """How many of the global samples [0, count) each file gets (exact, O(files) arithmetic).

        The whole windows before window K = count // W give C_f(K); the first count % W positions of
        window K add each file's rank at that position (the same floor sums `locate` uses).
        """
        count = int(count)
        if not 0 <= count <= MAX_GLOBAL_SAMPLES:
            raise ValueError(f"count {count} outside [0, {MAX_GLOBAL_SAMPLES}]")
        window, position = divmod(count, self.window)
        files = np.arange(self.num_files, dtype=np.int64)
        total = self.samples_before_window(files, window)
        if position:
            windows = np.full(self.num_files, window, dtype=np.int64)
            phases = self._phase(windows)
            shift = int((mix64(self.shift_key ^ np.uint64(window)) % np.uint64(self.window))[0])
            block_start = self._block_start(files, phases)
            block_size = self._block_start(files + 1, phases) - block_start
            offsets = (shift - block_start) % self.window
            positions = np.full(self.num_files, position, dtype=np.int64)
            total = total + (floor_sum(positions, self.window, self.slot_step, offsets)
                             - floor_sum(positions, self.window, self.slot_step, offsets - block_size + self.window)
                             + positions)
        return total

    def starved_files(self) -> np.ndarray:
        """Files whose weight is too small for the schedule ever to give them a sample (base 0, no extras)."""
        return np.flatnonzero((self.base == 0) & (self.interval_length == 0))

    # ---- mapping ----------------------------------------------------------------------------
    def locate(self, global_samples) -> BlendLocation:
        """Vectorised mapping of global sample numbers (any shape) to file, sample and epoch arrays."""
        g = np.asarray(global_samples, dtype=np.int64)
        shape = g.shape
        g = g.ravel()
        if g.size and (g.min() < 0 or g.max() >= MAX_GLOBAL_SAMPLES):
            raise IndexError(f"global sample {int(g.min() if g.min() < 0 else g.max())} outside "
                             f"[0, {MAX_GLOBAL_SAMPLES})")
        windows, positions = np.divmod(g, self.window)
        phases = self._phase(windows)
        shifts = (mix64(self.shift_key ^ windows.astype(np.uint64)) % np.uint64(self.window)).astype(np.int64)
        slots = (positions * self.slot_step + shifts) % self.window
        # binary search for the file whose block holds the slot: B_lo <= slot < B_hi
        low = np.zeros(g.shape, dtype=np.int64)
        high = np.full(g.shape, self.num_files, dtype=np.int64)
        while True:
            open_ = high - low > 1
            if not open_.any():
                break
            mid = (low + high) // 2
            goes_right = open_ & (self._block_start(mid, phases) <= slots)
            low = np.where(goes_right, mid, low)
            high = np.where(open_ & ~goes_right, mid, high)
        files = low
        # rank of this sample among its file's samples at earlier positions of the window, so that a
        # file's local numbers grow with the global number: #{p' < p : (p'J + shift - B_f) mod W < c_f}
        block_start = self._block_start(files, phases)
        block_size = self._block_start(files + 1, phases) - block_start
        offsets = (shifts - block_start) % self.window
        rank_in_window = (floor_sum(positions, self.window, self.slot_step, offsets)
                          - floor_sum(positions, self.window, self.slot_step, offsets - block_size + self.window)
                          + positions)
        local = windows * self.base[files] + self._extra_windows_before(files, windows) + rank_in_window
        sizes = self.samples_per_file[files]
        epochs, within = np.divmod(local, sizes)
        keys = derive_key(self.seed, self.salt, files, epochs)
        samples = permute(within, sizes, keys)
        return BlendLocation(files.reshape(shape), samples.reshape(shape), epochs.reshape(shape))

    def __getitem__(self, global_sample: int) -> tuple[int, int]:
        loc = self.locate([global_sample])
        return int(loc.file[0]), int(loc.sample[0])

    def __repr__(self) -> str:
        return (f"BlendedIndex(files={self.num_files}, window={self.window}, seed={self.seed}, "
                f"samples={int(self.samples_per_file.sum())})")
