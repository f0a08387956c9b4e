"""Sliding windows (bands of offsets) without the FFT: a tree of chunk states.

The separable fast path computes, for a polynomial ``p(x) ≈ eˣ`` with
``p(q'ᵀk') = φ(q')ᵀψ(k')`` (Alman & Song 2025, §4; :mod:`numbarope.ops._common`),
``num_i = Σ_j T(t_ij) p(q'_iᵀk'_j)[v_j, 1]``. A window
(:class:`numbarope.bias.Window`: ``T(t) = 1`` for ``−right <= t <= left``, else 0)
makes each query see a contiguous range of keys: the key chunks it covers entirely
are summed from a tree of chunk states, the partial chunks at both ends by Horner on
the logits (the masked chunk kernel :func:`numbarope.ops._common._horner_block`).
No FFT, and no differences of prefix sums.

The driver works on per-row key ranges: ``structure.key_ranges(L, S, offset)``
(``lo[i] <= j < hi[i]``, positions) mapped onto the real keys, so any structure that
gives key ranges and no bias values could be served by it (:func:`window_attention`
takes the structure). Rectangular problems, padded keys (removed; the real keys keep
their positions) and G query heads on one key/value head (key side once) are served.
No state in or out: a window's rows do not see a fixed set of earlier keys.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §3.1,
§4.2 (sums in any order).
"""

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._bounds import recurrence_rounding
from ._common import (_FM, _chunk_states, _example_qkv, _horner_block, _query_rows, _ranges,
                      _setup, _shaped, _Side, gemm_chunk, recurrence_chunk, scan_memory)
from ._cost import COST_CONSTANTS
from ._features import n_features
from .registry import Algorithm, register

__all__ = ["Window", "window_attention", "window_chunk", "window_memory"]


def window_chunk(m, E, Ev, g, S):
    """Keys per chunk of :func:`window_attention`:
    :func:`numbarope.ops._common.recurrence_chunk`, larger when the tree of chunk states
    (about 2·S/C states of m × (Ev+1)) would exceed STATE_BYTES."""
    most = max(1, _config.STATE_BYTES // (2 * 8 * m * (Ev + 1)))
    return int(max(recurrence_chunk(m, E, Ev, g), -(-int(S) // most)))


def window_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`window_attention`: a
    chunked pass (:func:`numbarope.ops._common.scan_memory` at :func:`window_chunk`
    keys per chunk) plus the tree of chunk states (at most STATE_BYTES)."""
    S = n if S is None else S
    m = n_features(E, degree)
    return scan_memory(n, S, E, Ev, degree, heads, window_chunk(m, E, Ev, degree, S)) \
        + _config.STATE_BYTES


# ------------------------------------------------------------------ kernel
@njit(cache=True, nogil=True, fastmath=_FM)
def _window_queries(qs, ks, qt, v, pc, lo, hi, ra, rb, gstart, gcl, gch, g0, g1, c, cf,
                    parent, var, ratio, w0, post, weight, nodes, nsums, loff, num, den):
    # Groups g0 <= gi < g1 of rows gstart[gi] .. gstart[gi+1] − 1 sharing (cl, ch): every
    # row sees the keys lo[r] <= t < hi[r], covering the whole chunks cl .. ch − 1 (none if
    # cl >= ch). Covered chunks: their states summed from the tree (the canonical <= 2
    # nodes per level, in key order), then φ(q)ᵀ·sum. The rest, keys lo .. ra[r] − 1 and
    # rb[r] .. hi[r] − 1 (within chunks cl − 1 and ch; within two chunks if none is
    # covered), by Horner on the logits (the masked chunk kernel without a decay), in
    # blocks of c rows.
    m = parent.shape[0]
    Ev = v.shape[1]
    buf = np.empty(m * max(1, min(cf, c)))
    Sc = np.empty((m, Ev))
    sc = np.empty(m)
    left = np.empty(64, np.int64)
    right = np.empty(64, np.int64)
    nodec = np.empty(0)
    nopos = np.empty(0, np.int64)
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
            _horner_block(qs, ks, v, pc, r0, r1, s0, s1, lo, ra, nodec, nopos, nopos, num,
                          den)
            _horner_block(qs, ks, v, pc, r0, r1, t0, t1, rb, hi, nodec, nopos, nopos, num,
                          den)


# parallel loops: thin pranges over independent tasks (any partition: the same rows)
@prange_loop(lambda kt, v, kpos, dec, tasks, *rest: (kt, v, kpos, dec, 0, 0, 0, *rest))
def _par_leaves(fn, kt, v, kpos, dec, tasks, c, cf, parent, var, ratio, w0, post, weight,
                nodes, nsums, notot, nosum):
    for i in prange(tasks.shape[0]):
        fn(kt, v, kpos, dec, tasks[i, 0], tasks[i, 1], 0, c, cf, parent, var, ratio, w0, post,
           weight, nodes, nsums, notot, nosum)


@prange_loop(lambda *a: a[:12] + (0, 0) + a[13:])
def _par_window_queries(fn, qs, ks, qt, v, pc, lo, hi, ra, rb, gstart, gcl, gch, tasks, c,
                        cf, parent, var, ratio, w0, post, weight, nodes, nsums, loff, num,
                        den):
    for i in prange(tasks.shape[0]):
        fn(qs, ks, qt, v, pc, lo, hi, ra, rb, gstart, gcl, gch, tasks[i, 0], tasks[i, 1], c,
           cf, parent, var, ratio, w0, post, weight, nodes, nsums, loff, num, den)


# ------------------------------------------------------------------ driver
def _window_pass(qs, ks, v, lo, hi, F, nw):
    """Row r sees the keys ``lo[r] <= j < hi[r]`` (indices of the real keys, unit
    weights); see :func:`window_attention`."""
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
    nodec = np.empty(0)
    nopos = np.empty(0, np.int64)
    notot, nosum = np.empty((0, 0)), np.empty(0)      # no task totals
    with parallel(nw):
        if covered:
            parts = _ranges(0, nch, min(nch, _config.MAX_TASKS))    # chunks are independent
            _par_leaves(_chunk_states, kt, v, nopos, nodec, task_array(parts), c, cf,
                        *F.keys(), nodes, nsums, notot, nosum)
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
        tasks = _ranges(0, ng, min(ng, _config.MAX_TASKS), work)
        _par_window_queries(_window_queries, qg, ks, qt, v, F.pc, lo, hi, ra, rb, gstart, gcl,
                            gch,
                            task_array(tasks), c, cf, *F.queries(), nodes, nsums, loff, gnum,
                            gden)
    num[rows] = gnum
    den[rows] = gden
    return num, den


def window_attention(q, k, v, scale, coef, structure, *, offset=0, key_mask=None,
                     workers=None):
    """Fast attention in which each query row sees a contiguous range of keys with
    weight 1: a sliding window ``T(t) = 1`` for ``−right <= t <= left``, else 0.

    Query i (position ``i + offset``) sees the real keys at the positions
    ``structure.key_ranges(L, S, offset)`` gives it: for :class:`numbarope.bias.Window`
    ``i + offset − left .. i + offset + right`` (None: unbounded). A causal window is
    ``right = 0`` (HF ``sliding_window=W`` is ``left = W − 1``). Work
    ``O((G·L + S)·m·(Ev+1) + G·L·2C·(E + Ev + g) + (G·L/C)·log(S/C)·m·(Ev+1))``,
    C = :func:`window_chunk`; no FFT, and no differences of prefix sums.

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
    structure : numbarope.bias.Structure
        Gives the rows' key ranges (:meth:`~numbarope.bias.Structure.key_ranges`; None:
        every key) and no bias values: a :class:`~numbarope.bias.Window`.
    offset : int, optional
        Position of query 0.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part (the real keys keep their
        positions).
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The
        result does not depend on it (bitwise).

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
    ``γ_k Σ|φ_αψ_α|`` holds (see :func:`numbarope.ops._bounds.recurrence_rounding`).
    A sliding two-stack sum would be O(1) per group but serial in the window's
    position; the tree is built once (its leaves in parallel) and read by
    independent groups, so any partition of the rows gives bitwise the same
    result.
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nk = kpos.size
    if G * L == 0 or nk == 0:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    nw = resolve_workers(workers)
    F = _Side(coef, E)
    ranges = structure.key_ranges(L, S, offset)
    if ranges is None:                                  # every key
        lo = np.zeros(L, np.int64)
        hi = np.full(L, nk, np.int64)
    else:                                               # positions -> real keys
        lo = np.searchsorted(kpos, ranges[0], side="left").astype(np.int64)
        hi = np.searchsorted(kpos, ranges[1], side="left").astype(np.int64)
    num, den = _window_pass(qs, ks, v64, np.tile(lo, G), np.tile(hi, G), F, nw)
    return _shaped(num, den, G, L, Ev, single)


class Window(Algorithm):
    """A band of offsets −right <= t <= left (sliding windows, :class:`numbarope.bias.Window`):
    sums of chunk states over a tree, masked polynomials at the band's ends, no
    differences of prefix sums (:func:`window_attention`)."""

    name = "window"
    structures = (_bias.Window,)

    def _chunk(self, h, degree):
        return window_chunk(n_features(h.E, degree), h.E, h.Ev, degree, h.S)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(self._chunk(h, degree), max(h.S, 1))
        nch = max(1, -(-h.S // ch))
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * 2 * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * 2 * ch * (2 * degree + 3)
                + c["gemm_flop"] * (h.heads * h.n / ch + nch) * 2 * np.log2(nch + 1)
                * m * ev1) / h.heads

    def memory(self, h, degree):
        return window_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def rounding(self, h, coef, delta):
        g = len(coef) - 1
        return recurrence_rounding("window", h.S, n_features(h.E, g), coef, h.radius,
                                   h.radius1, delta, self._chunk(h, g))

    def run(self, q, k, v, scale, coef, *, structure, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`window_attention` on ``structure`` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); ``T`` is not read. No state: a
        ``ValueError`` for ``initial_state`` or ``return_state``."""
        if initial_state is not None or return_state:
            raise ValueError("window: initial_state= and return_state= are not supported "
                             "(a window's rows see no fixed set of earlier keys)")
        return window_attention(q, k, v, scale, coef, structure, offset=offset,
                                key_mask=key_mask, workers=workers)

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=_bias.Window(40, 0))


register(Window())
