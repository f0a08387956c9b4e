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

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025): §4 (polynomial method, rescaled
Toeplitz decomposition), §5 (FFT algorithm).
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §24.1.
"""

import numpy as np
import scipy.fft as sfft

from .. import _config
from .. import bias as _bias
from .._runtime.threads import resolve_workers
from ._bounds import rounding_term
from ._common import _block_columns, _example_qkv, _extended, _finish, _setup, base_memory
from ._cost import COST_CONSTANTS
from ._features import feature_weights, features, n_features
from ._toeplitz import circulant_spectrum, fft_length
from .registry import Algorithm, Reason, register

__all__ = ["FFT", "fft_attention", "fft_memory", "toeplitz_weights"]


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

    def example(self, rng):
        q, k, v = _example_qkv(rng)
        return q, k, v, dict(rotary=True, bias=rng.standard_normal(2 * len(q) - 1))


register(FFT())
