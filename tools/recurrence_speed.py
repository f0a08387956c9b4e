"""Speed of the decay / window recurrences against the FFT path and the exact path.

Run: ``python tools/recurrence_speed.py [--n 4096 16384 65536] [--E 4 8 16] [--reps 3]
[--rate 0.01] [--workers W] [--clock wall|thread] [--json out.json]``.

``--clock thread --workers 1`` measures the calling thread's CPU time on one thread
(every path then runs in the caller's thread): robust to other load on a shared
machine, where wall-clock ratios can be off by 2x.

For each (n, E) (square self-attention, one head, Ev = E): rows of q, k have norm
sqrt(2), scale 1/sqrt(E), so the logit radius is R = 2/sqrt(E); p is the certified
Chebyshev approximant at eps = 1e-3. Four structured weights T(t):

* ``decay-causal``: γ^t for t >= 0 (γ = e^{−rate}), 0 for t < 0;
* ``decay-2sided``: γ^{|t|};
* ``window-causal``: 1 for 0 <= t <= 1023 (HF sliding_window = 1024);
* ``window-2sided``: 1 for −512 <= t <= 512.

Timed (best of ``--reps``, after a warm-up that compiles; wall clock and all
cores by default):

* ``rec``: :func:`numbarope.ops.decay.decay_attention` /
  :func:`numbarope.ops.window.window_attention`;
* ``fft``: :func:`numbarope.ops.fft.fft_attention` with ``T[i − j + n − 1] = T(t)``
  (the circulant FFT path). Its cost does not depend on T's values, so it is
  timed once per (n, E), with the two-sided decay's T, and shared by the rows;
* ``exact``: ``numbarope.rope_attention(q, k, v, bias=log T, method="exact")``
  (with ``is_causal=True`` for the causal rows, so the exact kernel skips the
  keys after each query).

Printed: seconds and the ratios fft/rec and exact/rec (> 1: the recurrence is
faster). ``--skip-fft-above`` / ``--skip-exact-above`` skip the slow baselines at
large n (reported as ``-``).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numbarope  # noqa: E402
from numbarope import bias as _bias  # noqa: E402
from numbarope.ops._features import n_features  # noqa: E402
from numbarope.ops.decay import decay_attention  # noqa: E402
from numbarope.ops.fft import fft_attention  # noqa: E402
from numbarope.ops.window import window_attention  # noqa: E402
from numbarope.polynomial import exp_approximation  # noqa: E402


def fast_decay(q, k, v, s, coef, rate, causal, workers):
    return decay_attention(q, k, v, s, coef, rate, causal, workers=workers)


def fast_window(q, k, v, s, coef, left, right, workers):
    return window_attention(q, k, v, s, coef, _bias.Window(left, right), workers=workers)


def inputs(n, E, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, E))
    k = rng.standard_normal((n, E))
    q *= np.sqrt(2.0) / np.linalg.norm(q, axis=-1, keepdims=True)
    k *= np.sqrt(2.0) / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((n, E))
    return q, k, v


def variants(rate, workers):
    """name -> (recurrence call(q, k, v, s, coef), log T(t) for t array, causal)."""
    def decay_log(causal):
        def f(t):
            lt = -rate * np.abs(t).astype(float)
            if causal:
                lt[t < 0] = -np.inf
            return lt
        return f

    def window_log(left, right):
        return lambda t: np.where((t >= -right) & (t <= left), 0.0, -np.inf)

    return {
        "decay-causal": (lambda q, k, v, s, c: fast_decay(q, k, v, s, c, rate, True, workers),
                         decay_log(True), True),
        "decay-2sided": (lambda q, k, v, s, c: fast_decay(q, k, v, s, c, rate, False, workers),
                         decay_log(False), False),
        "window-causal": (lambda q, k, v, s, c: fast_window(q, k, v, s, c, 1023, 0, workers),
                          window_log(1023, 0), True),
        "window-2sided": (lambda q, k, v, s, c: fast_window(q, k, v, s, c, 512, 512, workers),
                          window_log(512, 512), False),
    }


CLOCK = time.perf_counter


def best(fn, reps, warm=True):
    if warm:
        fn()
    t = np.inf
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        t = min(t, CLOCK() - t0)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--E", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--skip-fft-above", type=int, default=None, metavar="N")
    ap.add_argument("--skip-exact-above", type=int, default=None, metavar="N")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: all)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the caller's CPU time (use with --workers 1)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "thread":
        if args.workers != 1:
            ap.error("--clock thread needs --workers 1 (other threads' time is not counted)")
        CLOCK = time.thread_time
    W = args.workers
    rows = []
    print(f"workers={W or numbarope.get_workers()} clock={args.clock} rate={args.rate} "
          f"reps={args.reps}", flush=True)
    print(f"{'n':>6} {'E':>3} {'deg':>3} {'m':>5} {'variant':>14} {'rec':>9} {'fft':>9} "
          f"{'exact':>9} {'fft/rec':>8} {'exact/rec':>9}", flush=True)
    for E in args.E:
        # compile everything once on a small problem
        q, k, v = inputs(512, E)
        s = 1.0 / np.sqrt(E)
        coef = exp_approximation(2.0 * s, eps=1e-3).coef
        for rec, _, _ in variants(args.rate, W).values():
            rec(q, k, v, s, coef)
        for n in args.n:
            q, k, v = inputs(n, E)
            s = 1.0 / np.sqrt(E)
            R = s * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
            approx = exp_approximation(R, eps=1e-3)
            coef = approx.coef
            m = n_features(E, approx.degree)
            t = np.arange(2 * n - 1) - (n - 1)          # storage e = i − j + n − 1
            vs = variants(args.rate, W)
            t_fft = None
            if args.skip_fft_above is None or n <= args.skip_fft_above:
                T = np.exp(vs["decay-2sided"][1](t))
                t_fft = best(lambda: fft_attention(q, k, v, s, coef, T, workers=W), args.reps,
                             warm=n <= 16384)
            for name, (rec, logT, causal) in vs.items():
                t_rec = best(lambda: rec(q, k, v, s, coef), args.reps)
                t_ex = None
                if args.skip_exact_above is None or n <= args.skip_exact_above:
                    bias = logT(t)
                    try:
                        t_ex = best(lambda: numbarope.rope_attention(
                            q[None], k[None], v[None], bias=bias, scale=s, method="exact",
                            is_causal=causal, workers=W), args.reps, warm=n <= 16384)
                    except Exception as exc:      # the exact path is being edited elsewhere
                        print(f"  exact failed: {exc!r}", flush=True)
                row = dict(clock=args.clock, workers=W, n=n, E=E, degree=approx.degree, m=m,
                           variant=name, rec=t_rec, fft=t_fft, exact=t_ex,
                           fft_ratio=None if t_fft is None else t_fft / t_rec,
                           exact_ratio=None if t_ex is None else t_ex / t_rec)
                rows.append(row)

                def f(x, w=9, p=".3g"):
                    return "-".rjust(w) if x is None else format(x, p).rjust(w)
                print(f"{n:>6} {E:>3} {approx.degree:>3} {m:>5} {name:>14} {f(t_rec)} "
                      f"{f(t_fft)} {f(t_ex)} {f(row['fft_ratio'], 8, '.1f')} "
                      f"{f(row['exact_ratio'], 9, '.1f')}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
