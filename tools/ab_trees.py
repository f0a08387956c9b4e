"""Time the same calls on two source trees, each in processes of its own, interleaved.

    python tools/ab_trees.py OLD_TREE NEW_TREE [--reps 5] [--rounds 3] [--cases a,b]

Every round runs each tree's process once (alternating which goes first); each
process warms up every case, then times it ``--reps`` times (best and median).
Reported: per case, the best over rounds of each tree, the spread (min–max of the
rounds' bests) and new/old. Used for the notes of issues 19–21 (layout, threads,
speed): torch is not involved (numbarope.bench times torch).
"""

import argparse
import json
import os
import subprocess
import sys

CASES = {
    "exact-E64": dict(n=8192, E=64, causal=False, dtype="float32", method="exact"),
    "exact-causal-E64": dict(n=16384, E=64, causal=True, dtype="float32", method="exact"),
    "exact-E16": dict(n=16384, E=16, causal=False, dtype="float32", method="exact"),
    "fast": dict(n=65536, E=16, causal=False, dtype="float32", method="fast", R=0.5),
    "fast-causal": dict(n=65536, E=16, causal=True, dtype="float32", method="fast", R=0.5),
    "decode-S16384": dict(n=16384, E=64, causal=True, dtype="float32", method="exact",
                          decode=True),
}

WORKER = r"""
import json, sys, time
import numpy as np
import numbarope
cases = json.loads(sys.argv[1]); reps = int(sys.argv[2])
out = {}
for name, c in cases.items():
    rng = np.random.default_rng(0)
    n, E = c["n"], c["E"]
    if c.get("decode"):
        q = rng.standard_normal((1, 9, 1, E)).astype(c["dtype"])
        k, v = (rng.standard_normal((1, 3, n, E)).astype(c["dtype"]) for _ in range(2))
        kw = dict(enable_gqa=True, is_causal=True, causal_alignment="bottom_right")
    else:
        q, k, v = (rng.standard_normal((1, n, E)).astype(c["dtype"]) for _ in range(3))
        if "R" in c:       # every pair's logit radius below R
            for x in (q, k):
                x *= np.sqrt(c["R"] * np.sqrt(E)) / np.linalg.norm(x, axis=-1, keepdims=True).max()
        kw = dict(is_causal=c["causal"])
    f = lambda: numbarope.rope_attention(q, k, v, rotary=True, method=c["method"], **kw)
    f(); f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    out[name] = sorted(ts)
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    cases = {k: CASES[k] for k in a.cases.split(",")}
    res = {a.old: [], a.new: []}
    for r in range(a.rounds):
        order = (a.old, a.new) if r % 2 == 0 else (a.new, a.old)
        for tree in order:
            env = dict(os.environ, PYTHONPATH=tree)
            p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cases),
                                str(a.reps)], env=env, capture_output=True, text=True,
                               cwd="/tmp")
            if p.returncode:
                sys.exit(f"{tree}: {p.stderr[-2000:]}")
            res[tree].append(json.loads(p.stdout.splitlines()[-1]))
    print(f"{'case':18} {'old best':>9} {'(spread)':>17} {'new best':>9} {'(spread)':>17} "
          f"{'new/old':>7}")
    for name in cases:
        ob = [x[name][0] for x in res[a.old]]
        nb = [x[name][0] for x in res[a.new]]
        print(f"{name:18} {min(ob):9.4f} ({min(ob):.4f}–{max(ob):.4f}) {min(nb):9.4f} "
              f"({min(nb):.4f}–{max(nb):.4f}) {min(nb) / min(ob):7.3f}")


if __name__ == "__main__":
    main()
