"""A/B of the exact path and the general-W FFT path: the original release (old API,
``numbarope.exact.exact_attention`` and ``numbarope.fast.fast_general``) against the
one-file layout (``numbarope.ops.streaming.exact_attention`` with key ranges,
``numbarope.ops.toeplitz_fft.fast_general``).

Each side runs in its own Python process (``PYTHONPATH`` = its tree) and serves
requests on stdin; this driver builds the same inputs on both sides from a case
description and a seed, and compares the results.

* default: a grid of cases (causal, offsets, windows, padding, bias, GQA, general W,
  float32 and float64, rectangular, several row and key blocks); for each one
  max|new − old| of out and lse and whether they are bitwise equal. The original
  release took the per-row bias shift over padded keys too (a field report): cases
  with both a bias and padding are compared with a dense float64 reference instead
  (new and old), as are the field-report cases of huge biases on padded keys.
* ``--time``: old vs new, interleaved, best of ``--repeat`` (5), n = 8192 and 16384,
  E = Ev = 16 and 64, causal and not, float32, B = 2 heads; the ratio new/old
  (``--n``, ``--E``, ``--causal`` choose a part).

Usage::

    . /work/dev/bin/activate
    python tools/ab_streaming.py [--old /work/base] [--new <repo>] [--time]

Exit status 1 when a bitwise case differs or a reference case exceeds its tolerance.
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
REPO = os.path.dirname(HERE)


# ------------------------------------------------------------------ inputs

def _window_keep(n, S, offset, window, causal):
    """(n + S − 1,) bool: offsets t = e − (S − 1) + offset kept by the window/causal."""
    t = np.arange(n + S - 1) - (S - 1) + offset
    ok = np.ones(t.shape, bool)
    if window is not None:
        left, right = window
        if left is not None:
            ok &= t <= left
        if right is not None:
            ok &= t >= -right
    if causal:
        ok &= t >= 0
    return ok


def key_ranges(case):
    """(lo, hi) (n,) of the case's causal mask and window, or None."""
    n, S, off = case["n"], case["S"], case["offset"]
    if not case["causal"] and case.get("window") is None:
        return None
    p = np.arange(n, dtype=np.int64) + off
    lo = np.zeros(n, np.int64)
    hi = np.full(n, S, np.int64)
    if case["causal"]:
        hi = np.minimum(hi, np.clip(p + 1, 0, S))
    if case.get("window") is not None:
        left, right = case["window"]
        if left is not None:
            lo = np.maximum(lo, np.clip(p - left, 0, S))
        if right is not None:
            hi = np.minimum(hi, np.clip(p + right + 1, 0, S))
    return lo, hi


def make_inputs(case):
    """The arrays of a case (numpy only: the same on both sides)."""
    rng = np.random.default_rng(case["seed"])
    dt = np.dtype(case["dtype"])
    B, G, n, S, E, Ev = (case[x] for x in ("B", "G", "n", "S", "E", "Ev"))
    Bk = B // G
    amp = case.get("amp", 0.5)
    q = (rng.standard_normal((B, n, E)) * amp).astype(dt)
    k = (rng.standard_normal((Bk, S, E)) * amp).astype(dt)
    v = rng.standard_normal((Bk, S, Ev)).astype(dt)
    d = dict(q=q, k=k, v=v, scale=1.0 / np.sqrt(E), kvidx=np.arange(B) // G)
    if case.get("general"):
        Br = B if case.get("perhead") else 1
        W = rng.standard_normal((Br, n + S - 1, E, E)) / np.sqrt(E)
        d["relative"] = W.astype(dt)
        d["ridx"] = np.arange(B) % Br
    pad = case.get("pad")
    if pad is not None:
        Bm = Bk if pad == "perhead" else 1
        real = np.ones((Bm, S), bool)
        for r in range(Bm):
            if pad in ("left", "perhead"):
                real[r, :min(S - 1, 3 + 5 * r)] = False
            elif pad == "right":
                real[r, S - max(1, S // 4):] = False
            elif pad == "random":
                real[r] = rng.random(S) < 0.6
                real[r, 0] = True
        d["kmask"] = np.where(real, 0.0, -np.inf)
        d["kidx"] = (np.arange(B) // G) % Bm
    bk = case.get("bias")
    keep = None
    if case.get("window") is not None:
        keep = _window_keep(n, S, case["offset"], case["window"], False)
    if bk is not None or keep is not None:
        Bb = B if case.get("perhead") else 1
        if bk == "random":
            b = rng.standard_normal((Bb, n + S - 1)) * 3
        elif bk == "alibi":
            t = np.arange(n + S - 1) - (S - 1) + case["offset"]
            slopes = 2.0 ** -np.arange(1, Bb + 1)
            b = -slopes[:, None] * np.abs(t)[None]
        elif bk == "huge":             # -1e30 on every offset, 0 on a few
            b = np.full((Bb, n + S - 1), -1e30)
            b[:, rng.integers(0, n + S - 1, size=max(1, (n + S) // 7))] = 0.0
            b[:, ::5] += rng.standard_normal(b[:, ::5].shape)
        elif bk == "field":            # -1e30, but 0 on the offsets that only the
            b = np.full((Bb, n + S - 1), -1e30)    # last row's padded keys use
            padded = np.flatnonzero(~real[0]) if pad is not None else np.zeros(0, int)
            b[:, n - 1 - padded + S - 1] = 0.0
        elif bk == "masked":           # random with -inf holes
            b = rng.standard_normal((Bb, n + S - 1)) * 2
            b[:, rng.random(b.shape[1]) < 0.2] = -np.inf
        else:
            b = np.zeros((Bb, n + S - 1))
        if keep is not None:
            b = np.where(keep[None], b, -np.inf)
        d["bias"] = np.ascontiguousarray(b)
        d["bidx"] = np.arange(B) % Bb
    return d


def reference(case, d):
    """Dense float64 reference (out (B, n, Ev), lse (B, n)): per head and row, softmax
    over the keys it sees (range, padding, finite bias), the bias shifted by its
    maximum over those keys first (exact for any finite magnitude)."""
    B, n, S = case["B"], case["n"], case["S"]
    q, k, v = (d[x].astype(np.float64) for x in ("q", "k", "v"))
    out = np.zeros((B, n, v.shape[2]))
    lse = np.full((B, n), -np.inf)
    rng_ = key_ranges(case)
    i = np.arange(n)[:, None]
    j = np.arange(S)[None, :]
    for b in range(B):
        hk = d["kvidx"][b]
        if "relative" in d:
            W = d["relative"][d["ridx"][b]].astype(np.float64)
            L = d["scale"] * np.einsum("ie,ijef,jf->ij", q[b], W[i - j + S - 1], k[hk])
        else:
            L = d["scale"] * (q[b] @ k[hk].T)
        vis = np.ones((n, S), bool)
        if rng_ is not None:
            vis &= (j >= rng_[0][:, None]) & (j < rng_[1][:, None])
        if "kmask" in d:
            vis &= np.isfinite(d["kmask"][d["kidx"][b]])[None, :]
        Bm = np.zeros((n, S))
        if "bias" in d:
            Bm = d["bias"][d["bidx"][b]][i - j + S - 1]
            vis &= np.isfinite(Bm)
        for r in range(n):
            if not vis[r].any():
                continue
            sh = Bm[r, vis[r]].max()
            x = L[r, vis[r]] + (Bm[r, vis[r]] - sh)
            m = x.max()
            w = np.exp(x - m)
            out[b, r] = w @ v[hk][vis[r]] / w.sum()
            lse[b, r] = m + np.log(w.sum()) + sh
    return out, lse


# ------------------------------------------------------------------ the two sides

def _run_old(case, d):
    from numbarope.exact import exact_attention
    kw = dict(kvidx=d["kvidx"], return_lse=True, causal=case["causal"],
              offset=case["offset"])
    if "relative" in d:
        kw.update(relative=d["relative"], ridx=d["ridx"])
    if "bias" in d:
        kw.update(bias=d["bias"], bidx=d["bidx"])
    if "kmask" in d:
        kw.update(key_mask=d["kmask"], kidx=d["kidx"])
    if case.get("window") is not None:
        kw["window"] = tuple(case["window"])
    return exact_attention(d["q"], d["k"], d["v"], d["scale"], **kw)


def _run_new(case, d):
    from numbarope.ops.streaming import exact_attention
    kw = dict(kvidx=d["kvidx"], return_lse=True)
    r = key_ranges(case)
    if r is not None:
        kw["key_ranges"] = (r[0][None], r[1][None], np.zeros(case["B"], np.int64))
    if "relative" in d:
        kw.update(relative=d["relative"], ridx=d["ridx"])
    if "bias" in d:
        kw.update(bias=d["bias"], bidx=d["bidx"])
    if "kmask" in d:
        kw.update(key_mask=d["kmask"], kidx=d["kidx"])
    return exact_attention(d["q"], d["k"], d["v"], d["scale"], **kw)


def _fft_inputs(case):
    rng = np.random.default_rng(case["seed"])
    n, S, E, Ev = case["n"], case["S"], case["E"], case["Ev"]
    q = rng.standard_normal((n, E)) * 0.4
    k = rng.standard_normal((S, E)) * 0.4
    v = rng.standard_normal((S, Ev))
    W = rng.standard_normal((n + S - 1, E, E))
    W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
    coef = 1.0 / np.cumprod(np.concatenate([[1.0], np.arange(1.0, case["g"] + 1)]))
    T = np.ones(n + S - 1)
    if case.get("causal"):
        t = np.arange(n + S - 1) - (S - 1) + case["offset"]
        T = np.where(t >= 0, 1.0, 0.0)
    if case.get("decay"):
        t = np.arange(n + S - 1) - (S - 1) + case["offset"]
        T = T * np.exp(-0.05 * np.abs(t))
    mask = None
    if case.get("pad"):
        mask = np.ones(S, bool)
        mask[:3] = False
    return q, k, v, 0.7, coef, W, T, mask


def _fft_run(side, case):
    q, k, v, s, coef, W, T, mask = _fft_inputs(case)
    if side == "old":
        from numbarope.fast import fast_general
    else:
        from numbarope.ops.toeplitz_fft import fast_general
    return fast_general(q, k, v, s, coef, W, T, None, key_mask=mask)


def _time_inputs(cfg):
    rng = np.random.default_rng(0)
    n, E, B = cfg["n"], cfg["E"], cfg["B"]
    q, k, v = (rng.standard_normal((B, n, E)).astype(cfg["dtype"]) for _ in range(3))
    return q, k, v


def worker(side):
    cache = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "run":
            case = req["case"]
            if case.get("kind") == "fft":
                out, den = _fft_run(side, case)
                np.savez(req["path"], out=out, lse=den)
            else:
                d = make_inputs(case)
                out, lse = (_run_old if side == "old" else _run_new)(case, d)
                np.savez(req["path"], out=out, lse=lse)
            print(json.dumps({"ok": True}), flush=True)
        elif req["op"] == "time":
            cfg = req["cfg"]
            key = json.dumps(cfg, sort_keys=True)
            if key not in cache:
                cache.clear()
                cache[key] = _time_inputs(cfg)
            q, k, v = cache[key]
            n = cfg["n"]
            case = dict(n=n, S=n, offset=0, causal=cfg["causal"], B=cfg["B"])
            d = dict(q=q, k=k, v=v, scale=1.0 / np.sqrt(cfg["E"]),
                     kvidx=np.arange(cfg["B"]))
            fn = _run_old if side == "old" else _run_new
            t0 = time.perf_counter()
            fn(case, d)
            print(json.dumps({"t": time.perf_counter() - t0}), flush=True)


class Side:
    def __init__(self, side, path):
        env = dict(os.environ, PYTHONPATH=path)
        if side == "old":      # keep the old release's tree free of numba cache files
            env["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "ab_streaming_numba_old")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", side],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env, cwd=tempfile.gettempdir())

    def ask(self, **req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        return json.loads(line)

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=60)


# ------------------------------------------------------------------ the grid

def grid():
    cases = []
    base = dict(B=2, G=1, n=300, S=300, E=8, Ev=4, offset=0, causal=False, window=None,
                pad=None, bias=None, general=False, perhead=False)

    def add(**kw):
        c = dict(base, **kw)
        c["seed"] = len(cases) + 1
        cases.append(c)

    for dt in ("float64", "float32"):
        add(dtype=dt)
        add(dtype=dt, causal=True)
        add(dtype=dt, n=1, S=1)
        add(dtype=dt, n=37, S=37, E=3, Ev=5, causal=True)
        add(dtype=dt, n=700, S=1100, causal=True, offset=400)      # several key blocks
        add(dtype=dt, n=200, S=1100, causal=True, offset=900)      # prefill on a cache
        add(dtype=dt, n=300, S=500, causal=True, offset=-150)      # rows before key 0
        add(dtype=dt, n=1, S=1100, causal=True, offset=1099, B=8, G=4)  # decode, GQA
        add(dtype=dt, n=300, S=300, B=6, G=3)                      # GQA
        add(dtype=dt, n=600, S=1300, window=(100, 0), causal=True, bias="random")
        add(dtype=dt, n=600, S=1300, window=(100, 0), causal=True, offset=700)
        add(dtype=dt, n=600, S=1300, window=(64, 64), offset=350, bias="alibi")
        add(dtype=dt, n=900, S=900, window=(None, 5), bias="random")
        add(dtype=dt, n=900, S=900, window=(50, None), perhead=True, bias="random")
        add(dtype=dt, n=400, S=400, window=(30, 0), causal=True, offset=600)  # rows past S
        add(dtype=dt, n=400, S=400, window=(10, 10), offset=-300)  # rows before 0
        add(dtype=dt, bias="random")
        add(dtype=dt, bias="random", causal=True, perhead=True)
        add(dtype=dt, bias="masked", causal=True, offset=-20, n=300, S=600)
        add(dtype=dt, bias="huge", n=200, S=700)
        add(dtype=dt, bias="alibi", causal=True, n=700, S=700, B=4, G=2, perhead=True)
        add(dtype=dt, pad="left", causal=True)
        add(dtype=dt, pad="right", n=300, S=900)
        add(dtype=dt, pad="random", B=4, G=2)
        add(dtype=dt, pad="perhead", B=4, G=2, causal=True, n=300, S=700, offset=400)
        add(dtype=dt, general=True, n=70, S=70, E=4, Ev=3)
        add(dtype=dt, general=True, n=70, S=90, E=4, Ev=3, causal=True, offset=20)
        add(dtype=dt, general=True, n=80, S=80, E=3, Ev=2, bias="random", perhead=True)
        add(dtype=dt, general=True, n=300, S=700, E=2, Ev=2, window=(40, 0), causal=True,
            offset=400)
        add(dtype=dt, amp=6.0, causal=True)                        # large logits
        add(dtype=dt, amp=6.0, bias="random", n=600, S=600)
        # bias and padding: the old shift counted padded keys; reference only
        add(dtype=dt, pad="left", bias="random", causal=True, ref_only=True)
        add(dtype=dt, pad="random", bias="huge", n=200, S=700, ref_only=True)
        add(dtype=dt, pad="perhead", bias="alibi", B=4, G=2, perhead=True, window=(50, 0),
            causal=True, n=400, S=700, offset=300, ref_only=True)
        add(dtype=dt, pad="right", bias="masked", general=True, n=60, S=90, E=3, Ev=2,
            ref_only=True)
        add(dtype=dt, pad="left", bias="field", n=1, S=50, B=4, G=2, causal=True,
            offset=49, ref_only=True)                              # the field report
        add(dtype=dt, pad="random", bias="field", n=40, S=300, ref_only=True)
    for g, extra in ((3, {}), (4, dict(causal=True)), (3, dict(decay=True, pad=True)),
                     (2, dict(causal=True, offset=30, decay=True))):
        c = dict(kind="fft", n=60, S=90 if extra.get("offset") else 60, E=2, Ev=3, g=g,
                 offset=extra.pop("offset", 0), seed=100 + len(cases), **extra)
        cases.append(c)
    return cases


def _label(c):
    if c.get("kind") == "fft":
        keys = ("n", "S", "E", "g", "causal", "decay", "pad", "offset")
        return "fft_general " + " ".join(f"{x}={c[x]}" for x in keys if c.get(x) not in
                                         (None, False))
    keys = ("dtype", "B", "G", "n", "S", "E", "offset", "causal", "window", "pad", "bias",
            "general", "perhead", "amp")
    return " ".join(f"{x}={c[x]}" for x in keys if c.get(x) not in (None, False))


def _diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return np.inf
    fin = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or \
            not np.array_equal(a[~fin], b[~fin]):
        return np.inf
    return float(np.abs(a[fin] - b[fin]).max(initial=0.0))


def _bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.array_equal(a.view(np.uint8), b.view(np.uint8))


def correctness(old, new):
    with tempfile.TemporaryDirectory(prefix="ab_streaming_") as tmp:
        return _correctness(old, new, tmp)


def _correctness(old, new, tmp):
    bad = 0
    nbit = nref = 0
    for c in grid():
        po, pn = os.path.join(tmp, "old.npz"), os.path.join(tmp, "new.npz")
        old.ask(op="run", case=c, path=po)
        new.ask(op="run", case=c, path=pn)
        with np.load(po) as fo, np.load(pn) as fn:
            oo, lo_, on, ln = fo["out"], fo["lse"], fn["out"], fn["lse"]
        if c.get("ref_only"):
            nref += 1
            d = make_inputs(c)
            ro, rl = reference(c, d)
            tol = 2e-5 if c["dtype"] == "float32" else 1e-12
            en, eo = _diff(on, ro), _diff(oo, ro)
            eln = _diff(ln, rl)
            ok = en <= tol and eln <= tol * 64
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} ref  new−ref {en:.2e} (lse {eln:.2e}), "
                  f"old−ref {eo:.2e}   {_label(c)}")
            continue
        nbit += 1
        same = _bitwise(oo, on) and _bitwise(lo_, ln)
        bad += not same
        extra = ""
        if c.get("kind") != "fft":
            d = make_inputs(c)
            ro, _ = reference(c, d)
            extra = f" new−ref {_diff(on, ro):.1e}"
        print(f"{'ok ' if same else 'BAD'} bitwise={same!s:5} max|Δout| {_diff(oo, on):.1e} "
              f"max|Δlse| {_diff(lo_, ln):.1e}{extra}   {_label(c)}")
    print(f"\n{nbit} cases compared bitwise, {nref} against the float64 reference: "
          f"{'all ok' if not bad else f'{bad} FAILED'}")
    return bad


def timing(old, new, repeat, sizes=(8192, 16384), dims=(16, 64), causals=(False, True)):
    print("n      E   causal  old (s)   new (s)   new/old   (float32, B = 2, best of "
          f"{repeat}, interleaved)")
    for n in sizes:
        for E in dims:
            for causal in causals:
                cfg = dict(n=n, E=E, causal=causal, dtype="float32", B=2)
                old.ask(op="time", cfg=cfg)            # warm-up (and compile)
                new.ask(op="time", cfg=cfg)
                to, tn = [], []
                for _ in range(repeat):
                    to.append(old.ask(op="time", cfg=cfg)["t"])
                    tn.append(new.ask(op="time", cfg=cfg)["t"])
                print(f"{n:<6} {E:<3} {causal!s:7} {min(to):8.3f}  {min(tn):8.3f}   "
                      f"{min(tn) / min(to):6.3f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="/work/base")
    ap.add_argument("--new", default=REPO)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 16384], help="--time sizes")
    ap.add_argument("--E", type=int, nargs="+", default=[16, 64], help="--time head dims")
    ap.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    ap.add_argument("--worker", choices=("old", "new"))
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0
    old, new = Side("old", a.old), Side("new", a.new)
    try:
        if a.time:
            causals = {"yes": (True,), "no": (False,), "both": (False, True)}[a.causal]
            timing(old, new, a.repeat, a.n, a.E, causals)
            return 0
        return 1 if correctness(old, new) else 0
    finally:
        old.close()
        new.close()


if __name__ == "__main__":
    sys.exit(main())
