"""Does numbarope slow torch, or torch numbarope, in one process?

Four fresh interpreters per round, each timing one thing (best of --repeat
after a warm-up):

* ``torch-alone``: torch SDPA, nothing else imported;
* ``torch-after``: torch SDPA in a process where numbarope's exact and fast
  kernels ran first;
* ``numbarope-alone``: numbarope exact and causal fast, torch not imported;
* ``numbarope-after``: the same, in a process where torch SDPA ran first.

Usage: ``python tools/threads_interop.py [--rounds 3] [--repeat 5] [--threads 2]``.
Prints the medians over rounds and the ratios after/alone (1.0 = no effect).
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
what, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
n_ex, E_ex = 8192, 64
qe, ke, ve = (rng.standard_normal((1, n_ex, E_ex)).astype(np.float32) for _ in range(3))
n_f, E_f = 65536, 16
qf, kf = (rng.standard_normal((1, n_f, E_f)) for _ in range(2))
qf *= np.sqrt(2.0) / np.linalg.norm(qf, axis=-1, keepdims=True)
kf *= np.sqrt(2.0) / np.linalg.norm(kf, axis=-1, keepdims=True)
qf, kf = qf.astype(np.float32), kf.astype(np.float32)
vf = rng.standard_normal((1, n_f, E_f)).astype(np.float32)

def best(f):
    f()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)

def torch_part():
    import torch
    torch.set_num_threads(threads)
    Q, K, V = (torch.from_numpy(a)[None] for a in (qe, ke, ve))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"sdpa_E64": best(lambda: sdpa(Q, K, V))}

def numbarope_part():
    import numbarope
    ex = best(lambda: numbarope.rope_attention(qe, ke, ve, rotary=True, method="exact",
                                               workers=threads))
    fc = best(lambda: numbarope.rope_attention(qf, kf, vf, rotary=True, method="fast",
                                               eps=1e-3, is_causal=True, workers=threads))
    return {"exact_E64": ex, "fast_causal": fc}

res = {}
if what == "torch-alone":
    res = torch_part()
elif what == "torch-after":
    numbarope_part(); res = torch_part()
elif what == "numbarope-alone":
    res = numbarope_part()
elif what == "numbarope-after":
    torch_part(); res = numbarope_part()
print(json.dumps(res))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per setting")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per process")
    ap.add_argument("--threads", type=int, default=2, help="threads of both libraries")
    a = ap.parse_args(argv)
    settings = ["torch-alone", "torch-after", "numbarope-alone", "numbarope-after"]
    runs = {s: [] for s in settings}
    for r in range(a.rounds):
        for s in settings:         # interleaved: machine noise hits all settings alike
            out = subprocess.run([sys.executable, "-c", CHILD, s, str(a.threads),
                                  str(a.repeat)], capture_output=True, text=True, check=True)
            runs[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {s}: {runs[s][-1]}", file=sys.stderr, flush=True)

    def med(s, key):
        vals = sorted(x[key] for x in runs[s])
        return vals[len(vals) // 2]

    print("| measure | alone s | after the other library s | after/alone |")
    print("|---|--:|--:|--:|")
    for key, alone, after in (("sdpa_E64", "torch-alone", "torch-after"),
                              ("exact_E64", "numbarope-alone", "numbarope-after"),
                              ("fast_causal", "numbarope-alone", "numbarope-after")):
        a0, a1 = med(alone, key), med(after, key)
        print(f"| {key} | {a0:.4f} | {a1:.4f} | {a1 / a0:.2f} |")


if __name__ == "__main__":
    main()
