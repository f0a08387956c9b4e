"""The decoding kernel: few rows per key/value head, keys in chunks merged in order."""

import functools
from typing import NamedTuple

import numpy as np
from numba import carray, cfunc, njit, prange, types

from ... import _config
from ..._runtime.omp_team import as_voidptr, next_task
from ..._runtime.threads import parallel
from .._exp import row_max
from .kernel import _DUMMY_RANGE, _FM, _online_update

# ------------------------------------------------------------------ few rows (decoding)
#
# Decoding asks for one query per head (a few with grouped-query heads, or a few new
# tokens onto a cache) against a long cache: the rows of one key/value head are
# stacked (R <= DECODE_ROWS), and the keys are split into chunks of DECODE_CHUNK
# (flash-decoding): one task per (key/value head, chunk), each the online softmax of
# the main kernel over its keys in blocks of DECODE_BLOCK, with the logits and the
# value products as loops (vectorised over E; BLAS packs its operands, which for a
# few rows costs more than the product). The partial (max, sum, numerator) of the
# chunks are merged in float64, in chunk order. Every chunk boundary is a block
# boundary, so each weight passes the roundings of the main kernel's analysis
# (exact_error_bound with key_block = DECODE_BLOCK); the merge is one more
# rescale-and-add per chunk, within the float64 terms there.

@njit(cache=True, nogil=True, fastmath=_FM)
def _decode_task(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                 b, c0, c1, m_out, l_out, acc_out, bad_out):
    # rows r of key/value head b (q[b, r], already scaled) against keys c0 .. c1 - 1;
    # writes the chunk's running maximum, sum and numerator (float64)
    R, E = q.shape[1], q.shape[2]
    Ev = v.shape[2]
    S = np.empty((R, block), q.dtype)
    tmp = np.empty((R, Ev), q.dtype)
    acc = np.zeros((R, Ev))
    mx = np.full(R, -np.inf)
    den = np.zeros(R)
    lr = lidx[b]
    bad = False
    for j0 in range(c0, c1, block):
        j1 = min(j0 + block, c1)
        nb = j1 - j0
        jj = 0                      # four keys at a time: four independent dot chains
        while jj + 4 <= nb:
            k0 = k[b, j0 + jj]
            k1 = k[b, j0 + jj + 1]
            k2 = k[b, j0 + jj + 2]
            k3 = k[b, j0 + jj + 3]
            for r in range(R):
                qr = q[b, r]
                x0 = zero
                x1 = zero
                x2 = zero
                x3 = zero
                for e in range(E):
                    qe = qr[e]
                    x0 += qe * k0[e]
                    x1 += qe * k1[e]
                    x2 += qe * k2[e]
                    x3 += qe * k3[e]
                S[r, jj] = x0
                S[r, jj + 1] = x1
                S[r, jj + 2] = x2
                S[r, jj + 3] = x3
            jj += 4
        for j in range(jj, nb):
            kr = k[b, j0 + j]
            for r in range(R):
                qr = q[b, r]
                x = zero
                for e in range(E):
                    x += qr[e] * kr[e]
                S[r, j] = x
        any_row = False
        for r in range(R):
            row = S[r]
            for jj in range(nb):        # a non-finite logit: NaN/inf in q or k (any key,
                bad |= not np.isfinite(row[jj])     # padded or not) or beyond the dtype
            ja = 0
            jb = nb
            if has_ranges:
                ja = min(max(lo[lr, r] - j0, 0), nb)
                jb = max(min(hi[lr, r] - j0, nb), ja)
            for jj in range(ja):
                row[jj] = -np.inf
            for jj in range(jb, nb):
                row[jj] = -np.inf
            if has_kmask:
                km = kmask[kidx[b]]
                for jj in range(ja, jb):
                    row[jj] += km[j0 + jj]
            bm = row_max(row, ja, jb)
            if _online_update(row, nb, bm, r, mx, den, acc):
                any_row = True
        if not any_row:
            continue
        tmp[:, :] = 0.0
        jj = 0                      # four keys at a time: one update of tmp per four
        while jj + 4 <= nb:
            v0 = v[b, j0 + jj]
            v1 = v[b, j0 + jj + 1]
            v2 = v[b, j0 + jj + 2]
            v3 = v[b, j0 + jj + 3]
            for r in range(R):
                p0 = S[r, jj]
                p1 = S[r, jj + 1]
                p2 = S[r, jj + 2]
                p3 = S[r, jj + 3]
                tr = tmp[r]
                for c in range(Ev):
                    tr[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c]
            jj += 4
        for j in range(jj, nb):
            vr = v[b, j0 + j]
            for r in range(R):
                p = S[r, j]
                tr = tmp[r]
                for c in range(Ev):
                    tr[c] += p * vr[c]
        for r in range(R):
            for c in range(Ev):
                acc[r, c] += tmp[r, c]
    m_out[:] = mx
    l_out[:] = den
    acc_out[:, :] = acc
    bad_out[0] = bad


@njit(cache=True, parallel=True)
def _par_decode(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                tasks, M, L, A, F):
    # the decoding kernel's parallel loop. It calls its kernel directly (compiled into
    # the loop, not through prange_loop's function pointer): decoding calls take
    # microseconds, and the pointer's conversion on every call cost ~50 µs; this is
    # the kernel's only entry point, so it is compiled once all the same.
    for t in prange(tasks.shape[0]):
        _decode_task(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                     tasks[t, 0], tasks[t, 1], tasks[t, 2], M[t], L[t], A[t], F[t:t + 1])


@njit(cache=True, nogil=True)
def _start(q, scale, T, Ev):
    # q · s in q's dtype (as the main kernel scales it), and each task's partial
    # maximum, sum, numerator and non-finite flag
    qs = np.empty_like(q)
    Bk, R, E = q.shape
    for b in range(Bk):
        for r in range(R):
            for e in range(E):
                qs[b, r, e] = q[b, r, e] * scale
    return qs, np.empty((T, R)), np.empty((T, R)), np.empty((T, R, Ev)), np.zeros(T, np.bool_)


@njit(cache=True)
def _decode_call(q, scale, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges,
                 block, tasks, first):
    # the decoding kernel as one call from Python (each call from Python costs
    # microseconds): q scaled, the parallel loop, the merge in chunk order;
    # (out, lse, status of _decode_merge)
    Bk, R, E = q.shape
    Ev = v.shape[2]
    qs, M, L, A, F = _start(q, scale, tasks.shape[0], Ev)
    _par_decode(qs, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                tasks, M, L, A, F)
    out = np.empty((Bk, R, Ev), q.dtype)
    lse = np.empty((Bk, R))
    status = _decode_merge(M, L, A, F, first, out, lse)
    return out, lse, status


# ------------------------------------------------------------------ on torch's threads
#
# The same tasks run by torch's OpenMP team (numbarope._runtime.omp_team) when the
# inputs are torch tensors: each thread of the team takes the next task from an atomic
# counter until none is left, and the merge is the same, so the bits are those of the
# parallel loop above. The task function receives one int64 array (the descriptor):
# the counter's address, the sizes, and the addresses of C-contiguous arrays.

_D_WORDS = 27


@njit(cache=True)
def _team_prepare(q, scale, k, v, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                  tasks):
    # q scaled, the chunk partials allocated, and the descriptor of the task function
    Bk, R, E = q.shape
    Ev = v.shape[2]
    T = tasks.shape[0]
    qs, M, L, A, F = _start(q, scale, T, Ev)
    counter = np.zeros(1, np.int64)
    d = np.empty(_D_WORDS, np.int64)
    d[0] = counter.ctypes.data
    d[1] = T
    d[2] = Bk
    d[3] = R
    d[4] = E
    d[5] = Ev
    d[6] = k.shape[1]
    d[7] = qs.ctypes.data
    d[8] = k.ctypes.data
    d[9] = v.ctypes.data
    d[10] = M.ctypes.data
    d[11] = L.ctypes.data
    d[12] = A.ctypes.data
    d[13] = F.ctypes.data
    d[14] = tasks.ctypes.data
    d[15] = block
    d[16] = kmask.ctypes.data
    d[17] = kmask.shape[0]
    d[18] = kmask.shape[1]
    d[19] = kidx.ctypes.data
    d[20] = has_kmask
    d[21] = lo.ctypes.data
    d[22] = lo.shape[0]
    d[23] = lo.shape[1]
    d[24] = hi.ctypes.data
    d[25] = lidx.ctypes.data
    d[26] = has_ranges
    return d, counter, qs, M, L, A, F


@njit(cache=True, nogil=True)
def _team_loop(d, q, k, v, zero):
    # one thread of the team: tasks from the counter until none is left
    T, Bk, R, Ev = d[1], d[2], d[3], d[5]
    M = carray(as_voidptr(d[10]), (T, R), np.float64)
    L = carray(as_voidptr(d[11]), (T, R), np.float64)
    A = carray(as_voidptr(d[12]), (T, R, Ev), np.float64)
    F = carray(as_voidptr(d[13]), (T,), np.bool_)
    tasks = carray(as_voidptr(d[14]), (T, 3), np.int64)
    kmask = carray(as_voidptr(d[16]), (d[17], d[18]), np.float64)
    kidx = carray(as_voidptr(d[19]), (Bk,), np.int64)
    lo = carray(as_voidptr(d[21]), (d[22], d[23]), np.int64)
    hi = carray(as_voidptr(d[24]), (d[22], d[23]), np.int64)
    lidx = carray(as_voidptr(d[25]), (Bk,), np.int64)
    has_kmask = d[20] != 0
    has_ranges = d[26] != 0
    block = d[15]
    while True:
        t = next_task(d[0])
        if t >= T:
            break
        _decode_task(q, k, v, zero, kmask, kidx, has_kmask, lo, hi, lidx, has_ranges, block,
                     tasks[t, 0], tasks[t, 1], tasks[t, 2], M[t], L[t], A[t], F[t:t + 1])


@njit(cache=True, nogil=True)
def _team_f32(d):
    Bk, R, E, Ev, S = d[2], d[3], d[4], d[5], d[6]
    _team_loop(d, carray(as_voidptr(d[7]), (Bk, R, E), np.float32),
               carray(as_voidptr(d[8]), (Bk, S, E), np.float32),
               carray(as_voidptr(d[9]), (Bk, S, Ev), np.float32), np.float32(0.0))


@njit(cache=True, nogil=True)
def _team_f64(d):
    Bk, R, E, Ev, S = d[2], d[3], d[4], d[5], d[6]
    _team_loop(d, carray(as_voidptr(d[7]), (Bk, R, E), np.float64),
               carray(as_voidptr(d[8]), (Bk, S, E), np.float64),
               carray(as_voidptr(d[9]), (Bk, S, Ev), np.float64), 0.0)


_team_bodies: dict = {}


def _team_body(dt):
    """The address of ``void body(void *descriptor)`` for q's dtype, compiled on first
    use (a process that never decodes with torch tensors never compiles it)."""
    addr = _team_bodies.get(dt)
    if addr is None:
        inner = _team_f32 if dt == np.float32 else _team_f64

        def body(data):
            inner(carray(data, (_D_WORDS,), np.int64))

        fn = cfunc(types.void(types.voidptr), nopython=True)(body)
        _team_bodies[dt] = addr = (fn, fn.address)
    return addr[1]


@njit(cache=True, nogil=True)
def _consecutive(kvidx, g):
    # kvidx[b] == b // g for every b
    for b in range(kvidx.shape[0]):
        if kvidx[b] != b // g:
            return False
    return True


@njit(cache=True, nogil=True)
def _decode_merge(M, L, A, F, first, out, lse):
    # the chunks first[b] .. first[b+1] - 1 of key/value head b, merged in order; a head
    # with a non-finite logit (F) gets NaN rows (NaN/inf inputs: the callers refuse).
    # Returns 0 when some head was flagged or some output is not finite (in the
    # output's dtype), -1 when every output is finite and some row saw no key
    # (lse = -inf), 1 otherwise.
    Bk, R, Ev = out.shape
    status = 1
    for b in range(Bk):
        bad = False
        for t in range(first[b], first[b + 1]):
            bad |= F[t]
        if bad:
            status = 0
            for r in range(R):
                for c in range(Ev):
                    out[b, r, c] = np.nan
                lse[b, r] = np.nan
            continue
        for r in range(R):
            m = -np.inf
            for t in range(first[b], first[b + 1]):
                m = max(m, M[t, r])
            if m == -np.inf:
                for c in range(Ev):
                    out[b, r, c] = 0.0
                lse[b, r] = -np.inf
                if status == 1:
                    status = -1
                continue
            den = 0.0
            num = np.zeros(Ev)
            for t in range(first[b], first[b + 1]):
                if M[t, r] == -np.inf:
                    continue
                f = np.exp(M[t, r] - m)
                den += L[t, r] * f
                for c in range(Ev):
                    num[c] += A[t, r, c] * f
            inv = 1.0 / den
            for c in range(Ev):
                out[b, r, c] = num[c] * inv
                if not np.isfinite(out[b, r, c]):
                    status = 0
            lse[b, r] = m + np.log(den)
    return status


def _decode_stack(B, n, kvidx, Bk, kidx, has_kmask, lidx, has_ranges):
    """Group size g when the query heads of each key/value head are g consecutive heads
    with one key mask and one range row each, and g·n <= DECODE_ROWS; else 0."""
    if B % Bk:
        return 0
    g = B // Bk
    if g * n > _config.DECODE_ROWS or not _consecutive(kvidx, g):
        return 0
    for idx, has in ((kidx, has_kmask), (lidx, has_ranges)):
        if has and not np.all(idx.reshape(Bk, g) == idx[::g, None]):
            return 0
    return g


class DecodePlan(NamedTuple):
    """What the decoding kernel needs beyond the arrays, fixed by the shapes and the
    index arrays (:func:`decode_plan`); a caller that sees the same shapes again (a
    model's layers and steps) keeps it and calls :func:`decode_run`."""

    B: int
    n: int
    Bk: int
    g: int
    kib: np.ndarray           # (Bk,) key-mask row of each key/value head
    has_kmask: bool
    lo: np.ndarray            # (rows, g·n) key ranges of the stacked rows
    hi: np.ndarray
    lidx: np.ndarray          # (Bk,)
    has_ranges: bool
    block: int
    tasks: np.ndarray         # (T, 3) (head, start, stop)
    first: np.ndarray         # (Bk + 1,)
    threads: bool             # worth more than one thread


def decode_plan(B, n, Bk, S, E, Ev, kvidx, kidx, has_kmask, lo, hi, lidx, has_ranges):
    """The :class:`DecodePlan` of q (B, n, E) on k (Bk, S, E), v (Bk, S, Ev) with the
    index arrays of :func:`exact_attention` (int64, ``lo``/``hi`` (rows, n)), or None
    when the call is not for the decoding kernel (too many rows per key/value head,
    heads not grouped consecutively, or masks that differ inside a group)."""
    g = _decode_stack(B, n, kvidx, Bk, kidx, has_kmask, lidx, has_ranges)
    if not g:
        return None
    kib = np.ascontiguousarray(kidx[::g]) if has_kmask else np.zeros(Bk, np.int64)
    if has_ranges:          # a range row per stacked row: rows of g heads share lidx
        lr = lidx[::g]
        lo2 = np.ascontiguousarray(np.tile(lo[lr], (1, g)))
        hi2 = np.ascontiguousarray(np.tile(hi[lr], (1, g)))
        li2 = np.arange(Bk, dtype=np.int64)
    else:
        lo2, hi2, li2 = _DUMMY_RANGE, _DUMMY_RANGE, np.zeros(Bk, np.int64)
    block, tasks, first = _decode_plan(Bk, S, int(_config.DECODE_BLOCK),
                                       int(_config.DECODE_CHUNK))
    # the parallel region costs a few microseconds: worth it from a few thousand
    # row-key products of work per thread
    work = float(Bk) * g * n * S * (E + Ev)
    return DecodePlan(B, n, Bk, g, kib, has_kmask, lo2, hi2, li2, has_ranges, block,
                      tasks, first, tasks.shape[0] > 1 and work >= _config.DECODE_PARALLEL)


def decode_run(plan, q, k, v, scale, km, nthreads, team=None):
    """``(out (B, n, Ev), lse (B, n) float64, status)`` of the decoding kernel under
    ``plan`` (:func:`decode_plan`); q (B, n, E), k, v C-contiguous of one dtype, ``km``
    the (rows, S) float64 key mask (0 / −inf) or a dummy when the plan has none.
    ``status``: 0 when a head met a non-finite logit or value (its rows are NaN) or an
    output is not finite, -1 when some row saw no key (lse −inf, output 0), else 1.
    ``team``: torch's OpenMP team (:func:`numbarope._runtime.omp_team.team`) to run
    the tasks on instead of numba's threads (the same bits)."""
    B, n, E = q.shape
    dt = q.dtype
    qs = np.ascontiguousarray(q.reshape(plan.Bk, plan.g * n, E))
    nt = nthreads if plan.threads else 1
    if team is not None and nt > 1 and k.flags.c_contiguous and v.flags.c_contiguous \
            and km.flags.c_contiguous:      # (the team's tasks read raw addresses)
        d, counter, qs, M, L, A, F = _team_prepare(
            qs, dt.type(scale), k, v, km, plan.kib, plan.has_kmask, plan.lo, plan.hi,
            plan.lidx, plan.has_ranges, plan.block, plan.tasks)
        team.run(_team_body(dt), d.ctypes.data, nt)
        out = np.empty((plan.Bk, plan.g * n, v.shape[2]), dt)
        lse = np.empty((plan.Bk, plan.g * n))
        status = _decode_merge(M, L, A, F, plan.first, out, lse)
    else:
        with parallel(nt, blas=False, balance=False):
            out, lse, status = _decode_call(qs, dt.type(scale), k, v, dt.type(0.0), km,
                                            plan.kib, plan.has_kmask, plan.lo, plan.hi,
                                            plan.lidx, plan.has_ranges, plan.block,
                                            plan.tasks, plan.first)
    return out.reshape(B, n, v.shape[2]), lse.reshape(B, n), status


@functools.lru_cache(maxsize=256)
def _decode_plan(Bk, S, block, chunk):
    """``(block, tasks, first)`` of the decoding kernel: chunks of ``chunk`` keys (a
    multiple of the block), one task ``(head, start, stop)`` each, ``first[b]`` the
    first task of head b; read-only, shared by every call of these sizes."""
    chunk = max(block, chunk // block * block)
    nch = -(-S // chunk)
    c0 = np.arange(nch, dtype=np.int64) * chunk
    tasks = np.stack([np.repeat(np.arange(Bk, dtype=np.int64), nch), np.tile(c0, Bk),
                      np.tile(np.minimum(c0 + chunk, S), Bk)], axis=1)
    first = np.arange(0, Bk * nch + 1, nch, dtype=np.int64)
    for a in (tasks, first):
        a.setflags(write=False)
    return block, tasks, first
