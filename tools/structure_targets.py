#!/usr/bin/env python
"""The typed-structure targets: ALiBi and sliding windows on their own algorithms.

float32 inputs, logit radius R <= 0.5, eps 1e-3, E = Ev = 16, causal; best of
``--repeat`` calls, the methods interleaved in each round, ratios within one run:

* ALiBi (slope 2⁻⁴) on the decay algorithm against plain causal attention on the
  same q, k, v (prefix), and against the same bias forced onto the FFT path
  (passed as a plain array: ``Dense``);
* a causal sliding window (w = 4096 keys before the query) on the window algorithm
  against plain causal, and against its exact path (which skips the key blocks
  outside the band).

    python tools/structure_targets.py [--n 65536] [--repeat 3]
"""
import argparse
import time

import numpy as np

import numbarope
from numbarope.bias import ALiBi, Dense, Window


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536, help="sequence length")
    ap.add_argument("--window", type=int, default=4096, help="keys before the query")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best is reported")
    a = ap.parse_args()
    n, E, R = a.n, 16, 0.5
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(E)
    norm = np.sqrt(R / s)
    q = rng.standard_normal((n, E))
    q *= norm / np.linalg.norm(q, axis=1, keepdims=True)
    k = rng.standard_normal((n, E))
    k *= norm / np.linalg.norm(k, axis=1, keepdims=True)
    q, k = q.astype(np.float32), k.astype(np.float32)
    v = rng.standard_normal((n, E)).astype(np.float32)
    alibi = ALiBi([2.0 ** -4])
    win = Window(a.window, 0)
    common = dict(rotary=True, method="fast", eps=1e-3, return_info=True)
    cases = {
        "causal (prefix)": lambda: numbarope.rope_attention(q, k, v, is_causal=True, **common),
        "ALiBi (decay)": lambda: numbarope.rope_attention(q, k, v, bias=alibi, **common),
        "ALiBi as Dense (fft)": lambda: numbarope.rope_attention(
            q, k, v, bias=Dense(alibi.values(n)[0]), is_causal=True, **common),
        f"window {a.window} (window)": lambda: numbarope.rope_attention(q, k, v, bias=win,
                                                                        **common),
        f"window {a.window} exact": lambda: numbarope.rope_attention(
            q, k, v, bias=win, rotary=True, method="exact", return_info=True),
    }
    best = {name: np.inf for name in cases}
    info = {}
    for name, fn in cases.items():            # warm: compile, certify
        info[name] = fn()[1]
    for r in range(a.repeat):
        names = list(cases)
        names = names[r % len(names):] + names[:r % len(names)]      # rotate the order
        for name in names:
            t = time.perf_counter()
            cases[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["causal (prefix)"]
    print(f"n={n}, E=Ev={E}, float32, R<={R}, eps=1e-3, best of {a.repeat}")
    for name, t in best.items():
        h = info[name].heads[0]
        print(f"  {name:24s} {t:7.3f} s  {t / base:5.2f}x causal   algorithm {h.algorithm:9s} "
              f"degree {h.degree}  bound {h.error_bound:.1e} ({h.bound_kind})")
    print(f"  ALiBi: decay is {best['ALiBi as Dense (fft)'] / best['ALiBi (decay)']:.1f}x "
          f"faster than the FFT path")


if __name__ == "__main__":
    main()
