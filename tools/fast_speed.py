"""Speed, scaling, memory and error of the fast path (issue "Speed where users feel it").

Run: ``python tools/fast_speed.py [--n 65536] [--big 262144] [--reps 5] [--split]``
with 2 threads and no torch in the process. Rows of q, k have norm sqrt(2), so the
logit radius at scale 1/sqrt(16) is <= 0.5; eps = 1e-3 (Chebyshev degree 3, m = 969).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def inputs(n, E=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, n, E))
    k = rng.standard_normal((1, n, E))
    q *= np.sqrt(2.0) / np.linalg.norm(q, axis=-1, keepdims=True)
    k *= np.sqrt(2.0) / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((1, n, E))
    return q, k, v


def run(q, k, v, causal, method="fast"):
    import numbarope
    return numbarope.rope_attention(q, k, v, rotary=True, method=method, eps=1e-3,
                                    is_causal=causal, return_info=True)


def timings(n, reps):
    q, k, v = inputs(n)
    for causal in (False, True):
        run(q, k, v, causal)                      # warm-up (compile, caches)
    best = {False: np.inf, True: np.inf}
    for _ in range(reps):                         # interleaved
        for causal in (False, True):
            t = time.perf_counter()
            run(q, k, v, causal)
            best[causal] = min(best[causal], time.perf_counter() - t)
    return best[False], best[True]


def split(n, cf=None):
    """One thread, thread CPU time (robust to other load): features of one side alone,
    then each side's fused kernel (features + products + the denominator sums)."""
    from numba import njit

    from numbarope._runtime.threads import blas_threads
    from numbarope.ops import _common, _features
    q, k, v = (np.ascontiguousarray(a[0]) for a in inputs(n))
    E, g = 16, 3
    coef = np.array([1.0, 1.0, 0.5, 1 / 6])
    wphi, _ = _features.feature_weights(coef, E, g)
    _, parent, var, _ = _features.monomial_table(E, g)
    m = parent.size
    cf = cf or _common.gemm_chunk(m)
    ratio, w0, post = _features.feature_recurrence(wphi, parent)
    qt = np.ascontiguousarray(q.T)
    buf = np.empty(m * cf)

    @njit(nogil=True)
    def feat_only(qt, r0, r1, cf, parent, var, ratio, w0, post, weight, buf):
        m = parent.shape[0]
        for i0 in range(r0, r1, cf):
            i1 = min(i0 + cf, r1)
            P = buf[:m * (i1 - i0)].reshape((m, i1 - i0))
            _features._features_block(qt, i0, i1, parent, var, ratio, w0, post, weight, P, 0)

    def best(f, r=5):
        f()
        ts = []
        for _ in range(r):
            t = time.thread_time()
            f()
            ts.append(time.thread_time() - t)
        return min(ts)

    S, s = np.random.rand(m, 16), np.random.rand(m)
    num, den = np.empty((n, 16)), np.empty(n)
    S2, s2 = np.zeros((m, 16)), np.zeros(m)
    with blas_threads(1):
        tf = best(lambda: feat_only(qt, 0, n, cf, parent, var, ratio, w0, post, wphi, buf))
        tk = best(lambda: _common._key_state(qt, v, 0, n, cf, parent, var, ratio, w0, post,
                                             wphi, buf, S2, s2))
        tq = best(lambda: _common._query_rows(qt, S, s, 0, n, cf, parent, var, ratio, w0,
                                              post, wphi, buf, num, den))
    return {"rows_per_block": cf, "features_one_side_s": tf, "key_side_s": tk,
            "query_side_s": tq, "products_and_sums_s": tk + tq - 2 * tf}


def memory(n, causal):
    """Peak RSS above the inputs, in a fresh subprocess (VmHWM)."""
    code = f"""
import numpy as np, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from fast_speed import inputs, run
import numbarope
q, k, v = inputs(64)
run(q, k, v, {causal})
q, k, v = inputs({n})
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
# reset the high-water mark to the current RSS
open('/proc/self/clear_refs', 'w').write('5')
run(q, k, v, {causal})
print(rss('VmHWM:') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def error(n):
    q, k, v = inputs(n)
    res = {}
    for causal in (False, True):
        out, info = run(q, k, v, causal)
        ref, _ = run(q, k, v, causal, method="exact")
        res[causal] = (float(np.abs(out - ref).max()), float(np.max(info.error_bound)),
                       str(np.ravel(info.algorithm)[0]), int(np.ravel(info.degree)[0]))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--big", type=int, default=262144)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--split", action="store_true", help="only the 1-thread time split")
    a = ap.parse_args()
    assert "torch" not in sys.modules
    if a.split:
        print(json.dumps(split(a.n), indent=1))
        return
    res = {}
    t_nc, t_c = timings(a.n, a.reps)
    res["n"] = a.n
    res["noncausal_s"], res["causal_s"] = t_nc, t_c
    res["causal/noncausal"] = t_c / t_nc
    if not a.no_big:
        b_nc, b_c = timings(a.big, max(2, a.reps // 2))
        res["big_noncausal_s"], res["big_causal_s"] = b_nc, b_c
        res["scaling_noncausal"], res["scaling_causal"] = b_nc / t_nc, b_c / t_c
        res["peak_MiB_noncausal"] = memory(a.big, False) / 2**20
        res["peak_MiB_causal"] = memory(a.big, True) / 2**20
    for causal, (err, bound, alg, deg) in error(4096).items():
        res[f"err_{'causal' if causal else 'noncausal'}"] = dict(err=err, bound=bound,
                                                                 algorithm=alg, degree=deg)
    assert "torch" not in sys.modules
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
