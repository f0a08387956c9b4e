"""Exact attention kernels: blocked online softmax on BLAS, never an n×n matrix.

The work is cut into tasks, one per (head, block of ``_config.EXACT_ROW_BLOCK``
query rows), run on ``workers`` Python threads (:mod:`numbarope._threads`), each
task a serial numba kernel that releases the GIL. A task walks the key blocks
(``_config.EXACT_KEY_BLOCK`` keys; with ``causal``, only up to its last row) and
keeps, per row, the running maximum ``m``, denominator ``l`` and numerator
``acc`` (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"; Dao et al. 2022, FlashAttention, Alg. 1):

    S = s·Q_b K_bᵀ + b − rowshift          (one GEMM; bias and mask in one pass)
    m' = max(m, rowmax S);  P = exp(S − m')  (vectorised exp, see below)
    l = l·e^{m−m'} + rowsum P;  acc = acc·e^{m−m'} + P·V_b   (one GEMM)

and finally ``out = acc / l`` and the row log-sum-exp ``lse = m + log l``.

* **GEMMs** ``Q_b K_bᵀ`` and ``P V_b`` go to BLAS (numba's ``np.dot``), one BLAS
  thread per task; the threads of numbarope are the tasks.
* **exp** is our own vectorised kernel (:func:`_exp_block`): Cody–Waite
  reduction ``x = k·ln2 + r``, ``|r| <= ln2/2``, a Taylor polynomial of ``e^r``
  (degree 13 in float64, 7 in float32), and ``2^k`` written into the exponent
  bits. Its relative error is at most ``EXP_ULPS[dtype]`` units of roundoff
  (proven for float64; checked over every float32 input, see EXP_ULPS).
  Arguments below ``EXP_FLUSH[dtype]`` (weights below e^−708 in float64, e^−87
  in float32, relative to the row's running maximum) give exactly 0: they
  would be subnormal, cost ~50× more in arithmetic, and change a sum of >= 1
  by less than ``n·e^{EXP_FLUSH}`` (in ``info.error_bound``).
* **Maximum pass skipped** where a Cauchy–Schwarz bound ``s‖q_i‖·max‖k_j‖``
  keeps the key block within ``EXACT_HEADROOM`` of the running maximum (the
  weights are then at most e^headroom: no overflow), which is most blocks of
  ordinary inputs.
* **Precision**: the logits, ``exp`` and the ``P V`` product run in the compute
  dtype (float32 or float64); ``m``, ``l``, ``acc`` and the bias are float64.
* **General** ``W_t`` (``relative``): the logits ``q_iᵀ W_{i−j} k_j`` are
  per-pair bilinear forms, O(E²) each (no GEMM applies); the rest is the same.

Fully masked rows (every logit ``-inf``) return 0, as torch >= 2.5 does, with
``lse = -inf``. Memory: O(B·n·(E + Ev)) plus one row block × key block per
thread.
"""

import numpy as np
from numba import njit, types
from llvmlite import ir as llvmir
from numba.extending import intrinsic, overload

from .. import _config
from .._runtime.threads import blas_threads, resolve_workers, run_tasks
from ._exp import _exp_block

__all__ = ["exact_attention", "row_norms", "bias_row_shift", "EXACT_HEADROOM"]

_FM = set(_config.FASTMATH)

#: A key block whose logits are bounded (Cauchy–Schwarz) by the running maximum
#: plus this much needs no maximum pass: its weights are at most e^headroom.
#: It enters the rounding bound as 3u·headroom (planner.exact_error_bound).
EXACT_HEADROOM = {np.dtype(np.float64): 60.0, np.dtype(np.float32): 30.0}


@njit(cache=True, nogil=True, fastmath=_FM)
def _exact_tasks(q, k, v, relative, ridx, general, bias, bidx, has_bias, rowshift,
                 causal, gscale, row_block, key_block, qnorm, knorm, headroom,
                 offset, kmask, kidx, has_kmask, kvidx, left, right, sidx, tasks, out, lse):
    # q arrives multiplied by the scale s, except with general W (then gscale = s;
    # with no general W and a bias, gscale = 1)
    B, n, E = q.shape            # n query rows; query i sits at position i + offset
    nk = k.shape[1]              # keys at positions 0 .. nk-1; t = i + offset - j
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
        jend = min(max(i1 + offset, 0), nk) if causal else nk
        if right >= 0:          # a window: keys j <= i + offset + right only
            jend = min(jend, max(i1 + offset + right, 0))
        jbeg = 0
        if left >= 0:           # and j >= i + offset - left (whole key blocks skipped)
            jbeg = max(i0 + offset - left, 0)
            jbeg = min(jbeg - jbeg % key_block, jend)
        for j0 in range(jbeg, jend, key_block):
            j1 = min(j0 + key_block, jend)
            kb = j1 - j0
            S = Sbuf[:rb * kb].reshape((rb, kb))
            if general:
                for r in range(rb):
                    i = i0 + r
                    for j in range(j0, j1):
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
            # scale (general W), bias (float64), causal mask, row maxima
            kbound = knorm[hk, j0 // key_block]
            for r in range(rb):
                i = i0 + r
                row = S[r]
                jl = max(min(j1, i + offset + 1), j0) if causal else j1
                # Cauchy–Schwarz: logits of this block <= ‖q_i‖·max‖k_j‖ (+ shifted
                # bias <= 0). Within `headroom` of the running maximum no new maximum
                # is needed: weights e^{x−m} <= e^headroom cannot overflow.
                skip_max = (not general) and qnorm[b, i] * kbound <= mx[r] + headroom
                bm = -np.inf
                if has_kmask:               # key padding: 0 / -inf per key
                    km = kmask[kidx[b]]
                    for jj in range(jl - j0):
                        row[jj] += km[j0 + jj]
                if has_bias:
                    bb = bias[bidx[b]]
                    sh = rowshift[sidx[b], i]
                    off = i + nk - 1 - j0
                    for jj in range(jl - j0):
                        x = row[jj] * gscale + (bb[off - jj] - sh)
                        row[jj] = x
                        bm = x if x > bm else bm
                elif general:
                    for jj in range(jl - j0):
                        x = row[jj] * gscale
                        row[jj] = x
                        bm = x if x > bm else bm
                elif not skip_max:          # q was scaled: the GEMM gave the logits
                    for jj in range(jl - j0):
                        x = row[jj]
                        bm = x if x > bm else bm
                for jj in range(jl - j0, kb):
                    row[jj] = -np.inf
                mnew = max(mx[r], bm)
                if mnew == -np.inf:        # nothing visible yet in this row
                    for jj in range(kb):
                        row[jj] = 0.0
                    continue
                if mnew > mx[r]:
                    corr = np.exp(mx[r] - mnew)
                    if corr < 1e-308:
                        corr = 0.0
                    den[r] *= corr
                    for c in range(Ev):
                        acc[r, c] *= corr
                    mx[r] = mnew
                den[r] += _exp_block(row, kb, mx[r])
            P = PV[:rb * Ev].reshape((rb, Ev))
            if Ev > 0:
                np.dot(S, v[hk, j0:j1], P)
            for r in range(rb):
                for c in range(Ev):
                    acc[r, c] += P[r, c]
        for r in range(rb):
            if den[r] > 0.0:
                inv = 1.0 / den[r]
                for c in range(Ev):
                    out[b, i0 + r, c] = acc[r, c] * inv
                lse[b, i0 + r] = mx[r] + np.log(den[r])
            else:
                for c in range(Ev):
                    out[b, i0 + r, c] = 0.0
                lse[b, i0 + r] = -np.inf


_DUMMY_REL = np.zeros((1, 1, 1, 1))
_DUMMY_BIAS = np.zeros((1, 1))


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


def row_norms(x):
    """Upper bounds of the row norms ‖x[b, i]‖₂ of a (B, n, E) array, as float64.

    The squares are summed in x's dtype (no float64 copy of x), then enlarged by
    ``1 + 2(E+1)u`` (u its unit roundoff), which covers the rounding of a sum of E
    squares (Higham 2002, §3.1): the result is never below the true norm.
    """
    E = x.shape[-1]
    u = np.finfo(x.dtype).eps / 2
    with np.errstate(over="ignore"):
        sq = np.einsum("bne,bne->bn", x, x).astype(np.float64)
    out = np.sqrt(sq * (1 + 2 * (E + 1) * u))
    bad = ~np.isfinite(out)
    if bad.any():           # the squares overflowed x's dtype: rows scaled by max|x|, float64
        rows = x[bad].astype(np.float64)
        m = np.abs(rows).max(axis=1)
        m = np.where(m > 0, m, 1.0)
        r = rows / m[:, None]
        out[bad] = m * np.sqrt(np.einsum("ke,ke->k", r, r) * (1 + 2 * (E + 2) * 2.0 ** -53))
    return out


@njit(cache=True, nogil=True)
def _masked_row_max(b, runs, n, S, offset, causal):
    # max over the real keys j of row i (j <= i + offset when causal) of
    # b[i - j + S - 1], for the runs [a, c) of real keys: per run a window maximum over
    # the nondecreasing index range lo_i .. hi_i, O(runs · (n + S)).
    out = np.full(n, -np.inf)
    for r in range(runs.shape[0]):
        a = runs[r, 0]
        c = runs[r, 1]
        lo = np.empty(n, np.int64)
        hi = np.empty(n, np.int64)
        for ii in range(n):
            last = c - 1
            if causal and ii + offset < last:
                last = ii + offset
            lo[ii] = ii - last + S - 1
            hi[ii] = ii - a + S - 1
        m = _window_max(b, lo, hi)
        for ii in range(n):
            if m[ii] > out[ii]:
                out[ii] = m[ii]
    return out


def _key_runs(real):
    """(runs, 2) int64: the maximal runs [a, c) of True in a boolean vector."""
    d = np.diff(np.concatenate([[0], real.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1).astype(np.int64)


def bias_row_shift(bias, n, causal, n_keys=None, offset=0, key_mask=None):
    """Largest visible bias of every query row: ``max_{t visible to i} b_t``.

    Softmax is invariant to a constant per row, so the exact kernel adds
    ``b_t − shift_i`` (<= 0 on the visible offsets): biases of any finite
    magnitude (``finfo.min`` as a mask, a constant ``-1e30``) then cost no
    accuracy. Query i (at position i + offset) sees key j at offset
    ``t = i + offset − j``, stored at ``bias[i − j + S − 1]``, for the real keys j
    in [0, S) (``key_mask``; with ``causal``, j <= i + offset); rows that see no
    finite bias get 0. Taking the maximum over padded keys too would be wrong: a
    padded key with bias 0 next to real keys at −1e30 would make every real weight
    underflow.

    Parameters
    ----------
    bias : (Bb, n + S − 1) ndarray of float64
    n : int
        Query rows L.
    causal : bool
    n_keys : int, optional
        Key rows S (default n).
    offset : int, optional
        Position of query 0.
    key_mask : (S,) ndarray of bool, optional
        True = a real key (the same for every row of ``bias``); default all real.

    Returns
    -------
    (Bb, n) ndarray of float64
    """
    S = n if n_keys is None else int(n_keys)
    Bb = bias.shape[0]
    shift = np.zeros((Bb, n))
    if n == 0 or S == 0:
        return shift
    if key_mask is not None and not np.all(key_mask):
        runs = _key_runs(np.asarray(key_mask, dtype=bool))
        for r in range(Bb):
            m = _masked_row_max(np.ascontiguousarray(bias[r]), runs, n, S, int(offset),
                                bool(causal))
            ok = np.isfinite(m)
            shift[r, ok] = m[ok]
        return shift
    i = np.arange(n, dtype=np.int64)
    hi = i + S - 1
    lo = np.maximum(i, S - 1 - offset) if causal else i.copy()
    for r in range(Bb):
        m = _window_max(np.ascontiguousarray(bias[r]), lo, hi)
        ok = np.isfinite(m)
        shift[r, ok] = m[ok]
    return shift


def exact_blocks(B, n, nthreads, n_keys=None):
    """Row and key block sizes of the exact kernel for B heads of length n.

    ``_config.EXACT_ROW_BLOCK`` rows per task (large blocks keep the GEMMs
    efficient), halved down to 32 until there are at least 4 tasks per thread
    (so that every thread is busy and the last tasks balance);
    ``_config.EXACT_KEY_BLOCK`` keys, fewer when n is shorter.
    """
    rb = int(_config.EXACT_ROW_BLOCK)
    while rb > 32 and B * -(-n // rb) < 4 * nthreads:
        rb //= 2
    kb = int(min(_config.EXACT_KEY_BLOCK, max(n if n_keys is None else n_keys, 1)))
    return rb, kb


def exact_attention(q, k, v, scale, *, relative=None, ridx=None, bias=None,
                    bidx=None, causal=False, workers=None, return_lse=False, offset=0,
                    key_mask=None, kidx=None, kvidx=None, norms=None, window=None):
    """Exact softmax attention of flattened heads (internal entry point).

    Parameters
    ----------
    q : (B, n, E) ndarray of float32 or float64, C-contiguous
    k : (Bk, S, E) ndarray, same dtype, C-contiguous
        Head ``b`` uses ``k[kvidx[b]]`` (default ``kvidx[b] = b``; GQA shares heads).
        Queries and keys, already rotated if a rotary embedding applies. Their
        dtype (the same for q, k, v) is the compute precision of the logits,
        exp and the value product; the softmax state is float64.
    v : (Bk, S, Ev) ndarray, same dtype, C-contiguous
    scale : float
        Logit scale s > 0.
    relative : (Br, n+S−1, E, E) ndarray of the same dtype, optional
        General relative matrices; head ``b`` uses ``relative[ridx[b]]``.
    bias : (Bb, n+S−1) ndarray of float64, optional
        Relative bias (−inf masks); head ``b`` uses ``bias[bidx[b]]``. Shifted
        per row by :func:`bias_row_shift` (exact for softmax).
    causal : bool
        Mask keys after the query's position: j > i + offset.
    offset : int
        Position of query 0 (keys at 0..S-1): offset t = i + offset − j is stored
        at index ``i − j + S − 1`` of ``relative`` and ``bias``.
    norms : (ndarray (B, n), ndarray (Bk, S)), optional
        Upper bounds of the row norms of (unscaled) q and of k, if the caller
        has them (:func:`row_norms`); computed otherwise.
    key_mask : (Bk, S) ndarray of float64, optional
        0 for real keys, −inf for padding; head ``b`` uses ``key_mask[kidx[b]]``.
    window : (left, right), optional
        A promise that the bias masks (−inf) every offset ``t = i + offset − j``
        outside ``−right <= t <= left`` (None: unbounded side): key blocks wholly
        outside are skipped, O(n·(left + right)) work instead of O(n·S). The bias
        still applies inside.
    workers : int, optional
        Threads (scipy.fft's meaning; default all cores).
    return_lse : bool
        Also return the row log-sum-exp ``log Σ_j exp(s·logit_ij + b_ij)``.

    Returns
    -------
    out : (B, n, Ev) ndarray of the compute dtype
        ``softmax(s·logits + bias) @ v`` row by row; fully masked rows are 0.
    lse : (B, n) ndarray of float64
        Only with ``return_lse``; −inf on fully masked rows.
    """
    B, n, E = q.shape
    dt = q.dtype
    Ev = v.shape[2]
    out = np.empty((B, n, Ev), dt)
    lse = np.empty((B, n))
    if B == 0 or n == 0:
        return (out, lse) if return_lse else out
    if k.shape[1] == 0:              # no keys: every row is fully masked
        out[...] = 0
        lse[...] = -np.inf
        return (out, lse) if return_lse else out
    general = relative is not None
    has_bias = bias is not None
    rel = relative if general else _DUMMY_REL.astype(dt)
    ri = np.ascontiguousarray(ridx, dtype=np.int64) if general else np.zeros(B, np.int64)
    bs = np.ascontiguousarray(bias, dtype=np.float64) if has_bias else _DUMMY_BIAS
    bi = np.ascontiguousarray(bidx, dtype=np.int64) if has_bias else np.zeros(B, np.int64)
    S = k.shape[1]
    kvi = (np.arange(B, dtype=np.int64) if kvidx is None
           else np.ascontiguousarray(kvidx, dtype=np.int64))
    has_kmask = key_mask is not None
    km = np.ascontiguousarray(key_mask, dtype=np.float64) if has_kmask else _DUMMY_BIAS
    ki = np.ascontiguousarray(kidx, dtype=np.int64) if has_kmask else np.zeros(B, np.int64)
    if has_bias and has_kmask:    # per (bias row, key mask row) pair: visible keys only
        pairs_, sidx = np.unique(np.stack([bi, ki], axis=1), axis=0, return_inverse=True)
        shift = np.concatenate([bias_row_shift(bs[pb:pb + 1], n, causal, S, offset,
                                               np.isfinite(km[pk])) for pb, pk in pairs_])
        sidx = np.ascontiguousarray(sidx.reshape(-1), dtype=np.int64)
    elif has_bias:
        shift = bias_row_shift(bs, n, causal, S, offset)
        sidx = bi
    else:
        shift, sidx = _DUMMY_BIAS, np.zeros(B, np.int64)
    wl = wr = -1
    if window is not None:
        if not has_bias:
            raise ValueError("window= describes the −inf entries of a bias: pass the bias")
        wl = -1 if window[0] is None else int(window[0])
        wr = -1 if window[1] is None else int(window[1])
    nthreads = resolve_workers(workers)
    rb, kb = exact_blocks(B, n, nthreads, S)
    starts = np.arange(0, n, rb, dtype=np.int64)
    tasks = np.stack(np.broadcast_arrays(np.arange(B, dtype=np.int64)[:, None],
                                         starts[None, :]), axis=-1).reshape(-1, 2)
    if causal:      # longest tasks first: dynamic scheduling then balances the tail
        tasks = tasks[np.argsort(-tasks[:, 1], kind="stable")]
    # enough chunks for dynamic balance, few enough that Python overhead stays small
    pairs_per_task = rb * (S if not causal else S / 2) * (E * E if general else E + Ev)
    per_chunk = max(1, int(4e6 // max(pairs_per_task, 1)))
    inline = len(tasks) * pairs_per_task * min(1.0, n / rb) < _config.INLINE_WORK
    if inline:      # a small call: handing it to threads costs more than it saves
        chunks = [tasks]
    else:
        nchunks = max(min(len(tasks), 8 * nthreads), -(-len(tasks) // per_chunk))
        chunks = np.array_split(tasks, min(nchunks, len(tasks)))
    if general:
        gscale = float(scale)
        qnorm = knorm = np.zeros((1, 1))
        headroom = -np.inf
    else:           # fold the scale into q: the GEMM then gives the logits (one rounding)
        q = q * q.dtype.type(scale)
        gscale = 1.0
        # bounds of the logits per row and key block, slightly enlarged for rounding
        if norms is None:
            qn0, kn0 = row_norms(q), row_norms(k)
        else:                  # bounds of ‖q‖, ‖k‖ from the caller (unscaled q)
            qn0, kn0 = norms[0] * float(scale), norms[1]
        qnorm = np.ascontiguousarray(qn0 * (1 + 1e-5))     # margin for the GEMM's rounding
        kn = kn0 * (1 + 1e-5)
        nkb = -(-S // kb)
        knorm = np.full((k.shape[0], nkb * kb), 0.0)
        knorm[:, :S] = kn
        knorm = np.ascontiguousarray(knorm.reshape(k.shape[0], nkb, kb).max(axis=2))
        # e^headroom · key_block · max|V| must stay far below the dtype's maximum
        vmax = float(np.abs(v).max(initial=0.0))
        cap = np.log(float(np.finfo(dt).max) / 16 / kb / max(vmax, 1e-300))
        headroom = float(min(EXACT_HEADROOM[np.dtype(dt)], cap))
        if headroom < 1.0:
            headroom = -np.inf          # always compute the maximum

    def run(chunk):
        _exact_tasks(q, k, v, rel, ri, general, bs, bi, has_bias, shift, bool(causal),
                     gscale, rb, kb, qnorm, knorm, headroom, int(offset), km, ki,
                     has_kmask, kvi, wl, wr, sidx, np.ascontiguousarray(chunk),
                     out, lse)

    if inline:
        run(chunks[0])                       # the caller's thread; rows do not change
    else:
        with blas_threads(1):
            run_tasks(run, chunks, nthreads)
    if return_lse and has_bias:              # undo the per-row bias shift
        with np.errstate(invalid="ignore"):
            lse += np.where(np.isfinite(shift[sidx]), shift[sidx], 0.0)
    return (out, lse) if return_lse else out
