"""In-memory rope_attention vs the same call on a 2-process LocalCluster (numbarope._dask).

python tools/dask_measure.py [--n-exact N] [--n-fast N] [--heads H] [--chunks C]
Prints seconds (best of 2) and the bytes each block sends over the network.
"""
import argparse
import time

import numpy as np


def best(f, reps=2):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = f()
        t.append(time.perf_counter() - t0)
    return min(t), r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-exact", type=int, default=16384)
    ap.add_argument("--n-fast", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--E", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=4, help="head chunks")
    a = ap.parse_args()
    import dask.array as da
    import distributed

    import numbarope
    from numbarope._dask import long_sequence_attention, rope_attention_dask
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    hc = a.heads // a.chunks
    for method, n, s in (("fast", a.n_fast, 0.5 / np.sqrt(a.E)), ("exact", a.n_exact, 0.3)):
        rng = np.random.default_rng(0)
        # fast: |q|, |k| <= R-ish small so that R <= 0.5 (features feasible)
        q, k, v = (rng.uniform(-s, s, (a.heads, n, a.E)) for _ in range(3))
        kw = dict(rotary=True, is_causal=True, method=method, eps=1e-3, scale=1.0)
        numbarope.rope_attention(q[:1, :256], k[:1, :256], v[:1, :256], **kw)   # compile
        t_mem, ref = best(lambda: numbarope.rope_attention(q, k, v, **kw))
        dq, dk, dv = (da.from_array(x, chunks=(hc, -1, -1)) for x in (q, k, v))
        dq, dk, dv = client.persist([dq, dk, dv])       # data already on the workers
        distributed.wait([dq, dk, dv])
        rope_attention_dask(dq[:1, :256], dk[:1, :256], dv[:1, :256], **kw).compute()
        t_dask, out = best(lambda: rope_attention_dask(dq, dk, dv, **kw).compute())
        err = np.abs(out - ref).max()
        inb = 3 * hc * n * a.E * 8
        outb = hc * n * a.E * 8
        print(f"{method:5s} n={n} heads={a.heads} E={a.E}: in-memory {t_mem:.2f}s, "
              f"dask 2 procs ({a.chunks} blocks of {hc} heads) {t_dask:.2f}s, "
              f"max|diff|={err:.1e}; per block: q+k+v {inb / 2**20:.1f} MiB in "
              f"(if not already on the worker), out {outb / 2**20:.1f} MiB back")
    # one long sequence, exact, causal: pairs of query x key blocks
    n, blk = a.n_exact, a.n_exact // 4
    rng = np.random.default_rng(1)
    q, k, v = (rng.uniform(-0.3, 0.3, (a.heads, n, a.E)) for _ in range(3))
    kw = dict(rotary=True, is_causal=True, method="exact")
    t_mem, ref = best(lambda: numbarope.rope_attention(q, k, v, **kw))
    t_ls, out = best(lambda: long_sequence_attention(q, k, v, query_block=blk, client=client,
                                                     **kw).compute())
    pair_in = (blk * a.E * 8) * 3 * a.heads
    pair_out = a.heads * blk * (a.E + 1) * 8
    print(f"long  n={n} heads={a.heads} blocks={blk}: in-memory {t_mem:.2f}s, dask "
          f"{t_ls:.2f}s (incl. scatter), max|diff|={np.abs(out - ref).max():.1e}; per pair: "
          f"{pair_in / 2**20:.1f} MiB in (q, k, v blocks), {pair_out / 2**20:.1f} MiB partial "
          f"(out + lse) to the merge task")
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
