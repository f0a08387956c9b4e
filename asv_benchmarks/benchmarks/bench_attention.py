"""asv benchmarks of numbarope: exact vs certified fast RoPE attention.

Conventions (see asv_benchmarks/README.md):

* data are built in ``setup`` from a fixed seed; numba kernels are warmed in
  ``setup`` on tiny inputs (and the planner's approximant caches on the real
  inputs), so ``time_*`` methods measure steady-state calls, not compilation;
* ``time_*``: seconds; ``peakmem_*``: bytes; ``track_*``: measured errors and
  ratios (units in ``unit``); compilation is timed on its own in
  :class:`TimeCompile`, each sample in a fresh interpreter with an empty
  numba cache;
* ``n = 16384`` is the size the dashboard opens at; larger ones (65536) are
  skipped with the environment variable ``NUMBAROPE_BENCH_QUICK=1``
  (``NotImplementedError``, shown as ``n/a`` by asv), as in bench_algorithms.py.

Bounded inputs have logit radius ``R = s·max‖q‖·max‖k‖ = 0.5`` with the default
``s = 1/sqrt(E)``: the regime of Alman & Song (arXiv:2505.11892) where a
degree-3 polynomial certifies ``eps = 1e-3`` and the fast path is almost
linear in n. RoPE rotations keep the norms, so R is the same after rotation.
"""

import os
import time

import numpy as np

import numbarope

#: Logit radius of the bounded synthetic inputs.
RADIUS = 0.5
#: Tolerance of the fast path (relative to max|value|).
EPS = 1e-3
#: The size the dashboard opens at (the paper's regime starts about here on 2 cores).
LARGE_N = 16384


def _skip_large(n):
    """Sizes above LARGE_N are skipped with NUMBAROPE_BENCH_QUICK set (as
    bench_algorithms.py: the quick suite keeps n <= 16384, the dashboard's default)."""
    if n > LARGE_N and os.environ.get("NUMBAROPE_BENCH_QUICK"):
        raise NotImplementedError("large size skipped (NUMBAROPE_BENCH_QUICK is set)")


def bounded_inputs(n, E, Ev, radius=RADIUS, heads=1, seed=0):
    """Gaussian q, k, v of shape (heads, n, ·), q and k scaled to logit radius ``radius``.

    The radius is ``s·max_i‖q_i‖·max_j‖k_j‖`` with ``s = 1/sqrt(E)`` (per head).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, E))
    k = rng.standard_normal((heads, n, E))
    v = rng.standard_normal((heads, n, Ev))
    s = 1.0 / np.sqrt(E)
    qn = np.linalg.norm(q, axis=-1).max(axis=-1)[:, None, None]
    kn = np.linalg.norm(k, axis=-1).max(axis=-1)[:, None, None]
    c = np.sqrt(radius / (s * qn * kn))
    return q * c, k * c, v


def warm_kernels():
    """Compile (or load from numba's cache) every kernel once, on tiny inputs."""
    q, k, v = bounded_inputs(32, 4, 4)
    rel = numbarope.rotary_relative_matrices(32, numbarope.Rotary(), 4)
    for causal in (False, True):
        for method in ("exact", "fast", "auto"):
            numbarope.rope_attention(q, k, v, rotary=numbarope.Rotary(), method=method,
                                     eps=EPS, is_causal=causal)
            numbarope.rope_attention(q, k, v, relative=rel, method=method, eps=EPS,
                                     is_causal=causal)
        q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
        numbarope.rope_attention(q32, k32, v32, rotary=True, method="exact",
                                 is_causal=causal)


def _interleaved_best(slow, fast, rounds=5):
    """Ratio of best-of-``rounds`` times of two callables run alternately (warmed first)."""
    slow(), fast()
    best = [np.inf, np.inf]
    for _ in range(rounds):
        for i, fn in enumerate((slow, fast)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


class History:
    """The dashboard's history of main: exact and fast at n = 16384, E = Ev = 16,
    R = 0.5 (the paper's regime), causal and not, over a sample of commits
    (``asv run --steps 20``, asv_benchmarks/README.md). Light on purpose: its setup
    compiles only the exact and separable fast kernels, so a commit costs ~2 minutes,
    and it uses only the API every commit since the first benchmarks had."""

    params = ([False, True],)
    param_names = ["is_causal"]
    timeout = 300.0
    n = LARGE_N

    def setup(self, is_causal):
        rot = numbarope.Rotary()
        for method in ("exact", "fast"):          # compile on tiny inputs
            q, k, v = bounded_inputs(32, 16, 16)
            numbarope.rope_attention(q, k, v, rotary=rot, is_causal=is_causal,
                                     method=method, eps=EPS)
        self.q, self.k, self.v = bounded_inputs(self.n, 16, 16, seed=self.n)
        self.kw = dict(rotary=rot, is_causal=is_causal, eps=EPS)
        self._fast()                              # planner caches, first touch

    def _exact(self):
        return numbarope.rope_attention(self.q, self.k, self.v, method="exact", **self.kw)

    def _fast(self, return_info=False):
        return numbarope.rope_attention(self.q, self.k, self.v, method="fast",
                                        return_info=return_info, **self.kw)

    def time_exact(self, is_causal):
        self._exact()

    def time_fast(self, is_causal):
        self._fast()

    def track_speedup(self, is_causal):
        """Exact time / fast time (interleaved best of 5, see :func:`_interleaved_best`)."""
        return _interleaved_best(self._exact, self._fast)

    track_speedup.unit = "x"

    def track_bound_ratio(self, is_causal):
        """Measured error over the certified bound (< 1 always)."""
        out, info = self._fast(return_info=True)
        return float(np.abs(out - self._exact()).max() / info.heads[0].error_bound)

    track_bound_ratio.unit = "error/bound"


class TimeBounded:
    """Bounded logits (R = 0.5), E = Ev = 16, standard RoPE: where fast pays.

    The parameters are ordered for the dashboard, which draws every value of the
    first and the first value of the others: causal and not, at n = 16384."""

    params = ([False, True], [LARGE_N, 1024, 4096])
    param_names = ["is_causal", "n"]
    timeout = 300.0

    def setup(self, is_causal, n):
        _skip_large(n)
        warm_kernels()
        self.q, self.k, self.v = bounded_inputs(n, 16, 16, seed=n)
        self.rotary = numbarope.Rotary()
        self.causal = is_causal

    def _exact(self):
        return numbarope.rope_attention(self.q, self.k, self.v, rotary=self.rotary,
                                        is_causal=self.causal, method="exact")

    def _fast(self, return_info=False):
        return numbarope.rope_attention(self.q, self.k, self.v, rotary=self.rotary,
                                        is_causal=self.causal, method="fast", eps=EPS,
                                        return_info=return_info)

    def time_exact(self, is_causal, n):
        self._exact()

    def time_fast(self, is_causal, n):
        self._fast()

    def time_auto(self, is_causal, n):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=self.rotary,
                                 is_causal=self.causal, method="auto", eps=EPS)

    def track_fast_error(self, is_causal, n):
        """max|fast − exact| / max|V| (must stay below eps)."""
        err = np.abs(self._fast() - self._exact()).max()
        return float(err / np.abs(self.v).max())

    track_fast_error.unit = "max|err|/max|V|"

    def track_bound_ratio(self, is_causal, n):
        """Measured error over the certified bound (< 1 always)."""
        out, info = self._fast(return_info=True)
        err = np.abs(out - self._exact()).max()
        return float(err / info.heads[0].error_bound)

    track_bound_ratio.unit = "error/bound"

    def track_speedup(self, is_causal, n):
        """Exact time / fast time: best of 5 perf_counter runs each, after one warm-up
        call of each, the two interleaved so that machine noise hits both alike."""
        return _interleaved_best(self._exact, self._fast)

    track_speedup.unit = "x"


class TimeExactPrecision:
    """Exact path, float32 inputs computed in float32 (default) or float64, RoPE."""

    params = ([16, 64], [4096], ["float32", "float64"], [False, True])
    param_names = ["E", "n", "precision", "is_causal"]
    timeout = 300.0

    def setup(self, E, n, precision, is_causal):
        warm_kernels()
        rng = np.random.default_rng(n + E)
        self.q, self.k, self.v = (rng.standard_normal((1, n, E)).astype(np.float32)
                                  for _ in range(3))

    def time_exact(self, E, n, precision, is_causal):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=True, method="exact",
                                 precision=precision, is_causal=is_causal)


class TimeSubnormalWeights:
    """Exact path when all weights but one per row would be subnormal (e^-745..e^-708
    relative to the row maximum): they are flushed to 0, so no slowdown."""

    params = ([2048], ["ordinary", "subnormal"])
    param_names = ["n", "logits"]
    timeout = 300.0

    @staticmethod
    def inputs(n, logits):
        rng = np.random.default_rng(1)
        q = np.zeros((1, n, 2))
        k = np.zeros((1, n, 2))
        q[0, :, 0] = 1.0
        if logits == "subnormal":
            k[0, :, 0] = -rng.uniform(708, 745, n)
            k[0, 0, 0] = 0.0
        else:
            k[0, :, 0] = rng.standard_normal(n)
        return q, k, rng.standard_normal((1, n, 16))

    def setup(self, n, logits):
        warm_kernels()
        self.q, self.k, self.v = self.inputs(n, logits)

    def time_exact(self, n, logits):
        numbarope.rope_attention(self.q, self.k, self.v, scale=1.0, method="exact")

    def track_ratio_to_ordinary(self, n, logits):
        """Time with these logits / time with ordinary logits (best of 5, interleaved)."""
        other = self.inputs(n, "ordinary")

        def this():
            numbarope.rope_attention(self.q, self.k, self.v, scale=1.0, method="exact")

        def ordinary():
            numbarope.rope_attention(*other, scale=1.0, method="exact")

        return _interleaved_best(this, ordinary)

    track_ratio_to_ordinary.unit = "x"


class TimeGeneral:
    """General relative path exp(s·q_iᵀW_{i−j}k_j), W_t the RoPE rotations, E = 4."""

    params = ([512, 2048],)
    param_names = ["n"]
    timeout = 300.0

    def setup(self, n):
        warm_kernels()
        self.q, self.k, self.v = bounded_inputs(n, 4, 4, seed=n)
        self.relative = numbarope.rotary_relative_matrices(n, numbarope.Rotary(), 4)

    def time_exact(self, n):
        numbarope.rope_attention(self.q, self.k, self.v, relative=self.relative,
                                 method="exact")

    def time_fast(self, n):
        numbarope.rope_attention(self.q, self.k, self.v, relative=self.relative,
                                 method="fast", eps=EPS)


class TimeRealSample:
    """Real all-MiniLM-L6-v2 activations (layer 5, 12 heads, n = 512, E = 32), RoPE."""

    timeout = 300.0

    def setup(self):
        warm_kernels()
        sample = numbarope.load_sample()
        i = sample.layers.index(5)
        self.q, self.k, self.v = sample.query[i], sample.key[i], sample.value[i]
        self.rotary = numbarope.Rotary()
        # warm the planner's (memoised) approximant search for these radii
        numbarope.plan(self.q, self.k, self.v, rotary=self.rotary, eps=EPS)

    def time_auto(self):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=self.rotary,
                                 method="auto", eps=EPS)

    def time_exact(self):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=self.rotary,
                                 method="exact")

    def track_max_radius(self):
        """Largest logit radius R over the 12 heads (why auto stays exact here)."""
        info = numbarope.plan(self.q, self.k, self.v, rotary=self.rotary, eps=EPS)
        return float(np.max(info.radius))

    track_max_radius.unit = "R"


class PeakMem:
    """Peak resident memory of one call at n = 16384, E = Ev = 16, R = 0.5."""

    params = ([LARGE_N],)
    param_names = ["n"]
    timeout = 300.0

    def setup(self, n):
        _skip_large(n)
        warm_kernels()
        self.q, self.k, self.v = bounded_inputs(n, 16, 16, seed=n)

    def peakmem_fast(self, n):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=True, method="fast",
                                 eps=EPS)

    def peakmem_exact(self, n):
        numbarope.rope_attention(self.q, self.k, self.v, rotary=True, method="exact")


# The timed child is a fresh ``python -c``: asv does not pass PYTHONPATH on to it
# (ASV_PYTHONPATH only reaches the benchmark process's sys.path), so the child
# is pointed explicitly at the numbarope this process imported.
_NUMBAROPE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(numbarope.__file__)))

_COMPILE_SETUP = f"""
import os, sys, tempfile
sys.path.insert(0, {_NUMBAROPE_ROOT!r})
_cache = tempfile.TemporaryDirectory(prefix="numbarope-asv-")
os.environ["NUMBA_CACHE_DIR"] = _cache.name
import numpy as np
import numbarope
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 32, 4)) * 0.3 for _ in range(3))
rel = numbarope.rotary_relative_matrices(32, numbarope.Rotary(), 4)
"""


class TimeCompile:
    """Cold JIT compilation, each sample in a fresh interpreter with an empty numba cache.

    The import of numbarope and the data are in the (untimed) setup code; the
    timed statement is the first call of each path, i.e. compilation.
    """

    timeout = 900.0
    repeat = (1, 3, 60.0)
    number = 1
    warmup_time = 0.0

    def timeraw_compile_exact(self):
        return ("""
numbarope.rope_attention(q, k, v, rotary=True, method="exact")
numbarope.rope_attention(q, k, v, rotary=True, method="exact", is_causal=True)
""", _COMPILE_SETUP)

    def timeraw_compile_fast(self):
        return ("""
numbarope.rope_attention(q, k, v, rotary=True, method="fast")
numbarope.rope_attention(q, k, v, rotary=True, method="fast", is_causal=True)
numbarope.rope_attention(q, k, v, relative=rel, method="fast")
""", _COMPILE_SETUP)


class Backward:
    """The backward of one head (issue 22), E = Ev = 16, logit radius R = 0.5, at the
    forward's results: the exact kernel (FlashAttention-2's backward, float64) and the
    certified fast backwards of gemm (no mask) and prefix (causal), each at the
    polynomial the planner takes for eps = 1e-3. Gradients with respect to the rotated
    q, k (the rotation is O(n·E) either way)."""

    params = (["exact", "exact causal", "gemm", "prefix"], [LARGE_N, 4096, 65536])
    param_names = ["backward", "n"]
    timeout = 600.0
    number = 1
    repeat = (1, 3, 120.0)

    def setup(self, backward, n):
        _skip_large(n)
        if backward.startswith("exact") and n > LARGE_N:
            raise NotImplementedError("exact backward above n = 16384: O(n²), minutes")
        from numbarope.ops import gemm, prefix, streaming
        warm_kernels()
        q, k, v = (a[0] for a in bounded_inputs(n, 16, 16, seed=n))
        s = 1.0 / np.sqrt(16)
        self.dout = np.random.default_rng(n + 1).standard_normal((n, 16))
        causal = backward in ("exact causal", "prefix")
        if backward.startswith("exact"):
            ranges = None
            if causal:
                i = np.arange(n, dtype=np.int64)
                ranges = (np.zeros((1, n), np.int64), (i + 1)[None], np.zeros(1, np.int64))
            out, lse = streaming.exact_attention(q[None], k[None], v[None], s,
                                                 key_ranges=ranges, return_lse=True)

            def run():
                streaming.exact_backward(q[None], k[None], v[None], out, lse,
                                         self.dout[None], s, key_ranges=ranges)
        else:
            info = numbarope.plan(q[None], k[None], v[None], is_causal=causal,
                                  method="fast", eps=EPS)
            coef = info.heads[0].coef
            mod = prefix if causal else gemm
            fwd = prefix.prefix_attention if causal else gemm.gemm_attention
            out, den = fwd(q, k, v, s, coef)
            back = mod.prefix_backward if causal else mod.gemm_backward

            def run():
                back(q, k, v, out, den, self.dout, s, coef)
        self.run = run
        run()                                           # compile / warm

    def time_backward(self, backward, n):
        self.run()

    def peakmem_backward(self, backward, n):
        self.run()
