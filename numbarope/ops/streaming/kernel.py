"""The exact kernel: the blocked online softmax over per-row key ranges (its
prange loop), the per-row bias shift, and the helpers of the entry point."""

import math
from typing import NamedTuple

import numpy as np
from numba import carray, cfunc, njit, prange, types

from ... import _config
from ..._runtime.omp_team import as_voidptr, next_task
from ..._runtime.threads import blas_threads, prange_loop
from .._exp import _exp_block, row_max

_FM = set(_config.FASTMATH)

#: A key block whose logits are bounded (Cauchy–Schwarz) by the running maximum
#: plus this much needs no maximum pass: its weights are at most e^headroom.
#: It enters the rounding bound as 3u·headroom (:func:`exact_error_bound`).
EXACT_HEADROOM = {np.dtype(np.float64): 60.0, np.dtype(np.float32): 30.0}


@njit(cache=True, nogil=True, fastmath=_FM)
def _online_update(row, n, bm, r, mx, den, acc):
    # one key block's logits row[:n] (bm: their maximum over the keys the row sees)
    # into row r's online softmax: (mx, den, acc) rescaled to the new maximum,
    # row[:n] = exp(row − max), den += their sum. False (row zeroed) while the row has
    # seen no key. Shared by the main kernel and the decoding kernel.
    mnew = max(mx[r], bm)
    if mnew == -np.inf:
        for jj in range(n):
            row[jj] = 0.0
        return False
    if mnew > mx[r]:
        corr = np.exp(mx[r] - mnew)
        if corr < 1e-308:
            corr = 0.0
        den[r] *= corr
        for c in range(acc.shape[1]):
            acc[r, c] *= corr
        mx[r] = mnew
    den[r] += _exp_block(row, n, mx[r])
    return True


# ------------------------------------------------------------------ the kernel

@njit(cache=True, nogil=True, fastmath=_FM)
def _exact_tasks(q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx,
                 gscale, row_block, key_block, qnorm, knorm, headroom,
                 kmask, kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, tasks,
                 out, lse, ohead):
    # out: (B, n, Ev) (ohead = 1), or heads last, (B/ohead, n, ohead·Ev) (the layout
    # (batch, n, heads, Ev) transformers returns: head b = a·ohead + h writes out[a, i,
    # h·Ev:(h+1)·Ev]). q arrives multiplied by the scale s, except with general W (then
    # gscale = s; with no general W and a bias, gscale = 1). Row i of head b sees at most the keys
    # lo[lidx[b], i] <= j < hi[lidx[b], i] (all keys without ranges); the bias and W
    # of the pair (i, j) are stored at i - j + nk - 1. softcap > 0: the logits
    # (before the bias) are soft-capped, c·tanh(x/c) (then headroom = −inf).
    B, n, E = q.shape            # n query rows
    nk = k.shape[1]              # keys 0 .. nk-1
    Ev = v.shape[2]
    dt = q.dtype
    Sbuf = np.empty(row_block * key_block, dt)
    acc = np.empty((row_block, Ev))
    PV = np.empty(row_block * Ev, dt)
    mx = np.empty(row_block)
    den = np.empty(row_block)
    wq = np.empty(E)
    for ti in range(tasks.shape[0]):
        b = tasks[ti, 0]
        hk = kvidx[b]            # key/value head of query head b (GQA)
        i0 = tasks[ti, 1]
        i1 = min(i0 + row_block, n)
        rb = i1 - i0
        acc[:rb] = 0.0
        mx[:rb] = -np.inf
        den[:rb] = 0.0
        lr = lidx[b]
        jbeg = 0
        jend = nk
        if has_ranges:          # key blocks from min lo to max hi over the block's rows
            jbeg = nk           # (none when no row sees a key)
            jend = 0
            sees = False
            for i in range(i0, i1):
                jbeg = min(jbeg, lo[lr, i])
                jend = max(jend, hi[lr, i])
                sees = sees or hi[lr, i] > lo[lr, i]
            jbeg -= jbeg % key_block
            if not sees:
                jend = jbeg
        for j0 in range(jbeg, jend, key_block):
            j1 = min(j0 + key_block, jend)
            kb = j1 - j0
            S = Sbuf[:rb * kb].reshape((rb, kb))
            if general:
                for r in range(rb):
                    i = i0 + r
                    ja = 0
                    jb = kb
                    if has_ranges:
                        ja = min(max(lo[lr, i] - j0, 0), kb)
                        jb = max(min(hi[lr, i] - j0, kb), ja)
                    for j in range(j0 + ja, j0 + jb):
                        W = relative[ridx[b], i - j + nk - 1]
                        for c in range(E):
                            wq[c] = 0.0
                        for a in range(E):
                            qa = q[b, i, a]
                            for c in range(E):
                                wq[c] += qa * W[a, c]
                        s = 0.0
                        for c in range(E):
                            s += wq[c] * k[hk, j, c]
                        S[r, j - j0] = s
            else:
                np.dot(q[b, i0:i1], k[hk, j0:j1].T, S)
            # scale (general W), bias (float64), key ranges and padding, row maxima
            kbound = knorm[hk, j0 // key_block]
            for r in range(rb):
                i = i0 + r
                row = S[r]
                ja = 0                  # the row's keys in this block: ja <= jj < jb
                jb = kb
                if has_ranges:
                    ja = min(max(lo[lr, i] - j0, 0), kb)
                    jb = max(min(hi[lr, i] - j0, kb), ja)
                # Cauchy–Schwarz: logits of this block <= ‖q_i‖·max‖k_j‖ (+ shifted
                # bias <= 0). Within `headroom` of the running maximum no new maximum
                # is needed: weights e^{x−m} <= e^headroom cannot overflow.
                skip_max = (not general) and qnorm[b, i] * kbound <= mx[r] + headroom
                gs = gscale
                if softcap > 0.0:       # logit soft-capping (Gemma 2): c·tanh(s·qᵀk / c)
                    for jj in range(ja, jb):
                        row[jj] = softcap * np.tanh(row[jj] * gscale / softcap)
                    gs = 1.0
                bm = -np.inf
                for jj in range(ja):
                    row[jj] = -np.inf
                if has_kmask:               # key padding: 0 / -inf per key
                    km = kmask[kidx[b]]
                    for jj in range(ja, jb):
                        row[jj] += km[j0 + jj]
                if has_bias:
                    bb = bias[bidx[b]]
                    sh = rowshift[sidx[b], i]
                    off = i + nk - 1 - j0
                    for jj in range(ja, jb):
                        row[jj] = row[jj] * gs + (bb[off - jj] - sh)
                elif general:
                    for jj in range(ja, jb):
                        row[jj] = row[jj] * gs
                if has_bias or general or not skip_max:  # (else q was scaled: the GEMM
                    bm = row_max(row, ja, jb)            # gave the logits)
                for jj in range(jb, kb):
                    row[jj] = -np.inf
                _online_update(row, kb, bm, r, mx, den, acc)
            P = PV[:rb * Ev].reshape((rb, Ev))
            if Ev > 0:
                np.dot(S, v[hk, j0:j1], P)
            for r in range(rb):
                for c in range(Ev):
                    acc[r, c] += P[r, c]
        ob = b // ohead
        oc = (b % ohead) * Ev
        for r in range(rb):
            orow = out[ob, i0 + r]
            if den[r] > 0.0:
                inv = 1.0 / den[r]
                for c in range(Ev):
                    orow[oc + c] = acc[r, c] * inv
                lse[b, i0 + r] = mx[r] + np.log(den[r])
            else:
                for c in range(Ev):
                    orow[oc + c] = 0.0
                lse[b, i0 + r] = -np.inf


@prange_loop(lambda *a: a[:26] + (a[26][a[27][0]:a[27][1]],) + a[28:])
def _par_exact(fn, q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx,
               gscale, row_block, key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask,
               kvidx, lo, hi, lidx, has_ranges, softcap, tasks, starts, out, lse, ohead):
    # the parallel loop of the exact path: one iteration per group of tasks
    # tasks[starts[g]:starts[g+1]] (each task writes its own rows of out, lse)
    for g in prange(starts.shape[0] - 1):
        fn(q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift, sidx, gscale,
           row_block, key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask, kvidx, lo, hi,
           lidx, has_ranges, softcap, tasks[starts[g]:starts[g + 1]], out, lse, ohead)


# ------------------------------------------------------------------ on torch's threads
#
# The groups of _par_exact run by torch's OpenMP team (numbarope._runtime.omp_team)
# when the inputs are torch tensors and no relative matrices apply: each thread of the
# team takes the next group from an atomic counter; every task writes its own rows,
# so the bits are those of the parallel loop. The task function receives one int64
# array (the descriptor): a header, then five words per array (address, shape).

_X_ARRAYS = ("q", "k", "v", "bias", "bidx", "rowshift", "sidx", "qnorm", "knorm", "kmask",
             "kidx", "kvidx", "lo", "hi", "lidx", "tasks", "starts", "out", "lse")
_X_HEAD = 10        # counter, groups, has_bias, has_kmask, has_ranges, rb, kb, floats,
#                     ohead


@njit(cache=True, nogil=True)
def _put(d, slot, a):
    # array a's address and shape into the descriptor's slot
    base = _X_HEAD + 5 * slot
    d[base] = a.ctypes.data
    for i in range(a.ndim):
        d[base + 1 + i] = a.shape[i]


@njit(cache=True)
def _exact_team_prepare(q, k, v, bias, bidx, has_bias, rowshift, sidx, gscale, row_block,
                        key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask, kvidx, lo,
                        hi, lidx, has_ranges, softcap, tasks, starts, out, lse, ohead):
    # the descriptor of one wave (starts: its group boundaries) and what it points to
    d = np.zeros(_X_HEAD + 5 * 19, np.int64)
    counter = np.zeros(1, np.int64)
    floats = np.array([gscale, headroom, softcap])
    d[0] = counter.ctypes.data
    d[1] = starts.shape[0] - 1
    d[2] = has_bias
    d[3] = has_kmask
    d[4] = has_ranges
    d[5] = row_block
    d[6] = key_block
    d[7] = floats.ctypes.data
    d[8] = ohead
    _put(d, 0, q)
    _put(d, 1, k)
    _put(d, 2, v)
    _put(d, 3, bias)
    _put(d, 4, bidx)
    _put(d, 5, rowshift)
    _put(d, 6, sidx)
    _put(d, 7, qnorm)
    _put(d, 8, knorm)
    _put(d, 9, kmask)
    _put(d, 10, kidx)
    _put(d, 11, kvidx)
    _put(d, 12, lo)
    _put(d, 13, hi)
    _put(d, 14, lidx)
    _put(d, 15, tasks)
    _put(d, 16, starts)
    _put(d, 17, out)
    _put(d, 18, lse)
    return d, counter, floats


@njit(cache=True, nogil=True)
def _f64_2d(d, slot):
    b = _X_HEAD + 5 * slot
    return carray(as_voidptr(d[b]), (d[b + 1], d[b + 2]), np.float64)


@njit(cache=True, nogil=True)
def _i64_1d(d, slot):
    b = _X_HEAD + 5 * slot
    return carray(as_voidptr(d[b]), (d[b + 1],), np.int64)


@njit(cache=True, nogil=True)
def _i64_2d(d, slot):
    b = _X_HEAD + 5 * slot
    return carray(as_voidptr(d[b]), (d[b + 1], d[b + 2]), np.int64)


@njit(cache=True, nogil=True, fastmath=_FM)
def _exact_team_loop(d, q, k, v, rel, out):
    # one thread of the team: groups from the counter until none is left
    fl = carray(as_voidptr(d[7]), (3,), np.float64)
    bias, bidx = _f64_2d(d, 3), _i64_1d(d, 4)
    rowshift, sidx = _f64_2d(d, 5), _i64_1d(d, 6)
    qnorm, knorm = _f64_2d(d, 7), _f64_2d(d, 8)
    kmask, kidx, kvidx = _f64_2d(d, 9), _i64_1d(d, 10), _i64_1d(d, 11)
    lo, hi, lidx = _i64_2d(d, 12), _i64_2d(d, 13), _i64_1d(d, 14)
    tasks, starts, lse = _i64_2d(d, 15), _i64_1d(d, 16), _f64_2d(d, 18)
    ridx = np.zeros(q.shape[0], np.int64)
    ngroups = d[1]
    while True:
        g = next_task(d[0])
        if g >= ngroups:
            break
        _exact_tasks(q, k, v, rel, ridx, False, bias, bidx, d[2] != 0, rowshift, sidx,
                     fl[0], d[5], d[6], qnorm, knorm, fl[1], kmask, kidx, d[3] != 0, kvidx,
                     lo, hi, lidx, d[4] != 0, fl[2], tasks[starts[g]:starts[g + 1]], out, lse,
                     d[8])


@njit(cache=True, nogil=True)
def _dims3(d, slot):
    b = _X_HEAD + 5 * slot
    return (d[b + 1], d[b + 2], d[b + 3])


@njit(cache=True, nogil=True)
def _exact_team_f32(d):
    dt = np.float32
    _exact_team_loop(d, carray(as_voidptr(d[_X_HEAD]), _dims3(d, 0), dt),
                     carray(as_voidptr(d[_X_HEAD + 5]), _dims3(d, 1), dt),
                     carray(as_voidptr(d[_X_HEAD + 10]), _dims3(d, 2), dt),
                     np.zeros((1, 1, 1, 1), dt),
                     carray(as_voidptr(d[_X_HEAD + 85]), _dims3(d, 17), dt))


@njit(cache=True, nogil=True)
def _exact_team_f64(d):
    dt = np.float64
    _exact_team_loop(d, carray(as_voidptr(d[_X_HEAD]), _dims3(d, 0), dt),
                     carray(as_voidptr(d[_X_HEAD + 5]), _dims3(d, 1), dt),
                     carray(as_voidptr(d[_X_HEAD + 10]), _dims3(d, 2), dt),
                     np.zeros((1, 1, 1, 1), dt),
                     carray(as_voidptr(d[_X_HEAD + 85]), _dims3(d, 17), dt))


_exact_team_bodies: dict = {}


def _exact_team_body(dt):
    """The address of ``void body(void *descriptor)`` for the dtype, compiled on first
    use."""
    hit = _exact_team_bodies.get(dt)
    if hit is None:
        inner = _exact_team_f32 if dt == np.float32 else _exact_team_f64

        def body(data):
            inner(carray(data, (_X_HEAD + 5 * 19,), np.int64))

        fn = cfunc(types.void(types.voidptr), nopython=True)(body)
        _exact_team_bodies[dt] = hit = (fn, fn.address)
    return hit[1]


def exact_on_team(team, nthreads, q, k, v, bias, bidx, has_bias, rowshift, sidx, gscale,
                  row_block, key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask,
                  kvidx, lo, hi, lidx, has_ranges, softcap, tasks, waves, out, lse, ohead=1):
    """The exact kernel's waves on torch's OpenMP team (no relative matrices; every
    array C-contiguous): the results of ``_par_exact`` over the same waves."""
    body = _exact_team_body(q.dtype)
    with blas_threads(1):      # the GEMMs inside at one thread, as in numba's loop
        for starts in waves:
            d, counter, floats = _exact_team_prepare(
                q, k, v, bias, bidx, has_bias, rowshift, sidx, gscale, row_block,
                key_block, qnorm, knorm, headroom, kmask, kidx, has_kmask, kvidx, lo, hi,
                lidx, has_ranges, softcap, tasks, starts, out, lse, ohead)
            team.run(body, d.ctypes.data, nthreads)


_DUMMY_REL = np.zeros((1, 1, 1, 1))
_DUMMY_BIAS = np.zeros((1, 1))
_DUMMY_RANGE = np.zeros((1, 1), np.int64)


# ------------------------------------------------------------------ per-row bias shift

@njit(cache=True, nogil=True)
def _window_max(b, lo, hi):
    # max of b[lo_i .. hi_i] (inclusive; -inf when empty) for nondecreasing lo, hi:
    # a monotone deque, O(len(b) + len(lo))
    out = np.full(lo.size, -np.inf)
    dq = np.empty(b.size, np.int64)
    head = 0
    tail = 0
    nxt = 0
    for i in range(lo.size):
        while nxt <= hi[i] and nxt < b.size:
            while tail > head and b[dq[tail - 1]] <= b[nxt]:
                tail -= 1
            dq[tail] = nxt
            tail += 1
            nxt += 1
        while tail > head and dq[head] < lo[i]:
            head += 1
        if tail > head and lo[i] <= hi[i]:
            out[i] = b[dq[head]]
    return out


@njit(cache=True, nogil=True)
def _max_tree(b):
    # bottom-up segment tree of maxima over b (leaves at P .. P + len(b) - 1)
    P = 1
    while P < b.size:
        P *= 2
    t = np.full(2 * P, -np.inf)
    t[P:P + b.size] = b
    for i in range(P - 1, 0, -1):
        x = t[2 * i]
        y = t[2 * i + 1]
        t[i] = x if x > y else y
    return t, P


@njit(cache=True, nogil=True)
def _tree_max(t, P, l, r):
    # max of b[l .. r] (inclusive, l <= r) from its segment tree: O(log len(b))
    res = -np.inf
    l += P
    r += P + 1
    while l < r:
        if l & 1:
            x = t[l]
            res = x if x > res else res
            l += 1
        if r & 1:
            r -= 1
            x = t[r]
            res = x if x > res else res
        l >>= 1
        r >>= 1
    return res


@njit(cache=True, nogil=True)
def _first_run_after(ends, x):
    # index of the first run whose end exceeds x (ends increasing): binary search
    a = 0
    c = ends.size
    while a < c:
        mid = (a + c) // 2
        if ends[mid] <= x:
            a = mid + 1
        else:
            c = mid
    return a


#: Ways of :func:`_range_row_max`.
_DEQUE, _TREE, _PROBE = 0, 1, 2
#: Offsets a row probes, in decreasing order of bias, before it walks its runs.
_PROBES = 32


@njit(cache=True, nogil=True)
def _range_row_max(b, runs, lo, hi, S, mode):
    # max over the real keys j (runs [a, c) of real keys) with lo_i <= j < hi_i of
    # b[i - j + S - 1], per row i; -inf where there is none. For one run the offsets
    # e = i - j + S - 1 form the interval [i - min(c, hi_i) + S, i - max(a, lo_i) + S - 1].
    # _DEQUE: both ends of it are nondecreasing in i (lo and hi rise by at most 1 per
    # row): one monotone-deque window maximum per run, O(runs · (n + S)).
    # _TREE: a segment tree over b, O(log) per (row, run) pair that meets, or a direct
    # scan of the pair's few offsets.
    # _PROBE (many runs): the offsets in decreasing order of bias; a row takes the first
    # whose key it sees (its maximum), after _PROBES misses it walks its runs (_TREE).
    n = lo.size
    out = np.full(n, -np.inf)
    R = runs.shape[0]
    if mode == _DEQUE:
        el = np.empty(n, np.int64)
        er = np.empty(n, np.int64)
        for r in range(R):
            a = runs[r, 0]
            c = runs[r, 1]
            for i in range(n):
                el[i] = i - min(c, hi[i]) + S
                er[i] = i - max(a, lo[i]) + S - 1
            m = _window_max(b, el, er)
            for i in range(n):
                if m[i] > out[i]:
                    out[i] = m[i]
        return out
    t, P = _max_tree(b)
    ends = runs[:, 1].copy()
    order = np.empty(0, np.int64)
    real = np.zeros(S, np.bool_)
    if mode == _PROBE:
        order = np.argsort(-b, kind="mergesort")
        for r in range(R):
            real[runs[r, 0]:runs[r, 1]] = True
    for i in range(n):
        li = lo[i]
        hii = hi[i]
        if hii <= li:
            continue
        if mode == _PROBE:
            found = False
            for p in range(min(_PROBES, order.size)):
                e = order[p]
                if b[e] == -np.inf:          # no finite bias left: none visible
                    found = True
                    break
                j = i - e + S - 1
                if li <= j < hii and real[j]:
                    out[i] = b[e]
                    found = True
                    break
            if found:
                continue
        best = -np.inf
        r = _first_run_after(ends, li)
        while r < R and runs[r, 0] < hii:
            x0 = max(runs[r, 0], li)
            x1 = min(runs[r, 1], hii)
            e0 = i - x1 + S
            e1 = i - x0 + S - 1
            if e1 - e0 < 32:
                for e in range(e0, e1 + 1):
                    if b[e] > best:
                        best = b[e]
            else:
                x = _tree_max(t, P, e0, e1)
                if x > best:
                    best = x
            r += 1
        out[i] = best
    return out


def _key_runs(real):
    """(runs, 2) int64: the maximal runs [a, c) of True in a boolean vector."""
    d = np.diff(np.concatenate([[0], real.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1).astype(np.int64)


def _shift_mode(runs, lo, hi, S):
    """The cheapest way of :func:`_range_row_max` by operation counts: the deque
    (monotone ranges only), the tree, or probing (many runs per row)."""
    n = lo.size
    nonempty = hi > lo
    meets = float(np.maximum(
        np.searchsorted(runs[:, 0], hi[nonempty], side="left")
        - np.searchsorted(runs[:, 1], lo[nonempty], side="right"), 0).sum())
    log = math.log2(n + S + 1)
    tree = 2 * (n + S) + 2 * meets * log
    probe = 2 * (n + S) * log + n * _PROBES
    monotone = n <= 1 or (np.diff(lo).max() <= 1 and np.diff(hi).max() <= 1)
    deque = runs.shape[0] * (n + S) if monotone else np.inf
    best = min(deque, tree, probe)
    return _DEQUE if deque == best else _TREE if tree == best else _PROBE


def bias_row_shift(bias, n, n_keys=None, key_range=None, key_mask=None):
    """Largest bias over the keys each query row sees: ``max_{j visible to i} b_{ij}``.

    Softmax is invariant to a constant per row, so the exact kernel adds
    ``b − shift_i`` (<= 0 on the keys row i sees): biases of any finite magnitude
    (``finfo.min`` as a mask, a constant ``-1e30``) then cost no accuracy. Row i
    sees key j when ``lo_i <= j < hi_i`` (``key_range``) and j is a real key
    (``key_mask``); the bias of the pair is ``bias[i − j + S − 1]``. Rows that see no
    finite bias get 0. Taking the maximum over keys a row cannot see would be wrong:
    a padded key, or one outside the row's range, with bias 0 next to visible keys
    at −1e30 would make every visible weight underflow.

    Where ``lo`` and ``hi`` rise by at most 1 from a row to the next (causal,
    windows, no range) the offsets a run of real keys reaches form an interval whose
    ends are nondecreasing in i: a monotone-deque window maximum per run,
    O(runs·(L + S)). Otherwise (chunked local attention, packed sequences, any
    range) a segment tree over the bias: O((L + S) + pairs·log(L + S)) for the
    (row, run) pairs that meet. With many runs (scattered padding) each row first
    probes the offsets in decreasing order of bias and takes the first whose key it
    sees (O((L + S) log(L + S)) for the order, a few probes per row). The cheapest
    by operation counts is taken; all give the same maxima.

    Parameters
    ----------
    bias : (Bb, L + S − 1) ndarray of float64
        One relative bias per row of the result (−inf masks, no NaN or +inf).
    n : int
        Query rows L.
    n_keys : int, optional
        Key rows S (default L).
    key_range : (lo, hi), optional
        Each (L,) int: row i sees at most keys ``lo[i] <= j < hi[i]`` (clipped to
        [0, S]); default every key.
    key_mask : (S,) ndarray of bool, optional
        True = a real key (the same for every row of ``bias``); default all real.

    Returns
    -------
    (Bb, L) ndarray of float64
    """
    S = n if n_keys is None else int(n_keys)
    bias = np.asarray(bias, dtype=np.float64)
    Bb = bias.shape[0]
    shift = np.zeros((Bb, n))
    if n == 0 or S == 0 or Bb == 0:
        return shift
    if key_range is None:
        lo = np.zeros(n, np.int64)
        hi = np.full(n, S, np.int64)
    else:
        lo = np.clip(np.asarray(key_range[0], dtype=np.int64).reshape(n), 0, S)
        hi = np.clip(np.asarray(key_range[1], dtype=np.int64).reshape(n), 0, S)
    if key_mask is None:
        runs = np.array([[0, S]], np.int64)
    else:
        runs = _key_runs(np.asarray(key_mask, dtype=bool).reshape(S))
        if runs.shape[0] == 0:
            return shift
    mode = _shift_mode(runs, lo, hi, S)
    for r in range(Bb):
        m = _range_row_max(np.ascontiguousarray(bias[r]), runs, lo, hi, S, mode)
        ok = np.isfinite(m)
        shift[r, ok] = m[ok]
    return shift


# ------------------------------------------------------------------ helpers

@njit(cache=True, nogil=True, fastmath=_FM)
def _take_heads(x, hl, scale, scaled, copy, out, sq):
    # x C-contiguous, (A, G, n, E) or, with hl, (A, n, G, E) (transformers' layout), as
    # heads b = a·G + g (rows x[a, g, i] or x[a, i, g]): with copy, into out (A·G, n, E)
    # (C-contiguous, out's dtype): dtype(x)·dtype(scale) (scaled) or dtype(x), each
    # rounded once as x.astype(dtype) * dtype(scale) and astype round them (one
    # product: fastmath's reassoc/contract cannot change it). Without copy, out is not
    # written (any array of the dtype). sq[b, i]: the float64 sum of the squares of
    # that row (reassociated; inf or NaN when the row holds inf or NaN, or its squares
    # overflow float64: the caller checks them, as a test under fastmath's flags here
    # was compiled away on the path without a copy).
    A, G, n, E = x.shape
    if hl:
        G, n = n, G
    dt = out.dtype
    s = dt.type(scale)
    for a in range(A):
        for g in range(G):
            b = a * G + g
            for i in range(n):
                row = x[a, i, g] if hl else x[a, g, i]
                acc = 0.0
                if copy:
                    orow = out[b, i]
                    for e in range(E):
                        y = dt.type(row[e])
                        if scaled:
                            y = y * s
                        orow[e] = y
                        z = np.float64(y)
                        acc += z * z
                else:
                    for e in range(E):
                        z = np.float64(row[e])
                        acc += z * z
                sq[b, i] = acc


def _as4(x):
    """x (..., n, E) as (A, G, n, E): a view for 2, 3 or 4 dims."""
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 2:
        return x[None, None]
    return x.reshape((-1,) + x.shape[-3:])


def kernel_inputs(q, k, v, scale, dtype):
    """q·scale, k and v as the exact kernel takes them, and what :func:`exact_run`
    would read from them, in one pass over each.

    Parameters
    ----------
    q, k, v : (..., n, E), (..., S, E), (..., S, Ev) ndarray of float32 or float64
        Any strides (the transposed views transformers passes).
    scale : float
    dtype : float32 or float64
        The kernel's dtype.

    Returns
    -------
    (qf, kf, vf, stats), or None when q·scale, k or v holds inf or NaN (or a row's
    squares overflow float64)
        ``qf``: C-contiguous ``(B, n, E)``, ``q.astype(dtype) * dtype(scale)`` (one
        rounding each); ``kf``, ``vf``: ``k``, ``v`` as ``astype(dtype)``, C-contiguous
        (the arrays themselves when already so). ``stats = (sq_q (B, n), sq_k (Bk, S),
        vmax)``: float64 sums of the squares of the rows of ``qf`` and ``kf``, and an
        upper bound of ``max |v|`` (the largest row norm), for ``exact_run(stats=)``.
    """
    dtype = np.dtype(dtype)
    res = []
    for x, scaled in ((q, True), (k, False), (v, False)):
        x4 = _as4(x)
        if scaled and x4.dtype.itemsize > dtype.itemsize:
            x4 = x4.astype(dtype)               # narrowed first: one rounding each
        A, G, n, E = x4.shape
        hl = not x4.flags.c_contiguous and x4.transpose(0, 2, 1, 3).flags.c_contiguous
        if not hl:
            x4 = np.ascontiguousarray(x4)       # (other strides: copied once, here)
        copy = scaled or x4.dtype != dtype or hl
        out = np.empty((A * G, n, E), dtype) if copy else x4.reshape(A * G, n, E)
        src = x4.transpose(0, 2, 1, 3) if hl else x4
        sq = np.empty((A * G, n))
        _take_heads(src, hl, scale, scaled, copy, out, sq)
        if not np.isfinite(sq).all():
            return None
        res.append((out, sq))
    (qf, qsq), (kf, ksq), (vf, vsq) = res
    vmax = float(np.sqrt(vsq.max(initial=0.0) * (1 + 1e-6)))
    return qf, kf, vf, (qsq, ksq, vmax)


def norm_bounds(sq, E, dtype):
    """Upper bounds of row norms from the float64 sums of the squares of their E
    entries of ``dtype`` (any order): ``sqrt(sq·(1 + 2(E+1)u))``, u the unit roundoff
    of ``dtype`` (>= float64's), which covers the rounding of the sum (Higham 2002,
    §3.1)."""
    return np.sqrt(sq * (1 + (E + 1) * np.finfo(dtype).eps))


def row_norms(x):
    """Upper bounds of the row norms ‖x[b, i]‖₂ of a (B, n, E) array, as float64.

    The squares are summed in float64 (one pass, no copy of a C-contiguous x), then
    enlarged by :func:`norm_bounds`: the result is never below the true norm.
    """
    E = x.shape[-1]
    xc = np.ascontiguousarray(x).reshape(1, 1, -1, E)
    sq = np.empty((1, xc.shape[2]))
    _take_heads(xc, False, 1.0, False, False, np.empty((0, 0, E), x.dtype), sq)   # sums only
    out = norm_bounds(sq.reshape(x.shape[:-1]), E, x.dtype)
    bad = ~np.isfinite(out)
    if bad.any():           # the squares overflowed x's dtype: rows scaled by max|x|, float64
        rows = x[bad].astype(np.float64)
        m = np.abs(rows).max(axis=1)
        m = np.where(m > 0, m, 1.0)
        r = rows / m[:, None]
        out[bad] = m * np.sqrt(np.einsum("ke,ke->k", r, r) * (1 + 2 * (E + 2) * 2.0 ** -53))
    return out


def exact_blocks(B, n, n_keys=None):
    """Row and key block sizes of the exact kernel for B heads of length n.

    ``_config.EXACT_ROW_BLOCK`` rows per task (large blocks keep the GEMMs
    efficient), halved down to 32 until one head has at least
    ``_config.EXACT_TASKS`` tasks (so that one long head keeps several threads busy
    and the last tasks balance); ``_config.EXACT_KEY_BLOCK`` keys, fewer when n is
    shorter. From n alone (not B, not the threads): a row's blocks, hence its
    rounding, are the same for any number of threads and any batching of the heads
    (a Dask chunk of heads gives the bits of the whole call).
    """
    rb = int(_config.EXACT_ROW_BLOCK)
    while rb > 32 and -(-n // rb) < _config.EXACT_TASKS:
        rb //= 2
    kb = int(min(_config.EXACT_KEY_BLOCK, max(n if n_keys is None else n_keys, 1)))
    return rb, kb


def _check_ranges(key_ranges, B, n, S):
    """``key_ranges`` as C-contiguous int64 ``(lo, hi, lidx)``, clipped to [0, S]."""
    if len(key_ranges) == 2:
        lo, hi = key_ranges
        lidx = None
    else:
        lo, hi, lidx = key_ranges
    lo = np.atleast_2d(np.asarray(lo, dtype=np.int64))
    hi = np.atleast_2d(np.asarray(hi, dtype=np.int64))
    if lo.ndim != 2 or lo.shape != hi.shape or lo.shape[1] != n:
        raise ValueError(f"key_ranges: lo and hi must have shape (P, {n}), got "
                         f"{lo.shape} and {hi.shape}")
    P = lo.shape[0]
    if lidx is None:
        if P not in (1, B):
            raise ValueError(f"key_ranges: {P} range rows for {B} heads need lidx")
        lidx = np.zeros(B, np.int64) if P == 1 else np.arange(B, dtype=np.int64)
    lidx = np.ascontiguousarray(lidx, dtype=np.int64).reshape(-1)
    if lidx.shape != (B,) or (B and (lidx.min() < 0 or lidx.max() >= P)):
        raise ValueError(f"key_ranges: lidx must be ({B},) indices into {P} range rows")
    return (np.ascontiguousarray(np.clip(lo, 0, S)), np.ascontiguousarray(np.clip(hi, 0, S)),
            lidx)


def gather_key_ranges(ranges, n, S):
    """One ``key_ranges=(lo, hi, lidx)`` argument from per-head ranges.

    Parameters
    ----------
    ranges : sequence of ((L,), (L,)) or None
        Per head, the ``(lo, hi)`` of :meth:`numbarope.bias.Structure.key_ranges`,
        or None (every key).
    n, S : int
        Query rows L and keys S.

    Returns
    -------
    (lo, hi, lidx) or None
        Equal ranges share one row; None when no head has a range.
    """
    if all(r is None for r in ranges):
        return None
    rows, index, lidx = [], {}, np.empty(len(ranges), np.int64)
    for b, r in enumerate(ranges):
        if r is None:
            r = (np.zeros(n, np.int64), np.full(n, S, np.int64))
        lo = np.clip(np.asarray(r[0], dtype=np.int64).reshape(n), 0, S)
        hi = np.clip(np.asarray(r[1], dtype=np.int64).reshape(n), 0, S)
        key = lo.tobytes() + hi.tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append((lo, hi))
        lidx[b] = index[key]
    return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), lidx)


def _block_work(lo, hi, n, rb, kb):
    """(P, row blocks) keys each row block of each range row visits, and its rows."""
    starts = np.arange(0, n, rb, dtype=np.int64)
    rows = np.diff(np.append(starts, n))
    mn = np.minimum.reduceat(lo, starts, axis=1)
    mxh = np.maximum.reduceat(hi, starts, axis=1)
    sees = np.maximum.reduceat((hi > lo).astype(np.int8), starts, axis=1) > 0
    jbeg = mn - mn % kb
    return np.where(sees, np.maximum(mxh - jbeg, 0), 0), rows


class _Layout(NamedTuple):
    rb: int
    kb: int
    lo: np.ndarray
    hi: np.ndarray
    li: np.ndarray
    tasks: np.ndarray        # (T, 2) (head, first row), longest first
    inline: bool             # too small for a parallel region
    waves: tuple             # per wave, the group starts (each group one prange iteration)


_layouts: dict = {}


def _layout(B, n, S, cost, key_ranges, nthreads):
    """The exact kernel's blocks, tasks, groups and waves for these sizes (a function of
    the sizes, the ranges and the threads only). Kept for read-only range arrays (the
    fast lane's, reused call after call: the same objects, which cannot change) and
    calls without ranges; computed afresh otherwise."""
    key = None
    if key_ranges is None or all(not getattr(a, "flags", None) or not a.flags.writeable
                                 for a in key_ranges):
        key = (B, n, S, cost, nthreads) + (() if key_ranges is None else
                                          tuple(id(a) for a in key_ranges))
        hit = _layouts.get(key)
        if hit is not None and (key_ranges is None or
                                all(a is b for a, b in zip(hit[0], key_ranges))):
            return hit[1]
    rb, kb = exact_blocks(B, n, S)
    if key_ranges is not None:
        lo, hi, li = _check_ranges(key_ranges, B, n, S)
    else:
        lo = hi = _DUMMY_RANGE
        li = np.zeros(B, np.int64)
    starts = np.arange(0, n, rb, dtype=np.int64)
    tasks = np.stack(np.broadcast_arrays(np.arange(B, dtype=np.int64)[:, None],
                                         starts[None, :]), axis=-1).reshape(-1, 2)
    if key_ranges is not None:   # keys each task visits; longest tasks first: dynamic
        span, rows = _block_work(lo, hi, n, rb, kb)     # scheduling then balances the tail
        work = (span * rows)[li].reshape(-1).astype(np.float64)
        tasks = tasks[np.argsort(-work, kind="stable")]
        total = float(work.sum()) * cost
    else:
        total = float(B) * n * S * cost
    tasks = np.ascontiguousarray(tasks)
    inline = total < _config.INLINE_WORK
    waves = ()
    if not inline and len(tasks):
        # tasks in groups (each group one prange iteration, reusing its buffers: a row
        # does not depend on its group), groups in waves of about WAVE_WORK multiply-adds
        # per thread: between waves Python runs, so Ctrl-C stops a long call
        per_task = total / len(tasks)
        group = max(1, min(int(_config.EXACT_GROUP_WORK // max(per_task, 1)),
                           -(-len(tasks) // (4 * nthreads))))
        gs = np.arange(0, len(tasks) + group, group, dtype=np.int64)
        gs[-1] = len(tasks)
        gs = np.unique(gs)
        wave = max(8 * nthreads, int(_config.WAVE_WORK * nthreads // max(per_task * group, 1)))
        waves = tuple(np.ascontiguousarray(gs[w0:min(w0 + wave, len(gs) - 1) + 1])
                      for w0 in range(0, len(gs) - 1, wave))
    lay = _Layout(rb, kb, lo, hi, li, tasks, inline, waves)
    if key is not None:      # (writable arrays, as the kernels are compiled for; no
        if len(_layouts) >= 64:
            _layouts.pop(next(iter(_layouts)))
        _layouts[key] = (key_ranges, lay)      # caller sees them)
    return lay


def _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges):
    """``(shift (P, n), sidx (B,))``: each head's per-row bias shift (the largest bias
    over the keys the row sees: :func:`bias_row_shift`), one row of shifts per (key
    mask row, range row, bias row) triple."""
    trip, sidx = np.unique(np.stack([ki, li, bi], axis=1), axis=0, return_inverse=True)
    sidx = np.ascontiguousarray(sidx.reshape(-1), dtype=np.int64)
    shift = np.empty((trip.shape[0], n))
    pairs_, which = np.unique(trip[:, :2], axis=0, return_inverse=True)
    which = which.reshape(-1)
    for g, (pk, pl) in enumerate(pairs_):
        rows = np.flatnonzero(which == g)
        shift[rows] = bias_row_shift(
            bs[trip[rows, 2]], n, S, (lo[pl], hi[pl]) if has_ranges else None,
            np.isfinite(km[pk]) if has_kmask else None)
    return shift, sidx


def _index_args(B, bias, bidx, key_mask, kidx, kvidx):
    """The optional per-head arguments of the exact kernels as they take them:
    ``(kvi, has_bias, bs, bi, has_kmask, km, ki)``, contiguous int64 index arrays and
    float64 values, dummies where absent (shared by the forward and the backward)."""
    kvi = (np.arange(B, dtype=np.int64) if kvidx is None
           else np.ascontiguousarray(kvidx, dtype=np.int64))
    has_bias = bias is not None
    bs = np.ascontiguousarray(bias, dtype=np.float64) if has_bias else _DUMMY_BIAS
    bi = np.ascontiguousarray(bidx, dtype=np.int64) if has_bias else np.zeros(B, np.int64)
    has_kmask = key_mask is not None
    km = np.ascontiguousarray(key_mask, dtype=np.float64) if has_kmask else _DUMMY_BIAS
    ki = np.ascontiguousarray(kidx, dtype=np.int64) if has_kmask else np.zeros(B, np.int64)
    return kvi, has_bias, bs, bi, has_kmask, km, ki
