"""Re-measure the cost model on this machine: :func:`calibrate`."""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import scipy.fft as sfft

from . import ops
from ._pipeline import fastlane
from .bias import Causal, NoBias
from .ops._common import prefix_chunk
from .ops._cost import COST_CONSTANTS
from .ops._features import feature_weights, features, symmetric_power
from .ops.streaming import exact_attention

__all__ = ["CalibrationWarning", "calibrate"]

#: The shipped constants (``numbarope.ops._cost`` as imported), the reference of the
#: plausibility check; later updates of ``COST_CONSTANTS`` do not move it.
BUILTIN = dict(COST_CONSTANTS)
#: A measured constant more than this factor away from its built-in value is taken as
#: a failed measurement (e.g. a busy machine), not as a property of the machine.
PLAUSIBLE_FACTOR = 100.0
#: Spread of a kernel's timings (median / minimum over the repeats) above which the
#: measurement is reported as noisy.
NOISY_SPREAD = 1.5
#: Whole calls at sizes the constants were not taken from (exact calls at head_dim
#: 32, a gemm call with 32 value columns) must be predicted within this factor of
#: their fastest time, or no constant is stored: constants taken from differences of
#: two timings can be plausible and still wrong by several times when one of the two
#: was disturbed.
CHECK_FACTOR = 2.0


class CalibrationWarning(UserWarning):
    """:func:`calibrate` measured implausible or noisy constants (see its Notes)."""


def _dims():
    """Sizes of the timed runs, and the counts derived from them (no timing)."""
    E, g = 16, 3
    coef = 1.0 / np.array([1.0, 1.0, 2.0, 6.0])
    wphi, _ = feature_weights(coef, E, g)
    rows = 16384
    return {"n": 4096, "ng": 512, "Eg": 4, "E": E, "g": g, "rows": rows, "ev": 16,
            "ev_wide": 64, "ev_check": 32, "w_check": 32,
            "m": int(wphi.size), "ch": int(min(prefix_chunk(wphi.size), rows)),
            "coef": coef, "wphi": wphi, "N": 8192, "cols": 64, "F": 1025, "mk": 20,
            "ev1": 17, "nw": 2047, "Ew": 4}


def _probes(d, rng):
    """name -> a call of one kernel the cost model describes (inputs made here)."""
    probes = {}
    n = d["n"]
    for dt, sfx in ((np.float64, ""), (np.float32, "32")):
        for w in (8, 64, d["w_check"]):
            q, k, v = (rng.standard_normal((1, n, w)).astype(dt) for _ in range(3))
            name = f"exact{w}{sfx}" if w != d["w_check"] else f"check_exact{sfx}"
            probes[name] = (lambda q=q, k=k, v=v: exact_attention(q, k, v, 0.1))
    ng, Eg = d["ng"], d["Eg"]
    q, k, v = (rng.standard_normal((1, ng, Eg)) for _ in range(3))
    W = rng.standard_normal((1, 2 * ng - 1, Eg, Eg))
    probes["general"] = lambda: exact_attention(q, k, v, 0.1, relative=W,
                                                ridx=np.zeros(1, np.int64))
    # separable fast path as run (threads, fused feature blocks + BLAS): features of both
    # sides alone, then the whole gemm path (features + products) and the whole prefix
    # path (+ intra-chunk logits, Horner and products) at E = Ev = 16, degree 3
    x = rng.standard_normal((d["rows"], d["E"])) * 0.25
    vv = rng.standard_normal((d["rows"], d["ev"]))
    out = np.empty((d["m"], d["rows"]))
    probes["feature"] = lambda: features(x, d["E"], d["g"], d["wphi"], out)
    gemm, prefix = ops.get("gemm"), ops.get("prefix")
    probes["gemm"] = lambda: gemm.run(x, x, vv, 1.0, d["coef"], structure=NoBias())
    for name, ev in (("gemm_wide", d["ev_wide"]), ("check_gemm", d["ev_check"])):
        vw = rng.standard_normal((d["rows"], ev))
        probes[name] = (lambda vw=vw: gemm.run(x, x, vw, 1.0, d["coef"], structure=NoBias()))
    probes["prefix"] = lambda: prefix.run(x, x, vv, 1.0, d["coef"], structure=Causal())
    u = rng.standard_normal((d["N"], d["cols"]))
    probes["fft"] = lambda: sfft.irfft(sfft.rfft(u, axis=0), n=d["N"], axis=0)
    A = rng.standard_normal((d["F"], d["mk"], d["mk"])) + 1j
    B = rng.standard_normal((d["F"], d["mk"], d["ev1"])) + 1j
    probes["cmul"] = lambda: np.matmul(A, B)
    Wp = rng.standard_normal((d["nw"], d["Ew"], d["Ew"]))
    probes["sympow"] = lambda: symmetric_power(Wp, 3)
    return probes


def _derive(t, d):
    """The constants from one round of timings ``t`` (name -> seconds of one call).

    Constants taken from differences (``exact_flop``, ``gemm_flop``, ``elementwise``,
    ...) are not clamped: a difference that comes out <= 0 (noise larger than the
    effect) gives a value <= 0, which the plausibility check of :func:`calibrate`
    refuses.
    """
    c = {}
    nn = float(d["n"]) ** 2
    for sfx in ("", "32"):
        t8, t64 = t[f"exact8{sfx}"] / nn, t[f"exact64{sfx}"] / nn
        c["exact_flop" + sfx] = (t64 - t8) / (2 * 64 - 2 * 8)
        c["exact_pair" + sfx] = t8 - c["exact_flop" + sfx] * 16
    Eg = d["Eg"]
    tg = t["general"] / d["ng"] ** 2
    c["exact_general_flop"] = (tg - c["exact_pair"] - c["exact_flop"] * 2 * Eg) / (Eg * Eg + Eg)
    rows, m, ev = d["rows"], d["m"], d["ev"]
    c["feature"] = t["feature"] / (m * rows)
    # from two gemm calls that differ in their value columns only (the same features):
    # the features alone (written out whole, not block by block as the call computes
    # them) took 5x their share of the call, which left gemm_flop 6-36x too small
    c["gemm_flop"] = (t["gemm_wide"] - t["gemm"]) / (2 * rows * m * (d["ev_wide"] - ev))
    ch = d["ch"]
    intra = t["prefix"] - t["gemm"] - c["gemm_flop"] * rows * ch * (d["E"] + ev + 1)
    # elementwise: per (query, key) pair of a chunk and degree, Horner and mask (numba)
    c["elementwise"] = intra / (rows * ch * (2 * d["g"] + 3))
    # FFT per unit N·log2 N per column; complex block products per frequency
    c["fft_flop"] = t["fft"] / (2 * d["cols"] * d["N"] * np.log2(d["N"]))
    c["cmul"] = t["cmul"] / (4 * d["F"] * d["mk"] * d["mk"] * d["ev1"])
    c["sympow"] = t["sympow"] / (d["nw"] * (10 * 4 + 20 * 10) * 4)
    return {k: float(v) for k, v in c.items()}


def _checks(t, c, d):
    """check name -> (predicted, measured) seconds of the check calls (``t``: timings)
    under the constants ``c``: the model :func:`_derive` fits, at other sizes."""
    nn = float(d["n"]) ** 2
    res = {}
    for sfx in ("", "32"):
        pred = nn * (c["exact_pair" + sfx] + c["exact_flop" + sfx] * 2 * d["w_check"])
        res[f"check_exact{sfx}"] = (pred, t[f"check_exact{sfx}"])
    rows, m = d["rows"], d["m"]
    pred = c["feature"] * 2 * rows * m + c["gemm_flop"] * 2 * rows * m * (d["ev_check"] + 1)
    res["check_gemm"] = (pred, t["check_gemm"])
    return res


def _measure(repeat, seed, bar):
    """``repeat`` rounds of timings (name -> seconds), each round calling every probe
    once, after one untimed warm-up call of each (compilation, caches); the rounds
    interleave the kernels, so that a load that comes and goes hits all of them."""
    d = _dims()
    probes = _probes(d, np.random.default_rng(seed))
    for fn in probes.values():
        fn()
    bar.update()
    rounds = []
    for _ in range(repeat):
        t = {}
        for name, fn in probes.items():
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        rounds.append(t)
        bar.update()
    return rounds, d


def calibrate(update=True, seed=0, progress=None, repeat=5):
    """Measure the cost-model constants on this machine.

    Times small runs of each kernel the planner models in ``repeat`` interleaved
    rounds, after a warm-up call that also compiles; keeps each kernel's fastest
    time (other work on the machine only adds time) and derives the constants
    (seconds per operation of :data:`numbarope.ops._cost.COST_CONSTANTS`) from
    those. Takes a few seconds.

    Parameters
    ----------
    update : bool, optional
        Store the measured constants in ``numbarope.ops._cost.COST_CONSTANTS``
        (this process only) so that ``method="auto"`` and :func:`numbarope.plan` use
        them, unless one is implausible (see Notes): then none is stored.
    seed : int, optional
        Seed of the random test data.
    progress : bool, optional
        Show a tqdm progress bar on stderr (default: when stderr is a terminal).
    repeat : int, optional
        Rounds of timings (default 5, at least 1): each kernel is timed this many
        times, interleaved with the others.

    Returns
    -------
    dict
        The measured constants (seconds per operation), keys as COST_CONSTANTS
        (returned also when they were not stored).

    Warns
    -----
    CalibrationWarning
        A constant is not finite, <= 0, or more than ``PLAUSIBLE_FACTOR`` (100)
        times away from its built-in value: the message names it, its estimates
        the built-in value and the spread of the timings it comes from, and the
        constants in use are kept (none is updated). Or the constants predict a
        whole call at sizes they were not taken from (exact at head_dim 32, gemm
        with 32 value columns) more than ``CHECK_FACTOR`` (2) times off its time:
        the message names the call, and none is updated. Or, all constants plausible,
        a kernel's median time over the repeats is more than ``NOISY_SPREAD``
        (1.5×) its fastest: the constants are stored, and the message says which
        timings were noisy.

    Notes
    -----
    On a busy machine single timings vary by orders of magnitude (a run of 8
    calls of an older version gave ``elementwise`` from 1e-13 to 2.3e-9): the
    constants that are differences of two timings are the most fragile. The
    fastest of several interleaved calls ignores disturbed calls as long as one
    call of each kernel was not disturbed; the plausibility check refuses what is
    left of a disturbed measurement rather than letting it steer
    ``method="auto"``. Calibrate on a quiet machine.

    Examples
    --------
    >>> import numbarope
    >>> consts = numbarope.calibrate(update=False)   # doctest: +SKIP
    """
    if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    for name, flag in (("update", update), ("progress", progress)):
        if not (isinstance(flag, (bool, np.bool_)) or flag is None and name == "progress"):
            raise TypeError(f"{name} must be True or False"
                            + (" (or None: when stderr is a terminal)" if name == "progress"
                               else "") + f", got {flag!r}")
    # imported here, not with numbarope: tqdm.auto warns at import in a Jupyter kernel
    # without ipywidgets ("IProgress not found"), which every notebook would show
    from tqdm.auto import tqdm
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(total=int(repeat) + 1, desc="calibrate", leave=False, disable=not show)
    try:
        rounds, dims = _measure(int(repeat), seed, bar)
    finally:
        bar.close()
    best = {name: min(t[name] for t in rounds) for name in rounds[0]}
    spread = {name: float(np.median([t[name] for t in rounds])) / best[name]
              if best[name] > 0 else np.inf for name in best}
    c = _derive(best, dims)
    noisy = [name for name, x in spread.items() if not x <= NOISY_SPREAD]
    timings = (f"; timings: fastest of {repeat} interleaved calls per kernel, median/fastest "
               + ", ".join(f"{name} {spread[name]:.2f}" for name in (noisy or spread)))
    bad = [k for k, v in c.items() if not _plausible(v, BUILTIN.get(k))]
    if bad:
        warnings.warn(
            "numbarope.calibrate: implausible constants, none updated (the cost model "
            "keeps its current constants): " + ", ".join(
                f"{k} = {c[k]:.3g} (built-in {BUILTIN[k]:.3g})" for k in bad)
            + f"; a constant is accepted within {PLAUSIBLE_FACTOR:g}x of its built-in "
              f"value{timings}. The timings were probably disturbed by other work on the "
              f"machine: calibrate on a quiet machine, or with a larger repeat=.",
            CalibrationWarning, stacklevel=2)
        return c
    off = {name: p / m for name, (p, m) in _checks(best, c, dims).items()
           if not 1 / CHECK_FACTOR <= p / m <= CHECK_FACTOR}
    if off:
        warnings.warn(
            "numbarope.calibrate: the measured constants mispredict whole calls at other "
            "sizes, none updated (the cost model keeps its current constants): "
            + ", ".join(f"{name} predicted {r:.2f}x its time" for name, r in off.items())
            + f" (accepted within {CHECK_FACTOR:g}x){timings}. The timings were probably "
              f"disturbed by other work on the machine: calibrate on a quiet machine, or "
              f"with a larger repeat=.", CalibrationWarning, stacklevel=2)
        return c
    if noisy:
        warnings.warn(
            f"numbarope.calibrate: noisy timings (median more than {NOISY_SPREAD:g}x the "
            f"fastest call){timings}; the constants were {'stored' if update else 'returned'}"
            f" all the same (they are plausible); for steadier ones calibrate on a quiet "
            f"machine", CalibrationWarning, stacklevel=2)
    if update:
        COST_CONSTANTS.update(c)
        fastlane.clear()                      # reused plans were made with the old ones
    return c


def _plausible(value, builtin):
    """Finite, > 0 and within PLAUSIBLE_FACTOR of the built-in value (if there is one)."""
    if not (np.isfinite(value) and value > 0):
        return False
    if builtin is None:
        return True
    return builtin / PLAUSIBLE_FACTOR <= value <= builtin * PLAUSIBLE_FACTOR
