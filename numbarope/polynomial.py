"""Polynomial approximants of ``exp`` with certified relative error.

The fast path of numbarope replaces ``exp(x)`` on the logit interval
``[-R, R]`` by a polynomial ``p(x) = sum_k a_k x^k`` whose *relative* error

    delta = max_{|x| <= R} |p(x) e^{-x} - 1|

is bounded by a number computed here and certified (an upper bound proven by
the procedure of :func:`exp_approximation`, not a sampled estimate). Every
attention weight is then within a factor ``1 +- delta`` of the exact one, so
the output error is at most ``2 delta / (1 - delta) * max|V|``
(Alman & Song 2025, §4; see numbarope.rope_attention, Notes).

Two families are offered:

* ``"chebyshev"`` (default): a near-minimax fit for the relative error, found
  by Remez exchange steps for the weight ``e^{-x}`` started from the
  least-squares fit of the relative error, keeping whichever certifies
  better; the certified error never increases with the degree;
* ``"taylor"``: the truncated series ``a_k = 1/k!``.

Both are certified by the same a posteriori procedure (see
:func:`exp_approximation`, Notes).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from numpy.polynomial import chebyshev as _cheb
from scipy import special as _special

from . import _config

__all__ = ["ExpApproximation", "exp_approximation", "degree_for"]

#: Valid values of ``kind``.
KINDS = ("chebyshev", "taylor")

#: Largest radius accepted: beyond it ``e^{2R}`` (the scale of float64
#: rounding errors relative to ``e^x``) overflows and no polynomial is usable.
MAX_RADIUS = 350.0

#: Below this radius the Chebyshev fit is replaced by the Taylor series (the
#: two coincide to rounding there, and ``R**k`` would underflow).
_TINY_RADIUS = 1e-8

_U64 = 2.0 ** -53                                   # unit roundoff of float64
_UL = float(np.finfo(np.longdouble).eps) / 2.0      # unit roundoff of longdouble
_EXP_ULPS = 4.0     # assumed accuracy of np.exp (float64 and longdouble), ulps
_N_PIECES = 512     # pieces of [-R, R] for the local Lipschitz bounds
_REMEZ_GRID = 2049  # points of the (uncertified) Remez / screening grid
_REMEZ_STEPS = 20  # most Remez exchange steps per fit
_REMEZ_TOL = 1e-3  # stop when max error <= (1 + tol) * |level| (equioscillation)

_BOUND_METHOD = ("a posteriori: |p e^-x - 1| on a {n}-point grid (long double) "
                 "+ piecewise Lipschitz margin + float64 Horner bound "
                 "gamma_2g*sum|a_k||x|^k*e^-x")


def _gamma(n, u=_U64):
    """Higham's gamma_n = n u / (1 - n u)."""
    return n * u / (1.0 - n * u)


def _horner(coef, x):
    """Evaluate sum coef[k] x**k by Horner's rule in the dtype of ``x``."""
    y = np.full_like(x, coef[-1])
    for c in coef[-2::-1]:
        y *= x
        y += c
    return y


@dataclass(frozen=True, eq=False)
class ExpApproximation:
    """A polynomial approximant of ``exp`` on ``[-radius, radius]``.

    Attributes
    ----------
    coef : (degree + 1,) ndarray of float64, read-only
        Monomial coefficients ``a_k`` of ``p(x) = sum_k a_k x^k`` in the
        original variable ``x`` (lowest degree first).
    degree : int
        Degree ``g`` of ``p``: ``coef`` has ``g + 1`` entries (for
        ``"chebyshev"``, the last ones are zero when a lower-degree fit
        certifies better, see :func:`exp_approximation`, Notes).
    radius : float
        ``R``: the approximation interval is ``[-R, R]``.
    kind : {"chebyshev", "taylor"}
        How ``p`` was built.
    error_bound : float
        Certified ``delta >= max_{|x| <= R} |p(x) e^{-φ(x)} - 1|``, valid both
        for the exact value of ``p`` and for its float64 Horner evaluation;
        ``φ(x) = x``, or ``c·tanh(x/c)`` with ``softcap=c``.
    bound_method : str
        One line naming how ``error_bound`` was obtained.
    softcap : float or None
        ``c`` when ``p`` approximates ``exp(c·tanh(x/c))`` (soft-capped logits,
        Gemma 2), else None (``p`` approximates ``exp``).
    """

    coef: np.ndarray
    degree: int
    radius: float
    kind: Literal["chebyshev", "taylor"]
    error_bound: float
    bound_method: str
    softcap: float | None = None

    def __call__(self, x: ArrayLike) -> float | np.ndarray:
        """Evaluate ``p(x)`` in float64 by Horner's rule.

        Parameters
        ----------
        x : array_like of float
            Points (any shape); the bound ``error_bound`` holds for
            ``|x| <= radius``.

        Returns
        -------
        float or ndarray of float64
            ``p(x)``, same shape as ``x``.
        """
        xa = np.asarray(x, dtype=np.float64)
        y = _horner(self.coef, np.array(xa, dtype=np.float64, ndmin=1))
        return float(y[0]) if xa.ndim == 0 else y.reshape(xa.shape)

    def measured_error(self, npoints: int = 200_001) -> float:
        """Largest ``|p(x) e^{-x} - 1|`` on a uniform grid (NOT certified).

        Evaluated in ``np.longdouble`` on ``npoints`` equispaced points of
        ``[-R, R]``; a lower estimate of the true maximum, useful to judge how
        tight :attr:`error_bound` is.
        """
        if self.radius == 0.0:
            return abs(float(self.coef[0]) - 1.0)
        x = np.linspace(-self.radius, self.radius, int(npoints)).astype(np.longdouble)
        f = _horner(self.coef.astype(np.longdouble), x) * np.exp(
            -_log_weight(x, self.softcap)) - 1
        return float(np.max(np.abs(f)))

    def __repr__(self) -> str:
        cap = "" if self.softcap is None else f", softcap={self.softcap!r}"
        return (f"ExpApproximation(kind={self.kind!r}, degree={self.degree}, "
                f"radius={self.radius!r}{cap}, error_bound={self.error_bound:.3g})")


# --------------------------------------------------------------------------
# construction of the coefficients
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _cheb_monomial_table(g):
    """Integer monomial coefficients of T_0..T_g: row j holds T_j."""
    rows = [[1], [0, 1]]
    for _ in range(2, g + 1):
        a, b = rows[-1], rows[-2]
        nxt = [0] + [2 * c for c in a]
        for k, c in enumerate(b):
            nxt[k] -= c
        rows.append(nxt)
    return tuple(tuple(r) for r in rows[: g + 1])


def _cheb_to_monomial(c, radius):
    """Monomial coefficients in ``x = radius * y`` of ``sum_j c_j T_j(y)``.

    The change of basis cancels heavily at high degree (the ``a_k R^k`` are
    sums of terms far larger than themselves), so it is done in exact
    arithmetic and each ``a_k`` is rounded to float64 once: the float64
    ``c_j`` are integers over a common power of two, the sums are Python
    integers, and ``int / int`` is correctly rounded.
    """
    g = len(c) - 1
    table = _cheb_monomial_table(g)
    ratios = [float(v).as_integer_ratio() for v in c]
    den = max(d for _, d in ratios)          # powers of two: a common multiple
    beta = [0] * (g + 1)
    for row, (n, d) in zip(table, ratios):
        if n:
            n *= den // d
            for k, t in enumerate(row):
                if t:
                    beta[k] += n * t
    num, rden = float(radius).as_integer_ratio()
    out = np.empty(g + 1)
    for k in range(g + 1):                   # a_k = beta_k / (den * radius^k)
        out[k] = (beta[k] * rden ** k) / (den * num ** k)
    return out


def _taylor_coef(g):
    return np.array([float(Fraction(1, math.factorial(k))) for k in range(g + 1)])


def _rel_err_cheb(c, y, w):
    """p(y) e^{-Ry} - 1 with p in the Chebyshev basis; ``w = e^{-Ry}``."""
    return _cheb.chebval(y, c) * w - 1.0


def _alternating_extrema(err, n):
    """Indices of ``n`` alternating-sign local extrema of ``err``, or None."""
    s = np.sign(err)
    s[s == 0] = 1
    cuts = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [err.size]))
    idx = [a + int(np.argmax(np.abs(err[a:b]))) for a, b in zip(starts, ends)]
    if len(idx) < n:
        return None
    while len(idx) > n:
        mags = [abs(err[i]) for i in idx]
        if len(idx) - n == 1:
            del idx[0 if mags[0] <= mags[-1] else -1]
            continue
        i = int(np.argmin(mags))
        if i == 0 or i == len(idx) - 1:
            del idx[i]
        else:
            j = i - 1 if mags[i - 1] <= mags[i + 1] else i + 1
            for t in sorted((i, j), reverse=True):
                del idx[t]
    return np.array(idx)


def _log_weight(x, cap):
    """The exponent approximated: ``x``, or ``cap·tanh(x/cap)`` (soft-capped logits),
    in the dtype of ``x``."""
    return x if cap is None else cap * np.tanh(x / cap)


def _max_weight(radius, cap):
    """An upper bound of ``max_{|x|<=R} e^{-φ(x)} = e^{φ(R)}`` (φ odd, increasing;
    ``φ(R) = c·tanh(R/c) <= R``), with room for the rounding of tanh and exp."""
    top = radius if cap is None else min(radius, cap * math.tanh(radius / cap)
                                          * (1.0 + 16 * _U64))
    return math.exp(top) * (1.0 + _EXP_ULPS * _U64)


@functools.lru_cache(maxsize=16)
def _screen_grid(radius, cap=None):
    y = -np.cos(np.pi * np.arange(_REMEZ_GRID) / (_REMEZ_GRID - 1))
    return y, np.exp(-_log_weight(radius * y, cap))


def _grid_error(c, y, w):
    """(P(y) e^{-Ry} - 1 on the grid, its max modulus or inf if not finite)."""
    with np.errstate(all="ignore"):
        err = _rel_err_cheb(c, y, w)
        m = float(np.max(np.abs(err)))
    return err, (m if math.isfinite(m) else math.inf)


def _weighted_lsq(g, y, w):
    """Chebyshev coefficients minimising sum_i (P(y_i) e^{-R y_i} - 1)^2.

    The least-squares fit of the *relative* error: a good start for the
    Remez exchange, unlike the interpolant of ``e^{Ry}``, whose relative
    error is concentrated at ``y = -1`` when ``R`` is large. Columns are
    scaled by their largest entry (not their 2-norm, which overflows for
    ``R >~ 170``) before ``numpy.linalg.lstsq``.
    """
    lhs = _cheb.chebvander(y, g) * w[:, None]
    scl = np.max(np.abs(lhs), axis=0)
    scl[~(scl > 0)] = 1.0
    try:
        with np.errstate(all="ignore"):
            sol = np.linalg.lstsq(lhs / scl, np.ones(y.size), rcond=None)[0]
    except np.linalg.LinAlgError:
        return None
    c = sol / scl
    return c if np.all(np.isfinite(c)) else None


def _remez(c, g, y, w):
    """Remez exchange for min max |P(y) e^{-Ry} - 1| started from ``c``.

    The reference is the set of ``g + 2`` alternating extrema of the current
    error on the grid ``y``; each step solves ``P(y_i) e^{-R y_i} - s_i E
    = 1`` (rows equilibrated) for the Chebyshev coefficients and the level
    ``E``. Returns the iterate with the smallest grid error if it is smaller
    than that of ``c``, else None (never a step that made things worse).
    """
    err, best_err = _grid_error(c, y, w)
    best = None
    if not math.isfinite(best_err):
        return None
    stale = 0
    for _ in range(_REMEZ_STEPS):
        idx = _alternating_extrema(err, g + 2)
        if idx is None:            # no alternation (e.g. at the rounding level)
            break
        mat = np.empty((g + 2, g + 2))
        mat[:, :-1] = _cheb.chebvander(y[idx], g) * w[idx][:, None]
        mat[:, -1] = -np.sign(err[idx])
        rows = np.max(np.abs(mat), axis=1)
        try:
            sol = np.linalg.solve(mat / rows[:, None], 1.0 / rows)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(sol)):
            break
        cand = sol[:-1]
        err, m = _grid_error(cand, y, w)
        if m < best_err:
            best, best_err, stale = cand, m, 0
        else:
            stale += 1
        if m <= (1.0 + _REMEZ_TOL) * abs(sol[-1]) or stale >= 3:
            break                  # equioscillation reached, or no progress
    return best


def _chebyshev_fit(radius, g, cap=None):
    """Chebyshev coefficients (variable y = x/R) of the candidate fits.

    Returns ``(start,)`` or ``(start, refined)``: ``start`` is the better, on
    the screening grid, of the Chebyshev interpolant of ``e^{Ry}``
    (``numpy.polynomial.chebyshev.chebinterpolate``) and the least-squares
    fit of the relative error; ``refined`` is the best Remez iterate from it,
    present only if it is better on the grid. Which one is used is decided
    by the certificate of its monomial form (:func:`_select`).
    """
    y, w = _screen_grid(radius, cap)
    with np.errstate(all="ignore"):
        fits = [_cheb.chebinterpolate(lambda t: np.exp(_log_weight(radius * t, cap)), g)]
    step = (_REMEZ_GRID - 1) // 2   # least squares on a sub-grid of >= 8(g + 1)
    while step > 1 and (_REMEZ_GRID - 1) // step < 8 * (g + 1):
        step //= 2                  # points (Chebyshev points again): cheaper
    lsq = _weighted_lsq(g, y[::step], w[::step])
    if lsq is not None:
        fits.append(lsq)
    errs = [_grid_error(c, y, w)[1] for c in fits]
    start = fits[int(np.argmin(errs))]
    if min(errs) < 1e-14:          # already at rounding level: nothing to gain
        return (start,)
    refined = _remez(start, g, y, w)
    return (start,) if refined is None else (start, refined)


def _effective(a):
    """``a`` without its trailing zero coefficients (at least one kept).

    Horner's rule on trailing zeros is exact (``0 * x + a_k = a_k``), so
    evaluating ``a`` and its trimmed form gives identical values, and the
    bounds use the degree of the trimmed form.
    """
    nz = np.flatnonzero(a)
    return a[: nz[-1] + 1] if nz.size else a[:1]


@functools.lru_cache(maxsize=2048)
def _candidates(radius, g, cap=None):
    """Monomial candidates of degree g: tuple of (coef, screened delta)."""
    out = []
    for c in _chebyshev_fit(radius, g, cap):
        if not np.all(np.isfinite(c)):
            continue
        a = _cheb_to_monomial(c, radius)
        if np.all(np.isfinite(a)):
            a.flags.writeable = False
            out.append((a, _screen_coef(a, radius, cap)))
    if not out:                    # cannot happen for finite fits; be safe
        a = _taylor_coef(g)
        a.flags.writeable = False
        out.append((a, _screen_coef(a, radius, cap)))
    return tuple(out)


@functools.lru_cache(maxsize=2048)
def _candidate_delta(radius, g, i, npoints, cap=None):
    return _certify_coef(_candidates(radius, g, cap)[i][0], radius, npoints, cap)


@functools.lru_cache(maxsize=512)
def _select(radius, g, kind, npoints, cap=None):
    """(coef, certified delta) of the degree-g approximant.

    ``"chebyshev"``: the candidate with the smallest certified delta among
    the candidates of every degree ``k <= g`` (a degree-k polynomial is one
    of degree g with zero leading coefficients), ties going to the lower
    degree and to the unrefined start. Hence the certified delta never
    increases with g, and a Remez refinement is kept only if it lowers the
    certificate. Candidates are certified in increasing order of their
    screened value, a lower estimate of their certificate, until that
    value exceeds the best certificate found: usually one certificate.
    """
    if kind == "taylor" or radius < _TINY_RADIUS:
        a = _taylor_coef(g)
        a.flags.writeable = False
        return a, _certify_coef(a, radius, npoints, cap)
    pool = sorted((s, k, i) for k in range(g + 1)
                  for i, (_, s) in enumerate(_candidates(radius, k, cap)))
    best = None
    for s, k, i in pool:
        if best is not None and not s <= best[0]:
            break
        key = (_candidate_delta(radius, k, i, npoints, cap), k, i)
        if best is None or key < best:
            best = key
    delta, k, i = best
    a = _candidates(radius, k, cap)[i][0]
    if k < g:
        a = np.concatenate([a, np.zeros(g - k)])
        a.flags.writeable = False
    return a, delta


def _coefficients(radius, g, kind, npoints, cap=None):
    """Read-only float64 monomial coefficients of the degree-g approximant."""
    return _select(radius, g, kind, npoints, cap)[0]


# --------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------

def _horner_floor(a, radius, cap=None):
    """Bound on max_{|x|<=R} |fl64(p(x)) - p(x)| e^{-φ(x)} (Higham eq. (5.3))."""
    g = a.size - 1
    if g == 0:
        return 0.0
    s = float(_horner(np.abs(a), np.array([radius]))[0]) * (1.0 + _gamma(2 * g + 2))
    return _gamma(2 * g) * s * _max_weight(radius, cap)


def _screen_coef(a, radius, cap=None):
    """Cheap estimate of the certified delta of ``a`` (no guarantee).

    Largest |p(x)e^{-x} - 1| on the screening grid in float64, minus a bound
    on its own rounding error, plus the float64 Horner floor: a lower
    estimate of :func:`_certify_coef`.
    """
    a = _effective(a)
    g = a.size - 1
    if radius == 0.0:
        return abs(float(a[0]) - 1.0)
    y, w = _screen_grid(radius, cap)
    x = radius * y
    with np.errstate(all="ignore"):
        f = np.abs(_horner(a, x) * w - 1.0)
        rho = _gamma(2 * g + 8) * (_horner(np.abs(a), np.abs(x)) * w + 2.0)
        m = float(max(np.max(f - rho), 0.0)) + _horner_floor(a, radius, cap)
    return m if math.isfinite(m) else math.inf


@functools.lru_cache(maxsize=512)
def _screen(radius, g, kind, cap=None):
    """Screened delta of the degree-g approximant (used by the search).

    For ``"chebyshev"`` the smallest over the candidates of degree <= g,
    matching the selection of :func:`_select`.
    """
    if kind == "taylor" or radius < _TINY_RADIUS:
        return _screen_coef(_taylor_coef(g), radius, cap)
    return min(s for k in range(g + 1) for _, s in _candidates(radius, k, cap))


def _shifted_max(q, qa, c, w, extra=0):
    """Upper bounds of ``max_{0<=t<=w} |q(c + t)|`` per piece start ``c``
    (``q``, ``qa``: (g+1,) coefficients, or (pieces, g+1), one polynomial per piece).

    By the exact Taylor expansion of the polynomial q at c, ``|q(c + t)| <=
    sum_m |q^(m)(c)/m!| w^m``. The shifted coefficients are computed in float64
    together with the same recurrence on ``|q|``, ``|c|`` (``qa``), whose result
    bounds their rounding errors (``extra``: roundings already in ``q``, within
    ``γ_extra·qa``).
    """
    g = q.shape[-1] - 1
    d = np.array(np.broadcast_to(q, (c.size, g + 1)))
    da = np.array(np.broadcast_to(qa, (c.size, g + 1)))
    ca = np.abs(c)
    for i in range(g):                       # Taylor shift (synthetic division)
        for j in range(g - 1, i - 1, -1):
            d[:, j] += c * d[:, j + 1]
            da[:, j] += ca * da[:, j + 1]
    bound = np.abs(d) + 2.0 * (_gamma(4 * g + 16) + _gamma(extra)) * da
    # sum_m bound[:, m] w^m by Horner over m (all terms non-negative)
    qmax = bound[:, -1].copy()
    for m in range(g - 1, -1, -1):
        qmax = qmax * w + bound[:, m]
    return qmax * (1.0 + _gamma(2 * g + 4))


def _lipschitz_pieces(a, xg, starts, ends, cap=None):
    """Upper bounds L_j >= max |d/dx (p(x) e^{-φ(x)})| on [xg[starts], xg[ends]].

    exp (φ(x) = x): d/dx (p e^{-x}) = q(x) e^{-x} with q = p' - p, bounded by
    :func:`_shifted_max` of q. Soft-capped (φ(x) = c·tanh(x/c)): d/dx (p e^{-φ}) =
    (p' − φ'p) e^{-φ}; on a piece [x0, x0 + w] with ℓ(x) = κ + κ₁(x − x0), κ and
    κ₁ the float64 values of φ'(x0) = sech²(x0/c) and φ''(x0) = −(2/c)sech²·tanh,
    |p' − φ'p| <= |p' − ℓp| + |φ' − ℓ|·|p|: the polynomial p' − ℓp (degree g+1) by
    :func:`_shifted_max` (it cancels as p' − p does for exp), and by Taylor's
    theorem |φ'(x) − ℓ(x)| <= max|φ‴|·w²/2 + |φ'(x0) − κ| + |φ''(x0) − κ₁|·w
    with |φ‴| = (1/c²) sech²(z)·|6 tanh²(z) − 2| <= 2/c² and the float64 errors
    <= 16u (κ) and 16u/c (κ₁); e^{-φ(x)} <= e^{-φ(x0)} (φ increasing).
    """
    g = a.size - 1
    k = np.arange(g + 1, dtype=np.float64)
    c = xg[starts]
    w = (xg[ends] - xg[starts]) * (1.0 + 4 * _U64)
    if cap is None:
        q = np.empty(g + 1)
        qa = np.empty(g + 1)
        q[:-1] = k[1:] * a[1:] - a[:-1]
        qa[:-1] = k[1:] * np.abs(a[1:]) + np.abs(a[:-1])
        q[-1] = -a[-1]
        qa[-1] = abs(a[-1])
        qmax = _shifted_max(q, qa, c, w)
        return qmax * np.exp(-c) * (1.0 + (_EXP_ULPS + 2) * _U64)
    z = c / cap
    with np.errstate(over="ignore"):         # cosh(z) = inf: φ' = 0 to the last bit
        kappa = 1.0 / np.cosh(z) ** 2        # φ'(x0), within 16u
    kappa1 = -2.0 / cap * kappa * np.tanh(z)     # φ''(x0), within 16u/c
    # p' − ℓp = p' − (κ − κ₁x0)p − κ₁·x·p, coefficients of degree <= g + 1 per piece
    k0 = kappa - kappa1 * c
    q = np.zeros((c.size, g + 2))
    qa = np.zeros((c.size, g + 2))
    q[:, :g] = k[1:] * a[1:]                 # p' (exact: k·a_k, k <= 2^11)
    qa[:, :g] = np.abs(q[:, :g])
    q[:, :g + 1] -= k0[:, None] * a
    q[:, 1:] -= kappa1[:, None] * a
    k0a = np.abs(kappa) + np.abs(kappa1 * c)
    qa[:, :g + 1] += k0a[:, None] * np.abs(a)
    qa[:, 1:] += np.abs(kappa1)[:, None] * np.abs(a)
    # the formation of q (at most 4 roundings per coefficient, k0 included) is
    # within γ₄·qa; shifted by the same non-negative recurrence as qa
    # Taylor's remainder, or (tiny caps, where it is large) |φ'| + |ℓ| <= 1 + |κ| + |κ₁|w
    err = (np.minimum(w * w / (cap * cap), 1.0 + kappa + np.abs(kappa1) * w)
           + 16 * _U64 + 16 * _U64 / cap * w) * (1.0 + 8 * _U64)
    qmax = (_shifted_max(q, qa, c, w, extra=4)
            + err * _shifted_max(a, np.abs(a), c, w))
    top = -cap * np.tanh(c / cap) * (1.0 - 16 * _U64 * np.sign(c))
    return qmax * np.exp(top) * (1.0 + (_EXP_ULPS + 4) * _U64)


def _certify_coef(a, radius, npoints, cap=None):
    """Certified delta for the coefficients ``a`` (see exp_approximation).

    Trailing zero coefficients are dropped first (:func:`_effective`): they
    change neither p nor its float64 Horner value.
    """
    a = _effective(np.asarray(a, dtype=np.float64))
    g = a.size - 1
    if radius == 0.0:
        # p(0) = a_0 is computed exactly by Horner and e^0 = 1.
        return abs(float(a[0]) - 1.0)
    n = max(int(npoints), 2)
    xg = np.linspace(-radius, radius, n)
    xg[0], xg[-1] = -radius, radius
    # 1. the grid values, in long double, with a bound on their rounding error
    xl = xg.astype(np.longdouble)
    el = np.exp(-_log_weight(xl, cap))
    fl = _horner(a.astype(np.longdouble), xl) * el - 1
    emx = np.exp(-_log_weight(xg, cap))
    s = _horner(np.abs(a), np.abs(xg)) * emx
    # soft-capped: φ = c·tanh(x/c) in long double is within 7 u_L |φ| <= 7 u_L R
    # (a division, tanh to 4 ulps — sech²(z)·z <= tanh z keeps the argument's
    # rounding relative —, a product), which e^{-φ} turns into a relative error
    extra = 0 if cap is None else math.ceil(7 * radius) + 1
    eval_err = 2.0 * _gamma(2 * g + 10 + extra, _UL) * (s * (1 + _gamma(2 * g + 8)) + 2.0)
    big_f = np.abs(fl).astype(np.float64) * (1.0 + 2 * _U64) + eval_err
    # 2. Lipschitz margin per cell: sup_cell |f| <= (F_i + F_{i+1})/2 + L h/2
    cells = n - 1
    per = -(-cells // _N_PIECES)
    starts = np.arange(0, cells, per)
    ends = np.minimum(starts + per, cells)
    lip = _lipschitz_pieces(a, xg, starts, ends, cap)
    lip_cell = np.repeat(lip, ends - starts)
    h = np.diff(xg) * (1.0 + 4 * _U64)
    cell_sup = 0.5 * (big_f[:-1] + big_f[1:]) + 0.5 * lip_cell * h
    # 3. float64 evaluation of p by the package: Higham (5.3)
    delta = float(np.max(cell_sup)) + _horner_floor(a, radius, cap)
    return float(delta * (1.0 + 1e-12))


def _certify(radius, g, kind, npoints, cap=None):
    """Certified delta for the degree-g approximant (see exp_approximation)."""
    return _select(radius, g, kind, npoints, cap)[1]


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------

def _check_radius(radius):
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise TypeError(f"radius must be a real number >= 0, got {radius!r} "
                        f"of type {type(radius).__name__}; pass a float such as 1.0")
    r = float(radius)
    if not math.isfinite(r) or r < 0.0:
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}; "
                         "pass R >= max|logit| (a finite non-negative float)")
    if r > MAX_RADIUS:
        raise ValueError(f"radius={r!r} is above {MAX_RADIUS}: e^(2R) overflows "
                         "float64 and no polynomial approximation of exp is "
                         "usable; use the exact method (method='exact')")
    return r


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number in (0, 1), got {eps!r} of "
                        f"type {type(eps).__name__}; pass a float such as 1e-3")
    e = float(eps)
    if not (0.0 < e < 1.0):
        raise ValueError(f"eps must be in the open interval (0, 1), got {eps!r}; "
                         "pass the target relative error, e.g. eps=1e-3")
    return e


def _check_degree(degree, max_degree):
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral):
        raise TypeError(f"degree must be an int in [0, {max_degree}], got "
                        f"{degree!r} of type {type(degree).__name__}; pass e.g. "
                        "degree=8, or pass eps= to choose the degree")
    d = int(degree)
    if not 0 <= d <= max_degree:
        raise ValueError(f"degree must be in [0, {max_degree}] "
                         f"(numbarope._config.MAX_DEGREE), got {degree!r}; pass a "
                         "smaller degree or raise numbarope._config.MAX_DEGREE")
    return d


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {set(KINDS)}, got {kind!r}")
    return kind


def _check_softcap(softcap, kind):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number > 0 or None, got {softcap!r} of "
                        f"type {type(softcap).__name__}; pass the logit cap c, e.g. 50.0")
    c = float(softcap)
    if not (math.isfinite(c) and c > 0.0):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}; pass "
                         f"the logit cap c of c·tanh(x/c), e.g. 50.0")
    if kind != "chebyshev":
        raise ValueError(f"softcap={c:g} with kind={kind!r}: only Chebyshev fits of "
                         f"exp(c·tanh(x/c)) are built; pass kind='chebyshev'")
    return c


def _start_degree(radius, eps, kind, cap=None):
    """A degree at or below the answer, to start the search from.

    Taylor: ``e^{-R} R^{g+1}/(g+1)!`` is a rigorous lower bound of the
    relative error (attained at ``x = R``). Chebyshev: ``2 I_{g+1}(R) e^{-R}``
    (the first neglected Chebyshev coefficient of ``e^{Ry}`` relative to
    ``e^R``) was below the relative minimax error for every R and g tried
    (ratios 1.25 to ~10^3); the search also steps down while it can.
    Soft-capped (``cap``): 0 (no such estimate is known).
    """
    g = 0
    if cap is not None:
        return g
    if kind == "taylor":
        term = math.exp(-radius) * radius
        while term > eps and g < 200:
            g += 1
            term *= radius / (g + 1)
        return g
    while 2.0 * _special.ive(g + 1, radius) > eps and g < 200:
        g += 1
    return g


@functools.lru_cache(maxsize=1024)
def _exp_approximation(radius, eps, degree, kind, max_degree, npoints, cap=None):
    def make(g):
        return ExpApproximation(
            coef=_coefficients(radius, g, kind, npoints, cap), degree=g, radius=radius,
            kind=kind, error_bound=_certify(radius, g, kind, npoints, cap),
            bound_method=("exact: p(0) = 1 at radius 0" if radius == 0.0 else
                          _BOUND_METHOD.format(n=npoints)
                          + ("" if cap is None else f"; target exp(c·tanh(x/c)), c={cap:g}")),
            softcap=cap)

    if degree is not None:
        return make(degree)
    if radius == 0.0:
        return make(0)
    # search: screen cheaply upward, then certify from the first candidate
    screens = {}
    first = None
    for g in range(min(_start_degree(radius, eps, kind, cap), max_degree),
                   max_degree + 1):
        screens[g] = _screen(radius, g, kind, cap)
        if screens[g] <= eps:
            first = g
            break
    if first is not None:           # the start is a lower estimate: check below
        while first > 0:
            screens[first - 1] = _screen(radius, first - 1, kind, cap)
            if screens[first - 1] > eps:
                break
            first -= 1
    best_g, best_delta = None, math.inf
    if first is not None:
        lo = first
        if first > 0 and screens.get(first - 1, 0.0) <= 1.01 * eps:
            lo = first - 1          # borderline: let the certificate decide
        for g in range(lo, max_degree + 1):
            delta = _certify(radius, g, kind, npoints, cap)
            if delta <= eps:
                # a fallback to a lower-degree candidate: return that degree
                k = _effective(_coefficients(radius, g, kind, npoints, cap)).size - 1
                if k < g and _certify(radius, k, kind, npoints, cap) <= eps:
                    g = k
                return make(g)
            if delta < best_delta:
                best_g, best_delta = g, delta
            if g > first + 3:
                break
    if best_g is None or first is None:
        if not screens:             # even the start degree is above the limit
            screens[max_degree] = _screen(radius, max_degree, kind, cap)
        best_g = min(screens, key=screens.get)
        best_delta = _certify(radius, best_g, kind, npoints, cap)
    # a fallback to a lower-degree candidate: report that degree
    best_g = _effective(_coefficients(radius, best_g, kind, npoints, cap)).size - 1
    # the rounding floor of the degree's own fits (the selected polynomial may
    # be a lower-degree fallback, with a smaller floor but a larger error)
    own = ([_taylor_coef(best_g)] if kind == "taylor" or radius < _TINY_RADIUS
           else [a for a, _ in _candidates(radius, best_g, cap)])
    floor = min(_horner_floor(_effective(a), radius, cap) for a in own)
    if floor > 0.1 * eps:
        why = (f" Rounding alone limits it: float64 evaluation of p can err by "
               f"up to {floor:.2e} relative to e^x at x=-R (it grows like "
               "e^(2R)), so raising the degree limit will not help: accept a "
               "larger eps or use the exact method (method='exact').")
    else:
        why = (" Raise numbarope._config.MAX_DEGREE, accept a larger eps, or "
               "use the exact method (method='exact').")
    target = "exp" if cap is None else f"exp(c·tanh(x/c)), c={cap:g},"
    raise ValueError(
        f"cannot certify a {kind} polynomial approximation of {target} with relative "
        f"error eps={eps:g} on [-R, R], R={radius:g}: the best certified delta "
        f"is {best_delta:.3e} (degree {best_g}) within the degree limit "
        f"numbarope._config.MAX_DEGREE={max_degree}.{why}")


def exp_approximation(radius: float, eps: float | None = None, degree: int | None = None,
                      kind: Literal["chebyshev", "taylor"] = "chebyshev", *,
                      softcap: float | None = None) -> ExpApproximation:
    r"""Polynomial ``p`` with certified relative error to ``exp`` on ``[-R, R]``
    (or to ``exp(c·tanh(x/c))``, soft-capped logits).

    Parameters
    ----------
    radius : float, 0 <= radius <= 350
        ``R``; the approximation holds on ``[-R, R]`` (the logit radius of an
        attention head; Alman & Song 2025, §4).
    eps : float in (0, 1), optional
        Target relative error ``delta``: the smallest degree in
        ``0..numbarope._config.MAX_DEGREE`` whose certified bound is
        ``<= eps`` is chosen. Default ``1e-3`` when ``degree`` is not given.
    degree : int in [0, numbarope._config.MAX_DEGREE], optional
        Use this degree; the bound is certified but not compared with any
        target (it may exceed 1). Exclusive with ``eps``.
    kind : {"chebyshev", "taylor"}, default "chebyshev"
        ``"chebyshev"``: near-minimax fit for the relative error (Remez
        exchange steps for the weight ``e^{-x}``, see Notes); ``"taylor"``:
        ``a_k = 1/k!``.
    softcap : float > 0, optional
        ``c``: approximate the weight of soft-capped logits, ``f(x) =
        exp(c·tanh(x/c))`` (Gemma 2's ``attn_logit_softcapping``), instead of
        ``exp(x)``; ``"chebyshev"`` only. Everything below holds with
        ``e^{-x}`` replaced by ``e^{-φ(x)}``, ``φ(x) = c·tanh(x/c)`` (see Notes).

    Returns
    -------
    ExpApproximation
        Coefficients ``a_k`` (monomial basis, original variable), degree,
        radius, kind, certified ``error_bound`` and its method. Results are
        memoised on ``(radius, eps, degree, kind)`` and the config limits; the
        coefficient array is read-only.

    Raises
    ------
    TypeError
        Both ``eps`` and ``degree`` given; or an argument of the wrong type
        (non-real radius/eps, non-integer degree).
    ValueError
        ``radius`` negative, NaN, infinite or above 350; ``eps`` outside
        (0, 1); ``degree`` outside ``[0, MAX_DEGREE]``; unknown ``kind``;
        ``softcap`` not a finite number > 0, or with ``kind="taylor"``; or
        no degree ``<= MAX_DEGREE`` has a certified bound ``<= eps`` (the
        message gives R, eps, the best certified delta and the limit; for
        large ``R`` and small ``eps`` float64 rounding alone, which grows like
        ``e^{2R} g 2^{-53}``, can make the target unreachable).

    Notes
    -----
    **Construction.** With ``y = x / R``, ``"chebyshev"`` starts from the
    better (on a 2049-point Chebyshev grid) of the Chebyshev interpolant
    ``P(y) = sum_j c_j T_j(y)`` of ``e^{Ry}``, whose error decays like
    ``rho^{-g}`` for every ``rho > 1`` (Trefethen, ATAP, Thm 8.2, with
    ``e^{Ry}`` entire), and the least-squares fit of the relative error
    ``P(y) e^{-Ry} - 1``; then it runs at most 20 Remez exchange steps on
    ``max |P(y) e^{-Ry} - 1|``, the first reference being the alternating
    extrema of the start's error. The weighted start matters for
    ``R >~ 2``, where the interpolant's relative error concentrates at
    ``x = -R`` and Chebyshev points are a poor first reference. The
    conversion ``a_k = [y^k] P / R^k`` is done in exact arithmetic (it
    cancels heavily in floating point) and rounded once to float64. The
    start and its best Remez iterate are both candidates, and so are those
    of every lower degree (a degree-k polynomial is one of degree ``g > k``
    with zero leading coefficients): the candidate with the smallest
    certified bound (below) is returned, so a refinement is kept only if
    it lowers the certificate and ``error_bound`` never increases with
    ``degree``. Near the float64 rounding floor (large ``R`` or high
    degree), ``coef`` may therefore end in zeros; with ``eps=``, the
    degree returned is then the lower one.
    ``"taylor"`` has the a priori Lagrange bound
    ``|p(x) e^{-x} - 1| <= e^{max(x,0) - x} |x|^{g+1} / (g+1)! <=
    e^R R^{g+1} / (g+1)!``; the a posteriori bound below is reported instead
    because it is sharper.

    **Certificate.** Let ``f(x) = p(x) e^{-x} - 1`` with ``p`` the exact
    polynomial of the stored float64 coefficients. The returned

    .. math::

        \delta = \max_i \Big[\tfrac{F_i + F_{i+1}}{2} + \tfrac{L_i h_i}{2}\Big]
                 + \gamma_{2g}\, e^{R} \sum_k |a_k| R^k

    bounds ``sup_{|x|<=R} |fl(p(x)) e^{-x} - 1|`` where ``fl(p(x))`` is the
    float64 Horner value, because:

    1. On the grid ``x_0 = -R < ... < x_{N-1} = R`` (``N =
       numbarope._config.CERTIFY_GRID``), ``f(x_i)`` is evaluated in long
       double; ``F_i = |f^(x_i)| + 2 gamma^L_{2g+10} (S(x_i) e^{-x_i} + 2)``,
       ``S(x) = sum_k |a_k| |x|^k``, bounds ``|f(x_i)|`` (Horner error
       bound of Higham §5.1, eq. (5.3), in the long-double unit roundoff,
       plus a 4-ulp allowance for ``exp`` and the product and subtraction).
    2. ``f' = (p' - p) e^{-x}``. On each of 512 pieces ``[c, c + w]`` the
       polynomial ``q = p' - p`` is Taylor-shifted exactly to ``c`` (its
       rounding bounded by the same recurrence run on ``|q|``), giving
       ``L >= sup |f'|`` there. For a cell ``[x_i, x_{i+1}]`` of length
       ``h_i``, ``|f(x)| <= min(F_i + L (x - x_i), F_{i+1} + L (x_{i+1} - x))
       <= (F_i + F_{i+1})/2 + L h_i / 2``.
    3. ``|fl(p(x)) - p(x)| <= gamma_{2g} S(|x|) <= gamma_{2g} S(R)`` (Higham
       eq. (5.3), valid with or without fused multiply-add) and
       ``e^{-x} <= e^R``, which adds the last term; it is the float64
       rounding floor, ``~ 2g 2^{-53} e^{2R}``.

    **Soft-capped logits** (``softcap=c``): the target is ``e^{φ(x)}``, ``φ(x) =
    c·tanh(x/c)``, so the fits use the weight ``e^{-φ}`` and the certificate bounds
    ``f(x) = p(x) e^{-φ(x)} - 1``. Step 1 adds the long-double rounding of φ
    (at most ``7 u_L R``, turned by the exponential into a relative error);
    step 2 uses ``|f'| = |p' − φ'p| e^{-φ} <= (|p'| + |p|) e^{-φ}`` (``0 < φ'
    <= 1``), each of ``max|p'|``, ``max|p|`` on a piece by the same exact
    Taylor shift, and ``e^{-φ}`` at the piece's left end (φ increasing);
    step 3 uses ``e^{-φ(x)} <= e^{φ(R)} <= e^R``. Every attention weight
    ``p(s q_iᵀk_j)`` is then within ``1 ± δ`` of ``exp(c·tanh(s q_iᵀk_j/c))``, as
    for exp, so the fast path's bound holds unchanged.

    Trailing zero coefficients are dropped before the bound is computed
    (``g`` is then the degree of the rest): Horner's rule on them is exact
    (``0 * x + a_k = a_k``), so neither ``p`` nor ``fl(p(x))`` changes.
    Small safety factors cover the float64 arithmetic of the bound itself.
    The result is an upper bound on the true error that is typically within
    a factor 1.1 of it, except near the rounding floor where the worst-case
    Horner bound dominates.

    References
    ----------
    .. [1] J. Alman and Z. Song, "Fast RoPE Attention: Combining the
       Polynomial Method and Fast Fourier Transform", arXiv:2505.11892, 2025
       (the polynomial method: exp replaced by a low-degree polynomial on the
       bounded logit interval).
    .. [2] L. N. Trefethen, *Approximation Theory and Approximation Practice*,
       SIAM, 2013 (extended edition 2019), Ch. 8 (Thm 8.2: convergence of
       Chebyshev interpolants of analytic functions) and Ch. 10 (minimax,
       Remez).
    .. [3] N. J. Higham, *Accuracy and Stability of Numerical Algorithms*,
       2nd ed., SIAM, 2002, §5.1 (Horner's method: error bound (5.3) and
       running error bound).

    Examples
    --------
    >>> from numbarope.polynomial import exp_approximation
    >>> p = exp_approximation(1.0, eps=1e-6)
    >>> p.degree
    7
    >>> p.error_bound <= 1e-6
    True
    >>> abs(p(0.5) / 1.6487212707001282 - 1) <= p.error_bound
    True
    >>> exp_approximation(1.0, degree=6, kind="taylor").error_bound > 1e-4
    True
    >>> q = exp_approximation(4.0, eps=1e-3, softcap=5.0)
    >>> x = 3.0
    >>> abs(q(x) / math.exp(5.0 * math.tanh(x / 5.0)) - 1) <= q.error_bound <= 1e-3
    True
    """
    max_degree = int(_config.MAX_DEGREE)
    npoints = int(_config.CERTIFY_GRID)
    _check_kind(kind)
    r = _check_radius(radius)
    if eps is not None and degree is not None:
        raise TypeError(f"pass either eps or degree, not both (got eps={eps!r}, "
                        f"degree={degree!r}); eps selects the smallest degree "
                        "meeting it, degree fixes it")
    cap = _check_softcap(softcap, kind)
    if degree is not None:
        return _exp_approximation(r, None, _check_degree(degree, max_degree),
                                  kind, max_degree, npoints, cap)
    e = _check_eps(1e-3 if eps is None else eps)
    return _exp_approximation(r, e, None, kind, max_degree, npoints, cap)


def degree_for(radius: float, eps: float,
               kind: Literal["chebyshev", "taylor"] = "chebyshev") -> int:
    """Smallest degree whose certified relative error on ``[-R, R]`` is <= eps.

    Parameters
    ----------
    radius : float, 0 <= radius <= 350
        ``R``.
    eps : float in (0, 1)
        Target relative error ``delta``.
    kind : {"chebyshev", "taylor"}, default "chebyshev"

    Returns
    -------
    int
        ``exp_approximation(radius, eps=eps, kind=kind).degree``.

    Raises
    ------
    TypeError, ValueError
        As :func:`exp_approximation` (including when no degree up to
        ``numbarope._config.MAX_DEGREE`` reaches ``eps``).

    Examples
    --------
    >>> from numbarope.polynomial import degree_for
    >>> degree_for(0.5, 1e-3)
    3
    >>> degree_for(0.5, 1e-3, kind="taylor")
    4
    """
    return exp_approximation(radius, eps=eps, kind=kind).degree
