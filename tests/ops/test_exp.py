"""The exact path's vectorised exp, numbarope.ops._exp: its relative error against
long double and float64 references (EXP_ULPS), and the flush below EXP_FLUSH."""

import os

import numpy as np
import pytest

from numbarope.ops._exp import EXP_FLUSH, EXP_ULPS, exp_kernel


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_kernel_relative_error(dtype):
    rng = np.random.default_rng(6)
    lo = EXP_FLUSH[np.dtype(dtype)]
    x = np.concatenate([-rng.random(200_000) * -lo, -rng.random(20_000) * 1e-3,
                        np.linspace(lo, 0, 10_001)[1:]]).astype(dtype)
    x = x[x > lo]                                   # at or below lo: flushed to 0
    y = exp_kernel(x).astype(np.longdouble)
    ref = np.exp(x.astype(np.longdouble))
    u = np.finfo(dtype).eps / 2
    rel = np.abs(y / ref - 1).max() / u
    assert rel <= EXP_ULPS[np.dtype(dtype)], rel
    assert rel > 0.1          # the check can fail: it measures something


def test_exp_kernel_float32_every_input_sampled():
    """Every 97th float32 in (-87, 0] (every one with NUMBAROPE_FULL_TESTS=1)."""
    step = 1 if os.environ.get("NUMBAROPE_FULL_TESTS") else 97
    lo = np.float32(-87.0).view(np.uint32)
    hi = np.float32(-0.0).view(np.uint32)          # 0x80000000: bits grow toward -87
    worst = 0.0
    for c0 in range(int(hi), int(lo), 2 ** 26):       # -87 itself is flushed to 0
        bits = np.arange(c0, min(c0 + 2 ** 26, int(lo)), step, dtype=np.uint32)
        x = bits.view(np.float32)
        y = exp_kernel(x).astype(np.float64)
        ref = np.exp(x.astype(np.float64))
        worst = max(worst, float(np.max(np.abs(y / ref - 1))))
    assert worst / 2.0 ** -24 <= EXP_ULPS[np.dtype(np.float32)], worst / 2.0 ** -24


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_max_is_the_float_maximum(dtype):
    # the maximum through the bits' integer order (vectorised): the float maximum over
    # any range, with -inf entries, of either sign and any magnitude; -inf when empty
    from numba import njit
    from numbarope.ops._exp import row_max

    @njit
    def call(x, a, b):
        return row_max(x, a, b)

    rng = np.random.default_rng(0)
    for _ in range(300):
        x = (rng.standard_normal(70) * 10.0 ** rng.integers(-30, 30)).astype(dtype)
        x[rng.random(70) < 0.3] = -np.inf
        a, b = sorted(rng.integers(0, 71, 2))
        want = float(x[a:b].max()) if b > a else -np.inf
        assert call(x, a, b) == want
    x = np.full(5, -np.inf, dtype)
    assert call(x, 0, 5) == -np.inf and call(x, 3, 3) == -np.inf
    x[2] = -0.0
    x[4] = np.finfo(dtype).tiny / 4              # a subnormal
    assert call(x, 0, 5) == x[4]
