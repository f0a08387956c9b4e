#!/usr/bin/env python
"""Grouped-query attention on the fast path: the key side shared by a group's query heads.

Times ``rope_attention(q, k, v, enable_gqa=True)`` (each key/value head's features and
key-side state formed once for its query heads) against the same call with the key/value
heads repeated per query head (no sharing: the pre-sharing cost), best of ``--repeat``
runs, interleaved. All query heads have the same radius, so one polynomial serves a group.

    python tools/gqa_share.py [--n 16384] [--E 8] [--query-heads 9] [--kv-heads 3]
"""
import argparse
import time

import numpy as np

import numbarope


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="sequence length")
    ap.add_argument("--E", type=int, default=8, help="head_dim")
    ap.add_argument("--query-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((a.query_heads, a.n, a.E))
    q /= np.linalg.norm(q, axis=-1).max(axis=-1)[:, None, None]      # every head: R alike
    k = rng.standard_normal((a.kv_heads, a.n, a.E))
    k /= np.linalg.norm(k, axis=-1).max(axis=-1)[:, None, None]
    q, k = q * 1.6, k * 1.6             # R = s·max‖q‖·max‖k‖ = 2.56/√E
    v = rng.standard_normal((a.kv_heads, a.n, a.E))
    g = a.query_heads // a.kv_heads
    krep, vrep = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
    for causal in (False, True):
        kw = dict(rotary=True, is_causal=causal, method="fast", eps=1e-3)
        shared, single = [], []
        for _ in range(a.repeat):
            t = time.perf_counter()
            out, info = numbarope.rope_attention(q, k, v, enable_gqa=True, return_info=True, **kw)
            shared.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = numbarope.rope_attention(q, krep, vrep, **kw)
            single.append(time.perf_counter() - t)
        ts, tr = min(shared), min(single)
        print(f"n={a.n} E={a.E} {a.query_heads}q/{a.kv_heads}kv causal={causal}: shared "
              f"{ts:.3f} s, unshared {tr:.3f} s, saving {1 - ts / tr:.0%} "
              f"(degree {sorted(set(info.degree.tolist()))}; {info.reason[0]}); "
              f"max|shared - unshared| = {np.abs(out - ref).max():.1e}")


if __name__ == "__main__":
    main()
