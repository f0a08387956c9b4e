"""In-memory rope_attention vs the same call on a 2-process LocalCluster (numbarope.backends:
dask, long_sequence).

python tools/dask_measure.py [--n-exact N] [--n-fast N] [--heads H] [--chunks C]
                             [--only fast|exact] [--section heads|long] [--reps R]
Prints seconds (best of 2) and the bytes each block sends over the network.
"""
import argparse
import time

import numpy as np


REPS = 2


def best(f, reps=None):
    reps = REPS if reps is None else reps
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
    ap.add_argument("--reps", type=int, default=2, help="runs per timing (best of)")
    ap.add_argument("--only", choices=["fast", "exact"], default=None,
                    help="measure one method only")
    ap.add_argument("--section", choices=["heads", "long"], default=None,
                    help="heads: many heads, chunked; long: one long sequence in blocks")
    ap.add_argument("--blocks", type=int, default=4, help="blocks of the long sequence")
    a = ap.parse_args()
    global REPS
    REPS = a.reps
    import dask.array as da
    import distributed

    import numbarope
    from numbarope.backends.dask import rope_attention_dask
    from numbarope.backends.long_sequence import long_sequence_attention
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    hc = a.heads // a.chunks
    for method, n, s in (("fast", a.n_fast, 0.5 / np.sqrt(a.E)), ("exact", a.n_exact, 0.3)):
        if a.only not in (None, method) or a.section not in (None, "heads"):
            continue
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
    # one long sequence, causal: exact = pairs of query x key blocks merged by lse;
    # fast = key-side states per key block, tree reduction, query blocks
    from numbarope.bias import ALiBi
    alibi = ALiBi.from_heads(a.heads)
    for method, n, s, bias in (("fast", a.n_fast, 0.5 / np.sqrt(a.E), None),
                               ("fast", a.n_fast, 0.5 / np.sqrt(a.E), alibi),
                               ("exact", a.n_exact, 0.3, None)):
        if a.only not in (None, method) or a.section not in (None, "long"):
            continue
        blk = n // a.blocks
        rng = np.random.default_rng(1)
        q, k, v = (rng.uniform(-s, s, (a.heads, n, a.E)) for _ in range(3))
        kw = dict(rotary=True, is_causal=True, method=method, eps=1e-3, scale=1.0,
                  bias=bias)
        t_mem, ref = best(lambda: numbarope.rope_attention(q, k, v, **kw))
        info = numbarope.plan(q, k, v, **kw)
        t_ls, out = best(lambda: long_sequence_attention(q, k, v, query_block=blk,
                                                         client=client, **kw).compute())
        # the same with the blocks already on the workers (persisted dask arrays)
        dq, dk, dv = client.persist([da.from_array(x, chunks=(-1, blk, -1)) for x in (q, k, v)])
        distributed.wait([dq, dk, dv])
        t_on, _ = best(lambda: long_sequence_attention(dq, dk, dv, query_block=blk,
                                                       **kw).compute())
        blk_in = (blk * a.E * 8) * 3 * a.heads
        label = method + ("+alibi" if bias is not None else "")
        line = (f"long {label:10s} n={n} heads={a.heads} blocks of {blk}: in-memory "
                f"{t_mem:.2f}s, dask {t_ls:.2f}s (incl. scatter), {t_on:.2f}s (blocks "
                f"already on the workers), "
                f"max|diff|={np.abs(out - ref).max():.1e}; ")
        if method == "exact":
            pair_out = a.heads * blk * (a.E + 1) * 8
            line += (f"per pair task: {blk_in / 2**20:.1f} MiB in (q, k, v blocks), "
                     f"{pair_out / 2**20:.1f} MiB partial (out + lse) to the merge task")
        else:
            m = int(np.max(info.features))
            state = a.heads * m * (a.E + 1) * 8
            line += (f"{'/'.join(sorted(set(info.algorithm.ravel())))}, "
                     f"degree {int(np.max(info.degree))}, m={m}: per key block "
                     f"{2 * blk_in / 3 / 2**20:.1f} MiB in (k, v), one state of "
                     f"{state / 2**20:.1f} MiB out (m x (Ev+1) per head) to the tree; per "
                     f"query block {blk_in / 3 / 2**20:.1f} MiB q + its k, v block + one "
                     f"state in, {a.heads * blk * (a.E + 1) * 8 / 2**20:.1f} MiB out")
        print(line, flush=True)
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
