"""Structured relative weights without the FFT: exponential decay and sliding windows.

The separable fast path (:func:`numbarope.fast.fast_separable`) computes, for a
polynomial ``p(x) = Σ_k a_k x^k ≈ eˣ`` with ``p(q'ᵀk') = φ(q')ᵀψ(k')``
(``q' = √s q``, ``k' = √s k``; Alman & Song 2025, §4),

    num_i = Σ_j T(t_ij) p(q'_iᵀk'_j) [v_j, 1],     t_ij = i + offset − j,

and does the sum over j for an arbitrary Toeplitz T by FFT: ``m·(Ev+1)``
convolutions of length ``~L+S``. Two families of T have a cheaper structure,
done here in ``O((L+S)·m·(Ev+1))`` work plus ``O((L+S)·C·(E+Ev+g))`` inside
chunks of C keys, with no FFT and no rounding error of a convolution:

* :func:`fast_decay`: ``T(t) = γ^{|t|}``, ``γ = e^{−rate}`` (exponential decay,
  ALiBi's form per head). A chunked *decayed* prefix scan: ``T(t)`` for
  ``t >= 0`` factors as ``γ^{i−e}·γ^{e−j}`` through any position e between key j
  and query i, so the keys' state ``Σ_j γ^{e−j} ψ(k_j)[v_j, 1]ᵀ`` carried from
  one chunk end e to the next is multiplied by ``γ^{Δe}``. Two-sided decay scans
  forward (``t >= 0``) and backward (``t < 0``) states of the same chunks, formed
  from one set of key features and read with one set of query features.
* :func:`fast_window`: ``T(t) = 1`` for ``−right <= t <= left``, else 0. Each query
  sees a contiguous range of keys: the key chunks it covers entirely are summed
  from a tree of chunk states, the partial chunks at both ends by Horner on the
  logits.

Both serve rectangular problems (L queries at positions ``offset .. offset+L−1``
against S keys at ``0 .. S−1``), padded keys (``key_mask``) and G query heads
that share one key/value head (the key side is formed once). Padded keys are
removed and the real keys keep their positions, so every query row sees a
contiguous range of the real keys and all distances are taken between
positions.

:func:`recurrence_rounding` is the rigorous floating-point allowance of both
(see its Notes for the derivation).

Threads, as in :mod:`numbarope.fast`: serial ``nogil`` numba kernels run on
Python threads (:func:`numbarope._threads.run_tasks`), BLAS limited to one
thread per task, and every partition that changes a rounding depends on the
sizes only, so results are bitwise the same for any ``workers``.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and
Fast Fourier Transform", arXiv:2505.11892 (2025), §4 (polynomial method), §1
(relative bias keeps the Toeplitz structure).
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM
(2002): §2.2 (standard model), Lemma 3.1 and Lemma 3.3 (γ_k and the
θ-calculus), §3.1 and §4.2 (inner products and sums in any order).
"""

import math

import numpy as np
from numba import njit

from . import _config
from ._monomials import _features_block, feature_recurrence, feature_weights, monomial_table
from ._threads import blas_threads, resolve_workers, run_tasks
from .exact import EXP_ULPS, _exp64
from .fast import (_causal_group, _finish, _gemm_queries, _key_state, _query_rows, _ranges,
                   _state_tasks, _with_groups, gemm_chunk)

__all__ = ["fast_decay", "fast_window", "recurrence_rounding", "recurrence_chunk", "decay_chunk",
           "window_chunk", "DECAY_CUT"]

_FM = set(_config.FASTMATH)
_U = 2.0 ** -53

#: Decay factors ``e^{−rate·d}`` with ``fl(rate·d) > DECAY_CUT`` are stored as exactly
#: 0 (they are < e^{−699.9} relative to the row's nearest key, see
#: :func:`recurrence_rounding`); all others are normal numbers >= e^{−700}
#: (> 2^{−1010}), computed by numbarope's proven exp kernel.
DECAY_CUT = 700.0


#: Keys per chunk of both algorithms: None chooses it from the sizes
#: (:func:`recurrence_chunk`); an int forces it (tests use small ones).
CHUNK = None


def recurrence_chunk(m, E, Ev, g):
    """Keys per chunk: ``8·sqrt(m(Ev+1) / (E + Ev + 2g + 3))``, a multiple of 16 in [16, 512].

    A chunk costs each query row ~C·(E + Ev + 2g + 3) inside it (logits, Horner, values)
    and each chunk a few m·(Ev+1) state operations; the square root balances the two.
    Measured (one thread, n = 8192, eps = 1e-3): E = 4 (m = 70) best at 32, E = 8
    (m = 495) at 64-128, E = 16 (m = 969) at 128-256; the rule gives 32, 96, 160.
    """
    if CHUNK:
        return int(CHUNK)
    c = 8.0 * math.sqrt(m * (Ev + 1) / (E + Ev + 2 * g + 3))
    return int(min(512, max(16, 16 * round(c / 16))))


def decay_chunk(m, E, Ev, g):
    """Keys per chunk of :func:`fast_decay` (:func:`recurrence_chunk`)."""
    return recurrence_chunk(m, E, Ev, g)


def window_chunk(m, E, Ev, g, S):
    """Keys per chunk of :func:`fast_window`: :func:`recurrence_chunk`, larger when the
    tree of chunk states (about 2·S/C states of m × (Ev+1)) would exceed STATE_BYTES."""
    most = max(1, _config.STATE_BYTES // (2 * 8 * m * (Ev + 1)))
    return int(max(recurrence_chunk(m, E, Ev, g), -(-int(S) // most)))


# ------------------------------------------------------------------ decay factors
def _decay_factors(rate, d):
    """``fl(e^{−rate·d})`` for integer distances ``d >= 0``: exactly 1 at d = 0, exactly 0
    where ``fl(rate·d) > DECAY_CUT``, else numbarope's exp kernel (relative error
    <= EXP_ULPS·u, exact.EXP_ULPS) of the rounded argument ``−fl(rate·d)``."""
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


def _check_width(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return int(x)


# ------------------------------------------------------------------ serial kernels
@njit(cache=True, nogil=True, fastmath=_FM)
def _decay_state(kt, v, kpos, dec, r0, r1, ref, cf, parent, var, ratio, w0, post, weight,
                 buf, dw, vw, S, s):
    # S += Σ_{r0 <= r < r1} dec[ref − kpos[r]] ψ(k_r) v_rᵀ, s alike with 1: the decay
    # weight rides on the values (w × Ev products), features in blocks of cf rows.
    m = parent.shape[0]
    Ev = v.shape[1]
    for j0 in range(r0, r1, cf):
        j1 = min(j0 + cf, r1)
        w = j1 - j0
        P = buf[:m * w].reshape((m, w))
        _features_block(kt, j0, j1, parent, var, ratio, w0, post, weight, P, 0)
        d = dw[:w]
        for r in range(w):
            d[r] = dec[ref - kpos[j0 + r]]
        s += np.dot(P, d)
        if Ev:
            W = vw[:w * Ev].reshape((w, Ev))
            for r in range(w):
                f = d[r]
                for e in range(Ev):
                    W[r, e] = v[j0 + r, e] * f
            S += np.dot(P, W)


@njit(cache=True, nogil=True, fastmath=_FM)
def _decay_states(kt, v, kpos, dec, j0, j1, base, c, cf, parent, var, ratio, w0, post,
                  weight, states, sums, tot, tsum):
    # states[j − base] = Σ_{r in chunk j} dec[e_j − kpos[r]] ψ(k_r)[v_r, 1] (e_j: position
    # of chunk j's last key) for j0 <= j < j1; (tot, tsum) = the task's total referenced at
    # e_{j1−1}: tot ← dec[e_j − e_{j−1}]·tot + state_j, in chunk order.
    n = v.shape[0]
    m = parent.shape[0]
    w = max(1, min(cf, c))
    buf = np.empty(m * w)
    dw = np.empty(w)
    vw = np.empty(w * max(1, v.shape[1]))
    prev = 0
    for j in range(j0, j1):
        st = states[j - base]
        sm = sums[j - base]
        st[:, :] = 0.0
        sm[:] = 0.0
        k0 = j * c
        k1 = min(k0 + c, n)
        ref = kpos[k1 - 1]
        _decay_state(kt, v, kpos, dec, k0, k1, ref, cf, parent, var, ratio, w0, post, weight,
                     buf, dw, vw, st, sm)
        if j > j0:
            f = dec[ref - prev]
            tot[:, :] = tot * f + st
            tsum[:] = tsum * f + sm
        else:
            tot[:, :] = st
            tsum[:] = sm
        prev = ref


@njit(cache=True, nogil=True, fastmath=_FM)
def _decay_queries(qs, ks, qt, v, kpos, dec, pc, lim, xrow, rstart, j0, j1, base, c, cf,
                   parent, var, ratio, w0, post, weight, states, sums, S, s, num, den):
    # For key chunks j0 <= j < j1 in order, (S, s) on entry = the decayed state of all keys
    # before chunk j, referenced at e_{j−1} (the position of the last key of chunk j − 1).
    # Rows rstart[j] <= r < rstart[j+1] see the keys 0 .. lim[r] − 1, the last of them in
    # chunk j at position xrow[r]:
    #   num[r] = dec[xrow − e_{j−1}]·φ(q_r)ᵀS + Σ_{j·c <= t < lim[r]} dec[xrow − kpos[t]]
    #            · p(q_r k_t) v_t      (den alike, with s and 1);
    # then S ← dec[e_j − e_{j−1}]·S + states[j − base]. p by Horner on the logits.
    nk = v.shape[0]
    Ev = v.shape[1]
    g = pc.shape[0] - 1
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        a = rstart[j]
        b = rstart[j + 1]
        k0 = j * c
        k1 = min(k0 + c, nk)
        if b > a:
            if j > 0:
                _query_rows(qt, S, s, a, b, cf, parent, var, ratio, w0, post, weight, buf,
                            num, den)
                e0 = kpos[k0 - 1]
                for r in range(a, b):
                    f = dec[xrow[r] - e0]
                    den[r] *= f
                    for e in range(Ev):
                        num[r, e] *= f
            else:
                for r in range(a, b):
                    den[r] = 0.0
                    for e in range(Ev):
                        num[r, e] = 0.0
            for r0 in range(a, b, c):
                r1 = min(r0 + c, b)
                X = np.dot(qs[r0:r1], ks[k0:k1].T)
                for r in range(r1 - r0):
                    row = X[r]
                    x0 = xrow[r0 + r]
                    cnt = lim[r0 + r] - k0
                    acc = 0.0
                    for t in range(cnt):
                        x = row[t]
                        p = pc[0]
                        for d in range(1, g + 1):
                            p = p * x + pc[d]
                        p *= dec[x0 - kpos[k0 + t]]
                        row[t] = p
                        acc += p
                    for t in range(cnt, k1 - k0):
                        row[t] = 0.0
                    den[r0 + r] += acc
                if Ev:
                    num[r0:r1] += np.dot(X, v[k0:k1])
        if j > 0:
            f = dec[kpos[k1 - 1] - kpos[k0 - 1]]
            S[:, :] = S * f + states[j - base]
            s[:] = s * f + sums[j - base]
        else:
            S[:, :] = states[j - base]
            s[:] = sums[j - base]


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


@njit(cache=True, nogil=True, fastmath=_FM)
def _plain_states(kt, v, j0, j1, c, cf, parent, var, ratio, w0, post, weight, nodes, nsums):
    # nodes[j], nsums[j] = Σ_{r in chunk j} ψ(k_r) v_rᵀ, Σ ψ(k_r) (leaves of the tree).
    n = v.shape[0]
    buf = np.empty(parent.shape[0] * max(1, min(cf, c)))
    for j in range(j0, j1):
        nodes[j][:, :] = 0.0
        nsums[j][:] = 0.0
        _key_state(kt, v, j * c, min(j * c + c, n), cf, parent, var, ratio, w0, post, weight,
                   buf, nodes[j], nsums[j])


@njit(cache=True, nogil=True, fastmath=_FM)
def _horner_span(qs, ks, v, pc, r0, r1, s0, s1, rlo, rhi, num, den):
    # Rows r0 <= r < r1 against keys s0 <= t < s1: row r takes the keys
    # max(rlo[r], s0) <= t < min(rhi[r], s1), weight p(q_r k_t) (Horner on the logit).
    if s1 <= s0 or r1 <= r0:
        return
    g = pc.shape[0] - 1
    n = s1 - s0
    X = np.dot(qs[r0:r1], ks[s0:s1].T)
    for r in range(r1 - r0):
        row = X[r]
        ta = min(max(rlo[r0 + r] - s0, 0), n)
        tb = min(max(rhi[r0 + r] - s0, ta), n)
        for t in range(ta):
            row[t] = 0.0
        acc = 0.0
        for t in range(ta, tb):
            x = row[t]
            p = pc[0]
            for d in range(1, g + 1):
                p = p * x + pc[d]
            row[t] = p
            acc += p
        for t in range(tb, n):
            row[t] = 0.0
        den[r0 + r] += acc
    if v.shape[1]:
        num[r0:r1] += np.dot(X, v[s0:s1])


@njit(cache=True, nogil=True, fastmath=_FM)
def _window_queries(qs, ks, qt, v, pc, lo, hi, ra, rb, gstart, gcl, gch, g0, g1, c, cf,
                    parent, var, ratio, w0, post, weight, nodes, nsums, loff, num, den):
    # Groups g0 <= gi < g1 of rows gstart[gi] .. gstart[gi+1] − 1 sharing (cl, ch): every
    # row sees the keys lo[r] <= t < hi[r], covering the whole chunks cl .. ch − 1 (none if
    # cl >= ch). Covered chunks: their states summed from the tree (the canonical <= 2
    # nodes per level, in key order), then φ(q)ᵀ·sum. The rest, keys lo .. ra[r] − 1 and
    # rb[r] .. hi[r] − 1 (within chunks cl − 1 and ch; within two chunks if none is
    # covered), by Horner on the logits, in blocks of c rows.
    m = parent.shape[0]
    Ev = v.shape[1]
    buf = np.empty(m * max(1, min(cf, c)))
    Sc = np.empty((m, Ev))
    sc = np.empty(m)
    left = np.empty(64, np.int64)
    right = np.empty(64, np.int64)
    for gi in range(g0, g1):
        a = gstart[gi]
        b = gstart[gi + 1]
        cl = gcl[gi]
        ch = gch[gi]
        if cl < ch:
            nl = 0
            nr = 0
            x = cl
            y = ch
            lev = 0
            while x < y:
                if x & 1:
                    left[nl] = loff[lev] + x
                    nl += 1
                    x += 1
                if y & 1:
                    y -= 1
                    right[nr] = loff[lev] + y
                    nr += 1
                x >>= 1
                y >>= 1
                lev += 1
            Sc[:, :] = 0.0
            sc[:] = 0.0
            for i in range(nl):
                Sc += nodes[left[i]]
                sc += nsums[left[i]]
            for i in range(nr - 1, -1, -1):
                Sc += nodes[right[i]]
                sc += nsums[right[i]]
            _query_rows(qt, Sc, sc, a, b, cf, parent, var, ratio, w0, post, weight, buf,
                        num, den)
        else:
            for r in range(a, b):
                den[r] = 0.0
                for e in range(Ev):
                    num[r, e] = 0.0
        for r0 in range(a, b, c):
            r1 = min(r0 + c, b)
            # left span: lo .. ra; right span: rb .. hi (empty when no chunk is covered)
            s0 = lo[r0]
            s1 = ra[r0]
            t0 = rb[r0]
            t1 = hi[r0]
            for r in range(r0, r1):
                s0 = min(s0, lo[r])
                s1 = max(s1, ra[r])
                t0 = min(t0, rb[r])
                t1 = max(t1, hi[r])
            _horner_span(qs, ks, v, pc, r0, r1, s0, s1, lo, ra, num, den)
            _horner_span(qs, ks, v, pc, r0, r1, t0, t1, rb, hi, num, den)


# ------------------------------------------------------------------ drivers
class _Side:
    """Feature tables of one call (the same for every pass)."""

    def __init__(self, coef, E):
        g = len(coef) - 1
        self.wphi, self.wpsi = feature_weights(coef, E, g)
        _, self.parent, self.var, _ = monomial_table(E, g)
        self.rk, self.w0k, self.postk = feature_recurrence(self.wpsi, self.parent)
        self.rq, self.w0q, self.postq = feature_recurrence(self.wphi, self.parent)
        self.pc = np.ascontiguousarray(np.asarray(coef, np.float64)[::-1])   # Horner order
        self.m = self.parent.shape[0]
        self.E, self.g = E, g


def _decay_pass(qs, ks, v, kpos, lim, dec, F, nw):
    """One decayed prefix scan: row r sees the keys ``0 .. lim[r] − 1`` (positions
    ``kpos``, increasing) with weights ``dec[x_r − kpos[j]]``, ``x_r = kpos[lim[r] − 1]``
    (the row's last visible key). Rows with lim = 0 get 0.

    Phases per group of chunks (their states within STATE_BYTES), as
    :func:`numbarope.fast._prefix`: (1) each chunk's decayed state and each task's total,
    in parallel; (2) an exclusive decayed scan over the tasks, serial; (3) each task walks
    its chunks: query side, intra-chunk Horner, state update, in parallel. Rows that see
    every key (more than a chunk of them) use the final state, in parallel.
    """
    nk, Ev = v.shape
    nq = qs.shape[0]
    m = F.m
    c = decay_chunk(m, F.E, Ev, F.g)
    cf = min(gemm_chunk(m), c)
    nch = -(-nk // c)
    G = _causal_group(m, Ev + 1, nch)
    lim = np.asarray(lim, dtype=np.int64)
    order = None
    if np.any(lim[1:] < lim[:-1]):
        order = np.argsort(lim, kind="stable")
        lim = lim[order]
        qs = qs[order]
    qs = np.ascontiguousarray(qs)
    xrow = kpos[np.maximum(lim - 1, 0)]
    full0 = int(np.searchsorted(lim, nk, side="left"))
    if nq - full0 <= c:
        full0 = nq
    chunk_of = (lim[:full0] - 1) // c
    rstart = np.searchsorted(chunk_of, np.arange(nch + 1)).astype(np.int64)
    ends = kpos[np.minimum(np.arange(1, nch + 1) * c, nk) - 1]
    qt = np.ascontiguousarray(qs.T)
    kt = np.ascontiguousarray(ks.T)
    num = np.zeros((nq, Ev))
    den = np.zeros(nq)
    S = np.zeros((m, Ev))
    s = np.zeros(m)
    states = np.empty((min(G, nch), m, Ev))
    sums = np.empty((min(G, nch), m))
    work = (c + np.diff(rstart)).astype(np.float64)
    with blas_threads(1):
        for g0 in range(0, nch, G):
            g1 = min(g0 + G, nch)
            tasks = _ranges(g0, g1, _state_tasks(m, Ev + 1, g1 - g0), work[g0:g1])
            S_t = np.zeros((len(tasks), m, Ev))
            s_t = np.zeros((len(tasks), m))
            run_tasks(lambda i: _decay_states(kt, v, kpos, dec, tasks[i][0], tasks[i][1], g0,
                                              c, cf, F.parent, F.var, F.rk, F.w0k, F.postk,
                                              F.wpsi, states, sums, S_t[i], s_t[i]),
                      range(len(tasks)), nw)
            for i, (a, b) in enumerate(tasks):            # exclusive decayed scan, in place
                tot, tsum = S_t[i].copy(), s_t[i].copy()
                S_t[i], s_t[i] = S, s                     # referenced at ends[a − 1]
                if a > 0:
                    f = dec[ends[b - 1] - ends[a - 1]]
                    S *= f
                    s *= f
                S += tot
                s += tsum
            run_tasks(lambda i: _decay_queries(qs, ks, qt, v, kpos, dec, F.pc, lim, xrow,
                                               rstart, tasks[i][0], tasks[i][1], g0, c, cf,
                                               F.parent, F.var, F.rq, F.w0q, F.postq, F.wphi,
                                               states, sums, S_t[i], s_t[i], num, den),
                      range(len(tasks)), nw)
        if full0 < nq:                       # S: every key, referenced at kpos[nk − 1] = x_r
            # whole blocks of cf rows, split by the sizes only: the same GEMM blocks for
            # any number of threads
            nb = -(-(nq - full0) // cf)
            rows = [(full0 + a * cf, min(full0 + b * cf, nq))
                    for a, b in _ranges(0, nb, min(nb, _config.MAX_TASKS))]
            run_tasks(lambda t: _gemm_queries(qt, S, s, t[0], t[1], cf, F.parent, F.var, F.rq,
                                              F.w0q, F.postq, F.wphi, num, den), rows, nw)
    if order is not None:
        num[order], den[order] = num.copy(), den.copy()
    return num, den


def _both_fits(nk, m, Ev, c):
    """Two-sided decay in one pass keeps 2·nch states of m × (Ev+1): within STATE_BYTES?"""
    return (-(-nk // c)) * m * 2 * (Ev + 1) * 8 <= _config.STATE_BYTES


def _decay_both(qs, ks, v, kpos, lim, ff, fb, dec, F, nw):
    """Two-sided decay in one pass (see :func:`fast_decay`, Notes): every chunk's forward and
    backward states from one set of key features (parallel over chunks); exclusive
    forward and backward scans (parallel over features); each row's query features once
    against both states, and its chunk's logits once for both sides (parallel over
    chunks). ``ff``, ``fb``: the rows' side factors (0 for a side without keys)."""
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
    with blas_threads(1):
        run_tasks(lambda t: _both_states(kt, v, kpos, dec, t[0], t[1], c, cf, F.parent, F.var,
                                         F.rk, F.w0k, F.postk, F.wpsi, st),
                  _ranges(0, nch, ntask), nw)
        run_tasks(lambda t: _both_scan(kpos, dec, c, t[0], t[1], st),
                  _ranges(0, m, min(m, _config.MAX_TASKS)), nw)
        work = (c + np.diff(rstart)).astype(np.float64)
        run_tasks(lambda t: _both_queries(qs, ks, qt, v, kpos, dec, F.pc, lim, xf, xb, ff, fb,
                                          rstart, t[0], t[1], c, cf, F.parent, F.var, F.rq,
                                          F.w0q, F.postq, F.wphi, st, num, den),
                  _ranges(0, nch, ntask, work), nw)
    out_num = np.empty_like(num)
    out_den = np.empty_like(den)
    out_num[order], out_den[order] = num, den
    return out_num, out_den


def _window_pass(qs, ks, v, lo, hi, F, nw):
    """Row r sees the keys ``lo[r] <= j < hi[r]`` (unit weights); see :func:`fast_window`."""
    nk, Ev = v.shape
    nq = qs.shape[0]
    m = F.m
    c = window_chunk(m, F.E, Ev, F.g, nk)
    cf = min(gemm_chunk(m), c)
    nch = -(-nk // c)
    num = np.zeros((nq, Ev))
    den = np.zeros(nq)
    seen = np.flatnonzero(hi > lo)
    if seen.size == 0:
        return num, den
    lo, hi = lo[seen], hi[seen]
    cl = -(-lo // c)
    ch = hi // c
    ra = np.minimum(cl * c, hi)                     # Horner on lo .. ra and rb .. hi
    rb = np.maximum(ch * c, ra)
    order = np.lexsort((lo, ch, cl))                # groups of equal (cl, ch), contiguous
    rows = seen[order]
    lo, hi, cl, ch, ra, rb = (np.ascontiguousarray(a[order]) for a in (lo, hi, cl, ch, ra, rb))
    qg = np.ascontiguousarray(qs[rows])
    qt = np.ascontiguousarray(qg.T)
    kt = np.ascontiguousarray(ks.T)
    brk = np.flatnonzero((np.diff(cl) != 0) | (np.diff(ch) != 0)) + 1
    gstart = np.concatenate([[0], brk, [rows.size]]).astype(np.int64)
    gcl = np.ascontiguousarray(cl[gstart[:-1]])
    gch = np.ascontiguousarray(ch[gstart[:-1]])
    ng = gcl.size
    # tree of chunk states: level 0 the chunks, level l + 1 sums of pairs of level l
    sizes = [nch]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    loff = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    covered = bool(np.any(gcl < gch))
    nnode = int(loff[-1]) if covered else 1
    nodes = np.zeros((nnode, m, Ev))
    nsums = np.zeros((nnode, m))
    gnum = np.zeros((rows.size, Ev))
    gden = np.zeros(rows.size)
    with blas_threads(1):
        if covered:
            parts = _ranges(0, nch, min(nch, 4 * nw))       # chunks are independent
            run_tasks(lambda t: _plain_states(kt, v, t[0], t[1], c, cf, F.parent, F.var, F.rk,
                                              F.w0k, F.postk, F.wpsi, nodes, nsums),
                      parts, nw)
            for lev in range(1, len(sizes)):
                a0, n0, a1 = loff[lev - 1], sizes[lev - 1], loff[lev]
                pairs = n0 // 2
                np.add(nodes[a0:a0 + 2 * pairs:2], nodes[a0 + 1:a0 + 2 * pairs:2],
                       out=nodes[a1:a1 + pairs])
                np.add(nsums[a0:a0 + 2 * pairs:2], nsums[a0 + 1:a0 + 2 * pairs:2],
                       out=nsums[a1:a1 + pairs])
                if n0 % 2:
                    nodes[a1 + pairs] = nodes[a0 + n0 - 1]
                    nsums[a1 + pairs] = nsums[a0 + n0 - 1]
        # groups are independent (any partition gives the same rows); balanced by rows
        work = (np.diff(gstart) + 8).astype(np.float64)
        tasks = _ranges(0, ng, min(ng, 4 * nw), work)
        run_tasks(lambda t: _window_queries(qg, ks, qt, v, F.pc, lo, hi, ra, rb, gstart, gcl,
                                            gch, t[0], t[1], c, cf, F.parent, F.var, F.rq,
                                            F.w0q, F.postq, F.wphi, nodes, nsums, loff,
                                            gnum, gden),
                  tasks, nw)
    num[rows] = gnum
    den[rows] = gden
    return num, den


def _setup(q, k, v, scale, coef, key_mask):
    """Shapes, scaled float64 copies, real keys and their positions."""
    Q, single = _with_groups(q)
    G, L, E = Q.shape
    k = np.asarray(k)
    v = np.asarray(v)
    S, Ev = k.shape[0], v.shape[1]
    if k.shape != (S, E) or v.shape[0] != S:
        raise ValueError(f"shapes q {Q.shape}, k {k.shape}, v {v.shape} do not match: "
                         f"expected k (S, {E}) and v (S, Ev)")
    sq = np.sqrt(scale)
    qs = np.ascontiguousarray(Q.reshape(G * L, E) * sq, dtype=np.float64)
    ks = np.ascontiguousarray(k * sq, dtype=np.float64)
    v64 = np.ascontiguousarray(v, dtype=np.float64)
    if key_mask is None:
        kpos = np.arange(S, dtype=np.int64)
    else:
        keep = np.asarray(key_mask, dtype=bool).reshape(S)
        kpos = np.flatnonzero(keep).astype(np.int64)
        if kpos.size < S:
            ks = np.ascontiguousarray(ks[keep])
            v64 = np.ascontiguousarray(v64[keep])
    return Q, single, G, L, E, S, Ev, qs, ks, v64, kpos


def _shaped(num, den, G, L, Ev, single):
    out, den = _finish(num, Ev, den)
    out, den = out.reshape(G, L, Ev), den.reshape(G, L)
    return (out[0], den[0]) if single else (out, den)


def fast_decay(q, k, v, scale, coef, rate, causal, workers=None, *, offset=0, key_mask=None):
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
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The
        result does not depend on it (bitwise).
    offset : int, optional
        Position of query 0.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part (the real keys keep their
        positions, so distances are unchanged).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j γ^{|t_ij| − t0_i} p(·)`` with ``t0_i`` the distance of row i's nearest
        visible real key (so ``den = Σ_j T p`` exactly as fast_separable's whenever
        the row sees a key at its own position, e.g. square self-attention). Rows
        with den <= 0 (no visible key) get out = 0.

    Notes
    -----
    **Algorithm.** The real keys keep their positions ``P_j``. Forward scan
    (keys at or before the query): chunks of C keys; chunk c's state
    ``Σ_{j∈c} γ^{e_c − P_j} ψ(k_j)[v_j, 1]ᵀ`` (e_c the position of its last key),
    in parallel; a scan ``S ← γ^{e_c − e_{c−1}} S + state_c`` (per task in
    parallel, then an exclusive scan over the tasks' totals, serial); each row at
    ``x_i`` = the position of its last visible key gets
    ``γ^{x_i − e_{c−1}} φ(q_i)ᵀS + Σ_{j in its chunk, j visible} γ^{x_i − P_j}
    p(q_iᵀk_j)[v_j, 1]`` (Horner on the logits), in parallel. Two-sided: the keys
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
    which :func:`recurrence_rounding` bounds. No NaN or inf arises for any
    rate in ``[0, inf]``. Gradual underflow of a product (a state entry times
    a factor below 2⁻¹⁰²²) is rounded as IEEE arithmetic does.

    **Accuracy**: see :func:`recurrence_rounding` (algorithm ``"decay"``).
    """
    r = _check_rate(rate)
    Q, single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nk = kpos.size
    if G * L == 0 or nk == 0:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    nw = resolve_workers(workers)
    F = _Side(coef, E)
    dec = _decay_factors(r, np.arange(S))
    qpos = np.tile(np.arange(L, dtype=np.int64) + int(offset), G)
    lim_f = np.searchsorted(kpos, qpos, side="right").astype(np.int64)   # P_j <= pos
    if causal:
        num, den = _decay_pass(qs, ks, v64, kpos, lim_f, dec, F, nw)
        return _shaped(num, den, G, L, Ev, single)
    lim_b = nk - lim_f                                                    # P_j > pos
    hasf, hasb = lim_f > 0, lim_b > 0
    big = np.iinfo(np.int64).max // 4
    d_f = np.where(hasf, qpos - kpos[np.maximum(lim_f - 1, 0)], big)
    d_b = np.where(hasb, kpos[np.minimum(lim_f, nk - 1)] - qpos, big)
    t0 = np.minimum(d_f, d_b)
    ff = np.where(hasf, dec[np.where(hasf, d_f - t0, 0)], 0.0)
    fb = np.where(hasb, dec[np.where(hasb, d_b - t0, 0)], 0.0)
    if _both_fits(nk, F.m, Ev, decay_chunk(F.m, E, Ev, F.g)):
        num, den = _decay_both(qs, ks, v64, kpos, lim_f, ff, fb, dec, F, nw)
    else:            # two scans, the second over the reversed keys; states in groups
        num, den = _decay_pass(qs, ks, v64, kpos, lim_f, dec, F, nw)
        kpos_b = np.ascontiguousarray((S - 1) - kpos[::-1])
        num_b, den_b = _decay_pass(qs, np.ascontiguousarray(ks[::-1]),
                                   np.ascontiguousarray(v64[::-1]), kpos_b, lim_b, dec, F, nw)
        num = num * ff[:, None] + num_b * fb[:, None]
        den = den * ff + den_b * fb
    return _shaped(num, den, G, L, Ev, single)


def fast_window(q, k, v, scale, coef, left, right, workers=None, *, offset=0, key_mask=None):
    """Fast attention with a sliding window: ``T(t) = 1`` for ``−right <= t <= left``, else 0.

    Query i (position ``i + offset``) sees the keys at positions
    ``i + offset − left .. i + offset + right``. A causal window is ``right = 0``
    (HF ``sliding_window=W`` is ``left = W − 1``). Work
    ``O((G·L + S)·m·(Ev+1) + G·L·2C·(E + Ev + g) + (G·L/C)·log(S/C)·m·(Ev+1))``,
    C = :func:`window_chunk`; no FFT, and no differences of prefix sums.

    Parameters
    ----------
    q, k, v, scale, coef, workers, offset, key_mask
        As :func:`fast_decay`.
    left, right : int >= 0
        Keys before and after the query that take part (any size; beyond the
        sequence is the same as unbounded).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j T p``; rows with den <= 0 (no key in the window) get out = 0.

    Notes
    -----
    With padded keys removed, row i sees the real keys ``lo_i <= j < hi_i``, a
    contiguous range. With chunks of C keys, the chunks ``cl .. ch−1`` it
    covers entirely contribute ``φ(q_i)ᵀ Σ state_c`` and the at most ``C − 1``
    keys on each side of them (both ends' partial chunks, or the whole range
    when it covers no chunk: then fewer than 2C keys) ``Σ p(q_iᵀk_j)[v_j, 1]`` by
    Horner on the logits. Rows sharing ``(cl, ch)`` share one state sum and one
    GEMM.

    **Why a tree of chunk states.** The sum of the covered states is taken from
    a segment tree (level 0 the chunk states, each level the sums of pairs of
    the one below; ~2·S/C states): any chunk range is the disjoint union of at
    most 2 nodes per level, ``<= 2·log2(S/C)`` additions of m × (Ev+1) states
    per group of rows, against ``(hi−lo)/C`` for summing covered chunks
    directly (quadratic in S/C for wide windows) — and, unlike a difference of
    prefix sums ``Π(hi) − Π(lo)``, only additions of terms that belong to the
    window: ψ is signed, so prefix sums can be far larger than the window's
    sum and their difference would lose its relative accuracy (catastrophic
    cancellation). Every term of the result passes through at most
    ``C + 3⌈log2(S/C)⌉ + 2`` additions on the key side, so the usual bound
    ``γ_k Σ|φ_αψ_α|`` holds (see :func:`recurrence_rounding`). A sliding
    two-stack sum would be O(1) per group but serial in the window's
    position; the tree is built once (its leaves in parallel) and read by
    independent groups, so any partition of the rows gives bitwise the same
    result.
    """
    left = _check_width(left, "left")
    right = _check_width(right, "right")
    Q, single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nk = kpos.size
    if G * L == 0 or nk == 0:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    nw = resolve_workers(workers)
    F = _Side(coef, E)
    span = S + L + abs(int(offset)) + 1                # wider windows see the same keys
    left, right = min(left, span), min(right, span)
    qpos = np.tile(np.arange(L, dtype=np.int64) + int(offset), G)
    lo = np.searchsorted(kpos, qpos - left, side="left").astype(np.int64)
    hi = np.searchsorted(kpos, qpos + right, side="right").astype(np.int64)
    num, den = _window_pass(qs, ks, v64, lo, hi, F, nw)
    return _shaped(num, den, G, L, Ev, single)


# ------------------------------------------------------------------ rounding
def _gamma(k):
    ku = k * _U
    return ku / (1.0 - ku) if ku < 1 else np.inf


def recurrence_rounding(algorithm, S, m, coef, radius, radius1, delta, chunk=None, rate=None):
    """Rigorous relative floating-point allowance ρ of :func:`fast_decay` / :func:`fast_window`.

    With it, ``max|out − o| <= 2(δ+ρ)/(1−δ−ρ)·max|v|`` where o is the exact softmax
    attention with weights ``e^{s q_iᵀk_j}·T(t_ij)`` (δ the certified relative error
    of p on ``[−R, R]``): the form of the proven part of
    :func:`numbarope.planner.rounding_term`, which it replaces for these paths.

    Parameters
    ----------
    algorithm : {"decay", "window"}
    S : int
        Keys (real keys; an upper bound is fine).
    m : int
        Features C(E+g, g).
    coef : (g+1,) array_like
        p's monomial coefficients.
    radius : float
        Proven logit radius R >= max |s q_iᵀk_j|.
    radius1 : float
        ``R₁ >= s·max_i,j Σ_e |q_ie k_je|`` (e.g. s·max‖q‖₂·max‖k‖₂, as the
        planner's radius1).
    delta : float
        Certified relative error of p on [−R, R].
    chunk : int, optional
        Keys per chunk the call used (:func:`decay_chunk`, :func:`window_chunk`).
        Default: the smallest it can use (16, or ``CHUNK``) — a larger chunk
        only lowers the count.
    rate : float, optional
        The decay rate (``"decay"``); without it the worst case over rates.

    Returns
    -------
    float
        ρ (``inf`` when the bound is void).

    Notes
    -----
    Higham (2002): standard model ``fl(a op b) = (a op b)(1 + ε)``, ``|ε| <= u = 2⁻⁵³``
    (§2.2, without underflow); Lemma 3.1: a product of k factors ``(1+ε_i)^{±1}`` is
    ``1 + θ_k``, ``|θ_k| <= γ_k = ku/(1−ku)``; Lemma 3.3: ``(1+θ_j)(1+θ_k) = 1 +
    θ_{j+k}`` — its proof uses only ``|θ| <= γ``, so any factor ``1 + η`` with
    ``|η| <= γ_j`` counts as j roundings. A result that is, by linearity, a sum
    of products each computed through at most k roundings (the multiplications
    on its path and the additions it passes, in any order or association —
    §3.1, §4.2; with fused multiply-adds fewer) is within ``γ_k Σ|term|`` of the
    exact sum.

    *Polynomial part* (as planner.rounding_term): ``num_i = Σ_j Σ_α
    φ_α(q_i)ψ_α(k_j)·w_ij·[v_j, 1]`` (inside a chunk, Horner on the logit, whose
    own rounding δ already certifies); features and the dot product φᵀS cost at
    most ``m + 2g + 2`` roundings and ``Σ_α |φ_αψ_α| <= P₁ = Σ_k |a_k| R₁^k``.
    Additions over keys: at most S − 1 inside any association (the chunk GEMMs).

    *Decay* — path of key j (chunk c) to row i (chunk c') in the forward scan:
    the chunk weight, the task total's steps (chunks c+1 .. end of its task),
    one step per later task in the exclusive scan, the walk over the row's task
    up to c' (one-pass two-sided: one step per chunk in between), the row's
    factor, the forward/backward combination: at most ``c' − c + 2 <= nch + 1``
    decay factors (2 inside a chunk; rows that see every key skip the row's
    factor; the backward side is the mirror image), and as many additions, plus the row's
    own chunk, the combination and the output division: ``nch + 4`` additions
    beyond the S above. Each factor is ``fl(exp(−fl(rate·d)))`` (exactly 1 at
    d = 0) ``= e^{−rate·d}·e^{−rate·d·ε}(1 + η)``, ``|ε| <= u``, ``|η| <= EXP_ULPS·u``
    (numbarope.exact's kernel, proven: 64u), applied by one multiplication:
    ``EXP_ULPS + 1`` roundings. The factors' distances telescope to
    ``|t| − t0 <= S − 1`` (t0 the row's nearest visible key: every factor spans
    two positions in 0..S−1), so the arguments' errors multiply the path by
    ``e^{η'}``, ``|η'| <= u·rate·(|t| − t0)``.

    Case A, ``rate·(|t| − t0) <= T_B = DECAY_CUT/(1+u)``: no factor is 0 (each
    ``fl(rate·d_l) <= T_B(1+u)``) and ``e^{|η'|} − 1 <= γ_A``, ``A =
    min(rate·(S−1), DECAY_CUT)``. With

        k = S + m + 2g + 2 + (nch + 4) + (EXP_ULPS + 1)(nch + 2) + ⌈A⌉   (decay)
        k = S + m + 2g + 2 + 3⌈log2 nch⌉ + 3                          (window)

    (window: tree levels <= ⌈log2 nch⌉ and the range's <= 2 nodes per level,
    two Horner spans, the division; no factors) each term is within
    ``γ_k·P₁·w_ij·|v_j|``; the exact softmax term has weight ``e^{x}w_ij >=
    e^{−R}w_ij``, so relative to it: ``ρ_A = γ_k P₁ e^R/(1−δ)`` (the 1/(1−δ) as
    in rounding_term, harmless).

    Case B, ``rate·(|t| − t0) > T_B``: the exact relative weight is ``< e^{−T_B}``
    and the computed one 0 or ``<= e^{−T_B(1−u)}(1 + γ_k)``; each such term errs
    by at most ``2(1+γ_k)e^{−T_B(1−u)}P₁ max|v|`` absolutely, at most S of them in
    a row, whose exact denominator is ``>= e^{−R}`` (its nearest visible key has
    relative weight 1): ``ρ_B = 2S(1+γ_k)P₁e^{R − T_B(1−u)}/(1−δ)`` relative to the
    row's mass (< 10⁻²⁸⁰·S·P₁e^R; none for the window, or when rate·(S−1) <= T_B).

    *Output.* Computed ``N̂ = Σ_j w_j(1+a_j)v_j + e_N``, ``D̂ = Σ_j w_j(1+b_j) + e_D``
    (w_j exact softmax weights, D = Σ w_j), ``|a_j|, |b_j| <= ε = δ + ρ_A``,
    ``|e_N| <= ρ_B·D·max|v|``, ``|e_D| <= ρ_B·D``: then ``|N̂D − ND̂| <= 2(ε+ρ_B)D²max|v|``
    and ``D̂ >= (1−ε−ρ_B)D``, so ``|N̂/D̂ − N/D| <= 2(δ+ρ)/(1−δ−ρ)·max|v|`` with
    the returned ``ρ = ρ_A + ρ_B``.

    *Underflow.* Decay factors are 0 or normal (>= e^{−700}). Gradual underflow
    of a product (a state entry times a factor, or a feature product, below
    2⁻¹⁰²²; absolute error <= 2⁻¹⁰⁷⁵ each, Higham (2.8)) is outside the model,
    as in planner.rounding_term: it adds at most 2⁻¹⁰⁷⁵·(nch + m + C + 4)·
    max(1, Σ_α|φ_α(q)|)·max|v| to a row whose mass is >= (1−δ)e^{−R} >= e^{−351}
    — negligible unless the features exceed ~10¹⁵⁰.
    """
    g = len(coef) - 1
    S = max(int(S), 1)
    if algorithm not in ("decay", "window"):
        raise ValueError(f"algorithm must be 'decay' or 'window', got {algorithm!r}")
    c = max(1, int(chunk or CHUNK or 16))
    nch = -(-S // c)
    base = S + m + 2 * g + 2
    if algorithm == "window":
        k = base + 3 * math.ceil(math.log2(max(nch, 1))) + 3
    else:
        A = DECAY_CUT if rate is None else min(float(rate) * (S - 1), DECAY_CUT)
        ulps = float(EXP_ULPS[np.dtype(np.float64)])
        k = base + (nch + 4) + (ulps + 1) * (nch + 2) + math.ceil(A)
    gk = _gamma(k)
    with np.errstate(over="ignore", invalid="ignore"):
        P1 = float(np.sum(np.abs(np.asarray(coef, np.float64))
                          * min(float(radius1), 1e300) ** np.arange(g + 1)))
        eR = np.exp(min(float(radius), 700.0)) / max(1e-300, 1.0 - delta)
        rho = gk * P1 * eR
        if algorithm == "decay":
            TB = DECAY_CUT / (1 + _U)
            if rate is None or float(rate) * (S - 1) > TB:
                rho += 2 * S * (1 + gk) * P1 * eR * np.exp(-TB * (1 - _U))
    return float(rho) if np.isfinite(rho) else np.inf
