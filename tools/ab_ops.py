"""A/B of the separable fast algorithms: the old layout against ``numbarope.ops``.

Old: ``numbarope.fast.fast_separable`` (gemm, prefix, fft) and
``numbarope._recurrence.fast_decay`` / ``fast_window`` of the release in /work/base
(``PYTHONPATH=/work/base``). New: the registered algorithms of ``numbarope.ops``
(``ops.get(name).run(...)``, with a :mod:`numbarope.bias` structure) in this tree.
Each side runs in its own subprocess, builds the same inputs from the same seeds,
and saves its results; this script compares them.

Usage (from anywhere, with the venv active)::

    python tools/ab_ops.py                 # the equality grid (a few minutes on 2 cores)
    python tools/ab_ops.py --quick         # a smaller grid
    python tools/ab_ops.py --time          # old vs new timing, n = 16384, E = 16, g = 3
    python tools/ab_ops.py --time --workers 1 --reps 15 --only prefix,window

The grid: every algorithm; L = S and L != S with offsets (decoding blocks, queries
beyond the keys, negative offsets); causal or not; key padding; G = 1 and 3 query
heads per key/value head; E = 4, 8, 16; degree 2–4; n up to 5000; workers 1 and 2;
small chunks, tasks and state budgets (several groups, the two-scan decay). For each
case: max|diff| of out and den and whether they are bitwise equal (``np.array_equal``:
-0.0 == 0.0). The new side also checks that workers = 1, 2, 3 give bitwise the same
result.

``--time``: the old and the new side are two long-lived subprocesses, asked in turn
(old, new, old, new, ...) to run one algorithm on the same inputs; best of ``--reps``
(default 5) per side, after a warm-up; ratios new / old (< 1: the new is faster).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.path.dirname(HERE)
OLD = os.environ.get("NUMBAROPE_OLD", "/work/base")


# ------------------------------------------------------------------ the grid
def grid(quick=False):
    """The cases: dicts of plain values (JSON)."""
    shapes = [(300, 300, 0), (1000, 1000, 0), (40, 1000, 960), (300, 37, 0), (50, 300, -20),
              (700, 2500, 1800), (2000, 2000, 0), (5000, 5000, 0)]
    if quick:
        shapes = shapes[:5]
    eg = [(4, 2), (8, 3), (16, 2), (4, 4), (16, 3), (8, 2)]
    small = {"CAUSAL_CHUNK": 16, "MAX_TASKS": 3, "STATE_BYTES": 8 * 35 * 4 * 7,
             "FEATURE_BLOCK_BYTES": 8 * 35 * 16, "CHUNK": 7}
    two_scan = {"STATE_BYTES": 20_000, "CHUNK": 7}
    cases = []
    i = 0

    def add(alg, L, S, off, **kw):
        nonlocal i
        E, g = eg[i % len(eg)]
        if max(L, S) >= 2000 and (E, g) == (4, 4):
            E, g = 8, 2              # keep the big ones cheap on a shared machine
        if alg == "fft" and (E, g) in ((16, 3), (4, 4)):
            E, g = (16, 2) if max(L, S) < 2000 else (4, 3)
        c = dict(alg=alg, L=L, S=S, offset=off, E=E, Ev=3 if i % 3 else 8, degree=g,
                 G=3 if i % 2 else 1, pad=bool(i % 4 >= 2), workers=1 + i % 2, seed=1000 + i,
                 config={})
        c.update(kw)
        cases.append(c)
        i += 1

    for L, S, off in shapes:
        add("gemm", L, S, off)
        add("gemm", L, S, off, G=3, pad=True)
        add("fft", L, S, off, bias="random")
        add("fft", L, S, off, bias="causal-decay")
        # prefix: only where the causal mask cuts a real key (else the planner, and the
        # old fast_separable, take gemm)
        if off < S - 1:
            add("prefix", L, S, off)
            add("prefix", L, S, off, G=3, pad=True, workers=2)
        for rate, causal in ((0.01, True), (0.5, False), (5.0, True), (800.0, False),
                             (0.0, True)):
            add("decay", L, S, off, rate=rate, causal=causal)
        for left, right in ((0, 0), (40, 0), (5, 17), (300, 300), (None, 3)):
            add("window", L, S, off, left=left, right=right)
    # decoding: one query that sees every key (causal): gemm in both
    add("gemm", 1, 300, 299, causal=True)
    # small chunks, many tasks, several groups; two-sided decay as two scans
    for L, S, off in ((300, 300, 0), (90, 250, 100), (120, 40, -10), (1000, 1000, 0)):
        add("prefix", L, S, off, config=small, pad=True)
        add("gemm", L, S, off, config=small)
        add("decay", L, S, off, rate=0.05, causal=True, config=small, pad=True)
        add("decay", L, S, off, rate=0.05, causal=False, config=small)
        add("decay", L, S, off, rate=0.05, causal=False, config=two_scan, pad=True)
        add("decay", L, S, off, rate=5.0, causal=True, config=two_scan)
        add("window", L, S, off, left=20, right=0, config=small)
        add("window", L, S, off, left=9, right=33, config=small, pad=True)
    return cases


def inputs(c):
    """q (G, L, E) or (L, E), k, v, key mask, T (FFT) of a case; the same on both sides."""
    rng = np.random.default_rng(c["seed"])
    G, L, S, E = c["G"], c["L"], c["S"], c["E"]
    s = 1.0 / np.sqrt(E)
    R = 1.0
    q = rng.standard_normal((G, L, E))
    k = rng.standard_normal((S, E))
    q *= np.sqrt(R / s) / max(np.linalg.norm(q, axis=-1).max(), 1e-300)
    k *= np.sqrt(R / s) / max(np.linalg.norm(k, axis=-1).max(), 1e-300)
    v = rng.uniform(-1, 1, (S, c["Ev"]))
    mask = rng.random(S) < 0.7 if c["pad"] else None
    T = None
    if c["alg"] == "fft":
        t = np.arange(L + S - 1) - (S - 1) + c["offset"]
        if c.get("bias") == "random":
            T = rng.random(L + S - 1) + 0.5
        else:
            T = np.where(t >= 0, np.exp(-0.01 * np.abs(t)), 0.0)
    return (q[0] if G == 1 else q), k, v, s, mask, T


# ------------------------------------------------------------------ the two sides
def _configure(side, cfg):
    from numbarope import _config
    for key, val in cfg.items():
        if key == "CHUNK":
            if side == "old":
                import numbarope._recurrence as rec
                rec.CHUNK = val
            else:
                import numbarope.ops._common as common
                common.CHUNK = val
        else:
            setattr(_config, key, val)


def _old_call(c, q, k, v, s, coef, mask, T, workers):
    from numbarope._recurrence import fast_decay, fast_window
    from numbarope.fast import fast_separable
    alg = c["alg"]
    if alg in ("gemm", "prefix"):
        return fast_separable(q, k, v, s, coef, None, alg == "prefix" or c.get("causal", False),
                              workers, offset=c["offset"], key_mask=mask)
    if alg == "fft":
        return fast_separable(q, k, v, s, coef, T, False, workers, offset=c["offset"],
                              key_mask=mask)
    if alg == "decay":
        return fast_decay(q, k, v, s, coef, c["rate"], c["causal"], workers,
                          offset=c["offset"], key_mask=mask)
    big = c["L"] + c["S"]
    left = big if c["left"] is None else c["left"]
    right = big if c["right"] is None else c["right"]
    return fast_window(q, k, v, s, coef, left, right, workers, offset=c["offset"],
                       key_mask=mask)


def _new_call(c, q, k, v, s, coef, mask, T, workers):
    import numbarope.ops as ops
    from numbarope import bias
    from numbarope.ops import decay, fft, gemm, prefix, window  # noqa: F401  (register)
    alg = c["alg"]
    kw = dict(offset=c["offset"], key_mask=mask, workers=workers)
    if alg == "gemm":
        st = bias.NoBias()
    elif alg == "prefix":
        from numbarope.ops._common import visible_keys
        st = bias.Causal()
        if visible_keys(c["L"], c["S"], c["offset"], True, mask) is None:
            alg, st = "gemm", bias.NoBias()        # as the planner: no real key is cut
    elif alg == "fft":
        return ops.get("fft").run(q, k, v, s, coef, structure=bias.NoBias(), T=T, **kw)
    elif alg == "decay":
        if not np.isfinite(c["rate"]):
            return decay.decay_attention(q, k, v, s, coef, c["rate"], c["causal"], **kw)
        st = bias.Decay(c["rate"], c["causal"])
    else:
        st = bias.Window(c["left"], c["right"])
    return ops.get(alg).run(q, k, v, s, coef, structure=st, **kw)


def worker_grid(side, case_file, out_file):
    """Run every case of ``case_file`` on this side; save out/den per case."""
    from numbarope import _config
    from numbarope.polynomial import exp_approximation
    cases = json.load(open(case_file))
    call = _old_call if side == "old" else _new_call
    saved = {}
    defaults = {k: getattr(_config, k) for k in ("CAUSAL_CHUNK", "MAX_TASKS", "STATE_BYTES",
                                                  "FEATURE_BLOCK_BYTES")}
    for n, c in enumerate(cases):
        _configure(side, dict(defaults, CHUNK=None))
        _configure(side, c["config"])
        q, k, v, s, mask, T = inputs(c)
        coef = np.asarray(exp_approximation(1.0, degree=c["degree"]).coef)
        out, den = call(c, q, k, v, s, coef, mask, T, c["workers"])
        saved[f"{n}_out"], saved[f"{n}_den"] = out, den
        saved[f"{n}_coef"] = coef
        if side == "new":            # workers invariance, bitwise
            same = True
            for w in (1, 2, 3):
                if w == c["workers"]:
                    continue
                o2, d2 = call(c, q, k, v, s, coef, mask, T, w)
                same &= bool(np.array_equal(o2, out) and np.array_equal(d2, den))
            saved[f"{n}_workers_same"] = np.array(same)
    np.savez(out_file, **saved)


def _run_side(side, args):
    env = dict(os.environ, PYTHONPATH=OLD if side == "old" else NEW)
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", side]
                          + args, env=env, cwd=tempfile.gettempdir(), check=True)


def _describe(c):
    extra = ""
    if c["alg"] == "decay":
        extra = f" rate={c['rate']:g} {'causal' if c['causal'] else '2-sided'}"
    elif c["alg"] == "window":
        extra = f" ({c['left']},{c['right']})"
    elif c["alg"] == "fft":
        extra = f" {c['bias']}"
    elif c.get("causal"):
        extra = " causal"
    cfg = " small-config" if c["config"] else ""
    return (f"{c['alg']:6s} L={c['L']:5d} S={c['S']:5d} off={c['offset']:5d} G={c['G']} "
            f"E={c['E']:2d} Ev={c['Ev']} g={c['degree']} pad={int(c['pad'])} "
            f"w={c['workers']}{extra}{cfg}")


def main_grid(quick):
    cases = grid(quick)
    with tempfile.TemporaryDirectory() as tmp:
        cf = os.path.join(tmp, "cases.json")
        json.dump(cases, open(cf, "w"))
        res = {}
        for side in ("old", "new"):
            t0 = time.perf_counter()
            _run_side(side, ["--cases", cf, "--out", os.path.join(tmp, side + ".npz")])
            print(f"{side} side: {time.perf_counter() - t0:.1f} s", flush=True)
            res[side] = dict(np.load(os.path.join(tmp, side + ".npz")))
    old, new = res["old"], res["new"]
    rows, nbit, nwork = [], 0, 0
    worst = 0.0
    by_alg = {}
    for n, c in enumerate(cases):
        assert np.array_equal(old[f"{n}_coef"], new[f"{n}_coef"])
        oo, od, no, nd = old[f"{n}_out"], old[f"{n}_den"], new[f"{n}_out"], new[f"{n}_den"]
        assert oo.shape == no.shape and od.shape == nd.shape, (n, oo.shape, no.shape)
        dout = float(np.abs(oo - no).max(initial=0.0))
        dden = float((np.abs(od - nd) / np.maximum(np.abs(od), 1e-300)).max(initial=0.0))
        bit = bool(np.array_equal(oo, no) and np.array_equal(od, nd))
        wsame = bool(new[f"{n}_workers_same"])
        nbit += bit
        nwork += wsame
        worst = max(worst, dout)
        a = by_alg.setdefault(c["alg"], [0, 0, 0, 0.0])
        a[0] += 1
        a[1] += bit
        a[2] += wsame
        a[3] = max(a[3], dout)
        rows.append(f"{'bitwise' if bit else 'DIFFERS':7s} {'w-same' if wsame else 'W-DIFF':6s} "
                    f"max|dout|={dout:.2e} max rel|dden|={dden:.2e}  {_describe(c)}")
    print("\n".join(rows))
    print("\nsummary (old /work/base vs new numbarope.ops):")
    for alg, (cnt, bit, ws, w) in by_alg.items():
        print(f"  {alg:6s}: {bit}/{cnt} bitwise equal to the old, {ws}/{cnt} bitwise the "
              f"same for workers 1, 2, 3; max|dout| = {w:.2e}")
    print(f"  all   : {nbit}/{len(cases)} bitwise, {nwork}/{len(cases)} workers-invariant, "
          f"max|dout| = {worst:.2e}")
    return 0 if nbit == len(cases) and nwork == len(cases) else 1


# ------------------------------------------------------------------ timing
TIMED = ("gemm", "prefix", "decay-causal", "decay-2sided", "window", "fft")


def _timed_case(name, n):
    c = dict(L=n, S=n, offset=0, E=16, Ev=16, degree=3, G=1, pad=False, seed=7, config={})
    if name in ("gemm", "prefix"):
        c["alg"] = name
    elif name.startswith("decay"):
        c.update(alg="decay", rate=0.01, causal=name == "decay-causal")
    elif name == "window":
        c.update(alg="window", left=1023, right=0)
    else:
        c.update(alg="fft", bias="causal-decay")
    return c


def worker_time(side, n, workers=None):
    """Serve timing requests on stdin: a case name per line; answers seconds."""
    from numbarope.polynomial import exp_approximation
    call = _old_call if side == "old" else _new_call
    coef = np.asarray(exp_approximation(1.0, degree=3).coef)
    data = {}
    for name in TIMED:                      # warm-up (compile / load the numba cache)
        c = _timed_case(name, 600)
        q, k, v, s, mask, T = inputs(c)
        call(c, q, k, v, s, coef, mask, T, None)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        c = _timed_case(name, n)
        if name not in data:
            data[name] = inputs(c)
        q, k, v, s, mask, T = data[name]
        t0 = time.perf_counter()
        call(c, q, k, v, s, coef, mask, T, workers)
        print(time.perf_counter() - t0, flush=True)


def main_time(n, reps, which, workers=None):
    procs = {}
    for side in ("old", "new"):
        env = dict(os.environ, PYTHONPATH=OLD if side == "old" else NEW)
        procs[side] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", side, "--serve-time",
             "--n", str(n)] + ([] if workers is None else ["--workers", str(workers)]),
            env=env, cwd=tempfile.gettempdir(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
    best = {}
    try:
        for name in which:
            for r in range(reps):
                for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    p = procs[side]
                    p.stdin.write(name + "\n")
                    p.stdin.flush()
                    t = float(p.stdout.readline())
                    key = (name, side)
                    best[key] = min(best.get(key, np.inf), t)
            o, w = best[(name, "old")], best[(name, "new")]
            print(f"{name:13s} old {o:8.3f} s   new {w:8.3f} s   new/old {w / o:6.3f}",
                  flush=True)
    finally:
        for p in procs.values():
            p.stdin.write("\n")
            p.stdin.close()
            p.wait()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--time", action="store_true", help="time old vs new")
    ap.add_argument("--n", type=int, default=16384, help="--time: sequence length")
    ap.add_argument("--reps", type=int, default=5, help="--time: best of")
    ap.add_argument("--only", default=",".join(TIMED), help="--time: comma-separated cases")
    ap.add_argument("--workers", type=int, default=None,
                    help="--time: threads (default: numbarope's default, all cores)")
    ap.add_argument("--worker", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--serve-time", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        if a.serve_time:
            return worker_time(a.worker, a.n, a.workers)
        return worker_grid(a.worker, a.cases, a.out)
    if a.time:
        return main_time(a.n, a.reps, a.only.split(","), a.workers)
    return main_grid(a.quick)


if __name__ == "__main__":
    sys.exit(main())
