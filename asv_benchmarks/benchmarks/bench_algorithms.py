"""asv benchmarks per registered algorithm: exact and certified fast, n × E.

Every algorithm of ``numbarope.ops.registry()`` (the fast ones and the
exact ``"streaming"``) is measured on an input whose relative structure it
serves:

=============== ==================================================================
algorithm       input (RoPE, logit radius R = 0.5, eps = 1e-3)
=============== ==================================================================
streaming       no bias, ``method="exact"``
gemm            no bias
prefix          ``is_causal=True``
decay           ``bias=ALiBi(0.05)`` (causal)
window          ``bias=Window(255, 0)`` (a 256-key sliding window)
fft             ``bias=Dense(b)``, ``b`` a random relative bias (|b| <= 0.5)
toeplitz-fft    ``relative = rotary_relative_matrices(n, Rotary(), E)``
=============== ==================================================================

``setup`` checks with :func:`numbarope.plan` (``method="fast"``) that the planner
gives the head to the intended algorithm; otherwise, or where a size would take
unreasonably long, it raises ``NotImplementedError`` and asv shows ``n/a``:

* a call the planner predicts to take more than ``NUMBAROPE_BENCH_BUDGET`` seconds
  (default 1; the exact reference of the ``track_*`` too): e.g. exact above
  n = 16384 except on a window, ``fft`` at E = 16, ``toeplitz-fft`` at E = 8;
* exact (``streaming``) above n = 16384, ``toeplitz-fft`` above n = 16384; the
  ``track_*`` of :class:`Accuracy` (which run exact too) stop at n = 16384;
* E = 64 on the fast path (feature limit at eps = 1e-3);
* with ``NUMBAROPE_BENCH_QUICK=1``: everything above n = 16384.

The torch SDPA baseline (:class:`TorchSDPA`) runs in a child interpreter of its
own (``numbarope/_bench_torch.py``, as ``python -m numbarope.bench`` does):
torch's and numba's thread pools disturb each other in one process.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import numbarope
import numbarope.ops as _alg
from numbarope.bias import ALiBi, Dense, Window

#: Logit radius of the inputs (the fast path's regime) and tolerance.
RADIUS = 0.5
EPS = 1e-3

ALGORITHMS = list(_alg.registry())                  # 'streaming' + every fast one
FAST = [a.name for a in _alg.fast_algorithms()]
NS = [1024, 4096, 16384, 65536, 262144]
ES = [4, 8, 16, 64]


def first(value, values):
    """``values`` with ``value`` moved to the front: asv's graph draws every value of a
    benchmark's first parameter and only the first value of the others, so the sizes
    that matter (n = 16384, E = 16) come first."""
    return [value] + [x for x in values if x != value]


#: Largest n per algorithm (time, memory); exact: also the reference of track_*.
MAX_N = {"streaming": 16384, "toeplitz-fft": 16384}
#: Largest n when NUMBAROPE_BENCH_QUICK is set.
QUICK_MAX_N = 16384
#: head_dim above which the fast path is not attempted (feature limit).
MAX_E_FAST = 16


def budget():
    """Largest predicted seconds of one measured call (``NUMBAROPE_BENCH_BUDGET``, default 1)."""
    return float(os.environ.get("NUMBAROPE_BENCH_BUDGET", "1"))


def _quick():
    return bool(os.environ.get("NUMBAROPE_BENCH_QUICK"))


def bounded_qkv(n, E, Ev=None, radius=RADIUS, seed=0):
    """Gaussian (1, n, E) q, k, v with q, k scaled to logit radius ``radius`` (s = 1/sqrt(E))."""
    Ev = E if Ev is None else Ev
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, n, E))
    k = rng.standard_normal((1, n, E))
    v = rng.standard_normal((1, n, Ev))
    c = np.sqrt(radius * np.sqrt(E) / (np.linalg.norm(q, axis=-1).max()
                                        * np.linalg.norm(k, axis=-1).max()))
    return q * c, k * c, v


def structure_kwargs(algorithm, n, E, seed=0):
    """Keyword arguments of ``rope_attention`` giving an input ``algorithm`` serves."""
    if algorithm in ("streaming", "gemm"):
        return dict(rotary=True)
    if algorithm == "prefix":
        return dict(rotary=True, is_causal=True)
    if algorithm == "decay":
        return dict(rotary=True, bias=ALiBi([0.05]))
    if algorithm == "window":
        return dict(rotary=True, bias=Window(255, 0))
    if algorithm == "fft":
        b = np.random.default_rng(seed + 1).uniform(-0.5, 0.5, 2 * n - 1)
        return dict(rotary=True, bias=Dense(b))
    if algorithm == "toeplitz-fft":
        return dict(relative=numbarope.rotary_relative_matrices(n, numbarope.Rotary(), E))
    raise NotImplementedError(f"no input built for algorithm {algorithm!r}")


def check_feasible(algorithm, n, E):
    """Raise NotImplementedError (asv: skipped) for combinations not measured."""
    limit = MAX_N.get(algorithm, max(NS))
    if _quick():
        limit = min(limit, QUICK_MAX_N)
    if n > limit:
        raise NotImplementedError(f"{algorithm} above n = {limit} not measured")
    if algorithm != "streaming" and E > MAX_E_FAST:
        raise NotImplementedError(f"fast path at E = {E}: feature limit")


def build_case(algorithm, n, E, exact_reference=False):
    """(q, k, v, kwargs, method) for ``algorithm``, checked against the planner: the
    planner's algorithm must be ``algorithm`` and its predicted time (and the exact
    path's, with ``exact_reference``) within :func:`budget`."""
    q, k, v = bounded_qkv(n, E, seed=n + E)
    kw = structure_kwargs(algorithm, n, E)
    method = "exact" if algorithm == "streaming" else "fast"
    try:
        info = numbarope.plan(q, k, v, method=method, eps=EPS, **kw)
    except ValueError as exc:                         # FastPathError: cannot serve
        raise NotImplementedError(f"planner refuses {algorithm}: {exc}") from None
    chosen = info.algorithm[0]
    if chosen != algorithm:
        raise NotImplementedError(f"planner gives this input to {chosen!r}, not {algorithm!r}")
    predicted = info.time_exact[0] if method == "exact" else info.time_fast[0]
    if exact_reference:
        predicted = max(predicted, info.time_exact[0])
    if not predicted <= budget():
        raise NotImplementedError(f"predicted {predicted:.3g} s > budget {budget():g} s")
    return q, k, v, kw, method


_WARM = {}


def example(algorithm):
    """The registry's small example input of ``algorithm`` (streaming: unbiased RoPE)."""
    if algorithm == "streaming":
        q, k, v = bounded_qkv(64, 4)
        return q, k, v, dict(rotary=True)
    return _alg.get(algorithm).example(np.random.default_rng(0))


def warm(algorithm):
    """Compile (or load from numba's cache) the kernels of ``algorithm`` on tiny inputs."""
    if algorithm in _WARM:
        return
    q, k, v, kw = example(algorithm)
    method = "exact" if algorithm == "streaming" else "fast"
    numbarope.rope_attention(q, k, v, method=method, eps=EPS, **kw)
    numbarope.rope_attention(q, k, v, method="exact", **kw)
    _WARM[algorithm] = True


def best_of(fn, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Algorithm:
    """One call of each registered algorithm (streaming = exact) on the input it serves."""

    params = (ALGORITHMS, first(16384, NS), first(16, ES))
    param_names = ["algorithm", "n", "E"]
    timeout = 600.0

    def setup(self, algorithm, n, E):
        check_feasible(algorithm, n, E)
        warm(algorithm)
        self.q, self.k, self.v, self.kw, self.method = build_case(algorithm, n, E)
        self.run()                                  # planner caches, first-touch memory

    def run(self):
        return numbarope.rope_attention(self.q, self.k, self.v, method=self.method,
                                        eps=EPS, **self.kw)

    def time_call(self, algorithm, n, E):
        self.run()

    def peakmem_call(self, algorithm, n, E):
        self.run()


class Accuracy:
    """Fast algorithms against exact on the same input: error ÷ bound, speed-up."""

    params = (FAST, first(16384, NS[:3]), first(16, ES))
    param_names = ["algorithm", "n", "E"]
    timeout = 600.0

    def setup(self, algorithm, n, E):
        check_feasible(algorithm, n, E)
        warm(algorithm)
        self.q, self.k, self.v, self.kw, _ = build_case(algorithm, n, E, exact_reference=True)

    def fast(self, return_info=False):
        return numbarope.rope_attention(self.q, self.k, self.v, method="fast", eps=EPS,
                                        return_info=return_info, **self.kw)

    def exact(self):
        return numbarope.rope_attention(self.q, self.k, self.v, method="exact", **self.kw)

    def track_error_over_bound(self, algorithm, n, E):
        """max|fast − exact| (relative to max|V|, as the bound) ÷ the planner's bound."""
        out, info = self.fast(return_info=True)
        err = np.abs(out - self.exact()).max() / np.abs(self.v).max()
        return float(err / info.error_bound[0])

    track_error_over_bound.unit = "error/bound"

    def track_speedup_over_exact(self, algorithm, n, E):
        """Exact time ÷ fast time, best of 3 each, measured in this call (warmed first)."""
        self.exact(), self.fast()
        return float(best_of(self.exact) / best_of(self.fast))

    track_speedup_over_exact.unit = "x"


# --- torch SDPA baseline, in a child interpreter -------------------------------------

_WORKER = os.path.join(os.path.dirname(os.path.abspath(numbarope.__file__)), "_bench_torch.py")


def torch_available():
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except Exception:
        return False


class TorchWorker:
    """``numbarope/_bench_torch.py`` in a fresh interpreter (JSON lines on stdin/stdout)."""

    def __init__(self, threads=None):
        threads = threads or os.cpu_count() or 1
        self.proc = subprocess.Popen([sys.executable, _WORKER, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        hello = self.read()
        if "error" in hello:
            self.close()
            raise NotImplementedError(hello["error"])

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise NotImplementedError("torch worker died")
        return json.loads(line)

    def request(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self.read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self):
        try:
            self.request(op="quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


#: Structures torch SDPA takes without an n × n mask: none (gemm) and causal (prefix).
TORCH_CASES = ["gemm", "prefix"]


class TorchSDPA:
    """torch SDPA (flash attention on CPU) on the same rotated inputs, in its own process.

    ``track_time_torch`` is torch's best of 3 seconds (timed inside the child);
    ``track_speedup_over_torch`` is torch's best of 3 ÷ numbarope fast's best of 3.
    Skipped when torch is not importable.
    """

    params = (TORCH_CASES, first(16384, NS[:4]), first(16, ES[:3]))
    param_names = ["algorithm", "n", "E"]
    timeout = 600.0

    def setup(self, algorithm, n, E):
        if not torch_available():
            raise NotImplementedError("torch is not importable")
        check_feasible(algorithm, n, E)
        warm(algorithm)
        self.q, self.k, self.v, self.kw, _ = build_case(algorithm, n, E)
        self.tmp = tempfile.TemporaryDirectory(prefix="numbarope-asv-torch-")
        rot = numbarope.Rotary()
        path = os.path.join(self.tmp.name, "qkv.npz")
        np.savez(path, query=numbarope.apply_rotary(self.q, rot).astype(np.float32),
                 key=numbarope.apply_rotary(self.k, rot).astype(np.float32),
                 value=self.v.astype(np.float32))
        self.worker = TorchWorker()
        self.worker.request(op="load", path=path, causal=algorithm == "prefix",
                            scale=1.0 / np.sqrt(E))

    def teardown(self, algorithm, n, E):
        if getattr(self, "worker", None) is not None:
            self.worker.close()
        if getattr(self, "tmp", None) is not None:
            self.tmp.cleanup()

    def torch_best(self, repeat=3):
        self.worker.request(op="run", save=None)      # warm-up
        return min(self.worker.request(op="run", save=None)["time"] for _ in range(repeat))

    def fast(self):
        return numbarope.rope_attention(self.q, self.k, self.v, method="fast", eps=EPS,
                                        **self.kw)

    def track_time_torch(self, algorithm, n, E):
        """torch SDPA seconds, best of 3 (after a warm-up call)."""
        return float(self.torch_best())

    track_time_torch.unit = "seconds"

    def track_speedup_over_torch(self, algorithm, n, E):
        """torch SDPA best of 3 ÷ numbarope fast best of 3 (float32 torch, float64 ours)."""
        t_torch = self.torch_best()
        self.fast()
        return float(t_torch / best_of(self.fast))

    track_speedup_over_torch.unit = "x"


# --- compilation, apart --------------------------------------------------------------

# asv does not pass PYTHONPATH on to the timed child: point it at this numbarope.
_NUMBAROPE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(numbarope.__file__)))

_COMPILE_SETUP = f"""
import os, sys, tempfile
sys.path.insert(0, {_NUMBAROPE_ROOT!r})
_cache = tempfile.TemporaryDirectory(prefix="numbarope-asv-")
os.environ["NUMBA_CACHE_DIR"] = _cache.name
import numpy as np
import numbarope
import numbarope.ops as _alg
if ALGORITHM == "streaming":
    q, k, v = (np.random.default_rng(0).standard_normal((1, 64, 4)) * 0.3 for _ in range(3))
    kw = dict(rotary=True)
else:
    q, k, v, kw = _alg.get(ALGORITHM).example(np.random.default_rng(0))
"""


class CompileAlgorithm:
    """Cold JIT compilation of one algorithm: its first call in a fresh interpreter with an
    empty numba cache (import and data untimed, in the setup code)."""

    params = (ALGORITHMS,)
    param_names = ["algorithm"]
    timeout = 900.0
    repeat = (1, 1, 120.0)
    number = 1
    warmup_time = 0.0

    def timeraw_compile(self, algorithm):
        method = "exact" if algorithm == "streaming" else "fast"
        return (f"numbarope.rope_attention(q, k, v, method={method!r}, **kw)",
                _COMPILE_SETUP.replace("ALGORITHM", repr(algorithm)))
