#!/usr/bin/env python
"""Forward + backward of attention: numbarope's exact path against torch SDPA, each in a
clean process of its own, rounds interleaved (issue 22's target).

    python tools/grad_bench.py                        # n=4096, E=64, 8 heads, float32
    python tools/grad_bench.py --n 2048 --heads 4 --rounds 3
    python tools/grad_bench.py --n 65536 --E 16 --heads 1 --method fast --radius 0.5
        # the certified fast forward + backward (bounded logits: q, k scaled so that
        # s·max‖q‖·max‖k‖ = 0.5) against SDPA on the same inputs

Per implementation and process: a warm-up call, then the best of ``--repeat`` of
``out = attn(q, k, v); out.backward(dout)``, causal and not.
"""
import argparse
import json
import subprocess
import sys
import time


def child(impl, n, E, H, causal, repeat, threads, method="exact", radius=None):
    import torch
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, E, generator=g) for _ in range(3))
    if radius is not None:           # s·max‖q‖·max‖k‖ = radius per head, s = 1/sqrt(E)
        c = (radius * E ** 0.5 / (q.norm(dim=-1).amax(-1, keepdim=True)
                                  * k.norm(dim=-1).amax(-1, keepdim=True))) ** 0.5
        q, k = q * c[..., None], k * c[..., None]
    q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
    dout = torch.randn(1, H, n, E, generator=g)
    if impl == "numbarope":
        import numbarope

        def f():
            return numbarope.rope_attention(q, k, v, is_causal=causal, method=method)
    else:
        def f():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    best = {"forward": 1e9, "forward+backward": 1e9}
    for r in range(repeat + 1):
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        out = f()
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        if r:                                   # the first call warms up (compiles)
            best["forward"] = min(best["forward"], t1 - t0)
            best["forward+backward"] = min(best["forward+backward"], t2 - t0)
    print(json.dumps(best))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="exact", choices=("exact", "fast", "auto"),
                    help="numbarope's method (default exact)")
    ap.add_argument("--radius", type=float, default=None,
                    help="scale q, k to this logit radius (the fast path's regime)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.n, a.E, a.heads, a.child[1] == "causal", a.repeat, a.threads,
              a.method, a.radius)
        return
    extra = ["--method", a.method] + ([] if a.radius is None else ["--radius", str(a.radius)])
    res = {}
    for r in range(a.rounds):
        for causal in ("full", "causal"):
            order = ("numbarope", "sdpa") if r % 2 == 0 else ("sdpa", "numbarope")
            for impl in order:
                out = subprocess.run([sys.executable, __file__, "--n", str(a.n), "--E", str(a.E),
                                      "--heads", str(a.heads), "--repeat", str(a.repeat),
                                      "--threads", str(a.threads), *extra,
                                      "--child", impl, causal],
                                     capture_output=True, text=True, check=True).stdout
                res.setdefault((causal, impl), []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"n={a.n}, E={a.E}, {a.heads} heads, float32, {a.threads} threads, {a.rounds} rounds "
          f"(best; spread of the rounds' bests); numbarope method={a.method}"
          + ("" if a.radius is None else f", logit radius {a.radius}"))
    print("| case | numbarope (s) | torch SDPA (s) | ratio |")
    print("|---|---|---|--:|")
    for causal in ("full", "causal"):
        for what in ("forward", "forward+backward"):
            ours = [x[what] for x in res[(causal, "numbarope")]]
            theirs = [x[what] for x in res[(causal, "sdpa")]]
            print(f"| {causal}, {what} | {min(ours):.4g} ({min(ours):.4g}–{max(ours):.4g}) | "
                  f"{min(theirs):.4g} ({min(theirs):.4g}–{max(theirs):.4g}) | "
                  f"{min(ours) / min(theirs):.2f} |")


if __name__ == "__main__":
    main()
