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
:func:`numbarope.ops._bounds.rounding_term`) are here, and a backward
(:func:`toeplitz_fft_backward`: the exact attention's gradients with the forward's
weights, block-Toeplitz products of degree up to g + 1; a slower path, reachable as
a function only — the pipeline refuses ``relative=`` with inputs that require grad).

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
from ._features import (features, monomial_pairs, monomial_table, n_features, pair_weights,
                        symmetric_power)
from ._toeplitz import circulant_spectrum, fft_length, toeplitz_visibility
from .registry import Algorithm, Reason, register

__all__ = ["fast_general", "general_features", "toeplitz_fft_memory", "ToeplitzFFT",
           "toeplitz_fft_backward"]


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

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, relative=None, workers=None):
        """:func:`toeplitz_fft_backward` (the slower path of general W_t; ``relative``
        required, ``structure`` and ``offset`` not read: ``T`` carries them). No
        ``gradient_bound``: the info reports NaN for these heads."""
        if relative is None:
            raise ValueError("toeplitz-fft needs the relative matrices W_t (relative=)")
        return toeplitz_fft_backward(q, k, v, out, den, dout, scale, coef, relative, T,
                                     key_mask=key_mask, workers=workers)

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=40, E=2)
        W = rng.standard_normal((2 * 40 - 1, 2, 2))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
        return q, k, v, dict(relative=W, is_causal=True)


register(ToeplitzFFT())


# ------------------------------------------------------------------ the backward

def _general_backward(q, k, v, out, den, dout, scale, coef, relative, T, keep, nw):
    """:func:`toeplitz_fft_backward` of one query head: ``(dq, dk, dv)``."""
    L, E = q.shape
    S, Ev = v.shape
    g = len(coef) - 1
    sq = float(np.sqrt(scale))
    qs = np.ascontiguousarray(q * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    v64 = np.asarray(v, dtype=np.float64)
    dq = np.zeros((E, L))
    dk = np.zeros((E, S))
    dv = np.zeros((Ev, S))
    rows, seen = toeplitz_visibility(T, L, S, keep)
    Ob = np.asarray(out, dtype=np.float64).reshape(L, Ev)
    dO = np.asarray(dout, dtype=np.float64).reshape(L, Ev)
    D = np.asarray(den, dtype=np.float64).reshape(L)
    ok = rows & (D > 0)
    if not ok.any():
        return dq.T, dk.T, dv.T
    inv = np.zeros(L)
    inv[ok] = 1.0 / D[ok]
    delta = np.einsum("ic,ic->i", dO, Ob)                   # Δ̃_i = dO_i·õ_i
    A = np.concatenate([dO * (inv * sq)[:, None], -(delta * inv * sq)[:, None]], axis=1)
    X = np.concatenate([dO * inv[:, None], (delta * inv)[:, None]], axis=1)
    B = np.concatenate([v64 * sq, np.full((S, 1), -sq)], axis=1)
    vext = _extended(v64, None if keep is None else keep.astype(np.float64))
    M1, _, _, ptr, pe, pa = monomial_pairs(E, g)
    start, _, _, multi = monomial_table(E, g + 1)
    cw = pair_weights(coef, E, g)
    ones = np.ones(M1)
    Qm = features(qs, E, g + 1, ones, workers=nw)          # (M1, L): q'^β, unweighted
    Km = features(ks, E, g + 1, ones, workers=nw)          # (M1, S)
    N = fft_length(L, S)
    coef = np.asarray(coef, dtype=np.float64)
    for d in range(g + 2):
        lo, hi = int(start[d]), int(start[d + 1])
        md = hi - lo
        grad_qk = d >= 1 and coef[d - 1] != 0.0            # dq, dk: pairs of degree d − 1
        grad_v = d <= g and coef[d] != 0.0
        if not (grad_qk or grad_v):
            continue
        M = symmetric_power(relative, d, workers=nw)       # (L+S−1, md, md)
        M *= np.asarray(T, dtype=np.float64)[:, None, None]
        Xh = sfft.rfft(Qm[lo:hi].T[:, :, None] * X[:, None, :], n=N, axis=0, workers=nw)
        Zh = np.zeros_like(Xh)                              # (F, md, Ev+1)
        Uh = None
        if grad_qk:
            Uh = sfft.rfft(Km[lo:hi].T[:, :, None] * vext[:, None, :], n=N, axis=0,
                           workers=nw)
        mb = _block_columns(N, 16 * md * 2, md)
        for a0 in range(0, md, mb):
            a1 = min(a0 + mb, md)
            Ch = circulant_spectrum(np.ascontiguousarray(M[:, a0:a1, :]), L, N, nw, S=S)
            # transposed products Σ_i K(i−j)ᵀ X_i: the conjugate transposed spectrum
            Zh += np.matmul(np.conj(Ch).transpose(0, 2, 1), Xh[:, a0:a1, :])
            if grad_qk:
                Y = sfft.irfft(np.matmul(Ch, Uh), n=N, axis=0, workers=nw)[:L]
                Y /= multi[lo + a0:lo + a1][None, :, None]    # rows of C_d = M_d/multi
                t = np.einsum("igc,ic->gi", Y, A)            # (a1 − a0, L)
                _undo_pairs(dq, t, lo + a0, lo + a1, ptr, pe, pa, cw, Qm)
            del Ch
        del M, Uh, Xh
        Z = sfft.irfft(Zh, n=N, axis=0, workers=nw)[:S]    # (S, md, Ev+1)
        Z /= multi[lo:hi][None, :, None]
        if grad_qk:
            _undo_pairs(dk, np.einsum("jgc,jc->gj", Z, B), lo, hi, ptr, pe, pa, cw, Km)
        if grad_v:
            dv += np.einsum("g,gj,jgc->cj", cw[lo:hi], Km[lo:hi], Z[:, :, :Ev])
    if not seen.all():
        dk[:, ~seen] = 0.0
        dv[:, ~seen] = 0.0
    return dq.T, dk.T, dv.T


def _undo_pairs(out, t, b0, b1, ptr, pe, pa, cw, Mon):
    """``out[e] += cw[α]·Mon[α]·t[γ − b0]`` for the pairs (e, α) of monomials b0 <= γ <
    b1 (``x^γ = x^α·x_e``), in a fixed order."""
    for gam in range(b0, b1):
        for p in range(ptr[gam], ptr[gam + 1]):
            out[pe[p]] += cw[pa[p]] * Mon[pa[p]] * t[gam - b0]


def toeplitz_fft_backward(q, k, v, out, den, dout, scale, coef, relative, T=None, *,
                          key_mask=None, workers=None):
    r"""Fast gradients of attention with general relative matrices W_t (the
    toeplitz-fft algorithm's backward; a slower path, reachable as a function).

    The gradients of the EXACT attention with logits ``x_ij = s·q_iᵀW_{i−j}k_j`` and
    weights ``T(i−j)e^{x_ij}`` (``A_ij`` normalised), with the forward's weights
    ``P̃_ij = T(i−j)p(x_ij)/D_i`` in place of A and its output õ (as
    :func:`numbarope.ops.fft.fft_backward`; Dao 2023, §3.2; Chen et al. 2024):
    ``dQ_i = s Σ_j dX_ij W_{i−j}k_j``, ``dK_j = s Σ_i dX_ij W_{i−j}ᵀq_i``, ``dV_j =
    Σ_i P̃_ij dO_i``, ``dX_ij = P̃_ij(dO_i·v_j − Δ̃_i)``. With ``u = W k'`` (q' = √s q,
    k' = √s k), ``p(q'ᵀu)u_e = Σ_{|α|<=g} c_α q'^α u^{α+e_e}``, ``c_α = a_|α|·|α|!/α!``,
    and ``u^γ = Σ_β C_d(W)[γ, β] k'^β`` with ``C_d = M_d/(d!/γ!)`` (the rows of the
    symmetric power :func:`numbarope.ops._features.symmetric_power`, d = |γ|); by
    ``M_d(Wᵀ) = M_d(W)ᵀ`` the key side is the same with the transposed blocks. So for
    every degree d = 0 .. g + 1 (Alman & Song 2025, §5, block-Toeplitz products)::

        Y_i[γ] = Σ_j T(i−j) Σ_β C_d(W_{i−j})[γ, β] k'^β_j [v_j, 1]            (rows)
        Z_j[γ] = Σ_i T(i−j) Σ_β M_d(W_{i−j})[β, γ] q'^β_i [dO_i, Δ̃_i]/D_i / (d!/γ!)
        dQ_ie = (√s/D_i) Σ_α c_α q'^α_i [Σ_c dO_ic Y_i[α+e_e]_c − Δ̃_i Y_i[α+e_e]_Ev]
        dK_je = √s Σ_α c_α k'^α_j [Σ_c v_jc Z_j[α+e_e]_c − Z_j[α+e_e]_Ev]
        dV_jc = Σ_α c_α k'^α_j Z_j[α]_c

    the transposed products through the conjugate transposed spectrum. With ``W_t =
    I`` this is :func:`~numbarope.ops.fft.fft_backward`.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries (G query heads: one after the other, dk and dv summed).
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output (:func:`fast_general`).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators.
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
    coef : (g+1,) ndarray of float64
        The forward's polynomial.
    relative : (L+S−1, E, E) ndarray of float64
        ``relative[i − j + S − 1] = W_t``, as :func:`fast_general`.
    T : (L+S−1,) ndarray of float64, optional
        The forward's weights ``exp(b_t − max b)`` (causal zeros included); ones if
        None.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0``.
    workers : int, optional
        Threads of the symmetric powers, the features and scipy.fft; the result does
        not depend on it.

    Returns
    -------
    dq : (L, E) or (G, L, E) ndarray of float64
        Rows that see no real key get 0.
    dk : (S, E) ndarray of float64
        Summed over the query heads; 0 on padded keys and keys no row sees.
    dv : (S, Ev) ndarray of float64

    Raises
    ------
    ValueError
        ``relative`` or ``T`` of the wrong shape.

    Notes
    -----
    **Cost.** Per degree d <= g + 1 the forward's work at degree d twice (the row
    and the transposed products, each ``m_d²`` kernel sequences, ``m_d·(Ev+1)``
    columns each way, a ``(m_d × m_d)·(m_d × (Ev+1))`` product per frequency), i.e.
    about twice the forward of degree g + 1, plus one symmetric power per degree:
    slower than the separable :func:`~numbarope.ops.fft.fft_backward` by the kernel's
    ``m_d`` factor. **Memory**: the forward's at degree g + 1 (the stored
    ``M_d(W_t)``, the spectra of a block), and the monomials of degree <= g + 1 of q
    and k. **Accuracy**: the approximation is the forward's (ε of the weights, as
    :func:`numbarope.ops.fft.fft_gradient_bound` with ``R >= s·max|q_iᵀW_t k_j|``
    and ``κ_k``, ``κ_q`` replaced by the maxima of ``|W_t k_j|``, ``|W_tᵀq_i|``); no
    bound function is given here (the pipeline cannot reach this backward yet).
    **Threads**: no numba kernel of its own; the result does not depend on
    ``workers``.

    References
    ----------
    J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
    Fourier Transform", arXiv:2505.11892 (2025), §5.
    Y. Chen, J. Huo, X. Li, Y. Liang, Z. Shi, Z. Song, "Fast Gradient Computation for
    RoPE Attention in Almost Linear Time", arXiv:2412.17316 (2024).
    T. Dao, "FlashAttention-2", arXiv:2307.08691 (2023), §3.2.
    """
    Q = np.asarray(q, dtype=np.float64)
    single = Q.ndim == 2
    Q = Q[None] if single else Q
    G, L, E = Q.shape
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    S, Ev = v.shape
    if k.shape != (S, E):
        raise ValueError(f"shapes q {Q.shape}, k {k.shape}, v {v.shape} do not match")
    Ob = np.asarray(out, dtype=np.float64).reshape(G, L, Ev)
    dO = np.asarray(dout, dtype=np.float64).reshape(G, L, Ev)
    D = np.asarray(den, dtype=np.float64).reshape(G, L)
    dq = np.zeros((G, L, E))
    dk = np.zeros((S, E))
    dv = np.zeros((S, Ev))
    if L and S:
        relative = np.asarray(relative, dtype=np.float64)
        if relative.shape != (L + S - 1, E, E):
            raise ValueError(f"toeplitz-fft: relative has shape {relative.shape}, expected "
                             f"(L + S − 1, E, E) = {(L + S - 1, E, E)}")
        T = np.ones(L + S - 1) if T is None else np.asarray(T, dtype=np.float64).reshape(-1)
        if T.shape[0] != L + S - 1:
            raise ValueError(f"toeplitz-fft: T has {T.shape[0]} entries, expected "
                             f"L + S − 1 = {L + S - 1}")
    keep = None
    if key_mask is not None:
        keep = np.asarray(key_mask, dtype=bool).reshape(S)
        if keep.all():
            keep = None
    if G * L == 0 or S == 0 or Ev == 0 or (keep is not None and not keep.any()):
        return (dq[0] if single else dq), dk, dv
    nw = resolve_workers(workers)
    for h in range(G):
        a, b, c = _general_backward(Q[h], k, v, Ob[h], D[h], dO[h], scale,
                                    np.asarray(coef, dtype=np.float64), relative, T, keep, nw)
        dq[h] = a
        dk += b
        dv += c
    return (dq[0] if single else dq), dk, dv
