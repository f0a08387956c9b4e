"""Dense float64 references of the separable fast algorithms (tests/ops/test_*.py).

* :func:`poly_rows`: ``Σ_j p(s q_i·k_j) T(i−j) [v_j, 1]`` over the visible real keys by
  explicit loops over the rows (gemm, prefix, fft);
* :class:`Dense`: the same over all pairs at once with any ``log T``, weights relative to
  the row's largest visible T (decay, window), with ``p`` or with ``exp`` (true softmax);
* :func:`inputs`: q, k with a chosen logit radius, v uniform in [−1, 1].
"""

import numpy as np
from numpy.polynomial.polynomial import polyval


def bounded(rng, shape, R, scale):
    """Rows scaled so that scale·max‖q‖·max‖k‖ = R exactly."""
    c = np.sqrt(R / scale)
    out = []
    for _ in range(2):
        x = rng.standard_normal(shape)
        x /= np.linalg.norm(x, axis=-1, keepdims=True).max()
        out.append(x * c)
    return out


def separable_inputs(rng, n, E=4, Ev=3, R=1.0):
    s = 1.0 / np.sqrt(E)
    q, k = bounded(rng, (n, E), R, s)
    return q, k, rng.uniform(-1, 1, (n, Ev)), s


def poly_square(q, k, v, scale, coef, causal):
    """Dense reference of the fast path itself: weights p(s·q_iᵀk_j), masked, normalised."""
    P = polyval(scale * (q @ k.T), coef)
    if causal:
        P = np.tril(P)
    return (P @ v) / P.sum(axis=1, keepdims=True)


def poly_rows(q, k, v, s, coef, off=0, causal=False, keep=None, T=None):
    """Σ_j p(s q_i·k_j) T(i−j) [v_j, 1] over visible real keys, by dense loops."""
    L, S = q.shape[0], k.shape[0]
    j = np.arange(S)
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        w = polyval(s * (k @ q[i]), coef)
        if T is not None:
            w = w * T[i - j + S - 1]
        if causal:
            w = np.where(j <= i + off, w, 0.0)
        if keep is not None:
            w = w * keep
        if w.sum() > 0:
            out[i] = w @ v / w.sum()
    return out


def decay_log(rate, causal):
    """log T(t) for the decay, −inf where masked."""
    def f(t):
        with np.errstate(invalid="ignore"):
            lt = -rate * np.abs(t).astype(float)
        lt[t == 0] = 0.0                                 # rate = inf: 0·inf
        if causal:
            lt[t < 0] = -np.inf
        return lt
    return f


def window_log(left, right):
    return lambda t: np.where((t >= -right) & (t <= left), 0.0, -np.inf)


class Dense:
    """Dense ``Σ_j w(s q_iᵀk_j) T(t_ij) [v_j, 1]`` over all pairs, T relative to the row's
    largest visible T; ``weight`` = p (coefficients) or None for exp. The pair weights
    are formed once, each ``__call__(logT)`` applies one T; returns (out, den)."""

    def __init__(self, q, k, v, scale, offset=0, key_mask=None, weight=None):
        L, S = q.shape[0], k.shape[0]
        self.t = np.arange(L)[:, None] + offset - np.arange(S)[None, :]
        x = scale * (q @ k.T)
        self.W = np.exp(x) if weight is None else polyval(x, weight)
        self.v = v
        self.key_mask = key_mask

    def __call__(self, logT):
        lt = logT(self.t)
        if self.key_mask is not None:
            lt[:, ~self.key_mask] = -np.inf
        top = lt.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0
        W = np.exp(lt - top) * self.W
        num, den = W @ self.v, W.sum(axis=1)
        out = np.zeros_like(num)
        ok = den > 0
        out[ok] = num[ok] / den[ok, None]
        return out, den


def dense(q, k, v, scale, logT, offset=0, key_mask=None, weight=None):
    """One-off :class:`Dense`."""
    return Dense(q, k, v, scale, offset, key_mask, weight)(logT)


def inputs(rng, L, S, E=4, Ev=3, R=1.0, G=None):
    """q, k with s·max‖q‖·max‖k‖ = R at s = 1/sqrt(E), v uniform in [−1, 1]."""
    s = 1.0 / np.sqrt(E)
    q = rng.standard_normal((L, E) if G is None else (G, L, E))
    k = rng.standard_normal((S, E))
    q *= np.sqrt(R / s) / np.linalg.norm(q, axis=-1).max()
    k *= np.sqrt(R / s) / np.linalg.norm(k, axis=-1).max()
    return q, k, rng.uniform(-1, 1, (S, Ev)), s


#: fast vs dense polynomial: rounding only (relative to max|v|)
TOL = 1e-12


def agree(got, ref, tol=TOL):
    out, den = got
    rout, rden = ref
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(den))
    assert np.abs(out - rout).max(initial=0.0) <= tol
    assert np.all(np.abs(den - rden) <= tol * np.abs(rden))
