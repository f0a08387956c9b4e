"""Fixed cost of small rope_attention calls: median and min of 300 calls per case.

    python tools/call_overhead.py
    PYTHONPATH=/path/to/other/checkout python tools/call_overhead.py   # compare versions

Run each version in a process of its own, alternating, on a quiet machine.
"""
import time

import numpy as np

import numbarope

CASES = {
    "2 x 4/2 heads x 37, E16 f32 causal gqa": ((2, 4, 37, 16), (2, 2, 37, 16),
                                                dict(is_causal=True, enable_gqa=True,
                                                     scale=0.25)),
    "1 x 8 heads x 256, E64 f32 causal": ((1, 8, 256, 64), (1, 8, 256, 64),
                                          dict(is_causal=True)),
    "decode 1 x 8 heads, 1 vs 512, E64": ((1, 8, 1, 64), (1, 8, 512, 64),
                                          dict(is_causal=True, query_offset=511)),
}


def main():
    rng = np.random.default_rng(0)
    for name, (qs, ks, kw) in CASES.items():
        q = rng.standard_normal(qs).astype(np.float32)
        k = rng.standard_normal(ks).astype(np.float32)
        v = rng.standard_normal(ks).astype(np.float32)
        for _ in range(30):
            numbarope.rope_attention(q, k, v, **kw)
        t = []
        for _ in range(300):
            t0 = time.perf_counter()
            numbarope.rope_attention(q, k, v, **kw)
            t.append(time.perf_counter() - t0)
        print(f"{name}: median {1e3 * np.median(t):.3f} ms, min {1e3 * min(t):.3f} ms")


if __name__ == "__main__":
    main()
