"""Torch side of ``python -m numbarope.bench``: times torch SDPA in a clean process.

:mod:`numbarope.bench` runs this file as a script in a fresh interpreter
(``runpy.run_path``), never imports it: the process imports only numpy and
torch, as a user without numbarope runs it. Nothing from numbarope is
imported here, not even the package ``__init__``.

Command line: ``worker.py THREADS``. Protocol: one JSON request per line on
stdin, one JSON reply per line on stdout (anything else torch prints goes to
stderr). The first reply describes torch; then

* ``{"op": "load", "path": P, "causal": bool, "scale": s}`` loads ``query``,
  ``key``, ``value`` (already rotated, ``(heads, n, E)``) from the ``.npz``
  file P as ``(1, heads, n, E)`` tensors and replies with the SDPA backend
  torch picks (``FLASH_ATTENTION``; ``MATH`` would mean the n x n matrix);
* ``{"op": "run", "save": P or null}`` runs SDPA once and replies
  ``{"time": seconds}``; with ``save``, the output goes to the ``.npy`` file P;
* ``{"op": "quit"}`` ends the worker.

Errors reply ``{"error": message}`` and the worker keeps serving.
"""

import json
import os
import sys
import time

import numpy as np


def _reply(stream, obj):
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def _backend(torch, q, k, v, causal, scale):
    """Name of the SDPA backend torch picks for these inputs (private API; None if absent)."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal,
                                                  scale=scale)).name
    except Exception:
        return None


def main(argv):
    """Serve requests from stdin until ``quit`` or end of input; return the exit code."""
    out = sys.stdout
    sys.stdout = sys.stderr               # stray prints must not corrupt the protocol
    threads = int(argv[0])
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:              # broken installs raise more than ImportError
        _reply(out, {"error": f"import torch failed: {exc!r}"})
        return 1
    torch.set_num_threads(threads)
    info = torch.__config__.parallel_info().splitlines()
    _reply(out, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "parallel_backend": next((ln.split(":", 1)[1].strip() for ln in info
                                           if ln.startswith("ATen parallel backend")), None)})
    state = None
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "quit":
                _reply(out, {"ok": True})
                break
            if op == "load":
                state = None
                with np.load(req["path"]) as z:
                    # (heads, n, E) -> (1, heads, n, E): torch's CPU flash attention
                    # takes 4-D inputs only; 3-D ones fall back to the math backend,
                    # which materializes the n x n matrix (8x slower, O(n^2) memory)
                    q, k, v = (torch.from_numpy(np.ascontiguousarray(z[name])).unsqueeze(0)
                               for name in ("query", "key", "value"))
                causal, scale = bool(req["causal"]), float(req["scale"])
                state = (q, k, v, causal, scale)
                _reply(out, {"ok": True, "backend": _backend(torch, q, k, v, causal, scale)})
            elif op == "run":
                if state is None:
                    raise RuntimeError("run before load")
                q, k, v, causal, scale = state
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                    t = time.perf_counter() - t0
                if req.get("save"):
                    np.save(req["save"], o.squeeze(0).numpy())
                _reply(out, {"time": t})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            _reply(out, {"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
