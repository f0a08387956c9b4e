"""Re-measure the cost model on this machine: :func:`calibrate`."""

from __future__ import annotations

import sys
import time

import numpy as np
import scipy.fft as sfft
from tqdm.auto import tqdm

from . import ops
from .bias import Causal, NoBias
from .ops._common import prefix_chunk
from .ops._cost import COST_CONSTANTS
from .ops._features import feature_weights, features, symmetric_power
from .ops.streaming import exact_attention

__all__ = ["calibrate"]


def _median_time(fn, repeat=3):
    fn()                                      # warm (compile, caches)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def calibrate(update=True, seed=0, progress=None):
    """Measure the cost-model constants on this machine.

    Times small runs of each kernel the planner models (median of 3, after a
    warm-up that also compiles) and derives seconds per operation for
    :data:`numbarope.ops._cost.COST_CONSTANTS`. Takes a few seconds.

    Parameters
    ----------
    update : bool, optional
        Store the measured constants in ``numbarope.ops._cost.COST_CONSTANTS``
        (this process only) so that ``method="auto"`` and :func:`numbarope.plan` use them.
    seed : int, optional
        Seed of the random test data.
    progress : bool, optional
        Show a tqdm progress bar on stderr (default: when stderr is a terminal).

    Returns
    -------
    dict
        The measured constants (seconds per operation), keys as COST_CONSTANTS.

    Examples
    --------
    >>> import numbarope
    >>> consts = numbarope.calibrate(update=False)   # doctest: +SKIP
    """
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(total=8, desc="calibrate", leave=False, disable=not show)
    rng = np.random.default_rng(seed)
    c = {}
    # exact kernel: t = pairs·(pair + flop·(E + Ev)) at two widths, per precision
    n = 4096
    for dt, sfx in ((np.float64, ""), (np.float32, "32")):
        ts = {}
        for w in (8, 64):
            q, k, v = (rng.standard_normal((1, n, w)).astype(dt) for _ in range(3))
            ts[w] = _median_time(lambda: exact_attention(q, k, v, 0.1)) / (n * n)
        c["exact_flop" + sfx] = max((ts[64] - ts[8]) / (2 * 64 - 2 * 8), 1e-13)
        c["exact_pair" + sfx] = max(ts[8] - c["exact_flop" + sfx] * 16, 1e-12)
        bar.update()
    # general W: the per-pair bilinear forms (E² + E multiply-adds) on top
    ng, Eg = 512, 4
    q, k, v = (rng.standard_normal((1, ng, Eg)) for _ in range(3))
    W = rng.standard_normal((1, 2 * ng - 1, Eg, Eg))
    tg = _median_time(lambda: exact_attention(q, k, v, 0.1, relative=W,
                                              ridx=np.zeros(1, np.int64))) / (ng * ng)
    c["exact_general_flop"] = max((tg - c["exact_pair"] - c["exact_flop"] * 2 * Eg)
                                  / (Eg * Eg + Eg), 1e-12)
    bar.update()
    # separable fast path as run (threads, fused feature blocks + BLAS): features of both
    # sides alone, then the whole gemm path (features + products) and the whole prefix
    # path (+ intra-chunk logits, Horner and products) at E = Ev = 16, degree 3
    E, g, rows, ev = 16, 3, 16384, 16
    x = rng.standard_normal((rows, E)) * 0.25
    vv = rng.standard_normal((rows, ev))
    coef = 1.0 / np.array([1.0, 1.0, 2.0, 6.0])
    wphi, _ = feature_weights(coef, E, g)
    m = wphi.size
    out = np.empty((m, rows))
    c["feature"] = _median_time(lambda: features(x, E, g, wphi, out)) / out.size
    bar.update()
    gemm, prefix = ops.get("gemm"), ops.get("prefix")
    t_gemm = _median_time(lambda: gemm.run(x, x, vv, 1.0, coef, structure=NoBias()))
    c["gemm_flop"] = max((t_gemm - c["feature"] * 2 * rows * m) / (2 * rows * m * (ev + 1)),
                         1e-13)
    t_prefix = _median_time(lambda: prefix.run(x, x, vv, 1.0, coef, structure=Causal()))
    ch = min(prefix_chunk(m), rows)
    intra = max(t_prefix - t_gemm - c["gemm_flop"] * rows * ch * (E + ev + 1), 0.0)
    # elementwise: per (query, key) pair of a chunk and degree, Horner and mask (numba)
    c["elementwise"] = max(intra / (rows * ch * (2 * g + 3)), 1e-13)
    bar.update()
    # FFT per unit N·log2 N per column
    N, cols = 8192, 64
    u = rng.standard_normal((N, cols))
    c["fft_flop"] = _median_time(
        lambda: sfft.irfft(sfft.rfft(u, axis=0), n=N, axis=0)) / (2 * cols * N * np.log2(N))
    bar.update()
    # complex block products per frequency
    F, mk, ev1 = 1025, 20, 17
    A = rng.standard_normal((F, mk, mk)) + 1j
    B = rng.standard_normal((F, mk, ev1)) + 1j
    c["cmul"] = _median_time(lambda: np.matmul(A, B)) / (4 * F * mk * mk * ev1)
    bar.update()
    # symmetric powers
    W = rng.standard_normal((2047, 4, 4))
    t = _median_time(lambda: symmetric_power(W, 3))
    c["sympow"] = t / (2047 * (10 * 4 + 20 * 10) * 4)
    bar.update()
    bar.close()
    if update:
        COST_CONSTANTS.update(c)
    return c
