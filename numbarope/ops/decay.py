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

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._bounds import DECAY_CUT, recurrence_rounding
from ._common import (_FM, _check_state, _example_qkv, _key_states, _ranges, _scan, _setup,
                      _shaped, _Side, gemm_chunk, recurrence_chunk, scan_memory)
from ._cost import COST_CONSTANTS
from ._exp import _exp64
from ._features import _features_block, n_features
from .registry import Algorithm, register

__all__ = ["Decay", "decay_attention", "decay_factors", "decay_chunk", "key_state",
           "shift_state", "add_states", "decay_memory"]


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
    hasf, hasb = lim_f > 0, lim_b > 0
    big = np.iinfo(np.int64).max // 4
    d_f = np.where(hasf, qpos - kpos[np.maximum(lim_f - 1, 0)], big)
    d_b = np.where(hasb, kpos[np.minimum(lim_f, nk - 1)] - qpos, big)
    t0 = np.minimum(d_f, d_b)
    ff = np.where(hasf, dec[np.where(hasf, d_f - t0, 0)], 0.0)
    fb = np.where(hasb, dec[np.where(hasb, d_b - t0, 0)], 0.0)
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

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=_bias.ALiBi([0.05]))


register(Decay())
