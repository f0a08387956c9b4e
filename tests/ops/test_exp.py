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
