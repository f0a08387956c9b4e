"""General relative matrices W_t ("toeplitz-fft"): the block-Toeplitz FFT algorithm.

Every attention weight ``exp(s·q_iᵀW_{i−j}k_j + b_{i−j})`` is replaced by
``p(q'_iᵀW_{i−j}k'_j)·T(i−j)`` with ``p(x) = Σ_k a_k x^k ≈ eˣ`` certified on the
logit interval (:mod:`numbarope.polynomial`), ``q' = √s q``, ``k' = √s k`` and
``T(t) = exp(b_t − max b)`` (the bias, exact). For each degree k,

    (q'ᵀW_t k')^k = Σ_{|α|=|β|=k} q'^α M_k(W_t)[α, β] k'^β,

with ``M_k(W_t)`` the k-th symmetric power of W_t in the monomial basis
(:func:`numbarope.ops._features.symmetric_power`), so the sum over j is a
block-Toeplitz product with ``m_k × m_k`` blocks ``M_k(W_t)·T(t)``, done per frequency
through a circulant embedding (:mod:`numbarope.ops._toeplitz`): ``Σ_k m_k²``
Toeplitz sequences (:func:`general_features`) instead of C(E²+g, g).

The class, its kernel (:func:`fast_general`), its memory
(:func:`toeplitz_fft_memory`), its cost and its rounding allowance (the polynomial
method's proof plus the FFT's estimated rounding,
:func:`numbarope.ops._bounds.rounding_term`) are here.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §5 (FFT algorithm).
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (2002), §24.1.
"""

import numpy as np
import scipy.fft as sfft

from .. import _config
from .. import bias as _bias
from .._runtime.threads import resolve_workers
from ._bounds import rounding_term
from ._common import _block_columns, _example_qkv, _extended, _finish, base_memory
from ._cost import COST_CONSTANTS
from ._features import features, monomial_table, n_features, symmetric_power
from ._toeplitz import circulant_spectrum, fft_length
from .registry import Algorithm, Reason, register

__all__ = ["fast_general", "general_features", "toeplitz_fft_memory", "ToeplitzFFT"]


def general_features(E, degree):
    """Σ_k m_k² with m_k = C(E+k−1, k): Toeplitz sequences of the general path."""
    return int(sum((n_features(E, k) - (n_features(E, k - 1) if k else 0)) ** 2
                   for k in range(degree + 1)))


def toeplitz_fft_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes) of one head of the general path (estimate, upper
    side): the float64 copies (:func:`numbarope.ops._common.base_memory`), the largest
    degree's symmetric powers M_k(W_t) and its predecessor, the key-side spectrum and
    its product, one block of circulant spectra, and all monomials of q and k.

    Parameters
    ----------
    n, E, Ev, degree : int
        Query rows n (= L), head_dim, value columns, polynomial degree.
    S : int, optional
        Key rows (default n).
    heads : int, optional
        Query heads computed together on one key/value head.
    """
    S = n if S is None else S
    nq = n * heads
    m = n_features(E, degree)
    ev1 = Ev + 1
    base = base_memory(n, S, E, Ev, heads)
    N = fft_length(n, S)
    F = N // 2 + 1
    mk = n_features(E, degree) - n_features(E, degree - 1) if degree > 0 else 1
    sym = 8 * 2 * (n + S - 1) * mk * mk               # M_k(W_t) and its predecessor
    uhat = 16 * F * mk * ev1 * 2                       # key-side spectrum + product
    block = min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * mk * mk)
    return base + sym + uhat + block + 8 * (nq + S) * m   # + all monomials of q and k


def fast_general(q, k, v, scale, coef, relative, T, workers=None, *, key_mask=None):
    """Fast attention of one head with general relative matrices (block-Toeplitz FFT).

    Parameters
    ----------
    q : (L, E) ndarray of float64
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
    relative : (L+S−1, E, E) ndarray of float64
        ``relative[i − j + S − 1] = W_t`` (square, L = S = n: ``relative[t + n − 1]``;
        rectangular: t = i + query_offset − j, the offset only names the entries).
    T : (L+S−1,) ndarray of float64
        ``exp(b_t − max b)`` with causal zeros; ones when there is no bias.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys' rows of ``[v, 1]`` are zero.
    workers : int, optional
        Threads for the symmetric powers, the features and scipy.fft (scipy.fft's
        meaning; None: :func:`numbarope.get_workers`).

    Returns
    -------
    out : (n, Ev) ndarray of float64
    den : (n,) ndarray of float64

    Notes
    -----
    ``num_i = Σ_k a_k Σ_α q'_i^α Σ_j Σ_β M_k(W_{i−j})[α,β] T(i−j) k'_j^β [v_j, 1]``:
    for each degree k the key-side sequence ``k'^β ⊗ [v, 1]`` is transformed once,
    the kernel ``M_k(W_t)·T(t)`` in blocks of rows α, multiplied per frequency
    (a small matrix product), transformed back and contracted with ``q'^α``
    (Alman & Song 2025, §5; grouping by monomials gives Σ_k m_k² Toeplitz
    sequences instead of C(E²+g, g)).
    """
    L, E = q.shape
    S, Ev = v.shape
    if L == 0 or S == 0:
        return np.zeros((L, Ev)), np.zeros(L)
    g = len(coef) - 1
    sq = np.sqrt(scale)
    qs = np.ascontiguousarray(q * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    vext = _extended(np.asarray(v, dtype=np.float64),
                     None if key_mask is None else np.asarray(key_mask, np.float64))
    nw = resolve_workers(workers)
    N = fft_length(L, S)
    start, _, _, _ = monomial_table(E, g)
    ones = np.ones(start[-1])
    Qm = features(qs, E, g, ones, workers=nw).T     # unweighted monomials q'^α, (n, m) view
    Km = features(ks, E, g, ones, workers=nw).T
    num = np.zeros((L, Ev + 1))
    for deg in range(g + 1):
        a = coef[deg]
        if a == 0.0:
            continue
        lo, hi = start[deg], start[deg + 1]
        mk = hi - lo
        M = symmetric_power(relative, deg, workers=nw)
        M *= T[:, None, None]
        U = Km[:, lo:hi, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=nw)      # (F, mk, Ev+1)
        del U
        mb = _block_columns(N, 16 * mk * 2, mk)
        for a0 in range(0, mk, mb):
            a1 = min(a0 + mb, mk)
            Ch = circulant_spectrum(np.ascontiguousarray(M[:, a0:a1, :]), L, N, nw, S=S)
            Yh = np.matmul(Ch, Uh)                            # (F, mb, Ev+1)
            del Ch
            Y = sfft.irfft(Yh, n=N, axis=0, workers=nw)[:L]
            del Yh
            num += a * np.einsum("ia,iae->ie", Qm[:, lo + a0:lo + a1], Y)
        del M, Uh
    return _finish(num, Ev)


class ToeplitzFFT(Algorithm):
    """General relative matrices W_t: block-Toeplitz products per degree, per
    frequency (Alman & Song 2025, §5; Σ_k m_k² sequences; :func:`fast_general`)."""

    name = "toeplitz-fft"
    bound_kind = "estimated"
    general = True
    structures = (_bias.RelativeBias,)

    def unavailable(self, h):
        why = super().unavailable(h)
        if h.row_mass <= 0:
            why.append(Reason("row-mass", "a row that sees a key has relative weights that "
                                          "underflow to 0"))
        return why

    def features(self, E, degree):
        return general_features(E, degree)

    def rounding(self, h, coef, delta):
        return rounding_term(h.S, n_features(h.E, len(coef) - 1), coef, h.radius, h.radius1,
                             delta, fft_length(h.n, h.S), h.row_mass)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        E, n, S, ev1 = h.E, h.n, h.S, h.Ev + 1
        N = fft_length(n, S)
        nlog = N * np.log2(max(N, 2))
        F = N // 2 + 1
        t = c["feature"] * (n + S) * n_features(E, degree)
        for k in range(degree + 1):
            mk = n_features(E, k) - (n_features(E, k - 1) if k else 0)
            mprev = n_features(E, k - 1) - (n_features(E, k - 2) if k > 1 else 0) if k else 1
            t += c["sympow"] * (n + S) * mk * mprev * E
            t += c["fft_flop"] * (mk * mk + 2 * mk * ev1) * nlog
            t += c["cmul"] * 4 * F * mk * mk * ev1 + c["exact_flop"] * n * mk * ev1
        return t

    def memory(self, h, degree):
        return toeplitz_fft_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`fast_general` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`). ``relative`` (L+S−1, E, E) is
        required; ``T`` (L+S−1,) carries the structure (its causal zeros included;
        None: ones), so ``structure`` and ``offset`` are not read. ``q`` may be
        (G, L, E): the G query heads are computed one after the other. No key-side
        state: ``initial_state`` / ``return_state`` raise ValueError."""
        if initial_state is not None or return_state:
            raise ValueError("toeplitz-fft has no key-side state (initial_state= and "
                             "return_state= are for the separable algorithms)")
        if relative is None:
            raise ValueError("toeplitz-fft needs the relative matrices W_t (relative=)")
        q = np.asarray(q)
        if T is None:
            T = np.ones(q.shape[-2] + k.shape[0] - 1)
        if q.ndim == 2:
            return fast_general(q, k, v, scale, coef, relative, T, workers,
                                key_mask=key_mask)
        res = [fast_general(qg, k, v, scale, coef, relative, T, workers, key_mask=key_mask)
               for qg in q]
        L, Ev = q.shape[1], np.shape(v)[1]
        if not res:
            return np.zeros((0, L, Ev)), np.zeros((0, L))
        return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=40, E=2)
        W = rng.standard_normal((2 * 40 - 1, 2, 2))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
        return q, k, v, dict(relative=W, is_causal=True)


register(ToeplitzFFT())
