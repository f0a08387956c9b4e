"""Time torch's scaled_dot_product_attention on CPU, in a process of its own.

Run by ``03_scaling.ipynb`` as ``python _sdpa_timing.py '<json>'``, so that torch's
thread pool and numbarope's never share a process (in one process each can slow
the other down). The JSON argument holds

* ``cases``: list of ``{"name": str, "causal": bool}``;
* ``sizes``: list of sequence lengths n;
* ``E``, ``Ev``: head dims; ``dtype``: ``"float32"`` (default) or ``"float64"``;
* ``budget``: seconds; a case stops before a size whose time, extrapolated as
  n², would exceed it;
* ``repeat``: most calls per size (default 7; at least 2, as the first call at
  a new size also pays for fresh memory; calls stop once they add up to half a
  second, and a call over 5 s is not repeated); the best time is kept.

torch runs with its default thread count (all cores); where a call takes under
0.1 s it is also timed on one thread and the better time is kept: on a busy
machine the OpenMP start-up of a parallel region can cost milliseconds, more
than a small attention call itself.

The output is one JSON line: ``{"torch": version, "threads": k, "times": {name:
{n: seconds}}}``. One head, batch 1, inputs from ``torch.randn``; SDPA's default
scale ``1/sqrt(E)``; no rotary embedding (RoPE would be applied before SDPA).
"""

import json
import sys
import time


def main(argv):
    opts = json.loads(argv[1])
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, opts.get("dtype", "float32"))
    E = int(opts["E"])
    Ev = int(opts.get("Ev", E))
    budget = float(opts.get("budget", 60.0))
    repeat = int(opts.get("repeat", 7))
    gen = torch.Generator().manual_seed(0)

    all_threads = torch.get_num_threads()

    def call(n, causal):
        q = torch.randn(1, 1, n, E, generator=gen, dtype=dtype)
        k = torch.randn(1, 1, n, E, generator=gen, dtype=dtype)
        v = torch.randn(1, 1, n, Ev, generator=gen, dtype=dtype)
        with torch.inference_mode():
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return time.perf_counter() - t0

    times = {}
    for case in opts["cases"]:
        causal = bool(case.get("causal", False))
        call(64, causal)                       # warm-up
        out, last = {}, None
        for n in sorted(int(x) for x in opts["sizes"]):
            if last is not None and last[1] * (n / last[0]) ** 2 > budget:
                break
            best = None
            for threads in (all_threads, 1):
                torch.set_num_threads(threads)
                ts = [call(n, causal)]
                while len(ts) < repeat and (sum(ts) < 0.5 or len(ts) < 2) and ts[0] <= 5.0:
                    ts.append(call(n, causal))
                best = min(ts) if best is None else min(best, min(ts))
                if best >= 0.1 or all_threads == 1:
                    break
            torch.set_num_threads(all_threads)
            out[n] = best
            last = (n, out[n])
        times[case["name"]] = out
    print(json.dumps({"torch": torch.__version__, "threads": all_threads,
                      "times": times}))


if __name__ == "__main__":
    main(sys.argv)
