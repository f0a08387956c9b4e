"""The exact path's pairs, cost, certified bound, and its registry entry."""

import math

import numpy as np

from ... import _config
from .._cost import COST_CONSTANTS
from .._exp import EXP_FLUSH, EXP_ULPS
from ..registry import Algorithm, HeadSpec, register
from .kernel import EXACT_HEADROOM, _block_work

# ------------------------------------------------------------------ pairs, cost, bound

def visible_pairs(n, S, key_range=None, *, causal=False, offset=0):
    """(query, key) pairs inside the rows' key ranges: ``Σ_i max(hi_i − lo_i, 0)``.

    ``key_range`` (lo, hi), each (n,), clipped to [0, S]; without it, the causal
    pairs (``j <= i + offset``, in closed form) or all n·S.
    """
    n, S = int(n), int(S)
    if key_range is not None:
        lo = np.clip(np.asarray(key_range[0], dtype=np.int64), 0, S)
        hi = np.clip(np.asarray(key_range[1], dtype=np.int64), 0, S)
        return float(np.maximum(hi - lo, 0).sum())
    if not causal:
        return float(n) * S
    # Σ_{i<n} clip(i + offset + 1, 0, S): rows [0, a) see no key, rows [a, c) the
    # ramp i + offset + 1, rows [c, n) all S keys
    offset = int(offset)
    a = min(max(0, -offset - 1), n)
    c = min(max(S - offset - 1, a), n)
    return float((a + offset + 1 + c + offset) * (c - a) / 2 + float(S) * (n - c))



def visited_pairs(n, S, key_range=None, row_block=None, key_block=None):
    """(query, key) pairs the kernel computes: per block of ``row_block`` rows, whole
    key blocks from the smallest ``lo`` (aligned down to ``key_block``) to the largest
    ``hi`` of its rows (none when no row of it sees a key) (defaults:
    ``_config.EXACT_ROW_BLOCK``, ``EXACT_KEY_BLOCK``). Without ``key_range``, n·S.
    The predicted time of a window or a chunked structure is in these pairs, not in
    :func:`visible_pairs`."""
    n, S = int(n), int(S)
    if key_range is None or n == 0:
        return float(n) * S
    rb = int(row_block or _config.EXACT_ROW_BLOCK)
    kb = int(min(key_block or _config.EXACT_KEY_BLOCK, max(S, 1)))
    lo = np.clip(np.asarray(key_range[0], dtype=np.int64).reshape(1, n), 0, S)
    hi = np.clip(np.asarray(key_range[1], dtype=np.int64).reshape(1, n), 0, S)
    span, rows = _block_work(lo, hi, n, rb, kb)
    return float((span[0] * rows).sum())


def pairs_visited(n, S, offset=0, key_ranges=None):
    """The pipeline's ``HeadSpec.pairs``: :func:`visited_pairs` of the problem's
    ``key_ranges`` (lo, hi) at the default blocks; ``offset`` is already in the ranges
    (kept for the call's signature). Without ranges, n·S."""
    return visited_pairs(n, S, key_ranges)


def _gamma(k, u):
    """Higham's γ_k = k·u / (1 − k·u) (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1 else np.inf


def exact_error_bound(n, E, radius, radius1, vmax, precision="float64", general=False,
                      has_bias=False, key_block=None, logit_error=0.0):
    """Bound on ``max|out − o|`` of the exact kernel, o the mathematical value.

    Parameters
    ----------
    n, E : int
        Keys (S) and head_dim.
    radius : float
        Proven logit radius R >= max |s·q_iᵀW_t k_j| (not a caller's guess).
    radius1 : float
        ``s·max‖q‖·max‖W‖_F·max‖k‖`` (>= Σ_ab |s q_a W_ab k_b|); R for W = I.
    vmax : float
        max|V| of the head.
    precision : {"float64", "float32"}
        Compute precision of logits, exp and the P·V product (unit roundoff u).
    general, has_bias : bool
    key_block : int, optional
        Keys per block (default ``_config.EXACT_KEY_BLOCK``).
    logit_error : float, optional
        Absolute error of the logits from the inputs' preparation before the
        kernel, e.g. the float64 rotation (:func:`numbarope.rotary.rotation_logit_error`).

    Returns
    -------
    float
        ``2ρ/(1−ρ)·vmax + (γ_kb(u) + u + γ_{n/kb}(u₆₄) + 2u₆₄)·vmax``; ρ bounds the
        error of the weights relative to their sum (see Notes). Excludes the final
        rounding of a float32 result (added by the caller).

    Notes
    -----
    With x_ij = L_ij − m_i (the logit, bias shifted per row, minus the running
    maximum; |m_i| <= R because the shifted bias is 0 at the row's largest
    visible bias and <= 0 elsewhere):

    * the logit's dot product, the rounding of rotated inputs to the compute
      dtype and the scale: ``|ΔL| <= γ_{E+3}(u)·R₁`` (Higham §3.1; general W:
      γ_{2E+3}); the bias addition, the store and the subtraction of m:
      ``<= 3u(|x| + R + H)``, H = :data:`EXACT_HEADROOM` (the running maximum
      may trail the row's by up to H); the logits' own error from the inputs'
      preparation, ``logit_error``, adds to ``|ΔL|``;
    * exp: ``EXP_ULPS·u`` relative (:mod:`numbarope.ops._exp`);
    * hence each weight ``e^x`` is computed within ``e^x·(ρ₀)`` plus
      ``3u|x|e^x``; Σ_j |x_j|e^{x_j} <= 1.37·(ln n + 1)·Σ_j e^{x_j}, so the
      weights' total error is ``<= ρ·Σ_j e^{x_j}`` with
      ``ρ = ρ₀ + 4.2u(ln n + 1)(1 + ρ₀) + n·e^{EXP_FLUSH} + γ_{n+n/kb}(u₆₄) + 3(n/kb)u₆₄``
      (flushed weights, float64 sums and block rescalings);
    * the value product in the compute dtype adds ``γ_kb(u)·vmax`` per block,
      the value rounding ``u·vmax``, the float64 accumulation ``γ_{n/kb}(u₆₄)``.

    A perturbation of the weights by at most ``ρ`` times their sum moves a
    ratio ``Σ w v / Σ w`` by at most ``2ρ/(1−ρ)·max|v|``. Key blocks or keys a
    row does not see (key ranges, padding) give it weights exactly 0 and add
    nothing.
    """
    if n == 0 or vmax == 0.0:
        return 0.0
    dt = np.dtype(precision)
    u = 2.0 ** -24 if dt == np.float32 else 2.0 ** -53
    u64 = 2.0 ** -53
    kb = int(key_block or _config.EXACT_KEY_BLOCK)
    nb = -(-n // kb)
    R = min(float(radius), 1e300)
    R1 = min(max(float(radius1), R), 1e300)
    # the running maximum may trail the row's by up to EXACT_HEADROOM (blocks whose
    # Cauchy–Schwarz bound is within it skip the maximum pass): 3u·headroom more
    dlogit = (_gamma((2 * E if general else E) + 3, u) * R1 + 3 * u * (R + EXACT_HEADROOM[dt])
              + float(logit_error))
    if not math.isfinite(dlogit) or dlogit > 1.0:
        return np.inf
    # scalar math (not numpy): this runs once per head of every call
    rho0 = math.expm1(2 * dlogit) + EXP_ULPS[dt] * u * math.exp(2 * dlogit)
    rho = (rho0 + 4.2 * u * (math.log(n) + 1) * (1 + rho0) + n * math.exp(EXP_FLUSH[dt])
           + _gamma(n + nb, u64) + 3 * nb * u64)
    if not rho < 1:
        return np.inf
    return float(vmax * (2 * rho / (1 - rho) + _gamma(kb, u) + u + _gamma(nb, u64)
                         + 2 * u64))


class Streaming(Algorithm):
    """The exact path: blocked online softmax, BLAS products (:func:`exact_attention`).

    It serves every structure (any key ranges, bias, padding, general W_t); the
    pipeline runs it through :func:`exact_attention`, not :meth:`run`.
    """

    name = "streaming"
    fast = False
    bound_kind = "exact"

    def serves(self, structure) -> bool:
        return True

    def unavailable(self, h):
        return []

    def predict(self, h, degree=None):
        """Seconds: ``h.pairs`` (the pairs the kernel visits; n·S when None) times the
        per-pair and GEMM constants of :data:`numbarope.ops._cost.COST_CONSTANTS`."""
        c = COST_CONSTANTS
        sfx = "32" if h.compute_dtype == "float32" else ""
        pairs = float(h.n) * h.S if h.pairs is None else h.pairs
        t = pairs * (c["exact_pair" + sfx] + c["exact_flop" + sfx] * (h.E + h.Ev))
        if h.general:
            t += pairs * c["exact_general_flop"] * (h.E * h.E + h.E)
        return t

    def memory(self, h, degree=None):
        """Bytes: float64 copies of q, k, v, the output, and per-thread row/key-block
        buffers."""
        cfg = _config
        blocks = (cfg.EXACT_ROW_BLOCK * (cfg.EXACT_KEY_BLOCK + 2 * h.Ev + 2)
                  + 2 * cfg.EXACT_KEY_BLOCK + h.E)
        return 8 * (max(h.n, h.S) * (2 * h.E + 2 * h.Ev) + 2 * blocks)

    def run(self, q, k, v, scale, coef=None, **_):
        raise NotImplementedError("the exact path runs through "
                                  "numbarope.ops.streaming.exact_attention")

    def example(self, rng):
        q, k, v = (rng.standard_normal((96, 4)) * 0.4 for _ in range(3))
        return q, k, v, dict(is_causal=True, method="exact")


def predict_exact(n, E, Ev, general=False, precision="float64", S=None, key_range=None):
    """Predicted seconds of the exact kernel for one head (all threads): n query rows
    against S key rows (default n), rows seeing at most ``key_range`` (lo, hi)."""
    S = n if S is None else S
    return Streaming().predict(HeadSpec((), n, S, E, Ev, 0.0, 0.0, 0.0, general=general,
                                       compute_dtype=precision,
                                       pairs=visited_pairs(n, S, key_range)))


def exact_memory(n, E, Ev, S=None):
    """Working memory (bytes) of the exact path for one head."""
    return Streaming().memory(HeadSpec((), n, n if S is None else S, E, Ev, 0.0, 0.0, 0.0))


register(Streaming())
