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

Training: :func:`window_backward` (the ``backward`` of :class:`Window`) gives the
certified fast gradients of the exact window attention with the forward's weights,
by the same scheme twice (a tree of chunk states over the keys for dq, over the
query positions for dk and dv; the partial chunks by Horner), and
:func:`window_gradient_bound` bounds their error against the exact gradients.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §3.1,
§4.2 (sums in any order).
"""

import math

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from . import _common
from ._bounds import _gamma, _gradient_terms, recurrence_rounding
from ._common import (_FM, _chunk_states, _example_qkv, _horner_block, _query_rows, _ranges,
                      _setup, _shaped, _Side, backward_chunk, gemm_chunk, recurrence_chunk,
                      scan_memory)
from ._cost import COST_CONSTANTS
from ._features import _features_block, n_features
from .registry import Algorithm, register

__all__ = ["Window", "window_attention", "window_backward", "window_backward_chunk",
           "window_chunk", "window_gradient_bound", "window_memory"]


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

    #: forward+backward ≈ forward × (1 + backward_factor·(E·Ev + E + Ev)/(Ev + 1)):
    #: ~30× the forward at E = Ev = 16 (numbarope._config.FAST_BACKWARD_FACTOR)
    backward_factor = 1.7

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs: :func:`window_backward`
        on ``structure`` (``out``, ``den`` the forward's results; returns ``(dq, dk,
        dv)``; ``T`` is not read: the window's weights are 0 or 1). A ``ValueError``
        without a structure."""
        if structure is None:
            raise ValueError("window: backward needs the structure (a numbarope.bias.Window) "
                             "the forward ran on")
        return window_backward(q, k, v, out, den, dout, scale, coef, structure, offset=offset,
                               key_mask=key_mask, workers=workers)

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """:func:`window_gradient_bound` of :meth:`backward`'s results (``T`` not read)."""
        return window_gradient_bound(q, k, v, dout, scale, coef, delta, structure,
                                     offset=offset, key_mask=key_mask, radius=radius)

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=_bias.Window(40, 0))


register(Window())


# ------------------------------------------------------------------ the backward
#
# The certified fast backward of a window (issue 22): the formulas of
# :func:`numbarope.ops.gemm.gemm_backward` with every sum restricted to the window, as
# two passes of one kernel set, each the forward's scheme (a tree of chunk states plus
# the partial chunks at both ends by Horner), with the roles of the two sides swapped:
#
#   Q. apply side the rows (φ), state side the keys (ψ): dq_i[e] = Σ_a C_ia (φ_iᵀ Z)[e, a],
#      Z = Σ_{j covered} ψ_j k'_je [v_j, 1]_a over the key chunks row i covers (tree),
#      C_i = √s[dO_i/D_i, −Δ_i/D_i]; the keys of the partial chunks explicitly.
#   K. apply side the keys (ψ), state side the rows of all query heads (φ), ordered
#      position-major (row i of every head together: the heads share the key ranges,
#      so a key sees the same positions i in every head): dk_j[e] = Σ_a √s[v_j, 1]_a
#      (ψ_jᵀ Zq)[e, a], dv_j = ψ_jᵀ U, Zq = Σ_{i covered} φ_i q'_ie [dO_i/D_i, −Δ_i/D_i]_a,
#      U = Σ φ_i dO_i/D_i over the row chunks key j covers (tree); the rows of the
#      partial chunks explicitly.
#
# With the window's monotone key ranges (lo_i, hi_i non-decreasing in i) the rows that
# see key j are the positions rlo_j <= i < rhi_j, a contiguous range, so pass K is the
# forward's problem transposed. Generic form of a pass (state side x_b, A_b, Y_b; apply
# side x_a, C_a; one item sees the state items lo <= t < hi):
#
#   out1_a[e] = Σ_t w_at (C_a·A_t) x_t[e],   out2_a = Σ_t w_at Y_t,   w_at = p(x_a·x_t)
#
# by states Σ_t φ/ψ(x_t) [x_t ⊗ A_t, Y_t] (m × (E·na + E2)) over whole chunks and by the
# explicit M_at = w_at (C_a·A_t) over the rest. Each pass writes only its apply side's
# items: parallel over groups of items sharing their covered chunks (any partition:
# the same sums), the leaves of the tree parallel over chunks; bitwise the same for
# any number of threads. When the tree of full-width states would exceed STATE_BYTES,
# its columns are cut into slices of whole column units (unit e: the na columns
# [e, ·]; the E2 columns Y), one tree per slice in turn (features formed again per
# slice), and the chunk grows only when one unit's tree does not fit.

#: Positions per chunk of :func:`window_backward`'s trees; None:
#: :func:`window_backward_chunk` (tests force small ones).
BACKWARD_CHUNK = None


def window_backward_chunk(m, E, Ev, g, n):
    """Positions per chunk of a tree of :func:`window_backward` over ``n`` positions:
    ``6·sqrt(m·E·(Ev+1) / (2E + Ev + 2g + 3))``, a multiple of 16 in [16, 512]
    (:data:`BACKWARD_CHUNK`, or :data:`numbarope.ops._common.CHUNK`, forces one),
    larger when even a tree of one column unit (m × (Ev+1) states, about 2·n/C of
    them) would exceed STATE_BYTES.

    The forward's rule (:func:`numbarope.ops._common.recurrence_chunk`) balanced
    with states E times wider: each group of rows adds ~2·log2(n/C) tree nodes of m ×
    E·(Ev+1) (memory-bound), each row ~2C explicit pairs of ~2E + Ev + 2g + 3 flops.
    Measured (E = Ev = 16, g = 3, n = 16384, window 4096, 2 loaded cores): C = 160
    3.0 s, 384 1.4-2 s, 512 2.3 s (its explicit part 0.3 s); the rule gives 416.
    """
    if BACKWARD_CHUNK:
        c = int(BACKWARD_CHUNK)
    elif _common.CHUNK:
        c = int(_common.CHUNK)
    else:
        c = 6.0 * math.sqrt(m * E * (Ev + 1) / (2 * E + Ev + 2 * g + 3))
        c = int(min(512, max(16, 16 * round(c / 16))))
    most = max(1, _config.STATE_BYTES // (2 * 8 * m * (Ev + 1)))
    return int(max(c, -(-int(n) // most)))


def _tree_offsets(nch):
    """Level sizes of the tree over ``nch`` leaves and the offsets of the levels."""
    sizes = [nch]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return sizes, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _slices(widths, most):
    """Contiguous ranges of column units, each of total width <= ``most`` (a unit
    wider alone), greedily from the first: from the sizes only."""
    out, u0, w = [], 0, 0
    for u, x in enumerate(widths):
        if u > u0 and w + x > most:
            out.append((u0, u))
            u0, w = u, 0
        w += x
    out.append((u0, len(widths)))
    return out


@njit(cache=True, nogil=True, fastmath=_FM)
def _leaf_states(xbt, xb, Ab, Yb, j0, j1, c, u0, u1, cb, parent, var, ratio, w0, post,
                 weight, nodes):
    # nodes[J] = Σ_{t in chunk J} feat(x_t) Y_tᵀ for the chunks j0 <= J < j1 (items J·c ..
    # J·c + c − 1), Y_t = [x_t[e]·A_t (u0 <= e < min(u1, E), column (e − u0)·na + a),
    # Y_b[t] (when u1 > E)]: the slice u0 .. u1 of the column units. Features and
    # products in blocks of cb items; nodes[J] is overwritten.
    m = parent.shape[0]
    E = xb.shape[1]
    na = Ab.shape[1]
    nb = xb.shape[0]
    ne = max(0, min(u1, E) - u0)
    nx = Yb.shape[1] if u1 > E else 0
    width = ne * na + nx
    w = max(1, min(cb, c))
    fb = np.empty(m * w)
    yb = np.empty(w * max(width, 1))
    T = np.empty((m, width))
    for J in range(j0, j1):
        Z = nodes[J]
        k0 = J * c
        k1 = min(k0 + c, nb)
        first = True
        for i0 in range(k0, k1, cb):
            i1 = min(i0 + cb, k1)
            n = i1 - i0
            P = fb[:m * n].reshape((m, n))
            Y = yb[:n * width].reshape((n, width))
            _features_block(xbt, i0, i1, parent, var, ratio, w0, post, weight, P, 0)
            for r in range(n):
                t = i0 + r
                y = Y[r]
                at = Ab[t]
                for e in range(ne):
                    f = xb[t, u0 + e]
                    base = e * na
                    for a in range(na):
                        y[base + a] = f * at[a]
                base = ne * na
                for a in range(nx):
                    y[base + a] = Yb[t, a]
            if first:
                np.dot(P, Y, Z)
                first = False
            else:
                np.dot(P, Y, T)
                for a in range(m):
                    za = Z[a]
                    ta = T[a]
                    for e in range(width):
                        za[e] += ta[e]
        if first:
            Z[:, :] = 0.0


@njit(cache=True, nogil=True, fastmath=_FM)
def _group_apply(xat, Ca, gstart, gcl, gch, g0, g1, u0, u1, cb, parent, var, ratio, w0,
                 post, weight, nodes, loff, out1, out2):
    # Groups g0 <= gi < g1 of items gstart[gi] .. gstart[gi+1] − 1 covering the chunks
    # gcl[gi] .. gch[gi] − 1: Sc = the sum of the tree's canonical nodes (<= 2 per level,
    # in chunk order, as the forward), R_i = feat(x_i)ᵀSc (blocks of cb items), then
    # out1[i, u0 + e] = Σ_a Ca[i, a]·R_i[(e − u0)·na + a] (overwritten) and out2[i] = the
    # last columns of R_i when the slice holds the Y unit.
    m = parent.shape[0]
    width = nodes.shape[2]
    E = out1.shape[1]
    na = Ca.shape[1]
    ne = max(0, min(u1, E) - u0)
    nx = width - ne * na
    w = 1
    for gi in range(g0, g1):
        w = max(w, min(cb, gstart[gi + 1] - gstart[gi]))
    fb = np.empty(m * w)
    rbuf = np.empty(w * max(width, 1))
    Sc = np.empty((m, width))
    left = np.empty(64, np.int64)
    right = np.empty(64, np.int64)
    for gi in range(g0, g1):
        a = gstart[gi]
        b = gstart[gi + 1]
        x = gcl[gi]
        y = gch[gi]
        if x >= y:
            continue
        nl = 0
        nr = 0
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
        for i in range(nl):
            Sc += nodes[left[i]]
        for i in range(nr - 1, -1, -1):
            Sc += nodes[right[i]]
        for i0 in range(a, b, cb):
            i1 = min(i0 + cb, b)
            n = i1 - i0
            P = fb[:m * n].reshape((m, n))
            R = rbuf[:n * width].reshape((n, width))
            _features_block(xat, i0, i1, parent, var, ratio, w0, post, weight, P, 0)
            np.dot(P.T, Sc, R)
            for r in range(n):
                i = i0 + r
                row = R[r]
                ci = Ca[i]
                o = out1[i]
                for e in range(ne):
                    base = e * na
                    acc = 0.0
                    for t in range(na):
                        acc += ci[t] * row[base + t]
                    o[u0 + e] = acc
                if nx:
                    o2 = out2[i]
                    base = ne * na
                    for t in range(nx):
                        o2[t] = row[base + t]


@njit(cache=True, nogil=True, fastmath=_FM)
def _pair_block(xa, xb, Ca, Ab, Yb, pc, r0, r1, s0, s1, lo, hi, out1, out2):
    # The explicit part: items r0 <= r < r1 against the state items s0 <= t < s1, item
    # r taking max(lo[r], s0) <= t < min(hi[r], s1): w = p(x_r·x_t) by Horner on the
    # logit (as the forward's masked chunk kernel), M = w·(Ca_r·A_t);
    # out1[r] += Σ_t M_rt x_t, out2[r] += Σ_t w_rt Y_t.
    if s1 <= s0 or r1 <= r0:
        return
    g = pc.shape[0] - 1
    n = s1 - s0
    X = np.dot(xa[r0:r1], xb[s0:s1].T)
    Pm = np.dot(Ca[r0:r1], Ab[s0:s1].T)
    for r in range(r1 - r0):
        xr = X[r]
        pr = Pm[r]
        ta = min(max(lo[r0 + r] - s0, 0), n)
        tb = min(max(hi[r0 + r] - s0, ta), n)
        for t in range(ta):
            xr[t] = 0.0
            pr[t] = 0.0
        for t in range(ta, tb):
            x = xr[t]
            p = pc[0]
            for d in range(1, g + 1):
                p = p * x + pc[d]
            xr[t] = p
            pr[t] = p * pr[t]
        for t in range(tb, n):
            xr[t] = 0.0
            pr[t] = 0.0
    out1[r0:r1] += np.dot(Pm, xb[s0:s1])
    if Yb.shape[1]:
        out2[r0:r1] += np.dot(X, Yb[s0:s1])


@njit(cache=True, nogil=True, fastmath=_FM)
def _group_explicit(xa, xb, Ca, Ab, Yb, pc, lo, hi, ra, rb, gstart, g0, g1, c, out1, out2):
    # The partial chunks of groups g0 <= gi < g1, in blocks of c items: the state items
    # lo .. ra − 1 and rb .. hi − 1 of each item (both ends; the whole range when it
    # covers no chunk), added to out1, out2.
    for gi in range(g0, g1):
        a = gstart[gi]
        b = gstart[gi + 1]
        for r0 in range(a, b, c):
            r1 = min(r0 + c, b)
            s0 = lo[r0]
            s1 = ra[r0]
            t0 = rb[r0]
            t1 = hi[r0]
            for r in range(r0, r1):
                s0 = min(s0, lo[r])
                s1 = max(s1, ra[r])
                t0 = min(t0, rb[r])
                t1 = max(t1, hi[r])
            _pair_block(xa, xb, Ca, Ab, Yb, pc, r0, r1, s0, s1, lo, ra, out1, out2)
            _pair_block(xa, xb, Ca, Ab, Yb, pc, r0, r1, t0, t1, rb, hi, out1, out2)


@prange_loop(lambda xbt, xb, Ab, Yb, tasks, *rest: (xbt, xb, Ab, Yb, 0, 0, *rest))
def _par_leaf_states(fn, xbt, xb, Ab, Yb, tasks, c, u0, u1, cb, parent, var, ratio, w0,
                     post, weight, nodes):
    for i in prange(tasks.shape[0]):
        fn(xbt, xb, Ab, Yb, tasks[i, 0], tasks[i, 1], c, u0, u1, cb, parent, var, ratio,
           w0, post, weight, nodes)


@prange_loop(lambda xat, Ca, gstart, gcl, gch, tasks, *rest:
             (xat, Ca, gstart, gcl, gch, 0, 0, *rest))
def _par_group_apply(fn, xat, Ca, gstart, gcl, gch, tasks, u0, u1, cb, parent, var, ratio,
                     w0, post, weight, nodes, loff, out1, out2):
    for i in prange(tasks.shape[0]):
        fn(xat, Ca, gstart, gcl, gch, tasks[i, 0], tasks[i, 1], u0, u1, cb, parent, var,
           ratio, w0, post, weight, nodes, loff, out1, out2)


@prange_loop(lambda *a: a[:11] + (0, 0) + a[12:])
def _par_group_explicit(fn, xa, xb, Ca, Ab, Yb, pc, lo, hi, ra, rb, gstart, tasks, c, out1,
                        out2):
    for i in prange(tasks.shape[0]):
        fn(xa, xb, Ca, Ab, Yb, pc, lo, hi, ra, rb, gstart, tasks[i, 0], tasks[i, 1], c, out1,
           out2)


def _grad_pass(xa, Ca, lo, hi, xb, Ab, Yb, fa, fb, pc, c, nw):
    """One pass of :func:`window_backward` (see the comment above
    :data:`BACKWARD_CHUNK`): apply items ``xa`` (n, E) with coefficients ``Ca`` (n, na),
    item r seeing the state items ``lo[r] <= t < hi[r]`` of ``xb`` (nb, E) with ``Ab``
    (nb, na) and ``Y = Yb`` (nb, E2); ``fa``, ``fb`` the feature tables of the two
    sides, ``c`` state items per chunk. Returns ``(out1 (n, E), out2 (n, E2))``."""
    n, E = xa.shape
    nb = xb.shape[0]
    na = Ab.shape[1]
    E2 = Yb.shape[1]
    m = fa[0].shape[0]
    out1 = np.zeros((n, E))
    out2 = np.zeros((n, E2))
    seen = np.flatnonzero(hi > lo)
    if seen.size == 0 or nb == 0:
        return out1, out2
    lo, hi = lo[seen], hi[seen]
    cl = -(-lo // c)
    ch = hi // c
    ra = np.minimum(cl * c, hi)                     # explicit on lo .. ra and rb .. hi
    rb = np.maximum(ch * c, ra)
    order = np.lexsort((lo, ch, cl))                # groups of equal (cl, ch), contiguous
    rows = seen[order]
    lo, hi, cl, ch, ra, rb = (np.ascontiguousarray(a[order]) for a in (lo, hi, cl, ch, ra, rb))
    xg = np.ascontiguousarray(xa[rows])
    cg = np.ascontiguousarray(Ca[rows])
    brk = np.flatnonzero((np.diff(cl) != 0) | (np.diff(ch) != 0)) + 1
    gstart = np.concatenate([[0], brk, [rows.size]]).astype(np.int64)
    gcl = np.ascontiguousarray(cl[gstart[:-1]])
    gch = np.ascontiguousarray(ch[gstart[:-1]])
    ng = gcl.size
    o1 = np.zeros((rows.size, E))
    o2 = np.zeros((rows.size, E2))
    work = (np.diff(gstart) + 8).astype(np.float64)
    gtasks = task_array(_ranges(0, ng, min(ng, _config.MAX_TASKS), work))
    with parallel(nw):
        if np.any(gcl < gch):
            nch = -(-nb // c)
            sizes, loff = _tree_offsets(nch)
            nnode = int(loff[-1])
            widths = [na] * E + ([E2] if E2 else [])
            most = max(1, _config.STATE_BYTES // (8 * m * nnode))
            cb = backward_chunk(m, min(sum(widths), max(most, max(widths))))
            xbt = np.ascontiguousarray(xb.T)
            xgt = np.ascontiguousarray(xg.T)
            ltasks = task_array(_ranges(0, nch, min(nch, _config.MAX_TASKS)))
            for u0, u1 in _slices(widths, most):
                width = sum(widths[u0:u1])
                nodes = np.empty((nnode, m, width))
                _par_leaf_states(_leaf_states, xbt, xb, Ab, Yb, ltasks, c, u0, u1, cb, *fb,
                                 nodes)
                for lev in range(1, len(sizes)):
                    a0, n0, a1 = loff[lev - 1], sizes[lev - 1], loff[lev]
                    pairs = n0 // 2
                    np.add(nodes[a0:a0 + 2 * pairs:2], nodes[a0 + 1:a0 + 2 * pairs:2],
                           out=nodes[a1:a1 + pairs])
                    if n0 % 2:
                        nodes[a1 + pairs] = nodes[a0 + n0 - 1]
                _par_group_apply(_group_apply, xgt, cg, gstart, gcl, gch, gtasks, u0, u1, cb,
                                 *fa, nodes, loff, o1, o2)
                del nodes
        _par_group_explicit(_group_explicit, xg, xb, cg, Ab, Yb, pc, lo, hi, ra, rb, gstart,
                            gtasks, c, o1, o2)
    out1[rows] = o1
    out2[rows] = o2
    return out1, out2


def _row_ranges(structure, L, S, offset, kpos):
    """Rows' ranges of real keys ``lo <= j < hi`` (as :func:`window_attention`)."""
    nk = kpos.size
    ranges = structure.key_ranges(L, S, offset)
    if ranges is None:
        return np.zeros(L, np.int64), np.full(L, nk, np.int64)
    lo = np.searchsorted(kpos, ranges[0], side="left").astype(np.int64)
    hi = np.searchsorted(kpos, ranges[1], side="left").astype(np.int64)
    return lo, hi


def _key_row_ranges(lo, hi, nk):
    """For monotone rows' ranges: the positions ``rlo_j <= i < rhi_j`` that see real key
    j (``lo_i <= j < hi_i``)."""
    j = np.arange(nk, dtype=np.int64)
    return (np.searchsorted(hi, j, side="right").astype(np.int64),
            np.searchsorted(lo, j, side="right").astype(np.int64))


def window_backward(q, k, v, out, den, dout, scale, coef, structure, *, offset=0,
                    key_mask=None, workers=None):
    r"""Certified fast gradients of sliding-window softmax attention
    (:func:`window_attention`).

    The gradients of the EXACT window attention ``o_i = Σ_{j ∈ W_i} A_ij v_j``,
    ``A_ij = exp(x_ij)/Σ_{l ∈ W_i} exp(x_il)``, ``x_ij = s·q_iᵀk_j``, W_i the real keys
    row i sees (the band ``−right <= i + offset − j <= left`` of
    :class:`numbarope.bias.Window`, weight 1), approximated as
    :func:`numbarope.ops.gemm.gemm_backward` does: A replaced by the forward's own
    weights ``P̃_ij = w_ij/D_i``, ``w_ij = p(x_ij) = φ(q'_i)ᵀψ(k'_j)`` (``q' = √s q``,
    ``k' = √s k``; Alman & Song 2025, §4), o by the forward's õ, and the exact
    formulas (Dao 2023, §3.2; as sums through states: Chen et al. 2024) with ``Δ̃_i =
    dO_i·õ_i``::

        dQ_i = (√s/D_i) Σ_{j ∈ W_i} w_ij (dO_i·v_j − Δ̃_i) k'_j
        dK_j = √s Σ_{i: j ∈ W_i} (w_ij/D_i) (dO_i·v_j − Δ̃_i) q'_i
        dV_j = Σ_{i: j ∈ W_i} w_ij dO_i/D_i

    Row i sees the contiguous real keys ``lo_i <= j < hi_i``; for a window lo and hi
    are non-decreasing in i, so key j is seen by the contiguous positions
    ``rlo_j <= i < rhi_j`` (in every query head). Two passes, each the forward's
    scheme (a tree of chunk states over the whole chunks a range covers, the partial
    chunks at both ends explicitly, Horner on the logits):

    * dq: chunks of C keys, leaf states ``Z_c = Σ_{j ∈ c} ψ_j (k'_j ⊗ [v_j, 1])``
      (m × E·(Ev+1)), ``dQ_i[e] = Σ_a √s[dO_i/D_i, −Δ̃_i/D_i]_a (φ_iᵀ Σ_{c covered} Z_c)
      [e, a]`` (the canonical ≤ 2 nodes per level of the tree), plus
      ``Σ_j M_ij k'_j``, ``M_ij = w_ij √s (dO_i·v_j − Δ̃_i)/D_i``, over the keys of the
      partial chunks;
    * dk, dv: chunks of C positions (the rows of all G query heads at those
      positions), leaf states ``Zq_c = Σ_{i ∈ c} φ_i [q'_i ⊗ [dO_i/D_i, −Δ̃_i/D_i],
      dO_i/D_i]`` (m × (E·(Ev+1) + Ev)), ``dK_j[e] = Σ_a √s[v_j, 1]_a (ψ_jᵀ Σ Zq_c)[e, a]``,
      ``dV_j = ψ_jᵀ Σ U_c`` over the row chunks key j covers, plus ``Σ_i M_ij q'_i``
      and ``Σ_i w_ij dO_i/D_i`` over the rows of the partial chunks.

    Tree sums, not differences of prefix sums: ψ and φ are signed, so a prefix state
    can be far larger than a window's and the difference would lose its relative
    accuracy; the tree only adds terms of the window (as the forward). Rows with
    ``D_i <= 0`` or no key in their window contribute nothing and get ``dq = 0``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, as given to :func:`window_attention` (rotated; G query heads sharing
        this key/value head).
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output õ (:func:`window_attention` with the same inputs).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators D_i.
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        The forward's polynomial p (monomial coefficients).
    structure : numbarope.bias.Structure
        The forward's structure: its :meth:`~numbarope.bias.Structure.key_ranges`
        (a :class:`~numbarope.bias.Window`; ``Causal()``, ``NoBias()`` also work).
    offset : int, optional
        Position of query 0, as in the forward.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0`` (the real keys keep their
        positions).
    workers : int, optional
        Threads (None: :func:`numbarope.get_workers`). The result does not depend on
        it (bitwise): task partitions depend on the sizes only.

    Returns
    -------
    dq : (L, E) or (G, L, E) ndarray of float64
        With respect to the rotated q given.
    dk : (S, E) ndarray of float64
        Summed over the G query heads.
    dv : (S, Ev) ndarray of float64
        Summed over the G query heads.

    Raises
    ------
    ValueError
        Shapes that do not match (as the forward), or a structure whose rows' key
        ranges are not non-decreasing in the row (not a band of offsets).

    Notes
    -----
    **Accuracy.** :func:`window_gradient_bound` bounds ``max|dq − dq_exact|``,
    ``max|dk − dk_exact|``, ``max|dv − dv_exact|`` against the exact window softmax
    gradients (a proof, from maxima of the inputs and the rows' windows).

    **Cost.** As :func:`numbarope.ops.gemm.gemm_backward`'s four GEMM passes, about
    ``(G·L + S)·m·(2E·(Ev+1) + Ev)`` multiply-adds (``m = C(E+g, g)``), whatever the
    window's width; the trees ``O((G·L + S)/C · log2(n/C) · m·E·(Ev+1))`` additions;
    the explicit part ``O(G·L·2C·(2E + Ev + g))`` twice (C =
    :func:`window_backward_chunk`). Against the exact window backward's
    ``~7·G·L·W·(E+Ev)/2`` multiply-adds and two exponentials per pair (W keys per
    window) it pays for wide windows only: in multiply-adds from ``W ≈ 8·m·E·(Ev+1)
    /(7(E+Ev))`` (~9·10³ keys at E = Ev = 16, g = 3, m = 969). Its cost does not grow
    with W. Measured on 2 heavily shared cores (load average 6-8; E = Ev = 16, R =
    0.5, eps = 1e-3, g = 3, n = 16384): 2.6-3.5 s for any W, against 1.4 s for
    :func:`numbarope.ops.streaming.exact_backward` (float64) at W = 4096 and 2.8 s at
    W = 16384 (the causal mask); about 1.2× :func:`numbarope.ops.prefix.prefix_backward`
    on the same inputs (two trees and two explicit parts instead of two scans).

    **Memory.** Inputs' float64 copies, O((G·L + S)·(E + Ev)); the tree of a pass,
    about ``2n/C`` states of ``m × width``, at most STATE_BYTES (column slices of the
    state, one tree per slice in turn, when the full width does not fit; a larger C
    when one column unit does not); per task a feature block, its products and one
    state; per explicit block ``C × 2C·G`` logits and weights.

    **Threads.** Leaves of a tree in parallel over chunks; the apply side and the
    explicit part in parallel over groups of rows (keys) sharing their covered
    chunks, each writing its own rows (keys) only: no reduction across tasks, so
    bitwise the same for any ``workers`` (the partitions depend on the sizes only).
    BLAS at one thread inside.

    References
    ----------
    J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
    Fourier Transform", arXiv:2505.11892 (2025), §4.
    Y. Chen, J. Huo, X. Li, Y. Liang, Z. Shi, Z. Song, "Fast Gradient Computation for
    RoPE Attention in Almost Linear Time", arXiv:2412.17316 (2024).
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2.
    """
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
    if dO.shape != (nq, Ev) or O.shape != (nq, Ev) or D.shape != (nq,):
        raise ValueError("window_backward: out, den, dout do not match q and v")
    lo, hi = _row_ranges(structure, L, S, offset, kpos)
    if np.any(np.diff(lo) < 0) or np.any(np.diff(hi) < 0):
        raise ValueError("window_backward: the rows' key ranges must be non-decreasing "
                         "in the row (a band of offsets, numbarope.bias.Window)")
    F = _Side(coef, E)
    nw = resolve_workers(workers)
    m = F.m
    sq = float(np.sqrt(scale))
    lot, hit = np.tile(lo, G), np.tile(hi, G)
    ok = (D > 0) & (hit > lot)
    inv = np.zeros(nq)
    inv[ok] = 1.0 / D[ok]                                   # 1/D_i (0: no weight)
    delta = np.einsum("ic,ic->i", dO, O)                   # Δ̃_i = dO_i·õ_i
    rowA = np.empty((nq, Ev + 1))                           # [dO/D, −Δ/D]
    rowA[:, :Ev] = dO * inv[:, None]
    rowA[:, Ev] = -(delta * inv)
    keyA = np.empty((nk, Ev + 1))                           # [v, 1]
    keyA[:, :Ev] = v64
    keyA[:, Ev] = 1.0
    # pass Q: rows against key chunks → dq (rows without weight: an empty range)
    cq = window_backward_chunk(m, E, Ev, F.g, nk)
    dq, _ = _grad_pass(qs, rowA * sq, lot, np.where(ok, hit, lot), ks, keyA,
                       np.zeros((nk, 0)), F.queries(), F.keys(), F.pc, cq, nw)
    # pass K: keys against chunks of positions (rows of all heads, position-major)
    rlo, rhi = _key_row_ranges(lo, hi, nk)
    ck = window_backward_chunk(m, E, Ev, F.g, L)
    perm = np.arange(nq).reshape(G, L).T.reshape(-1)        # position-major: i·G + h
    qim = np.ascontiguousarray(qs[perm])
    Aim = np.ascontiguousarray(rowA[perm])
    Yim = np.ascontiguousarray(Aim[:, :Ev])
    dkr, dvr = _grad_pass(ks, keyA * sq, rlo * G, rhi * G, qim, Aim, Yim, F.keys(),
                          F.queries(), F.pc, ck * G, nw)
    if nk == S:
        dk, dv = dkr, dvr
    else:
        dk[kpos] = dkr
        dv[kpos] = dvr
    return dq.reshape(shape_q), dk, dv


def _window_sums(x, rlo, rhi):
    """Upper bounds of ``Σ_{rlo_j <= i < rhi_j} x_i`` (x >= 0) for every j, from one
    prefix sum: each computed prefix is within γ_n·Σx of the exact (Higham 2002, §4.2),
    so the computed difference, raised by 2γ_{n+1}·Σx and one rounding, bounds the
    window's sum from above (the difference of two prefixes may cancel; the margin
    keeps it an upper bound)."""
    cs = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    tot = float(cs[-1])
    return (cs[rhi] - cs[rlo]) * (1 + 2 * 2.0 ** -53) + 2 * _gamma(x.size + 1) * tot


def window_gradient_bound(q, k, v, dout, scale, coef, delta, structure, *, offset=0,
                          key_mask=None, radius=None, radius1=None):
    r"""Certified bounds on the errors of :func:`window_backward` against the EXACT
    window softmax attention's gradients.

    Parameters
    ----------
    q, k, v, dout, scale, coef, delta, key_mask, radius, radius1
        As :func:`numbarope.ops._bounds.gradient_bound` (q (L, E) or (G, L, E), dout
        alike; ``delta`` δ certified on ``[−R, R]``).
    structure : numbarope.bias.Structure
        The window (its :meth:`~numbarope.bias.Structure.key_ranges`), as the forward
        and the backward.
    offset : int, optional
        Position of query 0, as the forward and the backward.

    Returns
    -------
    (bq, bk, bv) : tuple of float
        Bounds on ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|``
        over all entries (``inf`` when void: ``δ + ρ >= 1``; 0 when no row sees a key).

    Notes
    -----
    A proof, in the model and notation of
    :func:`numbarope.ops._bounds.gradient_bound` (standard model without underflow,
    any summation order, Higham 2002, §3.1, §4.2), with every sum over keys restricted
    to the ``S_i >= 1`` real keys row i sees and every sum over rows to the rows
    (of all query heads) that see key j — n_j of them, ``n_K = max_j n_j``,
    ``S = max_i S_i``. (:func:`numbarope.ops._bounds.causal_gradient_bound` does not
    apply: it takes S_i as a prefix's length, larger than a window's, and its
    ``c_i`` decreases in S_i.) Rows with ``S_i = 0`` have exact and computed
    gradients 0 and take no part.

    * *The forward's weights.* :func:`window_attention`'s ``D̂_i`` is a sum over the
      row's keys in some association (tree nodes, then the two partial chunks by
      Horner, whose rounding stays below a feature route's, as in
      causal_gradient_bound), so within ``γ_k S_i P₁`` of ``Σ_j p(x_ij)``; ε, ε_P, e_o,
      e_Δ, H, a₁, a₂ are gradient_bound's (``_gradient_terms``) with S raised by
      ``3⌈log2 S_real⌉ + 3``, the tree's additions as
      :func:`numbarope.ops._bounds.recurrence_rounding` counts them (conservative:
      the tree is itself an association of the S_i terms).
    * *Approximation* (per row unchanged; ``A_ij <= c_i = 1/(1 + (S_i − 1)e^{−2R})``):
      dq: ``s κ_k min(N₁a₁, N₂a₂)``; dk_j: ``s κ_q min(Σ_{i ∋ j} c_i‖dO_i‖₁ a₁,
      Σ_{i ∋ j} c_i‖dO_i‖₂ a₂)``; dv_j: ``ε_P Σ_{i ∋ j} c_i‖dO_i‖_∞`` — for a window
      a key's sum runs over the ~W rows that see it, not all n (max over j, from
      prefix sums over positions with a margin, :func:`_window_sums`).
    * *Rounding* (:func:`window_backward`; counts as causal_gradient_bound's, the tree
      sums being associations of the window's terms): dq through the key tree:
      features ``2(5g + 3)``, ``fl(k'_je·[v_j, 1]_a)`` 3, the product 1, the sum over
      the covered keys (leaf GEMMs, tree nodes, the canonical nodes) ``<= S − 1``,
      ``φ̂ᵀZ`` m, the row factor ``fl(fl(√s)·fl(dO_ia·fl(1/D̂_i)))`` 4, its product 1,
      the sum over a Ev, the addition of the explicit part 1: ``k_q = S + m + Ev +
      10g + 15``; dk through the row tree: ``fl(q'_ie·fl(dO_ia·fl(1/D̂_i)))`` 5, the
      product 1, the sum over the rows that see j ``n_j − 1``, m, ``fl(√s·[v_j,
      1]_a)`` 2, its product 1, Ev, the addition 1: ``k_k = n_K + m + Ev + 10g + 15``;
      dv: ``k_v = n_K + m + 10g + 9``. The explicit routes (Horner on the logit
      ``g(E + 6) + 1``, ``fl(Ca·A)`` ``Ev + 5``, the weight's product 1, the product
      with k' (q') 3, the sum over the partial chunk, the final addition 1) stay below
      these since ``m >= 1 + gE``. ``Σ|terms|``: dq ``<= s κ_k (2 + e_Δ) V N₁ H``
      (``S_i P₁/D̂_i <= H``), dk_j ``<= s κ_q (2 + e_Δ) V H Σ_{i ∋ j}‖dO_i‖₁/S_i``, dv_j
      ``<= H Σ_{i ∋ j}‖dO_i‖_∞/S_i``.

    The returned bounds::

        bq = s κ_k [min(N₁a₁, N₂a₂) + γ_{k_q}(2 + e_Δ) V H N₁]
        bk = s κ_q max_j [min(Σ_{i∋j} c_i‖dO_i‖₁ a₁, Σ_{i∋j} c_i‖dO_i‖₂ a₂)
                          + γ_{k_k}(2 + e_Δ) V H Σ_{i∋j} ‖dO_i‖₁/S_i]
        bv = max_j [ε_P Σ_{i∋j} c_i‖dO_i‖_∞ + γ_{k_v} H Σ_{i∋j} ‖dO_i‖_∞/S_i]

    with κ_q over the rows that see a key, κ_k, V, ν, V₂ over the real keys.
    """
    Q = np.asarray(q, dtype=np.float64)
    E = Q.shape[-1]
    L = Q.shape[-2]
    Q = Q.reshape(-1, E)
    G = Q.shape[0] // max(L, 1)
    K = np.asarray(k, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    Ev = V.shape[1]
    dO = np.asarray(dout, dtype=np.float64).reshape(-1, Ev)
    S_all = K.shape[0]
    keep = np.ones(S_all, bool) if key_mask is None else \
        np.asarray(key_mask, dtype=bool).reshape(S_all)
    kpos = np.flatnonzero(keep).astype(np.int64)
    nk = kpos.size
    if nk == 0 or L == 0 or G == 0:
        return 0.0, 0.0, 0.0
    lo, hi = _row_ranges(structure, L, S_all, offset, kpos)
    if np.any(np.diff(lo) < 0) or np.any(np.diff(hi) < 0):
        raise ValueError("window_gradient_bound: the rows' key ranges must be "
                         "non-decreasing in the row (a band of offsets)")
    Sp = np.maximum(hi - lo, 0)                             # keys per position
    Si_t = np.tile(Sp, G)
    act = Si_t > 0
    if not act.any():
        return 0.0, 0.0, 0.0
    K, V = K[keep], V[keep]
    S = int(Sp.max())
    t = _gradient_terms(Q[act], K, V, scale, coef, delta,
                        S + 3 * math.ceil(math.log2(max(nk, 1))) + 3, radius, radius1)
    if t is None:
        return np.inf, np.inf, np.inf
    g, m, s, R, kq, kk, Vm, eP, eD, H, a1, a2 = t
    r1 = np.abs(dO).sum(axis=1) if Ev else np.zeros(G * L)
    r2 = np.linalg.norm(dO, axis=1) if Ev else np.zeros(G * L)
    ri = np.abs(dO).max(axis=1) if Ev else np.zeros(G * L)
    r1, r2, ri = (np.where(act, x, 0.0) for x in (r1, r2, ri))
    Sf = np.maximum(Sp, 1).astype(np.float64)
    rlo, rhi = _key_row_ranges(lo, hi, nk)
    nK = int(((rhi - rlo) * G).max())
    with np.errstate(over="ignore", invalid="ignore"):
        ci = 1.0 / (1.0 + (Sf - 1) * float(np.exp(-min(2 * R, 700.0))))   # per position

        def per_pos(x):                                    # summed over the heads
            return x.reshape(G, L).sum(axis=0)

        A1 = _window_sums(ci * per_pos(r1), rlo, rhi)
        A2 = _window_sums(ci * per_pos(r2), rlo, rhi)
        Ai = _window_sums(ci * per_pos(ri), rlo, rhi)
        B1 = _window_sums(per_pos(r1) / Sf, rlo, rhi)
        Bi = _window_sums(per_pos(ri) / Sf, rlo, rhi)
        N1, N2 = float(r1.max()), float(r2.max())
        bq = s * kk * (min(N1 * a1, N2 * a2)
                       + _gamma(S + m + Ev + 10 * g + 15) * (2 + eD) * Vm * H * N1)
        bk = s * kq * float(np.max(np.minimum(A1 * a1, A2 * a2)
                                   + _gamma(nK + m + Ev + 10 * g + 15) * (2 + eD) * Vm
                                   * H * B1))
        bv = float(np.max(eP * Ai + _gamma(nK + m + 10 * g + 9) * H * Bi))
    return tuple(float(b) if np.isfinite(b) else np.inf for b in (bq, bk, bv))
