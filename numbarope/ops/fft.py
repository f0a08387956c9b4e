"""Any relative bias with separable logits: circulant embedding, blocked over features.

Given ``p(x) = Σ_{k<=g} a_k x^k`` with ``|p(x)/eˣ − 1| <= δ`` on ``[−R, R]`` (see
:mod:`numbarope.polynomial`), every attention weight ``exp(s·q_iᵀk_j + b_t)``,
``t = i + offset − j``, is replaced by ``p(q'_iᵀk'_j)·T(t)`` with ``T(t) = exp(b_t −
max b)`` (the bias is exact) and ``q' = √s q``, ``k' = √s k``. The polynomial method
(Alman & Song 2025, §4) writes ``p(q'ᵀk') = φ(q')ᵀψ(k')`` with ``m = C(E+g, g)``
symmetric monomial features, so

    num_i = Σ_α φ_α(q'_i) Σ_j T(i − j) ψ_α(k'_j) [v_j, 1]

is, for each feature α and value column, a Toeplitz product: ``m·(Ev+1)`` circular
convolutions of length ``N = next_fast_len(L + S − 1)`` (circulant embedding,
:mod:`numbarope.ops._toeplitz`; Alman & Song 2025, §5), blocked over features so that
a block holds ``_config.FFT_BLOCK_BYTES`` — never an ``n × m × Ev`` array. Work
``O((G·L + S)·m + m·(Ev+1)·N log N)``.

It serves every relative bias (:class:`numbarope.bias.RelativeBias`: decay, windows,
T5 buckets, dense arrays, sums of them) through T; the structured ones also have
cheaper algorithms without an FFT (:mod:`~numbarope.ops.gemm`,
:mod:`~numbarope.ops.prefix`, :mod:`~numbarope.ops.decay`, :mod:`~numbarope.ops.window`).
Its rounding is an estimate (:func:`numbarope.ops._bounds.rounding_term` with the FFT
length: Higham 2002, §24.1), so its bound is "estimated". No state in or out: a
Toeplitz product has no carried key-side state.

Backward (:func:`fft_backward`, :meth:`FFT.backward`): the exact attention's gradients
with the forward's weights (Chen et al. 2024), every sum over keys a Toeplitz product
and every sum over rows a transposed one, by FFT over the ``C(E+g+1, g+1)·(Ev+1)``
monomial columns of degree <= g + 1 (the products of a feature and a coordinate);
its bound :func:`fft_gradient_bound` is "estimated" as the forward's (the FFTs'
rounding), the rest proven.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025): §4 (polynomial method, rescaled
Toeplitz decomposition), §5 (FFT algorithm).
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §24.1.
"""

import math

import numpy as np
import scipy.fft as sfft
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._bounds import _gamma, _gradient_terms, rounding_term
from ._common import (_FM, _block_columns, _example_qkv, _extended, _finish, _ranges,
                      _row_blocks, _setup, base_memory)
from ._cost import COST_CONSTANTS
from ._features import feature_weights, features, monomial_pairs, n_features, pair_weights
from ._toeplitz import circulant_spectrum, fft_length, toeplitz_visibility
from .registry import Algorithm, Reason, register

__all__ = ["FFT", "fft_attention", "fft_memory", "toeplitz_weights", "fft_backward",
           "fft_backward_memory", "fft_gradient_bound"]


def fft_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`fft_attention`: the
    copies (:func:`numbarope.ops._common.base_memory`), φ(Q) and ψ(K) in full and one
    block of (N, mb, Ev+1) real arrays and spectra. Parameters as
    :func:`numbarope.ops.gemm.gemm_memory`."""
    S = n if S is None else S
    m = n_features(E, degree)
    ev1 = Ev + 1
    N = fft_length(n, S)
    F = N // 2 + 1
    return (base_memory(n, S, E, Ev, heads) + 8 * (n * heads + S) * m
            + min(_config.FFT_BLOCK_BYTES * 3, 3 * 16 * F * m * ev1))


def toeplitz_weights(structure, L, S, offset=0):
    """``T = exp(b − max b)`` of one head's relative structure in the storage of an
    L × S call (``T[i − j + S − 1]``, query offset ``offset``; masked offsets 0; all 0
    when every offset is masked)."""
    b = np.asarray(structure.values(L, S, offset), dtype=np.float64)
    if b.ndim != 1:
        raise ValueError(f"fft: one head's structure is needed (structure.select(head)), "
                         f"got values of shape {b.shape}")
    top = b.max(initial=-np.inf)
    if not np.isfinite(top):
        return np.zeros(b.shape)
    return np.exp(b - top)


def fft_attention(q, k, v, scale, coef, T, *, key_mask=None, workers=None):
    """Fast attention of one key/value head with Toeplitz weights ``T`` by FFT.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any; query i is at position ``i + offset``
        (the offset only names the entries of T). G query heads that share this
        key/value head are computed together: the key-side features and spectra are
        formed once for all of them.
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    T : (L+S−1,) ndarray of float64
        ``T[i − j + S − 1] = exp(b_t − max b) >= 0`` for offset ``t = i + offset − j``
        (causal zeros included; :func:`toeplitz_weights`).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys are zero rows of ``[v, 1]`` (the Toeplitz
        structure is kept).
    workers : int, optional
        Threads for the feature kernels and scipy.fft (scipy.fft's meaning; None:
        :func:`numbarope.get_workers`).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j T(t_ij) p(s·q_iᵀk_j)`` (rows with den <= 0 get out = 0; rows that see no
        key carry the FFT's rounding noise, which callers set to 0).
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask,
                                                        remove_padded=False)
    g = len(coef) - 1
    nw = resolve_workers(workers)

    def shaped(out, den):
        out, den = out.reshape(G, L, Ev), den.reshape(G, L)
        return (out[0], den[0]) if single else (out, den)

    if G * L == 0 or kpos.size == 0:
        return shaped(np.zeros((G * L, Ev)), np.zeros(G * L))
    keep = None if kpos.size == S else np.asarray(key_mask, dtype=bool).reshape(S)
    wphi, wpsi = feature_weights(coef, E, g)
    vext = _extended(v64, None if keep is None else keep.astype(np.float64))
    m = wphi.size
    num = np.zeros((G * L, Ev + 1))
    N = fft_length(L, S)
    Tspec = circulant_spectrum(np.asarray(T, dtype=np.float64), L, N, nw, S=S)
    Pq = features(qs, E, g, wphi, workers=nw).T      # (G·L, m) views of feature-major arrays
    Pk = features(ks, E, g, wpsi, workers=nw).T      # (S, m)
    mb = _block_columns(N, 8 * (Ev + 1) * 3, m)
    for a0 in range(0, m, mb):
        a1 = min(a0 + mb, m)
        U = Pk[:, a0:a1, None] * vext[:, None, :]
        Uh = sfft.rfft(U, n=N, axis=0, workers=nw)
        del U
        Uh *= Tspec[:, None, None]
        Y = sfft.irfft(Uh, n=N, axis=0, workers=nw)[:L]
        del Uh
        for h in range(G):                              # the key side serves every head
            num[h * L:(h + 1) * L] += np.einsum("ia,iae->ie", Pq[h * L:(h + 1) * L, a0:a1], Y)
    return shaped(*_finish(num, Ev))


class FFT(Algorithm):
    """Any relative bias T(t) = exp(b_t): circulant embedding, blocked over features
    (Alman & Song 2025, §5; :func:`fft_attention`)."""

    name = "fft"
    bound_kind = "estimated"
    structures = (_bias.RelativeBias,)

    def unavailable(self, h):
        why = super().unavailable(h)
        if h.row_mass <= 0:
            why.append(Reason("row-mass", "a row that sees a key has relative weights that "
                                          "underflow to 0"))
        return why

    def rounding(self, h, coef, delta):
        return rounding_term(h.S, self.features(h.E, len(coef) - 1), coef, h.radius,
                             h.radius1, delta, fft_length(h.n, h.S), h.row_mass)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        N = fft_length(h.n, h.S)
        nlog = N * np.log2(max(N, 2))
        return (c["feature"] * (h.heads * h.n + h.S) * m + c["fft_flop"] * 2 * m * ev1 * nlog
                + c["exact_flop"] * h.heads * h.n * m * ev1) / h.heads

    def memory(self, h, degree):
        return fft_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`fft_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`) with ``T``, or without it the weights of
        ``structure`` (:func:`toeplitz_weights`; None: no bias). No state: a
        ``ValueError`` for ``initial_state`` or ``return_state``."""
        if initial_state is not None or return_state:
            raise ValueError("fft: initial_state= and return_state= are not supported "
                             "(a Toeplitz product carries no key-side state); the gemm, "
                             "prefix and causal decay algorithms take them")
        if T is None:
            T = toeplitz_weights(_bias.NoBias() if structure is None else structure,
                                 np.shape(q)[-2], np.shape(k)[0], offset)
        return fft_attention(q, k, v, scale, coef, T, key_mask=key_mask, workers=workers)

    #: forward+backward ≈ forward × (1 + backward_factor·(E·Ev + E + Ev)/(Ev + 1))
    #: (numbarope._config.FAST_BACKWARD_FACTOR): the backward transforms 2·C(E+g+1, g+1)
    #: columns per value column against the forward's C(E+g, g), 2(E+g+1)/(g+1) times
    #: (not ~E times); measured 0.8–4.6× the forward (E = 4–16, n = 4096–65536, g = 3,
    #: 2 loaded cores), i.e. factors 0.17–1.0: the middle
    backward_factor = 0.5

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs: :func:`fft_backward`
        (``out``, ``den`` the forward's results; returns ``(dq, dk, dv)``) with ``T``,
        or without it the weights of ``structure`` as :meth:`run` takes them."""
        T = self._weights(q, k, structure, T, offset)
        return fft_backward(q, k, v, out, den, dout, scale, coef, T, key_mask=key_mask,
                            workers=workers)

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """:func:`fft_gradient_bound` of :meth:`backward`'s results (the FFTs' rounding
        estimated: ``bound_kind = "estimated"``)."""
        T = self._weights(q, k, structure, T, offset)
        return fft_gradient_bound(q, k, v, dout, scale, coef, delta, T, key_mask=key_mask,
                                  radius=radius)

    @staticmethod
    def _weights(q, k, structure, T, offset):
        if T is not None:
            return T
        return toeplitz_weights(_bias.NoBias() if structure is None else structure,
                                np.shape(q)[-2], np.shape(k)[0], offset)

    def example(self, rng):
        q, k, v = _example_qkv(rng)
        return q, k, v, dict(rotary=True, bias=rng.standard_normal(2 * len(q) - 1))


register(FFT())


# ------------------------------------------------------------------ the backward
#
# The certified fast backward (issue 22) of the Toeplitz weights T: the gradients of the
# EXACT softmax attention with the forward's weights P̃_ij = T(i−j) p(x_ij)/D_i in place
# of the probabilities (fft_backward's docstring). Every sum over keys (rows) is a
# Toeplitz (transposed Toeplitz) product, done by FFT per column like the forward, on
# the columns below. With ψ_α(k')k'_e = w_α k'^{α+e_e} (w_α the feature weight), the
# m·E products "feature × key coordinate" are monomials of degree 1 .. g+1, each the
# product of at most min(E, g+1) pairs (α, e): the columns are the C(E+g+1, g+1)
# unweighted monomials (times [v, 1], or [dO/D, Δ/D]), not m·(Ev·E + E) — 3.2x fewer at
# E = 16, g = 3 — and the pairs are undone on the other side (monomial_pairs):
#
#   pass A (dq)     Y_i[β, c] = Σ_j T(i−j) k'_j^β [v_j, 1]_c              (β: 1 .. g+1)
#                   dq_ie = Σ_{(α,e) of β} c_α q'_i^α Σ_c A_ic Y_i[β, c],
#                   A_i = (√s/D_i)[dO_i, −Δ_i],  c_α = a_|α|·|α|!/α! (= φ_α ψ_α / (q'^α k'^α))
#   pass B (dk, dv) Z_j[β, c] = Σ_i T(i−j) Σ_h q'_hi^β [dO_hi/D_hi, Δ_hi/D_hi]_c   (β: 0 .. g+1)
#                   dk_je = Σ_{(α,e) of β} c_α k'_j^α Σ_c B_jc Z_j[β, c],  B_j = √s[v_j, −1]
#                   dv_jc = Σ_α c_α k'_j^α Z_j[α, c]                      (α: 0 .. g)
#
# Pass B's transposed product is the FFT with the conjugate spectrum (T reversed). The
# G query heads of one key/value head share pass A's transforms, and pass B sums
# their columns before transforming (the product is linear). Columns are formed in
# blocks of whole monomials (FFT_BLOCK_BYTES, as the forward), by numba kernels over
# tasks of monomials; the contractions run over tasks of rows (keys) of whole blocks,
# each task writing its own rows: partitions from the sizes only, so the results are
# bitwise the same for any ``workers`` (scipy.fft's transforms are independent per
# column).

@njit(cache=True, nogil=True, fastmath=_FM)
def _columns(Mt, xt, W, parent, var, G, L, b0, t0, t1, U):
    # U[(b − b0)·w + c, i] = Σ_h x_{hL+i}^β(b) · W[c, hL+i] for monomials t0 <= b < t1
    # (x^β = Mt[parent[b]] · xt[var[b]], 1 for b = 0), i < L; w = W.shape[0] columns.
    w = W.shape[0]
    mono = np.empty(L)
    for b in range(t0, t1):
        base = (b - b0) * w
        for c in range(w):
            row = U[base + c]
            for i in range(L):
                row[i] = 0.0
        for h in range(G):
            o = h * L
            if b == 0:
                for i in range(L):
                    mono[i] = 1.0
            else:
                src = Mt[parent[b], o:o + L]
                xv = xt[var[b], o:o + L]
                for i in range(L):
                    mono[i] = src[i] * xv[i]
            for c in range(w):
                row = U[base + c]
                wc = W[c, o:o + L]
                for i in range(L):
                    row[i] += mono[i] * wc[i]


@njit(cache=True, nogil=True, fastmath=_FM)
def _contract(Y, A, Mt, cw, ptr, pe, pa, b0, b1, L, r0, r1, nv, out1, out2):
    # Rows r0 <= r < r1 (of one head: Y's index is r − hL, h = r0 // L): for monomials
    # b0 <= b < b1, t_r = Σ_c A[c, r]·Y[(b − b0)·w + c, r − hL]; out1[e, r] += cw[α]·
    # Mt[α, r]·t_r for the pairs (e, α) of b; with nv > 0 (dv) and b a feature
    # (b < Mt.shape[0]): out2[c, r] += cw[b]·Mt[b, r]·Y[(b − b0)·w + c, r] for c < nv.
    w = A.shape[0]
    m = Mt.shape[0]
    n = r1 - r0
    o = (r0 // L) * L
    t = np.empty(n)
    for b in range(b0, b1):
        base = (b - b0) * w
        for r in range(n):
            t[r] = 0.0
        for c in range(w):
            y = Y[base + c, r0 - o:r1 - o]
            a = A[c, r0:r1]
            for r in range(n):
                t[r] += a[r] * y[r]
        for p in range(ptr[b], ptr[b + 1]):
            f = cw[pa[p]]
            mv = Mt[pa[p], r0:r1]
            d = out1[pe[p], r0:r1]
            for r in range(n):
                d[r] += f * mv[r] * t[r]
        if nv > 0 and b < m:
            f = cw[b]
            mv = Mt[b, r0:r1]
            for c in range(nv):
                y = Y[base + c, r0 - o:r1 - o]
                d = out2[c, r0:r1]
                for r in range(n):
                    d[r] += f * mv[r] * y[r]


@prange_loop(lambda Mt, xt, W, parent, var, G, L, b0, tasks, U:
             (Mt, xt, W, parent, var, G, L, b0, 0, 0, U))
def _par_columns(fn, Mt, xt, W, parent, var, G, L, b0, tasks, U):
    for i in prange(tasks.shape[0]):
        fn(Mt, xt, W, parent, var, G, L, b0, tasks[i, 0], tasks[i, 1], U)


@prange_loop(lambda Y, A, Mt, cw, ptr, pe, pa, b0, b1, L, tasks, nv, out1, out2:
             (Y, A, Mt, cw, ptr, pe, pa, b0, b1, L, 0, 0, nv, out1, out2))
def _par_contract(fn, Y, A, Mt, cw, ptr, pe, pa, b0, b1, L, tasks, nv, out1, out2):
    for i in prange(tasks.shape[0]):
        fn(Y, A, Mt, cw, ptr, pe, pa, b0, b1, L, tasks[i, 0], tasks[i, 1], nv, out1, out2)


#: Rows (keys) per task of the backward's contractions (whole blocks: the same
#: vectorised loops for any ``workers``).
BACKWARD_ROWS = 1024


def _row_tasks(G, L):
    """Tasks of whole blocks of BACKWARD_ROWS rows inside each of G heads of L rows."""
    tasks = []
    for h in range(G):
        tasks += _row_blocks(h * L, (h + 1) * L, BACKWARD_ROWS)
    return task_array(tasks)


def _toeplitz_pass(Mt, xt, W, G, L, nout, spec, N, b_lo, M1, tabs, A, Mc, cw, nv, out1,
                   out2, nw, rows):
    """One pass: for blocks of monomials b_lo <= b < M1, the columns (:func:`_columns`
    of the G·L rows of Mt, xt, W), their Toeplitz products by FFT (``spec`` the
    circulant spectrum; the first ``nout`` entries kept) and the contraction
    (:func:`_contract` with A, Mc, cw on the ``rows`` tasks) into out1, out2."""
    _, parent, var, ptr, pe, pa = tabs
    w = W.shape[0]
    mb = _block_columns(N, 8 * w * 3, M1 - b_lo)
    # one zero-padded buffer for every block (the kernel writes the first L entries of
    # each column): no padded copy inside rfft, no fresh pages per block
    buf = np.zeros((min(mb, M1 - b_lo) * w, N))
    for b0 in range(b_lo, M1, mb):
        b1 = min(b0 + mb, M1)
        U = buf[:(b1 - b0) * w]
        ctasks = task_array(_ranges(b0, b1, min(b1 - b0, _config.MAX_TASKS)))
        with parallel(nw, blas=False):
            _par_columns(_columns, Mt, xt, W, parent, var, G, L, b0, ctasks, U)
        Uh = sfft.rfft(U, axis=-1, workers=nw)
        Uh *= spec
        Y = sfft.irfft(Uh, n=N, axis=-1, workers=nw, overwrite_x=True)
        del Uh
        with parallel(nw, blas=False):
            _par_contract(_contract, Y, A, Mc, cw, ptr, pe, pa, b0, b1, nout, rows, nv,
                          out1, out2)
        del Y


def fft_backward_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`fft_backward`: the
    copies (:func:`numbarope.ops._common.base_memory`), the unweighted monomials of
    degree <= g of the keys and of every query head's rows, the row factors and the
    gradients, and one block of columns, spectra and products (at most
    ``3·FFT_BLOCK_BYTES``, as the forward). Parameters as :func:`fft_memory`."""
    S = n if S is None else S
    m = n_features(E, degree)
    M1 = n_features(E, degree + 1)
    ev1 = Ev + 1
    N = fft_length(n, S)
    nq = n * heads
    block = min(_config.FFT_BLOCK_BYTES * 3, 3 * 8 * N * M1 * ev1)
    return (base_memory(n, S, E, Ev, heads) + 8 * (nq + S) * (m + 2 * ev1 + E)
            + block)


def fft_backward(q, k, v, out, den, dout, scale, coef, T, *, key_mask=None, workers=None):
    r"""Certified fast gradients of softmax attention with a relative bias (Toeplitz
    weights T), by FFT.

    The gradients of the EXACT attention ``o_i = Σ_j A_ij v_j``, ``A_ij = T(i−j)
    e^{x_ij} / Σ_l T(i−l) e^{x_il}``, ``x_ij = s·q_iᵀk_j`` (T(t) = exp(b_t − max b),
    the bias exact), approximated by replacing A with the forward's own weights
    ``P̃_ij = T(i−j) p(x_ij)/D_i``, ``p(x_ij) = φ(q'_i)ᵀψ(k'_j)`` (``q' = √s q``,
    ``k' = √s k``; Alman & Song 2025, §4–5, as :func:`fft_attention`) and the exact
    output by the forward's õ. The exact formulas (Dao 2023, FlashAttention-2, §3.2:
    ``Δ_i = dO_i·o_i``, ``dX_ij = A_ij(dO_i·v_j − Δ_i)``, ``dV_j = Σ_i A_ij dO_i``,
    ``dQ_i = s Σ_j dX_ij k_j``, ``dK_j = s Σ_i dX_ij q_i``) with P̃ make every sum over
    keys a Toeplitz product and every sum over rows a transposed one — the fast
    backward of Chen, Huo, Li, Liang, Shi, Song (2024), whose §5 (RoPE: Toeplitz
    structure) this follows. With ``ψ_α(k')k'_e = w^ψ_α k'^{α+e_e}`` and ``c_α =
    w^φ_α w^ψ_α = a_|α|·|α|!/α!`` (feature weights, :func:`feature_weights`) the
    products of a feature and a coordinate are the monomials β of degree 1 .. g+1::

        Y_i[β] = Σ_j T(i−j) k'_j^β [v_j, 1],                         (Toeplitz)
        dQ_ie  = (√s/D_i) Σ_{|α|<=g} c_α q'_i^α [Σ_c dO_ic Y_i[α+e_e]_c − Δ_i Y_i[α+e_e]_Ev],
        Z_j[β] = Σ_i T(i−j) Σ_h q'_hi^β [dO_hi/D_hi, Δ_hi/D_hi],     (transposed)
        dK_je  = √s Σ_{|α|<=g} c_α k'_j^α [Σ_c v_jc Z_j[α+e_e]_c − Z_j[α+e_e]_Ev],
        dV_jc  = Σ_{|α|<=g} c_α k'_j^α Z_j[α]_c

    (h over the G query heads of this key/value head). Each is one circular
    convolution of length ``N = next_fast_len(L + S − 1)`` per column (circulant
    embedding, :mod:`numbarope.ops._toeplitz`; the transposed product takes the
    conjugate spectrum, T reversed), ``C(E+g+1, g+1)·(Ev+1)`` columns per pass.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, as given to :func:`fft_attention` (rotated; G query heads sharing
        this key/value head).
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output õ (:func:`fft_attention` with the same inputs).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators D_i (T normalised as given).
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        The forward's polynomial p (monomial coefficients).
    T : (L+S−1,) ndarray of float64
        The forward's Toeplitz weights, ``T[i − j + S − 1] >= 0`` (0: masked;
        :func:`toeplitz_weights`).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0``.
    workers : int, optional
        Threads of the numba kernels and scipy.fft (None: :func:`numbarope.get_workers`).
        The result does not depend on it (bitwise).

    Returns
    -------
    dq : (L, E) or (G, L, E) ndarray of float64
        With respect to the rotated q given. Rows that see no real key (T = 0 on all
        of them, or every key padded) get exactly 0, whatever their ``den``.
    dk : (S, E) ndarray of float64
        Summed over the G query heads; exactly 0 on padded keys and keys no row sees.
    dv : (S, Ev) ndarray of float64
        As dk.

    Raises
    ------
    ValueError
        Shapes that do not match (q, k, v as :func:`fft_attention`; T not (L+S−1,)).

    Notes
    -----
    **Accuracy.** :func:`fft_gradient_bound` bounds the errors against the exact
    softmax gradients: the forward's relative weight error (δ, the polynomial
    method's proven rounding and the FFT's estimated one) and the backward's own
    rounding, the FFT's part an estimate (``bound_kind = "estimated"``, as the
    forward's).

    **Cost.** Two passes of ``C(E+g+1, g+1)·(Ev+1)`` real FFTs of length N and back
    (pass B one column block more: the degree-0 monomial), i.e. about
    ``2(E+g+1)/(g+1)`` times the forward's ``m·(Ev+1)`` (m = C(E+g, g)); plus
    ``O((G·L + S)·C(E+g+1, g+1)·(Ev+1))`` for the columns and contractions. The
    exact backward costs ``~7·G·L·S·(E+Ev)/2``: the FFT backward pays only for long
    sequences and small E·g (E = 4, g = 3: 140 monomials; E = 16, g = 3: 4845).

    **Memory.** :func:`fft_backward_memory`: the unweighted monomials of degree <= g
    of the keys and of every query row (as the forward's features), and one block of
    columns, spectra and products within ``3·FFT_BLOCK_BYTES``; no L × S array.

    **Threads.** The columns and contractions are numba prange loops over tasks
    (monomials; blocks of :data:`BACKWARD_ROWS` rows inside a head, or keys) whose
    partition depends on the sizes only; scipy.fft's ``workers`` split its batch
    of independent transforms. Bitwise the same for any ``workers``.

    References
    ----------
    J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
    Fourier Transform", arXiv:2505.11892 (2025), §4–5.
    Y. Chen, J. Huo, X. Li, Y. Liang, Z. Shi, Z. Song, "Fast Gradient Computation for
    RoPE Attention in Almost Linear Time", arXiv:2412.17316 (2024).
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2.
    G. H. Golub, C. F. Van Loan, "Matrix Computations", 4th ed. (2013), §4.8.2.
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask,
                                                        remove_padded=False)
    nq = G * L
    Ob = np.asarray(out, dtype=np.float64).reshape(nq, Ev)
    dO = np.asarray(dout, dtype=np.float64).reshape(nq, Ev)
    D = np.asarray(den, dtype=np.float64).reshape(nq)
    T = np.asarray(T, dtype=np.float64).reshape(-1)
    if nq and S and T.shape[0] != L + S - 1:
        raise ValueError(f"fft: T has {T.shape[0]} entries, expected L + S − 1 = "
                         f"{L + S - 1}")
    shape_q = (L, E) if single else (G, L, E)
    dq = np.zeros((nq, E))
    dk = np.zeros((S, E))
    dv = np.zeros((S, Ev))
    if nq == 0 or kpos.size == 0 or Ev == 0:
        return dq.reshape(shape_q), dk, dv
    keep = None if kpos.size == S else np.asarray(key_mask, dtype=bool).reshape(S)
    rows, seen = toeplitz_visibility(T, L, S, keep)
    if not rows.any():
        return dq.reshape(shape_q), dk, dv
    g = len(coef) - 1
    nw = resolve_workers(workers)
    sq = float(np.sqrt(scale))
    ok = np.tile(rows, G) & (D > 0)
    inv = np.zeros(nq)
    inv[ok] = 1.0 / D[ok]                                   # 1/D_i (0: no weight)
    delta = np.einsum("ic,ic->i", dO, Ob)                   # Δ̃_i = dO_i·õ_i
    tabs = monomial_pairs(E, g)
    M1 = tabs[0]
    cw = pair_weights(coef, E, g)
    ones = np.ones(cw.size)
    Qm = features(qs, E, g, ones, workers=nw)              # (m, G·L): q'^α, unweighted
    Km = features(ks, E, g, ones, workers=nw)              # (m, S)
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    N = fft_length(L, S)
    spec = circulant_spectrum(T, L, N, nw, S=S)
    # pass A: dq (Toeplitz products of the keys' columns k'^β [v, 1])
    vext = _extended(v64, None if keep is None else keep.astype(np.float64))
    W = np.ascontiguousarray(vext.T)                        # (Ev+1, S)
    A = np.empty((Ev + 1, nq))
    A[:Ev] = (dO * (inv * sq)[:, None]).T
    A[Ev] = -(delta * inv * sq)
    dqt = np.zeros((E, nq))
    _toeplitz_pass(Km, kt, W, 1, S, L, spec, N, 1, M1, tabs, A, Qm, cw, 0, dqt,
                   np.zeros((0, nq)), nw, _row_tasks(G, L))
    del W, A
    # pass B: dk, dv (transposed products of the rows' columns q'^β [dO/D, Δ/D])
    Wq = np.empty((Ev + 1, nq))
    Wq[:Ev] = (dO * inv[:, None]).T
    Wq[Ev] = delta * inv
    B = np.empty((Ev + 1, S))
    B[:Ev] = v64.T * sq
    B[Ev] = -sq
    dkt = np.zeros((E, S))
    dvt = np.zeros((Ev, S))
    _toeplitz_pass(Qm, qt, Wq, G, L, S, np.conj(spec), N, 0, M1, tabs, B, Km, cw, Ev, dkt,
                   dvt, nw, _row_tasks(1, S))
    dq = dqt.T
    dk = dkt.T
    dv = dvt.T
    if not seen.all():
        dk[~seen] = 0.0
        dv[~seen] = 0.0
    return np.ascontiguousarray(dq).reshape(shape_q), np.ascontiguousarray(dk), \
        np.ascontiguousarray(dv)


_U = 2.0 ** -53
#: The FFT's per-entry rounding model of the forward (numbarope.ops._bounds.rounding_term):
#: a circular convolution of c and x by FFT is within about ``5u·log2(N)·‖c‖₂‖x‖₂`` of
#: the exact one per entry (Higham 2002, §24.1), taken with a margin of 1.5 (measured
#: on scipy.fft: at most ~0.6u·log2(N)·‖c‖₂‖x‖₂). An estimate, not a proof.
FFT_ROUNDING = 7.5


def _row_mass_lower(T, L, S, keep):
    """(L,) lower bounds of the rows' masses ``Σ_j T(i−j)`` over the real keys:
    prefix-sum differences minus their rounding ``γ_{L+S}·ΣT`` (a proof), or with
    padded keys an FFT convolution minus ``8u·log2(N)·‖T‖₂‖w‖₂`` (an estimate, as the
    pipeline's row mass); clipped at 0."""
    T = np.asarray(T, dtype=np.float64)
    if keep is None:
        cs = np.concatenate([[0.0], np.cumsum(T)])
        i = np.arange(L)
        return np.maximum(cs[i + S] - cs[i] - _gamma(L + S + 1) * cs[-1], 0.0)
    from scipy.signal import fftconvolve
    w = keep.astype(np.float64)
    full = fftconvolve(T, w)[S - 1:S - 1 + L]
    err = 8 * _U * np.log2(max(L + 2 * S - 2, 2)) * np.linalg.norm(T) * np.linalg.norm(w)
    return np.maximum(full - err, 0.0)


def fft_gradient_bound(q, k, v, dout, scale, coef, delta, T, *, key_mask=None, radius=None,
                       radius1=None, parts=False):
    r"""Bounds on the errors of :func:`fft_backward` against the EXACT softmax attention's
    gradients with the relative bias ``log T``: the approximation and the rounding
    outside the FFTs proven, the FFTs' rounding estimated (``bound_kind =
    "estimated"``, as the forward's).

    Parameters
    ----------
    q : (L, E) or (G, L, E) array_like
        Queries as given to the forward and the backward (rotated).
    k : (S, E) array_like
    v : (S, Ev) array_like
    dout : (L, Ev) or (G, L, Ev) array_like
        The gradient with respect to the output.
    scale : float
        s > 0.
    coef : (g+1,) array_like
        The forward's polynomial p.
    delta : float
        δ: certified relative error of p against exp on ``[−R, R]``.
    T : (L+S−1,) array_like
        The Toeplitz weights of the forward and the backward (``T[i − j + S − 1]``).
    key_mask : (S,) array_like of bool, optional
        True = a real key.
    radius : float, optional
        Proven ``R >= max|s q_iᵀk_j|`` over the real keys; default
        ``s·max‖q_i‖₂·max‖k_j‖₂``. δ must hold on ``[−R, R]``.
    radius1 : float, optional
        ``R₁ >= s·max_ij Σ_e |q_ie k_je|``; default ``s·max‖q_i‖₂·max‖k_j‖₂``.
    parts : bool, optional
        Also return the three parts (``{"approximation": ..., "rounding": ...,
        "fft": ...}``, each a (bq, bk, bv) tuple) whose sums are the bounds.

    Returns
    -------
    (bq, bk, bv) : tuple of float
        Bounds on ``max|dq − dq_exact|``, ``max|dk − dk_exact|``,
        ``max|dv − dv_exact|`` (``inf`` when void: ``δ + ρ >= 1``, or a row that sees a
        key has no measurable mass). With ``parts``: ``((bq, bk, bv), parts)``.

    Notes
    -----
    :func:`numbarope.ops._bounds.causal_gradient_bound`'s argument (itself
    :func:`~numbarope.ops._bounds.gradient_bound`'s, in its model and notation) with
    the weights T: rows that see no real key (T = 0 on all of them) have exact and
    computed gradients 0 and take no part; n the other rows of all query heads, S the
    real keys, ``μ_i = Σ_j T(i−j)`` row i's mass over the real keys (a lower bound:
    :func:`_row_mass_lower`), ``T_max = max T``, ``N`` the FFT length, u = 2⁻⁵³.

    * *The forward's weights.* Row i's computed denominator is ``D̂_i = Σ_j T_ij
      e^{x_ij}(1 + η_i)``: δ, the proven rounding of the features and products
      (ρ of :func:`numbarope.ops._bounds.rounding_term`, the γ-sum over at most
      ``Σ_j T_ij`` times ``P₁``, relative to ``Σ_j T_ij e^{x_ij} >= μ_i e^{−R}``: the same
      ρ as without T) and the FFT's, estimated as the forward's (:data:`FFT_ROUNDING`
      ``·u·log2(N)·‖T‖₂·√S·P₁'`` per entry, ``P₁' = Σ_k |a_k| R₁'^k``, ``R₁' = s·max_i
      Σ_e |q_ie| max_j |k_je|`` bounding ``Σ_α |φ_α(q'_i)|·max_j|ψ_α(k'_j)|``), relative
      to ``μ_i e^{−R}(1 − δ)``: ``ρ_F``. :func:`~numbarope.ops._bounds._gradient_terms`
      is evaluated with ``δ + ρ_F`` in place of δ: every quantity it returns (ε, ε_P,
      e_o, e_Δ, H, a₁, a₂) increases with δ, and ``|η_i| <= δ + ρ_F + ρ`` — its ε.
    * *Approximation* (proven given ε): per row unchanged (``Σ_j P̃_ij <= 1 + ε_P``,
      the same dX̃ − dX); a weight is at most ``A_ij = 1/(1 + Σ_{l≠j} (T_il/T_ij)
      e^{x_il − x_ij}) <= c_i = 1/(1 + (μ_i/T_max − 1)₊ e^{−2R})``::

          dq: s κ_k min(N₁a₁, N₂a₂),   dk: s κ_q min(Σ_i c_i‖dO_i‖₁ a₁, Σ_i c_i‖dO_i‖₂ a₂),
          dv: ε_P Σ_i c_i ‖dO_i‖_∞.

      With T ≡ 1 (no bias) ``μ_i = S`` and these are gradient_bound's.
    * *Rounding outside the FFTs* (proven). A term of dq_ie is ``(√s/D̂_i)·a_ic·c_α
      q'^α_i·T_ij k'^{α+e}_j [v_j, 1]_c``: the column's ``k'^β [v, 1]_c`` at most ``3g + 4``
      roundings, the row's ``c_α q'^α`` ``3g + 1``, its factor ``fl(dO_ic·fl(fl(1/D̂_i)
      ·fl(√s)))`` 4, the sum over c ``Ev + 1``, the products into dq 2, the sum over α
      m: ``m + Ev + 6g + 12`` roundings, below gradient_bound's ``k_q = S + m + Ev +
      10g + 14``, which is used (likewise ``k_k``, ``k_v``: pass B's columns sum the G
      heads, G − 1 <= n − 1 additions). The sums of |terms|: ``Σ_j T_ij P₁/D̂_i <= H``
      for dq; ``Σ_i T_ij P₁ ‖dO_i‖/D̂_i <= T_max H Σ_i ‖dO_i‖/μ_i`` for dk, dv::

          dq: s κ_k γ_{k_q}(2 + e_Δ) V H N₁,
          dk: s κ_q γ_{k_k}(2 + e_Δ) V H T_max Σ_i ‖dO_i‖₁/μ_i,
          dv: γ_{k_v} H T_max Σ_i ‖dO_i‖_∞/μ_i.

    * *The FFTs' rounding* (estimated, :data:`FFT_ROUNDING` ``= 7.5`` as the forward;
      ``F = 7.5u·log2(N)·‖T‖₂``): an entry of a Toeplitz product of a column x errs by
      ``F‖x‖₂``. Pass A's columns ``k'^{α+e}[v, 1]_c`` have ``‖x‖₂ <= √S κ'^α κ'_e
      max|[v, 1]_c|`` (κ'_e = √s max_j|k_je|), weighed by ``(√s/D̂_i)|c_α q'^α_i||a_ic|``:
      summed over α, ``Σ_α |c_α||q'^α_i|κ'^α <= P₁'``; pass B's columns ``Σ_h q'^β_hi
      [dO_hi, Δ̂_hi]_c/D̂_hi`` have ``‖x‖₂ <= κq'^α κq'_e e^R/(1−ε)·‖w_c‖₂``, ``w_{c,i} =
      Σ_h |dO_hic|/μ_i`` (``w₁``: ``Σ_h ‖dO_hi‖₁/μ_i`` for the Δ column, |Δ̂| <= (1 + e_Δ)
      V‖dO‖₁), weighed by ``√s|c_α k'^α_j||[v_j, −1]_c|``, ``P₁'' = Σ_k |a_k| R₁''^k``,
      ``R₁'' = s·max_j Σ_e |k_je| max_i |q_ie|``::

          dq: s κ_k (2 + e_Δ) V F √S P₁' e^R/(1−ε) · max_i ‖dO_i‖₁/μ_i,
          dk: s κ_q V F P₁'' e^R/(1−ε) · (Σ_c ‖w_c‖₂ + (1 + e_Δ)‖w₁‖₂),
          dv: F P₁'' e^R/(1−ε) · max_c ‖w_c‖₂.

    The bounds are the sums of the three parts. The approximation part dominates
    unless δ is near the rounding floor; on random inputs the errors are 10–10⁴×
    below it (tests/ops/test_fft_backward.py).
    """
    Q = np.asarray(q, dtype=np.float64)
    E = Q.shape[-1]
    L = Q.shape[-2]
    Q = Q.reshape(-1, E)
    K = np.asarray(k, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    Ev = V.shape[1]
    dO = np.asarray(dout, dtype=np.float64).reshape(-1, Ev)
    S_all = K.shape[0]
    zero = (0.0, 0.0, 0.0)
    empty = {"approximation": zero, "rounding": zero, "fft": zero}
    keep = None
    if key_mask is not None:
        keep = np.asarray(key_mask, dtype=bool).reshape(S_all)
        if keep.all():
            keep = None
    if Q.shape[0] == 0 or L == 0 or S_all == 0 or (keep is not None and not keep.any()):
        return (zero, empty) if parts else zero
    G = Q.shape[0] // L
    T = np.asarray(T, dtype=np.float64).reshape(-1)
    rows, _ = toeplitz_visibility(T, L, S_all, keep)
    act = np.tile(rows, G)
    if not act.any():
        return (zero, empty) if parts else zero
    inf = (np.inf,) * 3
    void = (inf, {"approximation": inf, "rounding": inf, "fft": inf})
    mass = _row_mass_lower(T, L, S_all, keep)
    mi = np.tile(mass, G)[act]
    if not mi.min() > 0:
        return void if parts else inf
    if keep is not None:
        K, V = K[keep], V[keep]
    Qa, dOa = Q[act], dO[act]
    S, n = K.shape[0], Qa.shape[0]
    coef = np.asarray(coef, dtype=np.float64)
    g = len(coef) - 1
    m = n_features(E, g)
    s = float(scale)
    cs = s * float(np.linalg.norm(Qa, axis=1).max()) * float(np.linalg.norm(K, axis=1).max())
    R = cs if radius is None else float(radius)
    R1 = cs if radius1 is None else float(radius1)
    kap_k = np.abs(K).max(axis=0)
    kap_q = np.abs(Qa).max(axis=0)
    N = fft_length(L, S_all)
    F = FFT_ROUNDING * _U * math.log2(max(N, 2)) * float(np.linalg.norm(T))
    with np.errstate(over="ignore", invalid="ignore"):
        eR = float(np.exp(min(R, 700.0)))
        pw = np.arange(g + 1)
        P1q = float(np.sum(np.abs(coef) * min(s * float((np.abs(Qa) @ kap_k).max()), 1e300)
                           ** pw))
        P1k = float(np.sum(np.abs(coef) * min(s * float((np.abs(K) @ kap_q).max()), 1e300)
                           ** pw))
        rho_f = F * math.sqrt(S) * P1q * eR / (max(1e-300, 1 - float(delta)) * float(mi.min()))
    if not np.isfinite(rho_f):
        return void if parts else inf
    d2 = float(delta) + float(rho_f)
    t = _gradient_terms(Qa, K, V, scale, coef, d2, S, radius, radius1)
    if t is None:
        return void if parts else inf
    g, m, s, R, kq, kk, Vm, eP, eD, H, a1, a2 = t
    eps = d2 + rounding_term(S + 8 * g + 4, m, coef, R, R1, d2)
    inv1 = 1.0 / (1.0 - eps)
    r1 = np.abs(dOa).sum(axis=1)
    r2 = np.linalg.norm(dOa, axis=1)
    ri = np.abs(dOa).max(axis=1)
    Tmax = float(T.max())
    # per position i: Σ_h |dO_hic| / μ_i over the active rows
    wfull = np.zeros((G * L, Ev))
    wfull[act] = np.abs(dOa) / mi[:, None]
    w = wfull.reshape(G, L, Ev).sum(axis=0)
    wc = np.linalg.norm(w, axis=0)
    w1 = float(np.linalg.norm(w.sum(axis=1)))
    with np.errstate(over="ignore", invalid="ignore"):
        ci = 1.0 / (1.0 + np.maximum(mi / Tmax - 1.0, 0.0) * float(np.exp(-min(2 * R, 700.0))))
        N1, N2 = float(r1.max()), float(r2.max())
        approx = (s * kk * min(N1 * a1, N2 * a2),
                  s * kq * min(float(ci @ r1) * a1, float(ci @ r2) * a2),
                  eP * float(ci @ ri))
        rnd = (s * kk * _gamma(S + m + Ev + 10 * g + 14) * (2 + eD) * Vm * H * N1,
               s * kq * _gamma(n + m + Ev + 10 * g + 14) * (2 + eD) * Vm * H * Tmax
               * float(np.sum(r1 / mi)),
               _gamma(n + m + 10 * g + 8) * H * Tmax * float(np.sum(ri / mi)))
        ffts = (s * kk * (2 + eD) * Vm * F * math.sqrt(S) * P1q * eR * inv1
                * float((r1 / mi).max()),
                s * kq * Vm * F * P1k * eR * inv1 * (float(wc.sum()) + (1 + eD) * w1),
                F * P1k * eR * inv1 * float(wc.max(initial=0.0)))
    tot = tuple(float(a + b + c) for a, b, c in zip(approx, rnd, ffts))
    tot = tuple(b if np.isfinite(b) else np.inf for b in tot)
    if parts:
        return tot, {"approximation": tuple(map(float, approx)),
                     "rounding": tuple(map(float, rnd)), "fft": tuple(map(float, ffts))}
    return tot
