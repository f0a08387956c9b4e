"""Exponential decay ``T(t) = γ^{|t|} = e^{−rate·|t|}`` without the FFT: decayed scans.

The separable fast path computes, for a polynomial ``p(x) = Σ_k a_k x^k ≈ eˣ`` with
``p(q'ᵀk') = φ(q')ᵀψ(k')`` (``q' = √s q``, ``k' = √s k``; Alman & Song 2025, §4;
:mod:`numbarope.ops._common`),

    num_i = Σ_j T(t_ij) p(q'_iᵀk'_j) [v_j, 1],     t_ij = i + offset − j,

which :mod:`numbarope.ops.fft` does for an arbitrary Toeplitz T by FFT. Exponential
decay (ALiBi's form per head, :class:`numbarope.bias.Decay`) has a cheaper structure,
done here in ``O((L+S)·m·(Ev+1))`` work plus ``O((L+S)·C·(E+Ev+g))`` inside chunks of
C keys, with no FFT and no rounding error of a convolution: ``T(t)`` for ``t >= 0``
factors as ``γ^{i−e}·γ^{e−j}`` through any position e between key j and query i, so
the keys' state ``Σ_j γ^{e−j} ψ(k_j)[v_j, 1]ᵀ`` carried from one chunk end e to the
next is multiplied by ``γ^{Δe}`` — the chunked scan of :func:`numbarope.ops._common._scan`
with a decay. Two-sided decay scans forward (``t >= 0``) and backward (``t < 0``)
states of the same chunks, formed from one set of key features and read with one set
of query features (this module's one-pass kernels), or as two scans when the states
do not fit.

Rectangular problems (L queries at positions ``offset .. offset+L−1`` against S keys
at ``0 .. S−1``), padded keys (``key_mask``: removed, the real keys keep their
positions, so all distances are taken between positions) and G query heads that
share one key/value head (the key side formed once) are all served.

State in, state out (causal decay only): a state is the decayed key-side sum
``(S, s) = Σ_j γ^{e − p_j} ψ(k'_j)[v_j, 1]`` *referenced at* a position e at or
after every key in it (:func:`key_state`: e = the block's last position S−1).
``initial_state`` is the state of keys at positions ``p_j < 0`` referenced at
position −1, the position just before key 0::

    S₀ = Σ_{p_j < 0} γ^{−1−p_j} ψ(k'_j) v_jᵀ,   s₀ = Σ_{p_j < 0} γ^{−1−p_j} ψ(k'_j),

and the state returned with ``return_state=True`` is that of every real key of the
call and the initial one, referenced at position S−1 (the last key position, padded
or not) — which is position −1 of the next block of keys. :func:`shift_state` moves a
reference later, :func:`add_states` joins the states of consecutive blocks.

:func:`numbarope.ops._bounds.recurrence_rounding` is the rigorous floating-point
allowance (see its Notes for the derivation).

The backward (:func:`decay_backward`, :meth:`Decay.backward`): the certified fast
gradients of the exact decayed softmax attention with the forward's weights (as
:func:`numbarope.ops.prefix.prefix_backward`, each weight times its decay): dQ through
decayed key-side states scanned as the forward's (keys at or before the row, then the
mirror image for the keys after it), dK and dV through decayed row-side states scanned
the opposite way, each row's own chunk by Horner with the decay factor;
:func:`decay_gradient_bound` bounds its errors (a proof).

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4 (polynomial method), §1 (relative
bias keeps the Toeplitz structure).
O. Press, N. A. Smith, M. Lewis, "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation", ICLR 2022 (ALiBi).
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM
(2002): §2.2, Lemma 3.1 and Lemma 3.3, §3.1 and §4.2.
"""

import math

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from . import _common
from ._bounds import _U, DECAY_CUT, _gamma, _gradient_terms, recurrence_rounding
from ._common import (_add_rows_to_state, _FM, _check_state, _example_qkv, _key_states, _ranges,
                      _scan, _setup, _shaped, _Side, backward_chunk, gemm_chunk, prefix_chunk,
                      recurrence_chunk, scan_memory)
from ._cost import COST_CONSTANTS
from ._exp import EXP_ULPS, _exp64
from ._features import _features_block, n_features
from .registry import Algorithm, register

__all__ = ["Decay", "decay_attention", "decay_backward", "decay_gradient_bound",
           "decay_factors", "decay_chunk", "backward_chunk_keys", "key_state", "shift_state",
           "add_states", "decay_memory"]


def decay_chunk(m, E, Ev, g):
    """Keys per chunk of :func:`decay_attention`
    (:func:`numbarope.ops._common.recurrence_chunk`)."""
    return recurrence_chunk(m, E, Ev, g)


def decay_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`decay_attention`: two
    chunked scans (:func:`numbarope.ops._common.scan_memory` at :func:`decay_chunk` keys
    per chunk) — the forward and backward states of two-sided decay."""
    S = n if S is None else S
    m = n_features(E, degree)
    return 2 * scan_memory(n, S, E, Ev, degree, heads, decay_chunk(m, E, Ev, degree))


# ------------------------------------------------------------------ decay factors
def decay_factors(rate, d):
    """``fl(e^{−rate·d})`` for integer distances ``d >= 0``: exactly 1 at d = 0, exactly 0
    where ``fl(rate·d) > DECAY_CUT``, else numbarope's exp kernel (relative error
    <= EXP_ULPS·u, :data:`numbarope.ops._exp.EXP_ULPS`) of the rounded argument
    ``−fl(rate·d)``.

    Parameters
    ----------
    rate : float >= 0 (or inf)
    d : array_like of int >= 0

    Returns
    -------
    ndarray of float64, the shape of ``d``
    """
    d = np.asarray(d, dtype=np.int64)
    out = np.zeros(d.shape, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        arg = rate * d.astype(np.float64)            # rate = inf, d = 0: NaN, fixed below
    live = (d > 0) & (arg <= DECAY_CUT)
    x = np.ascontiguousarray(-arg[live])
    if x.size:
        _exp64(x, x.size, 0.0)
    out[live] = x
    out[d == 0] = 1.0
    return out


def _check_rate(rate):
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"rate must be a real scalar >= 0, got {rate!r}") from None
    if np.ndim(rate) != 0 or not r >= 0.0:            # NaN fails too
        raise ValueError(f"rate must be a real scalar >= 0 (or inf), got {rate!r}")
    return r


# ------------------------------------------------------------------ two-sided kernels
@njit(cache=True, nogil=True, fastmath=_FM)
def _both_states(kt, v, kpos, dec, j0, j1, c, cf, parent, var, ratio, w0, post, weight, st):
    # Two-sided decay, key side: st[j] = Σ_{r in chunk j} ψ(k_r)[f_r v_r, f_r, b_r v_r, b_r]
    # (m × 2(Ev+1)), f_r = dec[e_j − P_r] (forward, to the chunk's last key), b_r =
    # dec[P_r − b_j] (backward, from its first key): features once, one GEMM.
    n = v.shape[0]
    Ev = v.shape[1]
    m = parent.shape[0]
    w = max(1, min(cf, c))
    buf = np.empty(m * w)
    W = np.empty((w, 2 * (Ev + 1)))
    for j in range(j0, j1):
        k0 = j * c
        k1 = min(k0 + c, n)
        e = kpos[k1 - 1]
        b = kpos[k0]
        out = st[j]
        out[:, :] = 0.0
        for i0 in range(k0, k1, cf):
            i1 = min(i0 + cf, k1)
            ww = i1 - i0
            P = buf[:m * ww].reshape((m, ww))
            _features_block(kt, i0, i1, parent, var, ratio, w0, post, weight, P, 0)
            Wb = W[:ww]
            for r in range(ww):
                fw = dec[e - kpos[i0 + r]]
                bw = dec[kpos[i0 + r] - b]
                for x in range(Ev):
                    Wb[r, x] = v[i0 + r, x] * fw
                    Wb[r, Ev + 1 + x] = v[i0 + r, x] * bw
                Wb[r, Ev] = fw
                Wb[r, 2 * Ev + 1] = bw
            out += np.dot(P, Wb)


@njit(cache=True, nogil=True, fastmath=_FM)
def _both_scan(kpos, dec, c, a0, a1, st):
    # In place on the features a0 .. a1 − 1 of every chunk: forward half (columns < Ev+1)
    # → exclusive prefix of the chunks before j, referenced at e_{j−1}; backward half →
    # exclusive suffix of the chunks after j, referenced at b_{j+1}. Each entry's chain of
    # operations is the same for any split of the features: results do not depend on it.
    nch = st.shape[0]
    h = st.shape[2] // 2
    nk = kpos.shape[0]
    acc = np.zeros((a1 - a0, h))
    tmp = np.empty((a1 - a0, h))
    for j in range(nch):
        blk = st[j, a0:a1, :h]
        tmp[:, :] = blk
        blk[:, :] = acc
        if j > 0:
            f = dec[kpos[min(j * c + c, nk) - 1] - kpos[j * c - 1]]
            acc[:, :] = acc * f + tmp
        else:
            acc[:, :] = tmp
    acc[:, :] = 0.0
    for j in range(nch - 1, -1, -1):
        blk = st[j, a0:a1, h:]
        tmp[:, :] = blk
        blk[:, :] = acc
        if j < nch - 1:
            f = dec[kpos[j * c + c] - kpos[j * c]]
            acc[:, :] = acc * f + tmp
        else:
            acc[:, :] = tmp


@njit(cache=True, nogil=True, fastmath=_FM)
def _both_queries(qs, ks, qt, v, kpos, dec, pc, lim, xf, xb, ff, fb, rstart, j0, j1, c, cf,
                  parent, var, ratio, w0, post, weight, st, num, den):
    # Two-sided decay, query side, chunks j0 <= j < j1: rows rstart[j] .. rstart[j+1] − 1
    # have their last key at or before them (index lim − 1, position xf) in chunk j (or
    # none: chunk 0), the first after them at index lim (position xb). With the row
    # factors ff, fb (γ^{d_f − t0}, γ^{d_b − t0}; 0 for a side without keys):
    #   num = ff·dec[xf − e_{j−1}]·φᵀF_j + fb·dec[b_{j+1} − xb]·φᵀB_j
    #         + Σ_{t in chunk j} p(q k_t)·(ff·dec[xf − P_t] if t < lim else fb·dec[P_t − xb])·v_t
    # (den alike): φ(q) once for both states (one GEMM with [F_j, B_j]), the chunk's logits
    # once for both sides.
    nk = v.shape[0]
    Ev = v.shape[1]
    h = Ev + 1
    nch = st.shape[0]
    m = parent.shape[0]
    g = pc.shape[0] - 1
    buf = np.empty(m * max(1, min(cf, c)))
    for j in range(j0, j1):
        a = rstart[j]
        b = rstart[j + 1]
        if b <= a:
            continue
        k0 = j * c
        k1 = min(k0 + c, nk)
        e_prev = kpos[k0 - 1] if j > 0 else 0
        b_next = kpos[k1] if j < nch - 1 else 0
        for i0 in range(a, b, cf):
            i1 = min(i0 + cf, b)
            w = i1 - i0
            P = buf[:m * w].reshape((m, w))
            _features_block(qt, i0, i1, parent, var, ratio, w0, post, weight, P, 0)
            Y = np.dot(P.T, st[j])
            for r in range(w):
                i = i0 + r
                cfw = ff[i] * dec[xf[i] - e_prev] if j > 0 else 0.0
                cbw = fb[i] * dec[b_next - xb[i]] if j < nch - 1 else 0.0
                den[i] = cfw * Y[r, Ev] + cbw * Y[r, h + Ev]
                for x in range(Ev):
                    num[i, x] = cfw * Y[r, x] + cbw * Y[r, h + x]
        for r0 in range(a, b, c):
            r1 = min(r0 + c, b)
            X = np.dot(qs[r0:r1], ks[k0:k1].T)
            for r in range(r1 - r0):
                i = r0 + r
                row = X[r]
                split = min(max(lim[i] - k0, 0), k1 - k0)
                acc = 0.0
                fi = ff[i]
                x0 = xf[i]
                for t in range(split):
                    x = row[t]
                    p = pc[0]
                    for d in range(1, g + 1):
                        p = p * x + pc[d]
                    p *= dec[x0 - kpos[k0 + t]] * fi
                    row[t] = p
                    acc += p
                fi = fb[i]
                x0 = xb[i]
                for t in range(split, k1 - k0):
                    x = row[t]
                    p = pc[0]
                    for d in range(1, g + 1):
                        p = p * x + pc[d]
                    p *= dec[kpos[k0 + t] - x0] * fi
                    row[t] = p
                    acc += p
                den[i] += acc
            if Ev:
                num[r0:r1] += np.dot(X, v[k0:k1])


# parallel loops: thin pranges over independent tasks (partitions by the sizes only)
@prange_loop(lambda kt, v, kpos, dec, tasks, *rest: (kt, v, kpos, dec, 0, 0, *rest))
def _par_both_states(fn, kt, v, kpos, dec, tasks, c, cf, parent, var, ratio, w0, post,
                     weight, st):
    for i in prange(tasks.shape[0]):
        fn(kt, v, kpos, dec, tasks[i, 0], tasks[i, 1], c, cf, parent, var, ratio, w0, post,
           weight, st)


@prange_loop(lambda kpos, dec, c, tasks, st: (kpos, dec, c, 0, 0, st))
def _par_both_scan(fn, kpos, dec, c, tasks, st):
    for i in prange(tasks.shape[0]):
        fn(kpos, dec, c, tasks[i, 0], tasks[i, 1], st)


@prange_loop(lambda *a: a[:13] + (0, 0) + a[14:])
def _par_both_queries(fn, qs, ks, qt, v, kpos, dec, pc, lim, xf, xb, ff, fb, rstart, tasks,
                      c, cf, parent, var, ratio, w0, post, weight, st, num, den):
    for i in prange(tasks.shape[0]):
        fn(qs, ks, qt, v, kpos, dec, pc, lim, xf, xb, ff, fb, rstart, tasks[i, 0],
           tasks[i, 1], c, cf, parent, var, ratio, w0, post, weight, st, num, den)


# ------------------------------------------------------------------ drivers
def _side_factors(qpos, kpos, lim_f, dec):
    """Two-sided decay, the rows' side factors ``(ff, fb)``: ``γ^{d_f − t0}`` and
    ``γ^{d_b − t0}`` (d_f, d_b the distances of the row's nearest visible real key at or
    before it and after it, ``t0 = min(d_f, d_b)``; 0 for a side without keys)."""
    nk = kpos.size
    lim_b = nk - lim_f
    hasf, hasb = lim_f > 0, lim_b > 0
    big = np.iinfo(np.int64).max // 4
    d_f = np.where(hasf, qpos - kpos[np.maximum(lim_f - 1, 0)], big)
    d_b = np.where(hasb, kpos[np.minimum(lim_f, nk - 1)] - qpos, big)
    t0 = np.minimum(d_f, d_b)
    ff = np.where(hasf, dec[np.where(hasf, d_f - t0, 0)], 0.0)
    fb = np.where(hasb, dec[np.where(hasb, d_b - t0, 0)], 0.0)
    return ff, fb


def _both_fits(nk, m, Ev, c):
    """Two-sided decay in one pass keeps 2·nch states of m × (Ev+1): within STATE_BYTES?"""
    return (-(-nk // c)) * m * 2 * (Ev + 1) * 8 <= _config.STATE_BYTES


def _decay_both(qs, ks, v, kpos, lim, ff, fb, dec, F, nw):
    """Two-sided decay in one pass (see :func:`decay_attention`, Notes): every chunk's
    forward and backward states from one set of key features (parallel over chunks);
    exclusive forward and backward scans (parallel over features); each row's query
    features once against both states, and its chunk's logits once for both sides
    (parallel over chunks). ``ff``, ``fb``: the rows' side factors (0 for a side without
    keys)."""
    nk, Ev = v.shape
    nq = qs.shape[0]
    m = F.m
    c = decay_chunk(m, F.E, Ev, F.g)
    cf = min(gemm_chunk(m), c)
    nch = -(-nk // c)
    order = np.argsort(lim, kind="stable")
    lim, qs, ff, fb = lim[order], qs[order], ff[order], fb[order]
    qs = np.ascontiguousarray(qs)
    xf = kpos[np.maximum(lim - 1, 0)]
    xb = kpos[np.minimum(lim, nk - 1)]
    chunk_of = np.maximum(lim - 1, 0) // c
    rstart = np.searchsorted(chunk_of, np.arange(nch + 1)).astype(np.int64)
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    st = np.empty((nch, m, 2 * (Ev + 1)))
    num = np.empty((nq, Ev))
    den = np.empty(nq)
    ntask = min(nch, _config.MAX_TASKS)
    with parallel(nw):
        _par_both_states(_both_states, kt, v, kpos, dec, task_array(_ranges(0, nch, ntask)),
                         c, cf, *F.keys(), st)
        _par_both_scan(_both_scan, kpos, dec, c,
                       task_array(_ranges(0, m, min(m, _config.MAX_TASKS))), st)
        work = (c + np.diff(rstart)).astype(np.float64)
        _par_both_queries(_both_queries, qs, ks, qt, v, kpos, dec, F.pc, lim, xf, xb, ff, fb,
                          rstart,
                          task_array(_ranges(0, nch, ntask, work)), c, cf, *F.queries(), st,
                          num, den)
    out_num = np.empty_like(num)
    out_den = np.empty_like(den)
    out_num[order], out_den[order] = num, den
    return out_num, out_den


def decay_attention(q, k, v, scale, coef, rate, causal, *, offset=0, key_mask=None,
                    workers=None, initial_state=None, return_state=False):
    """Fast attention with exponential decay ``T(t) = γ^{|t|} = e^{−rate·|t|}``.

    ``num_i = Σ_j γ^{|t_ij|} p(s·q_iᵀk_j)[v_j, 1]``, ``t_ij = i + offset − j``, with
    ``causal`` only ``t >= 0``; ``out_i = num_i[:Ev] / num_i[Ev]``. Work
    ``O((G·L + S)·m·(Ev+1) + (G·L + S)·C·(E + Ev + g))``, C = :func:`decay_chunk`,
    m = C(E+g, g); no FFT.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries (rotated if RoPE); query i at position ``i + offset``. G query heads
        sharing this key/value head are computed together (key side once).
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    rate : float >= 0
        Decay per position (γ = e^{−rate}); 0 is no decay, ``inf`` keeps only the
        nearest visible key(s).
    causal : bool
        Only keys at or before the query (``t >= 0``); else two-sided.
    offset : int, optional
        Position of query 0.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part (the real keys keep their
        positions, so distances are unchanged).
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The
        result does not depend on it (bitwise).
    initial_state : tuple of ndarray, optional
        Causal only: ``(S₀, s₀)`` of shapes (m, Ev) and (m,), the decayed state of
        keys at positions ``p_j < 0`` referenced at position −1,
        ``Σ_{p_j<0} γ^{−1−p_j} ψ(k'_j)[v_j, 1]`` (module docstring; :func:`key_state`
        of the previous block, or the state it returned). Every query row must see
        all of them: ``offset >= −1``.
    return_state : bool, optional
        Causal only: also return the decayed state of this call's real keys and the
        initial one, referenced at position S−1 (the ``initial_state`` of the next
        block of keys).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j γ^{|t_ij| − t0_i} p(·)`` with ``t0_i`` the distance of row i's nearest
        visible real key of this call (so ``den = Σ_j T p`` exactly as the FFT's
        whenever the row sees a key at its own position, e.g. square self-attention);
        rows that see only ``initial_state``'s keys have ``t0_i = i + offset + 1``
        (weights relative to position −1). Rows with den <= 0 (no visible key) get
        out = 0.
    state : (S, s), with ``return_state=True``

    Raises
    ------
    ValueError
        For a rate that is not a real scalar >= 0, state arguments with two-sided
        decay, a malformed ``initial_state`` or ``offset < −1`` with one.

    Notes
    -----
    **Algorithm.** The real keys keep their positions ``P_j``. Forward scan
    (keys at or before the query): chunks of C keys; chunk c's state
    ``Σ_{j∈c} γ^{e_c − P_j} ψ(k_j)[v_j, 1]ᵀ`` (e_c the position of its last key),
    in parallel; a scan ``S ← γ^{e_c − e_{c−1}} S + state_c`` (per task in
    parallel, then an exclusive scan over the tasks' totals, serial); each row at
    ``x_i`` = the position of its last visible key gets
    ``γ^{x_i − e_{c−1}} φ(q_i)ᵀS + Σ_{j in its chunk, j visible} γ^{x_i − P_j}
    p(q_iᵀk_j)[v_j, 1]`` (Horner on the logits), in parallel
    (:func:`numbarope.ops._common._scan` with a decay). An initial state enters as the
    state of a chunk ending at position −1. Two-sided: the keys
    after the query (``t < 0``; ``t = 0`` is forward) by the mirror-image scan,
    the two sides added with the factors ``γ^{d_f − t0}``, ``γ^{d_b − t0}``
    (d_f, d_b the distances of the nearest visible key on each side, ``t0 =
    min(d_f, d_b)``). When the 2·S/C forward and backward chunk states fit in
    ``_config.STATE_BYTES`` this is one pass: both states of a chunk from one
    set of key features (one GEMM), the exclusive forward and backward scans in
    parallel over the features, each row's query features once against both
    (one GEMM) and its chunk's logits once for both sides; else two scans
    (the second over the reversed keys) with states kept in groups, as the
    causal path does.

    **Scaling, underflow.** Every weight is formed relative to the row's
    nearest visible key (the common factor ``γ^{t0_i}`` of a row cancels in
    out), so the largest decay factor of a row is exactly 1 and every factor
    spans the distance between two positions in ``0 .. S−1``: no factor exceeds
    1, nothing overflows, and a row whose keys are all far (rectangular,
    padding) is not lost to underflow. Factors are ``fl(e^{−rate·d})`` for
    ``fl(rate·d) <= DECAY_CUT`` = 700 (normal numbers, numbarope's proven exp
    kernel) and exactly 0 beyond: once ``rate·(distance) > 700`` (for
    ``rate·C > 700``, whole chunk states) the factor is 0 and contributes nothing;
    the weights so dropped are below ``e^{−699.9}`` times the row's largest,
    which :func:`numbarope.ops._bounds.recurrence_rounding` bounds. No NaN or inf
    arises for any rate in ``[0, inf]``. Gradual underflow of a product (a state entry
    times a factor below 2⁻¹⁰²²) is rounded as IEEE arithmetic does.

    **Accuracy**: see :func:`numbarope.ops._bounds.recurrence_rounding` (algorithm
    ``"decay"``).
    """
    r = _check_rate(rate)
    if not causal and (initial_state is not None or return_state):
        raise ValueError("decay: initial_state= and return_state= need causal decay (a "
                         "two-sided decay's rows also see keys after them, which no "
                         "state of earlier keys carries)")
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nk = kpos.size
    F = _Side(coef, E)
    if initial_state is not None:
        initial_state = _check_state(initial_state, F.m, Ev, "decay")
        if offset < -1:
            raise ValueError(f"decay: with initial_state every query row must see the "
                             f"state's keys (positions < 0): offset must be >= -1, got "
                             f"{offset}")
    stateful = initial_state is not None or return_state
    if (G * L == 0 or nk == 0) and not stateful:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    nw = resolve_workers(workers)
    dec = decay_factors(r, np.arange(S + 1))
    qpos = np.tile(np.arange(L, dtype=np.int64) + int(offset), G)
    lim_f = np.searchsorted(kpos, qpos, side="right").astype(np.int64)   # P_j <= pos
    c = decay_chunk(F.m, E, Ev, F.g)
    if causal:
        num, den, St, st = _scan(qs, ks, v64, lim_f, F, nw, c, kpos, dec, initial_state)
        res = _shaped(num, den, G, L, Ev, single)
        if not return_state:
            return res
        ref = int(kpos[-1]) if nk else -1             # the state's reference position
        f = dec[S - 1 - ref]
        return res + ((St * f, st * f),)
    lim_b = nk - lim_f                                                    # P_j > pos
    ff, fb = _side_factors(qpos, kpos, lim_f, dec)
    if _both_fits(nk, F.m, Ev, c):
        num, den = _decay_both(qs, ks, v64, kpos, lim_f, ff, fb, dec, F, nw)
    else:            # two scans, the second over the reversed keys; states in groups
        num, den, _, _ = _scan(qs, ks, v64, lim_f, F, nw, c, kpos, dec)
        kpos_b = np.ascontiguousarray((S - 1) - kpos[::-1])
        num_b, den_b, _, _ = _scan(qs, np.ascontiguousarray(ks[::-1]),
                                   np.ascontiguousarray(v64[::-1]), lim_b, F, nw, c, kpos_b,
                                   dec)
        num = num * ff[:, None] + num_b * fb[:, None]
        den = den * ff + den_b * fb
    return _shaped(num, den, G, L, Ev, single)


# ------------------------------------------------------------------ states
def key_state(k, v, scale, coef, rate, *, key_mask=None, workers=None):
    """Decayed key-side state of a block of keys alone, referenced at its last position.

    ``S = Σ_j γ^{S−1−p_j} ψ(k'_j) v_jᵀ``, ``s = Σ_j γ^{S−1−p_j} ψ(k'_j)`` over the real
    keys of the block (positions ``p_j`` in ``0 .. S−1``, ``k' = √s k``, ψ the key-side
    features of ``p(q'ᵀk') = φ(q')ᵀψ(k')``), each weight ``fl(γ^d)`` of
    :func:`decay_factors` (0 beyond ``rate·d > DECAY_CUT``). It is the
    ``initial_state`` of :func:`decay_attention` for the block of keys that follows;
    states of consecutive blocks join by :func:`add_states`.

    Parameters
    ----------
    k : (S, E) ndarray of float64
        Keys, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
    coef : (g+1,) ndarray of float64
    rate : float >= 0
    key_mask : (S,) ndarray of bool, optional
        True = a real key.
    workers : int, optional
        The result does not depend on it (bitwise).

    Returns
    -------
    S : (m, Ev) ndarray of float64
    s : (m,) ndarray of float64
    """
    r = _check_rate(rate)
    k = np.asarray(k)
    _, _, _, E, S, _, _, ks, v64, kpos = _setup(k[:0], k, v, scale, coef, key_mask)
    dec = decay_factors(r, np.arange(max(S, 1)))
    return _key_states(ks, v64, _Side(coef, E), resolve_workers(workers), kpos, dec,
                       max(S - 1, 0))


def shift_state(state, rate, distance):
    """A decayed state referenced ``distance >= 0`` positions later: ``γ^distance·(S, s)``
    (one multiplication by ``fl(γ^distance)`` of :func:`decay_factors`)."""
    f = float(decay_factors(_check_rate(rate), np.array([int(distance)]))[0])
    return state[0] * f, state[1] * f


def add_states(earlier, later, rate, distance):
    """The decayed state of two consecutive key blocks, referenced at the later one's
    reference: ``γ^distance·earlier + later``, ``distance`` = the later reference
    position minus the earlier (e.g. the later block's length, for :func:`key_state`
    states of adjacent blocks)."""
    f = float(decay_factors(_check_rate(rate), np.array([int(distance)]))[0])
    return earlier[0] * f + later[0], earlier[1] * f + later[1]


def _nearest_visible(L, S, offset, causal, key_mask):
    """(L,) int64: index of each row's nearest visible real key (−1: none)."""
    real = np.arange(S) if key_mask is None else np.flatnonzero(key_mask)
    pos = np.arange(L) + int(offset)
    if real.size == 0:
        return np.full(L, -1)
    a = np.searchsorted(real, pos, side="right") - 1          # last real key <= pos
    before = np.where(a >= 0, real[np.maximum(a, 0)], -1)
    if causal:
        return before
    after = real[np.minimum(a + 1, real.size - 1)]
    after = np.where(after >= pos, after, -1)                 # first real key > pos
    use_after = (before < 0) | ((after >= 0) & (after - pos < pos - before))
    return np.where(use_after, after, before)


class Decay(Algorithm):
    """Exponential decay T(t) = γ^{|t|} (ALiBi, :class:`numbarope.bias.Decay`), causal or
    two-sided: chunked decayed prefix scans of the key-side states, no FFT
    (:func:`decay_attention`; rounding proven in
    :func:`numbarope.ops._bounds.recurrence_rounding`)."""

    name = "decay"
    structures = (_bias.Decay,)

    def _chunk(self, h, degree):
        return decay_chunk(n_features(h.E, degree), h.E, h.Ev, degree)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(self._chunk(h, degree), max(h.S, 1))
        sides = 1 if h.causal else 2
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * sides * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * ch * (2 * degree + 4)) / h.heads

    def memory(self, h, degree):
        return decay_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def rounding(self, h, coef, delta):
        g = len(coef) - 1
        return recurrence_rounding("decay", h.S, n_features(h.E, g), coef, h.radius,
                                   h.radius1, delta, self._chunk(h, g),
                                   float(h.structure.rate))

    def run(self, q, k, v, scale, coef, *, structure, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`decay_attention` with ``structure.rate`` (one head's: a scalar,
        ``structure.select(head)``) and ``structure.causal`` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`).

        With ``T`` (the head's Toeplitz weights, normalised to max 1) ``den`` is given
        in T's normalisation (multiplied by T at each row's nearest visible key), as the
        FFT's; ``T`` cannot go with ``initial_state``. State arguments: causal decay
        only (:func:`decay_attention`)."""
        rate = structure.rate
        if np.ndim(rate) != 0:
            raise ValueError(f"decay: one head's structure is needed (a scalar rate: "
                             f"structure.select(head)), got rate of shape {np.shape(rate)}")
        if T is not None and initial_state is not None:
            raise ValueError("decay: T= and initial_state= together: den with a state is "
                             "relative to the row's nearest key of this call or to "
                             "position -1; pass T=None")
        res = decay_attention(q, k, v, scale, coef, rate, structure.causal, offset=offset,
                              key_mask=key_mask, workers=workers,
                              initial_state=initial_state, return_state=return_state)
        if T is not None:       # den in T's normalisation (decay_attention: per row, by
            out, den = res[:2]  # the weight of its nearest visible key)
            L, S = np.shape(q)[-2], np.shape(k)[0]
            j = _nearest_visible(L, S, offset, structure.causal, key_mask)
            w = np.where(j >= 0, T[np.arange(L) - j + S - 1], 0.0)
            res = (out, den * w) + tuple(res[2:])
        return res

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs: :func:`decay_backward`
        with ``structure.rate`` (one head's scalar) and ``structure.causal`` (``out``,
        ``den`` the forward's results; returns ``(dq, dk, dv)``; bound:
        :func:`decay_gradient_bound`).

        With ``T`` the ``den`` given is in T's normalisation (as :meth:`run` returns it,
        or ``exp(lse − shift)`` of the pipeline): it is divided by T at each row's
        nearest visible key, back to :func:`decay_attention`'s. Rows where that weight
        or ``den`` is not a normal number (the product underflowed) make the backward
        recompute the denominators by :func:`decay_attention` (a forward pass)."""
        if structure is None:
            raise ValueError("decay: backward needs the head's structure (a Decay)")
        rate = structure.rate
        if np.ndim(rate) != 0:
            raise ValueError(f"decay: one head's structure is needed (a scalar rate: "
                             f"structure.select(head)), got rate of shape {np.shape(rate)}")
        if T is not None:
            L, S = np.shape(q)[-2], np.shape(k)[0]
            j = _nearest_visible(L, S, offset, structure.causal, key_mask)
            w = np.where(j >= 0, np.asarray(T, np.float64)[np.arange(L) - j + S - 1], 0.0)
            D = np.asarray(den, dtype=np.float64)
            tiny = np.finfo(np.float64).tiny
            good = (w >= tiny) & (D >= tiny)
            if np.all(good | (j < 0)):
                den = np.where(j >= 0, D / np.where(good, w, 1.0), 0.0)
            else:                   # underflowed: the forward's own denominators again
                den = decay_attention(q, k, v, scale, coef, rate, structure.causal,
                                      offset=offset, key_mask=key_mask, workers=workers)[1]
        return decay_backward(q, k, v, out, den, dout, scale, coef, rate, structure.causal,
                              offset=offset, key_mask=key_mask, workers=workers)

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """:func:`decay_gradient_bound` of :meth:`backward`'s results (``T`` not read)."""
        return decay_gradient_bound(q, k, v, dout, scale, coef, delta, structure.rate,
                                    structure.causal, offset=offset, key_mask=key_mask,
                                    radius=radius)

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=_bias.ALiBi([0.05]))


register(Decay())


# ------------------------------------------------------------------ the backward
#
# The certified fast backward of exponential decay (issue 22): the formulas of
# :func:`numbarope.ops.gemm.gemm_backward` with each weight multiplied by the decay
# T_ij = γ^{|t_ij| − t0_i} (relative to the row's nearest visible key, as the forward's
# den). One SIDE at a time: the keys at or before the row (t >= 0; causal: the only
# side) and, two-sided, the keys after it (t < 0) — the mirror image, run by the same
# code on the reversed keys at mirrored positions, as the forward's two-scan path.
# On a side row i sees a prefix of lim_i real keys, the last at position x_i, with
# weights r_i·γ^{x_i − P_j} (r_i the row's side factor γ^{d − t0}: 1 causal). Rows are
# sorted by lim, keys cut into chunks of C; e_J = position of chunk J's last key,
# b_i = lim_i // C (nch: the row sees every key). As prefix_backward's three parts:
#
#   A. decayed prefix over key chunks J = 0 .. nch (→ dq): rows of b_i = J get
#      dq_i = ρ_i Σ_a C_ia (φ_iᵀZ)[e, a],   ρ_i = r_i·γ^{x_i − e_{J−1}},
#      Z = Σ_{chunks < J} γ^{e_{J−1} − P_j} ψ_j k'_je [v_j, 1]_a; then
#      Z ← γ^{e_J − e_{J−1}} Z + Σ_{j in chunk J} κ_j ψ_j k'_je [v_j, 1]_a,  κ_j = γ^{e_J − P_j}
#      (C_i = √s[dO_i/D_i, −Δ_i/D_i]);
#   B. decayed suffix over row groups J = nch .. 0 (→ dk, dv): keys of chunk J get
#      dk_j = κ_j Σ_a √s[v_j, 1]_a (ψ_jᵀZq)[e, a], dv_j = κ_j ψ_jᵀU with
#      Zq = Σ_{b_i > J} r_i γ^{x_i − e_J} φ_i q'_ie [dO_i/D_i, −Δ_i/D_i]_a (U alike with
#      dO_i/D_i); then Zq ← γ^{e_J − e_{J−1}} Zq + Σ_{b_i = J} ρ_i φ_i q'_ie [..]_a;
#   L. explicit, rows b_i = J against keys J·C .. lim_i − 1: w_it = r_i γ^{x_i − P_t}
#      p(q'_i·k'_t) (Horner, as the forward's chunk kernel), M_it = w_it √s(dO_i·v_t −
#      Δ_i)/D_i: dq_i += Σ_t M_it k'_t, dk_t += Σ_i M_it q'_i, dv_t += Σ_i w_it dO_i/D_i.
#
# Every factor is one entry of dec (fl(γ^d), d between two positions, <= 1: nothing
# overflows however far a row is from its keys); the path of a key to a row passes at
# most nch + 2 of them. Threads as prefix_backward's: A and B serial over the chunks,
# parallel over tasks of whole column units (unit e: the columns [e, ·] of the state,
# whose task alone writes output column e; B one more unit, U, for dv); L parallel over
# tasks of whole chunks. Partitions depend on the sizes only: bitwise the same results
# for any number of threads.

#: Keys per chunk of :func:`decay_backward`; None: ``_common.CHUNK`` if set, else
#: :func:`numbarope.ops._common.prefix_chunk` (the causal prefix backward's: the state
#: is E + 1 times wider than the forward's, so a larger chunk than the forward's pays).
BACKWARD_CHUNK = None
#: State columns per task of the backward's scans (whole units of Ev + 1 columns), as
#: :data:`numbarope.ops.prefix.BACKWARD_COLUMNS`.
BACKWARD_COLUMNS = 64


def backward_chunk_keys(m):
    """Keys per chunk of :func:`decay_backward` (:data:`BACKWARD_CHUNK`)."""
    if BACKWARD_CHUNK:
        return int(BACKWARD_CHUNK)
    if _common.CHUNK:
        return int(_common.CHUNK)
    return prefix_chunk(m)


@njit(cache=True, nogil=True, fastmath=_FM)
def _dscan_columns(st, B, A, at, C, fa, fstep, steps, u0, u1, cb, sparent, svar, sratio,
                   sw0, spost, sweight, aparent, avar, aratio, aw0, apost, aweight, out1,
                   out2):
    # One task of a decayed backward scan: the column units u0 <= u < u1 of a running
    # state, unit e < E the na = A.shape[1] columns Z[e, a] = Σ decay·feat(x_r) B[r, e]
    # A[r, a] over the state side's rows added so far (A carries each row's weight to
    # the reference of the step that adds it), unit E (when u1 > E) the out2.shape[1]
    # columns Σ decay·feat(x_r) A[r, a]. Step t: first the apply side's rows steps[t, 0]
    # .. steps[t, 1]: out1[i, e] = fa[i]·Σ_a C[i, a] (feat(y_i)ᵀZ)[e, a], out2[i, a] =
    # fa[i]·(feat(y_i)ᵀZ)[E, a]; then Z ← fstep[t]·Z (the next reference) and the state
    # side's rows steps[t, 2] .. steps[t, 3] are added. Features of the state side from
    # st (E, rows) with the s* tables, of the apply side from at with a*; blocks of cb
    # rows. Apply rows met before any state row keep their 0.
    m = sparent.shape[0]
    E = B.shape[1]
    na = A.shape[1]
    ne = max(0, min(u1, E) - u0)
    nx = out2.shape[1] if u1 > E else 0
    width = ne * na + nx
    Z = np.zeros((m, width))
    T = np.empty((m, width))
    fb = np.empty(m * cb)
    yb = np.empty(cb * max(width, 1))
    empty = True
    for t in range(steps.shape[0]):
        a0, a1, s0, s1 = steps[t, 0], steps[t, 1], steps[t, 2], steps[t, 3]
        if not empty:
            for i0 in range(a0, a1, cb):
                i1 = min(i0 + cb, a1)
                n = i1 - i0
                P = fb[:m * n].reshape((m, n))
                R = yb[:n * width].reshape((n, width))
                _features_block(at, i0, i1, aparent, avar, aratio, aw0, apost, aweight, P, 0)
                np.dot(P.T, Z, R)
                for r in range(n):
                    i = i0 + r
                    row = R[r]
                    ci = C[i]
                    o = out1[i]
                    f = fa[i]
                    for e in range(ne):
                        base = e * na
                        acc = 0.0
                        for a in range(na):
                            acc += ci[a] * row[base + a]
                        o[u0 + e] = f * acc
                    if nx:
                        o2 = out2[i]
                        base = ne * na
                        for a in range(nx):
                            o2[a] = f * row[base + a]
            f = fstep[t]
            if f != 1.0:
                for a in range(m):
                    za = Z[a]
                    for e in range(width):
                        za[e] *= f
        empty = _add_rows_to_state(st, s0, s1, cb, sparent, svar, sratio, sw0, spost,
                                   sweight, A, B, u0, ne, na, nx, fb, yb, Z, T, empty)


@njit(cache=True, nogil=True, fastmath=_FM)
def _dlocal_chunks(qs, ks, v, Cd, cdel, pc, lim, rstart, xr, rf, kpos, dec, j0, j1, c, ss,
                   dq, dk, dv):
    # The explicit part of chunks j0 <= J < j1: rows rstart[J] <= i < rstart[J+1] (sorted
    # by lim, all with J·c <= lim_i < J·c + c) against the keys J·c <= t < lim_i, in
    # blocks of c rows: X = q'k'ᵀ, w = rf_i·dec[xr_i − kpos_t]·p(X) (Horner, masked),
    # M = w·ss·(Cd vᵀ + cdel), dq[rows] = M k', dk[keys] += Mᵀq', dv[keys] += wᵀCd
    # (Cd = dO/D, cdel = −Δ/D).
    g = pc.shape[0] - 1
    for J in range(j0, j1):
        k0 = J * c
        for r0 in range(rstart[J], rstart[J + 1], c):
            r1 = min(r0 + c, rstart[J + 1])
            kb = lim[r1 - 1]                      # the block's largest lim
            n = kb - k0
            if n <= 0:
                continue
            X = np.dot(qs[r0:r1], ks[k0:kb].T)
            Pm = np.dot(Cd[r0:r1], v[k0:kb].T)
            M = np.empty_like(X)
            for r in range(r1 - r0):
                i = r0 + r
                tb = min(max(lim[i] - k0, 0), n)
                xrow = X[r]
                pr = Pm[r]
                mr = M[r]
                d = cdel[i]
                x0 = xr[i]
                fi = rf[i]
                for t in range(tb):
                    x = xrow[t]
                    p = pc[0]
                    for e in range(1, g + 1):
                        p = p * x + pc[e]
                    p *= dec[x0 - kpos[k0 + t]] * fi
                    xrow[t] = p
                    mr[t] = p * (ss * (pr[t] + d))
                for t in range(tb, n):
                    xrow[t] = 0.0
                    mr[t] = 0.0
            dq[r0:r1] = np.dot(M, ks[k0:kb])
            dk[k0:kb] += np.dot(M.T, qs[r0:r1])
            dv[k0:kb] += np.dot(X.T, Cd[r0:r1])


@prange_loop(lambda st, B, A, at, C, fa, fstep, steps, tasks, *rest:
             (st, B, A, at, C, fa, fstep, steps, 0, 0, *rest))
def _par_dscan_columns(fn, st, B, A, at, C, fa, fstep, steps, tasks, cb, sparent, svar,
                       sratio, sw0, spost, sweight, aparent, avar, aratio, aw0, apost,
                       aweight, out1, out2):
    for i in prange(tasks.shape[0]):
        fn(st, B, A, at, C, fa, fstep, steps, tasks[i, 0], tasks[i, 1], cb, sparent, svar,
           sratio, sw0, spost, sweight, aparent, avar, aratio, aw0, apost, aweight, out1,
           out2)


@prange_loop(lambda qs, ks, v, Cd, cdel, pc, lim, rstart, xr, rf, kpos, dec, tasks, *rest:
             (qs, ks, v, Cd, cdel, pc, lim, rstart, xr, rf, kpos, dec, 0, 0, *rest))
def _par_dlocal_chunks(fn, qs, ks, v, Cd, cdel, pc, lim, rstart, xr, rf, kpos, dec, tasks, c,
                       ss, dq, dk, dv):
    for i in prange(tasks.shape[0]):
        fn(qs, ks, v, Cd, cdel, pc, lim, rstart, xr, rf, kpos, dec, tasks[i, 0], tasks[i, 1],
           c, ss, dq, dk, dv)


def _unit_tasks(widths):
    """Contiguous ranges of column units, about :data:`BACKWARD_COLUMNS` columns each,
    balanced by width: from the sizes only."""
    widths = np.asarray(widths, dtype=np.float64)
    k = int(max(1, min(len(widths), round(widths.sum() / max(1, BACKWARD_COLUMNS)))))
    return _ranges(0, len(widths), k, widths)


def _side_backward(qs, ks, v, kpos, lim, rf, Cd, cdel, dec, F, nw, c, sq):
    """One side of :func:`decay_backward` (see the comment above :data:`BACKWARD_CHUNK`):
    row i sees the first ``lim[i]`` keys (positions ``kpos``, increasing) with weights
    ``rf[i]·dec[x_i − kpos[j]]·p(q'_i·k'_j)``, ``x_i = kpos[lim[i] − 1]``. ``Cd`` = dO/D,
    ``cdel`` = −Δ/D per row (0 for rows without weight). Returns ``(dq, dk, dv)``: (nq, E)
    in the rows' given order, (nk, E), (nk, Ev)."""
    nq, E = qs.shape
    nk, Ev = v.shape
    m = F.m
    nch = -(-nk // c)
    order = np.argsort(lim, kind="stable")                 # rows by lim: b_i increasing
    lim = np.ascontiguousarray(lim[order], dtype=np.int64)
    qso = np.ascontiguousarray(qs[order])
    Cdo = np.ascontiguousarray(Cd[order])
    cdo = np.ascontiguousarray(cdel[order])
    rfo = np.ascontiguousarray(rf[order], dtype=np.float64)
    b = np.where(lim == 0, -1, np.where(lim >= nk, nch, lim // c))
    rstart = np.searchsorted(b, np.arange(nch + 2)).astype(np.int64)  # rows of b = J
    ends = kpos[np.minimum(np.arange(1, nch + 1) * c, nk) - 1]         # e_J
    xr = np.ascontiguousarray(kpos[np.maximum(lim - 1, 0)])            # x_i
    kw = dec[ends[np.arange(nk) // c] - kpos]                          # κ_j = γ^{e_J − P_j}
    prev = ends[np.clip(b - 1, 0, max(nch - 1, 0))]
    rw = np.where(b >= 1, rfo * dec[np.where(b >= 1, xr - prev, 0)], 0.0)   # ρ_i
    gap = np.ones(nch + 1)                                 # gap[J] = γ^{e_J − e_{J−1}}
    if nch > 1:
        gap[1:nch] = dec[ends[1:] - ends[:-1]]
    J = np.arange(nch + 1, dtype=np.int64)
    stepsA = np.stack([rstart[:-1], rstart[1:], np.minimum(J * c, nk),
                       np.minimum(J * c + c, nk)], axis=1)
    Jr = nch - J                                            # nch, nch − 1, .., 0
    stepsB = np.stack([np.minimum(Jr * c, nk), np.minimum(Jr * c + c, nk),
                       np.where(Jr >= 1, rstart[Jr], 0), np.where(Jr >= 1, rstart[Jr + 1], 0)],
                      axis=1)
    stepsA = np.ascontiguousarray(stepsA, dtype=np.int64)
    stepsB = np.ascontiguousarray(stepsB, dtype=np.int64)
    fstepA = np.ascontiguousarray(gap)                      # after step J: e_{J−1} → e_J
    fstepB = np.ascontiguousarray(gap[Jr])                  # after step Jr: e_Jr → e_{Jr−1}
    rowA = np.empty((nq, Ev + 1))                           # [dO/D, −Δ/D]
    rowA[:, :Ev] = Cdo
    rowA[:, Ev] = cdo
    keyA = np.empty((nk, Ev + 1))                           # [v, 1]
    keyA[:, :Ev] = v
    keyA[:, Ev] = 1.0
    qt = np.ascontiguousarray(qso.T)
    kt = np.ascontiguousarray(ks.T)
    tasksA = _unit_tasks([Ev + 1] * E)
    tasksB = _unit_tasks([Ev + 1] * E + [Ev])
    cb = backward_chunk(m, max(Ev + 1, max((b_ - a_) * (Ev + 1) + Ev for a_, b_ in tasksB)))
    dqA = np.zeros((nq, E))
    dkB = np.zeros((nk, E))
    dvB = np.zeros((nk, Ev))
    dqL = np.zeros((nq, E))
    dkL = np.zeros((nk, E))
    dvL = np.zeros((nk, Ev))
    work = (np.diff(rstart[:nch + 1]) + 1).astype(np.float64)
    tasksL = _ranges(0, nch, min(nch, _config.MAX_TASKS), work)
    with parallel(nw):
        # A: decayed prefix over key chunks → dq
        _par_dscan_columns(_dscan_columns, kt, ks, keyA * kw[:, None], qt, rowA * sq, rw,
                           fstepA, stepsA, task_array(tasksA), cb, *F.keys(), *F.queries(),
                           dqA, np.zeros((nq, 0)))
        # B: decayed suffix over row groups → dk, dv
        _par_dscan_columns(_dscan_columns, qt, qso, rowA * rw[:, None], kt, keyA * sq, kw,
                           fstepB, stepsB, task_array(tasksB), cb, *F.queries(), *F.keys(),
                           dkB, dvB)
        # L: the explicit part of every chunk
        _par_dlocal_chunks(_dlocal_chunks, qso, ks, v, Cdo, cdo, F.pc, lim, rstart, xr, rfo,
                           kpos, dec, task_array(tasksL), c, sq, dqL, dkL, dvL)
    dq = np.empty((nq, E))
    dq[order] = dqA + dqL
    return dq, dkB + dkL, dvB + dvL


def decay_backward(q, k, v, out, den, dout, scale, coef, rate, causal, *, offset=0,
                   key_mask=None, workers=None):
    r"""Certified fast gradients of softmax attention with exponential decay
    (:func:`decay_attention`).

    The gradients of the EXACT attention with bias ``−rate·|t|`` (``t_ij = i + offset −
    j``; ``causal``: only ``t >= 0``), ``o_i = Σ_j A_ij v_j``, ``A_ij = T_ij e^{x_ij} /
    Σ_l T_il e^{x_il}``, ``T_ij = γ^{|t_ij|}``, ``x_ij = s·q_iᵀk_j``, approximated as
    :func:`numbarope.ops.gemm.gemm_backward` does (the fast-backward idea of Chen, Huo,
    Li, Liang, Shi, Song 2024): A replaced by the forward's own weights ``P̃_ij =
    w_ij/D_i``, ``w_ij = γ^{|t_ij| − t0_i} p(x_ij)``, ``p(x_ij) = φ(q'_i)ᵀψ(k'_j)``
    (``q' = √s q``, ``k' = √s k``; Alman & Song 2025, §4; t0_i the distance of row i's
    nearest visible real key, D_i the forward's ``den``), o by the forward's õ, and the
    exact formulas (Dao 2023, §3.2) with ``Δ̃_i = dO_i·õ_i``::

        dQ_i = (√s/D_i) Σ_j w_ij (dO_i·v_j − Δ̃_i) k'_j
        dK_j = √s Σ_i (w_ij/D_i) (dO_i·v_j − Δ̃_i) q'_i
        dV_j = Σ_i w_ij dO_i/D_i

    **Algorithm** (the forward's decayed chunked scans, with the wider states of
    :func:`numbarope.ops.prefix.prefix_backward`). A side (the keys at or before the
    row, ``t >= 0``; two-sided also the keys after it, ``t < 0``, by the same code on
    the reversed keys at mirrored positions) gives row i a prefix of ``lim_i`` real keys,
    the last at position ``x_i``, with weights ``r_i γ^{x_i − P_j} p(x_ij)``, ``r_i =
    γ^{d_i − t0_i}`` (d_i the distance of the side's nearest key; 1 causal). The keys are
    cut into chunks of C = :func:`backward_chunk_keys` (e_J the position of chunk J's
    last key). dQ takes the keys of the whole chunks before ``b_i = lim_i // C``
    through a decayed key state, a prefix scan as the forward's::

        Z_J = Σ_{j < J·C} γ^{e_{J−1} − P_j} ψ_j (k'_j ⊗ [v_j, 1])   (m × E(Ev+1)),
        Z_{J+1} = γ^{e_J − e_{J−1}} Z_J + Σ_{j in chunk J} γ^{e_J − P_j} ψ_j (k'_j ⊗ [v_j, 1]),
        dQ_i = r_i γ^{x_i − e_{b_i−1}} Σ_a √s [dO_i/D_i, −Δ̃_i/D_i]_a (φ_iᵀZ_{b_i})[·, a],

    and its own chunk's keys ``b_i·C .. lim_i − 1`` explicitly (Horner on the logits
    times ``r_i γ^{x_i − P_j}``, as the forward's chunk kernel). dK and dV: the rows that
    see key j of chunk J with ``b_i > J`` come through a decayed ROW state scanned in the
    opposite direction (a suffix over row groups, referenced at e_J)::

        Zq_J = Σ_{b_i > J} r_i γ^{x_i − e_J} φ_i (q'_i ⊗ [dO_i/D_i, −Δ̃_i/D_i]),   U_J alike
               with dO_i/D_i,   Zq_{J−1} = γ^{e_J − e_{J−1}} Zq_J + Σ_{b_i = J} ...,
        dK_j = γ^{e_J − P_j} Σ_a √s [v_j, 1]_a (ψ_jᵀZq_J)[·, a],   dV_j = γ^{e_J − P_j} ψ_jᵀU_J,

    the rows with ``b_i = J`` explicitly. Every factor is an entry ``fl(γ^d)`` of
    :func:`decay_factors`, d between two positions: none exceeds 1, so nothing overflows
    however far a row lies from its keys (rectangular, padding), as in the forward.
    Rows with ``D_i <= 0`` or no visible key contribute nothing and get ``dq = 0``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, as given to :func:`decay_attention` (rotated; query i at position
        ``i + offset``; G query heads sharing this key/value head).
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1.
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output õ (:func:`decay_attention` with the same inputs).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators D_i as :func:`decay_attention` returns them (weights
        relative to each row's nearest visible key; :meth:`Decay.backward` converts
        those of :meth:`Decay.run` with ``T``).
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        The forward's polynomial p (monomial coefficients).
    rate : float >= 0 (or inf)
        The decay per position, γ = e^{−rate}.
    causal : bool
        Only the keys at or before the query (else two-sided), as the forward.
    offset : int, optional
        Position of query 0.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0`` (the real keys keep their
        positions).
    workers : int, optional
        Threads (None: :func:`numbarope.get_workers`). The result does not depend on
        it (bitwise): task partitions depend on the sizes only.

    Returns
    -------
    dq : (L, E) or (G, L, E) ndarray of float64
        With respect to the (rotated) q given.
    dk : (S, E) ndarray of float64
        Summed over the G query heads.
    dv : (S, Ev) ndarray of float64
        Summed over the G query heads.

    Raises
    ------
    ValueError
        For a rate that is not a real scalar >= 0, or shapes that do not match.

    Notes
    -----
    **Accuracy.** :func:`decay_gradient_bound` bounds ``max|dq − dq_exact|``,
    ``max|dk − dk_exact|``, ``max|dv − dv_exact|`` against the exact gradients with the
    decay bias (a proof, from maxima of the inputs and decayed row masses): each row's
    P̃ is within ``ε_P = 2ε/(1−ε)`` of the softmax relatively, ε = δ + ρ with ρ the
    forward's :func:`numbarope.ops._bounds.recurrence_rounding`, plus the rounding of
    these passes (the decay factors on every path counted as in the forward's model).

    **Cost.** Per side, the two scans ``(G·L + S)·m·(2E·(Ev+1) + Ev)`` multiply-adds in
    GEMMs (``m = C(E+g, g)``), ``m·E·(2Ev+3)`` per chunk to move the states' references,
    and the explicit part ``O(G·L·C·(E + Ev + g))``; two-sided decay runs both sides
    (twice the causal cost). The exact backward is ``~7·G·L·S·(E+Ev)/2`` (``/4``
    causal) with two exponentials per pair.

    **Memory.** Inputs' float64 copies and three partial results per side,
    ``O((G·L + S)·(E + Ev))``; per scan task a slice of the running state (the whole
    state is ``m × (2E(Ev+1) + Ev)`` over all tasks), a feature block and its products;
    per explicit task a C × C block. No per-chunk states are stored.

    **Threads.** As :func:`numbarope.ops.prefix.prefix_backward`: the scans run
    serially over the chunks, parallel over tasks of about :data:`BACKWARD_COLUMNS`
    state columns; the explicit part parallel over tasks of whole chunks; the parts
    added in a fixed order.

    References
    ----------
    J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
    Fourier Transform", arXiv:2505.11892 (2025), §4.
    Y. Chen, J. Huo, X. Li, Y. Liang, Z. Shi, Z. Song, "Fast Gradient Computation for
    RoPE Attention in Almost Linear Time", arXiv:2412.17316 (2024).
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2.
    O. Press, N. A. Smith, M. Lewis, "Train Short, Test Long: Attention with Linear
    Biases Enables Input Length Extrapolation", ICLR 2022 (ALiBi).
    """
    r = _check_rate(rate)
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nq = G * L
    nk = kpos.size
    shape_q = (L, E) if single else (G, L, E)
    dq = np.zeros((nq, E))
    dk = np.zeros((S, E))
    dv = np.zeros((S, Ev))
    if nq == 0 or nk == 0 or Ev == 0:
        return dq.reshape(shape_q), dk, dv
    O = np.asarray(out, dtype=np.float64).reshape(nq, Ev)
    dO = np.asarray(dout, dtype=np.float64).reshape(nq, Ev)
    D = np.asarray(den, dtype=np.float64).reshape(nq)
    v64 = np.require(v64, requirements=["C", "W"])   # a read-only v: one more numba type
    F = _Side(coef, E)
    nw = resolve_workers(workers)
    c = backward_chunk_keys(F.m)
    sq = float(np.sqrt(scale))
    dec = decay_factors(r, np.arange(S + 1))
    qpos = np.tile(np.arange(L, dtype=np.int64) + int(offset), G)
    lim_f = np.searchsorted(kpos, qpos, side="right").astype(np.int64)   # P_j <= pos
    lim_b = nk - lim_f                                                    # P_j > pos
    seen = lim_f > 0 if causal else np.ones(nq, bool)
    ok = (D > 0) & seen
    inv = np.zeros(nq)
    inv[ok] = 1.0 / D[ok]                                   # 1/D_i (0: no weight)
    delta = np.einsum("ic,ic->i", dO, O)                   # Δ̃_i = dO_i·õ_i
    Cd = dO * inv[:, None]                                  # dO_i/D_i
    cdel = -(delta * inv)                                   # −Δ̃_i/D_i
    if causal:
        dqr, dkr, dvr = _side_backward(qs, ks, v64, kpos, lim_f, np.ones(nq), Cd, cdel, dec,
                                       F, nw, c, sq)
    else:
        ff, fb = _side_factors(qpos, kpos, lim_f, dec)
        dqr, dkr, dvr = _side_backward(qs, ks, v64, kpos, lim_f, ff, Cd, cdel, dec, F, nw,
                                       c, sq)
        kpos_b = np.ascontiguousarray((S - 1) - kpos[::-1])
        dq_b, dk_b, dv_b = _side_backward(qs, np.ascontiguousarray(ks[::-1]),
                                          np.ascontiguousarray(v64[::-1]), kpos_b, lim_b, fb,
                                          Cd, cdel, dec, F, nw, c, sq)
        dqr = dqr + dq_b
        dkr = dkr + dk_b[::-1]
        dvr = dvr + dv_b[::-1]
    if nk == S:
        dk, dv = dkr, dvr
    else:
        dk[kpos] = dkr
        dv[kpos] = dvr
    return dqr.reshape(shape_q), dk, dv


# ------------------------------------------------------------------ the backward's bound
@njit(cache=True, nogil=True)
def _decayed_sums(kpos, dec, Wf, Wb):
    # F[j] = Σ_{a >= j} dec[kpos[a] − kpos[j]]·Wf[a] and B[j] = Σ_{a <= j}
    # dec[kpos[j] − kpos[a]]·Wb[a], by the two recurrences (O(nk)).
    nk = kpos.shape[0]
    F = np.empty(nk)
    B = np.empty(nk)
    acc = 0.0
    for j in range(nk - 1, -1, -1):
        if j < nk - 1:
            acc *= dec[kpos[j + 1] - kpos[j]]
        acc += Wf[j]
        F[j] = acc
    acc = 0.0
    for j in range(nk):
        if j > 0:
            acc *= dec[kpos[j] - kpos[j - 1]]
        acc += Wb[j]
        B[j] = acc
    return F, B


def decay_gradient_bound(q, k, v, dout, scale, coef, delta, rate, causal=False, *, offset=0,
                         key_mask=None, radius=None, radius1=None, chunk=None,
                         backward_chunk=None):
    r"""Certified bounds on the errors of :func:`decay_backward` against the EXACT
    softmax attention's gradients with the decay bias ``−rate·|t|``.

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
        The polynomial p of the forward.
    delta : float
        δ: certified relative error of p against exp on ``[−R, R]``.
    rate : float >= 0 (or inf)
        γ = e^{−rate}.
    causal : bool, optional
        Only the keys at or before the query, as the forward and the backward.
    offset : int, optional
        Position of query 0.
    key_mask : (S,) array_like of bool, optional
        True = a real key.
    radius : float, optional
        Proven ``R >= max |s q_iᵀk_j|`` over the real keys; default the
        Cauchy–Schwarz ``s·max‖q_i‖₂·max‖k_j‖₂``. δ must hold on ``[−R, R]``.
    radius1 : float, optional
        ``R₁ >= s·max_ij Σ_e |q_ie k_je|``; default ``s·max‖q_i‖₂·max‖k_j‖₂``.
    chunk, backward_chunk : int, optional
        Keys per chunk of the forward (default :func:`decay_chunk`) and of the backward
        (default :func:`backward_chunk_keys`), for the counts of decay factors.

    Returns
    -------
    (bq, bk, bv) : tuple of float
        Bounds on ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|``
        over all entries (``inf`` when void: ``δ + ρ >= 1``).

    Notes
    -----
    A proof, in the model and notation of
    :func:`numbarope.ops._bounds.gradient_bound` and
    :func:`~numbarope.ops._bounds.causal_gradient_bound` (Higham 2002: standard model,
    Lemmas 3.1 and 3.3, any summation order), over the rows that see a real key (the
    others have exact and computed gradients 0), with n those rows of all query
    heads, ``S_r`` the real keys, ``S`` the key positions, T_ij = γ^{|t_ij| − t0_i} the
    decay relative to row i's nearest visible key (so ``max_j T_ij = 1``) and
    ``M_i = Σ_j T_ij >= 1`` the row's decayed mass. Those gradient bounds do not apply
    as they stand: they count ``S_i`` keys of weight 1 per row and the polynomial
    method's rounding without decay factors; here every place where a row's number of
    keys entered enters its mass M_i, and the factors are counted.

    * *The forward's weights.* :func:`decay_attention`'s ``D̂_i = Σ_j T_ij e^{x_ij}(1 +
      η_i)``, ``|η_i| <= ε = δ + ρ`` with ρ = :func:`~numbarope.ops._bounds.
      recurrence_rounding` ("decay", at the forward's chunk) for ``S + 8g + 6`` keys:
      its count ``S + m + 2g + 2`` becomes ``S + m + 10g + 8``, every feature rounding
      counted as :func:`~numbarope.ops._bounds.gradient_bound` does (``5d + 2`` per
      side) and 2 more for ``fl(fl(D̂·w)/w)``, the conversion of :meth:`Decay.backward`
      (``T`` given); S also bounds the telescoped distances ``|t| − t0 <= S − 1``.
      Then, as there, ``|P̃_ij − A_ij| <= ε_P A_ij`` with ``P̃_ij = T_ij p(x_ij)/D̂_i``
      (the backward's formula in exact arithmetic), ``ε_P = (δ + ε)/(1 − ε)``, the
      output error ``e_o``, ``e_Δ``, ``a₁``, ``a₂`` unchanged.
    * *Approximation.* ``A_ij = T_ij e^{x_ij}/Σ_l T_il e^{x_il}`` is at most
      ``c_i = 1/(1 + (M_i − 1)e^{−2R})`` (``Σ_{l≠j} T_il/T_ij >= M_i − 1``, each ratio of
      exponentials >= e^{−2R}) and at most ``e^{2R} T_ij/M_i``. A key's sum over rows
      ``Σ_i A_ij r_i`` (r_i = ‖dO_i‖₁, ‖dO_i‖₂ or ‖dO_i‖_∞) is thus at most
      ``Λ_A(r) = min(Σ_i c_i r_i, e^{2R} Λ_T(r))``, ``Λ_T(r) >= max_j Σ_i T_ij r_i/M_i``::

          dq: s κ_k min(N₁a₁, N₂a₂),   dk: s κ_q min(Λ_A(‖dO‖₁)a₁, Λ_A(‖dO‖₂)a₂),
          dv: ε_P Λ_A(‖dO‖_∞)

      (dq as before: ``Σ_j A_ij = 1``, ``Σ_j P̃_ij <= 1 + ε_P``).
    * *Rounding.* ``D̂_i >= (1 − ε) M_i e^{−R}``, so ``Σ_j T_ij P₁/D̂_i <= H = P₁e^R/(1−ε)``
      (dq) and ``T_ij P₁/D̂_i <= H T_ij/M_i`` (dk, dv: summed over rows, ``H Λ_T``).
      Roundings per term: those of :func:`~numbarope.ops._bounds.causal_gradient_bound`
      (``k_q = S_r + m + Ev + 10g + 15``, ``k_k = n + m + Ev + 10g + 15``, ``k_v = n + m +
      10g + 9``; the scans' operations are the prefix backward's, each decay weight
      multiplied into a row of ``[v, 1]`` or ``[dO/D, −Δ/D]`` or into the result, or a
      state scaled) plus the decay factors on the path of a key to a row: in the state
      routes ``κ_j``, one step factor per chunk passed, ``γ^{x_i − e}`` and the side
      factor ``r_i``, at most ``nch + 2`` (nch the backward's chunks), each ``fl(exp(−
      fl(rate·d)))`` and one multiplication: ``EXP_ULPS + 1`` roundings with the
      argument's error telescoped over the path to ``e^{η'}``, ``|η'| <= u·A``, ``A =
      min(rate·(S−1), DECAY_CUT)`` (``⌈A⌉`` roundings, as in recurrence_rounding); the
      explicit route 2 factors; 1 addition more for the two sides. So each count grows
      by ``k_d = (EXP_ULPS + 1)(nch + 2) + ⌈A⌉ + 1``. Pairs with ``rate·(|t| − t0) >
      T_B`` (a factor may be cut to 0): the exact relative weight is ``< e^{−T_B}``, the
      computed 0 or ``<= (1 + γ_k) e^{−T_B(1−u)}``: an absolute error of at most ``β_q =
      2S_r(1 + γ)e^{−T_B(1−u)}`` times ``H`` and the term's other factors for dq (at most
      S_r such keys), ``β = 2(1 + γ)e^{−T_B(1−u)}`` per row for dk and dv; 0 when
      ``rate·(S−1) <= T_B``.

    The returned bounds::

        bq = s κ_k [min(N₁a₁, N₂a₂) + (γ_{k_q} + β_q)(2 + e_Δ) V H N₁]
        bk = s κ_q [min(Λ_A(‖dO‖₁)a₁, Λ_A(‖dO‖₂)a₂) + (2 + e_Δ) V H (γ_{k_k} Λ_T(‖dO‖₁) + β Σ₁)]
        bv = ε_P Λ_A(‖dO‖_∞) + H (γ_{k_v} Λ_T(‖dO‖_∞) + β Σ_∞)

    *The masses and Λ_T* are computed in O(n + S_r) from positions: ``Σ_{l <= j}
    γ^{P_j − P_l}`` and ``Σ_{l >= j} γ^{P_l − P_j}`` by two decayed recurrences over the
    real keys give ``M_i`` (the side factors times the sums at the row's nearest key on
    each side), and ``max_j Σ_i T_ij w_i`` (``w_i = r_i/M_i``) the same recurrences on
    the rows' weights gathered at their nearest keys. Their own rounding (at most
    ``K = (EXP_ULPS + 2)(S_r + 4) + n + ⌈A⌉`` per term, all terms positive) is covered by
    taking ``M_i = max(1, M̂_i(1 − 2γ_K))`` and ``Λ_T = min(Σ_i w_i, (1 + 2γ_K)·max_j(...)
    + e^{−T_B}Σ_i w_i)`` (the last for the terms whose factor was cut to 0, each
    ``< e^{−T_B}``).

    Where rows see few keys of weight near 1 (fast decay: M_i small) the bounds are about
    those of a short causal window; with ``rate = 0`` they are
    :func:`~numbarope.ops._bounds.causal_gradient_bound`'s (causal) up to the counts.
    """
    r = _check_rate(rate)
    Q = np.asarray(q, dtype=np.float64)
    E = Q.shape[-1]
    L = Q.shape[-2]
    Q = Q.reshape(-1, E)
    K = np.asarray(k, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    Ev = V.shape[1]
    dO = np.asarray(dout, dtype=np.float64).reshape(-1, Ev)
    S_all = K.shape[0]
    keep = (np.ones(S_all, bool) if key_mask is None
            else np.asarray(key_mask, dtype=bool).reshape(S_all))
    kpos = np.flatnonzero(keep).astype(np.int64)
    nk = kpos.size
    G = Q.shape[0] // max(L, 1)
    qpos = np.tile(np.arange(L, dtype=np.int64) + int(offset), G)
    lim_f = np.searchsorted(kpos, qpos, side="right").astype(np.int64)
    act = lim_f > 0 if causal else np.full(qpos.size, nk > 0)
    K, V = K[keep], V[keep]
    if nk == 0 or not act.any():
        return 0.0, 0.0, 0.0
    coef = np.asarray(coef, dtype=np.float64)
    g = len(coef) - 1
    m = n_features(E, g)
    dec = decay_factors(r, np.arange(S_all + 1))
    if causal:
        ff, fb = np.ones(qpos.size), np.zeros(qpos.size)
    else:
        ff, fb = _side_factors(qpos, kpos, lim_f, dec)
    Q, dO, lim_f, ff, fb = Q[act], dO[act], lim_f[act], ff[act], fb[act]
    n = Q.shape[0]
    # --- the forward's ε and the shared terms (_bounds._gradient_terms, ρ of decay)
    cf = decay_chunk(m, E, Ev, g) if chunk is None else int(chunk)
    cb = backward_chunk_keys(m) if backward_chunk is None else int(backward_chunk)
    t = _gradient_terms(Q, K, V, scale, coef, delta, S_all, radius, radius1,
                        rounding=lambda R, R1: recurrence_rounding(
                            "decay", S_all + 8 * g + 6, m, coef, R, R1, delta, cf, r))
    if t is None:
        return np.inf, np.inf, np.inf
    _, _, s, R, kq, kk, Vm, eP, eD, H, a1, a2 = t
    # --- decayed masses M_i (lower bounds) and Λ_T (upper bounds)
    A = min(r * (S_all - 1), DECAY_CUT) if S_all > 1 else 0.0
    ulps = float(EXP_ULPS[np.dtype(np.float64)])
    gK = _gamma((ulps + 2) * (nk + 4) + n + math.ceil(A))
    TB = DECAY_CUT / (1 + _U)
    ones = np.ones(nk)
    ab, af = _decayed_sums(kpos, dec, ones, ones)          # Σ_{l>=j}, Σ_{l<=j}
    Mh = ff * af[np.maximum(lim_f - 1, 0)] * (lim_f > 0)
    Mh = Mh + fb * ab[np.minimum(lim_f, nk - 1)] * (lim_f < nk)
    M = np.maximum(1.0, Mh * (1 - 2 * gK))
    with np.errstate(over="ignore", invalid="ignore"):
        ci = 1.0 / (1.0 + (M - 1) * float(np.exp(-min(2 * R, 700.0))))
        e2R = float(np.exp(min(2 * R, 700.0)))
    fwd = lim_f > 0
    bwd = lim_f < nk

    def lam_T(rw):
        w = rw / M
        Wf = np.zeros(nk)
        Wb = np.zeros(nk)
        np.add.at(Wf, lim_f[fwd] - 1, (ff * w)[fwd])
        np.add.at(Wb, lim_f[bwd], (fb * w)[bwd])
        Fs, Bs = _decayed_sums(kpos, dec, Wf, Wb)
        tot = float(w.sum())
        return min(tot, (1 + 2 * gK) * float((Fs + Bs).max()) + float(np.exp(-TB)) * tot)

    def lam_A(rw):
        return min(float(ci @ rw), e2R * lam_T(rw))

    r1 = np.abs(dO).sum(axis=1) if Ev else np.zeros(n)
    r2 = np.linalg.norm(dO, axis=1) if Ev else np.zeros(n)
    ri = np.abs(dO).max(axis=1) if Ev else np.zeros(n)
    nch = -(-nk // max(1, cb))
    kd = (ulps + 1) * (nch + 2) + math.ceil(A) + 1
    kq_, kk_, kv_ = (nk + m + Ev + 10 * g + 15 + kd, n + m + Ev + 10 * g + 15 + kd,
                     n + m + 10 * g + 9 + kd)
    cut = r * (S_all - 1) > TB if S_all > 1 else False
    with np.errstate(over="ignore", invalid="ignore"):
        eB = float(np.exp(-TB * (1 - _U))) if cut else 0.0
        bq_r = (_gamma(kq_) + 2 * nk * (1 + _gamma(kq_)) * eB)
        bk_r = (_gamma(kk_) * lam_T(r1) + 2 * (1 + _gamma(kk_)) * eB * float(r1.sum()))
        bv_r = (_gamma(kv_) * lam_T(ri) + 2 * (1 + _gamma(kv_)) * eB * float(ri.sum()))
        N1, N2 = float(r1.max()), float(r2.max())
        bq = s * kk * (min(N1 * a1, N2 * a2) + bq_r * (2 + eD) * Vm * H * N1)
        bk = s * kq * (min(lam_A(r1) * a1, lam_A(r2) * a2) + (2 + eD) * Vm * H * bk_r)
        bv = eP * lam_A(ri) + H * bv_r
    return tuple(float(b) if np.isfinite(b) else np.inf for b in (bq, bk, bv))
