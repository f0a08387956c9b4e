"""The exact backward (FlashAttention-2's, in two passes), beside the forward."""


import numpy as np
from numba import njit, prange

from ... import _config
from ..._runtime.threads import parallel, prange_loop, resolve_workers
from .._exp import _exp_block
from .kernel import _DUMMY_BIAS, _DUMMY_RANGE, _FM, _check_ranges, _index_args, _row_shifts

# ------------------------------------------------------------------ the backward
#
# Gradients of the exact attention (Dao, "FlashAttention-2", arXiv:2307.08691, §3.2,
# Algorithm 2, here in two passes so that every output has one writer): with the
# logits x_ij = s·q_iᵀk_j + b_ij over the keys row i sees, P_ij = exp(x_ij − lse_i)
# recomputed from the forward's log-sum-exp, dP_ij = dO_i·v_j and
# Δ_i = dO_i·O_i = Σ_j P_ij dP_ij,
#
#     dS_ij = P_ij (dP_ij − Δ_i),   dq_i = s Σ_j dS_ij k_j,
#     dk_j = s Σ_i dS_ij q_i,       dv_j = Σ_i P_ij dO_i.
#
# Pass 1 (tasks: query head × row block) forms dq; pass 2 (tasks: key/value head ×
# key block, over the query heads of its group: GQA sums their gradients) forms dk
# and dv. Each task runs its blocks in a fixed order and writes its own rows: the
# gradients are bitwise the same for any number of threads. Working memory: the
# float64 gradients and, per thread, blocks of BWD_BLOCK² — O(n·(E+Ev)).


@njit(cache=True, nogil=True, fastmath=_FM)
def _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift, sidx,
                kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb):
    # P holds s·q_iᵀk_j and D holds dO_i·v_j of rows i0.., keys j0..; on return
    # P_ij = exp(x_ij − lse_i) (0 where row i does not see key j; by the forward's
    # exp kernel, vectorised, in P's dtype) and D = dS. softcap > 0: x_ij is
    # c·tanh(s·q_iᵀk_j / c) + b_ij, and dS carries its derivative 1 − tanh² (in tb)
    rb, kb = P.shape
    dt = P.dtype
    for r in range(rb):
        i = i0 + r
        row = P[r]
        ja = 0
        jb = kb
        if has_ranges:
            ja = min(max(lo[lr, i] - j0, 0), kb)
            jb = max(min(hi[lr, i] - j0, kb), ja)
        li = lse[b, i]
        if li == -np.inf:
            ja = jb = 0                                     # the row sees nothing
        for jj in range(ja):
            row[jj] = -np.inf
        for jj in range(jb, kb):
            row[jj] = -np.inf
        if softcap > 0.0:
            for jj in range(ja, jb):
                t = np.tanh(row[jj] / softcap)
                tb[jj] = 1.0 - t * t
                row[jj] = softcap * t
        if has_kmask:
            km = kmask[kidx[b]]
            for jj in range(ja, jb):
                row[jj] += km[j0 + jj]
        if has_bias:
            sh = rowshift[sidx[b], i]
            li = li - sh                                    # both sides shifted alike
            bb = bias[bidx[b]]
            off = i + nk - 1 - j0
            for jj in range(ja, jb):
                row[jj] = row[jj] + (bb[off - jj] - sh)
        if jb > ja:
            _exp_block(row, kb, li)                         # −inf → 0
        else:
            for jj in range(kb):
                row[jj] = 0.0
        dl = dt.type(delta[b, i])
        drow = D[r]
        for jj in range(kb):
            drow[jj] = row[jj] * (drow[jj] - dl)
        if softcap > 0.0:
            for jj in range(ja, jb):
                drow[jj] *= tb[jj]


@njit(cache=True, nogil=True)
def _grad_q_task(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                 kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, task, dq):
    # pass 1, one task (query head b, rows i0 .. i0+block): dq[b, rows] = Σ_j dS_ij k_j
    B, n, E = qs.shape
    nk = k.shape[1]
    dt = qs.dtype
    b = task[0]
    i0 = task[1]
    i1 = min(i0 + block, n)
    rb = i1 - i0
    hk = kvidx[b]
    lr = lidx[b]
    Pb = np.empty(rb * block, dt)
    Db = np.empty(rb * block, dt)
    G = np.empty((rb, E), dt)
    tb = np.empty(block, dt)
    jbeg = 0
    jend = nk
    if has_ranges:
        jbeg = nk
        jend = 0
        for i in range(i0, i1):
            if hi[lr, i] > lo[lr, i]:
                jbeg = min(jbeg, lo[lr, i])
                jend = max(jend, hi[lr, i])
    for j0 in range(jbeg, jend, block):
        j1 = min(j0 + block, jend)
        kb = j1 - j0
        P = Pb[:rb * kb].reshape((rb, kb))
        D = Db[:rb * kb].reshape((rb, kb))
        np.dot(qs[b, i0:i1], k[hk, j0:j1].T, P)
        np.dot(do[b, i0:i1], v[hk, j0:j1].T, D)
        _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift, sidx,
                    kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb)
        np.dot(D, k[hk, j0:j1], G)
        for r in range(rb):
            for e in range(E):
                dq[b, i0 + r, e] += G[r, e]


@njit(cache=True, nogil=True)
def _grad_kv_task(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                  kidx, has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block,
                  task, dk, dv):
    # pass 2, one task (key/value head hk, keys j0 .. j0+block), over the query heads
    # heads[hstart[hk]:hstart[hk+1]] in order: dk = Σ dSᵀ·(s q), dv = Σ Pᵀ·dO
    B, n, E = qs.shape
    nk = k.shape[1]
    Ev = v.shape[2]
    dt = qs.dtype
    hk = task[0]
    j0 = task[1]
    j1 = min(j0 + block, nk)
    kb = j1 - j0
    Pb = np.empty(block * kb, dt)
    Db = np.empty(block * kb, dt)
    GK = np.empty((kb, E), dt)
    GV = np.empty((kb, Ev), dt)
    tb = np.empty(kb, dt)
    for t in range(hstart[hk], hstart[hk + 1]):
        b = heads[t]
        lr = lidx[b]
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rb = i1 - i0
            if has_ranges:                  # rows of this block that see one of the keys
                sees = False
                for i in range(i0, i1):
                    if lo[lr, i] < j1 and hi[lr, i] > j0 and hi[lr, i] > lo[lr, i]:
                        sees = True
                        break
                if not sees:
                    continue
            P = Pb[:rb * kb].reshape((rb, kb))
            D = Db[:rb * kb].reshape((rb, kb))
            np.dot(qs[b, i0:i1], k[hk, j0:j1].T, P)
            np.dot(do[b, i0:i1], v[hk, j0:j1].T, D)
            _grad_block(P, D, b, i0, j0, nk, lse, delta, bias, bidx, has_bias, rowshift,
                        sidx, kmask, kidx, has_kmask, lo, hi, lr, has_ranges, softcap, tb)
            np.dot(P.T, do[b, i0:i1], GV)
            np.dot(D.T, qs[b, i0:i1], GK)
            for jj in range(kb):
                for e in range(E):
                    dk[hk, j0 + jj, e] += GK[jj, e]
                for c in range(Ev):
                    dv[hk, j0 + jj, c] += GV[jj, c]


@prange_loop(lambda *a: a[:21] + (a[21][0],) + a[22:])
def _par_grad_q(fn, qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                kidx, has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, tasks, dq):
    # pass 1's parallel loop: one iteration per (query head, row block)
    for t in prange(tasks.shape[0]):
        fn(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask, kidx,
           has_kmask, kvidx, lo, hi, lidx, has_ranges, softcap, block, tasks[t], dq)


@prange_loop(lambda *a: a[:22] + (a[22][0],) + a[23:])
def _par_grad_kv(fn, qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask,
                 kidx, has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block,
                 tasks, dk, dv):
    # pass 2's parallel loop: one iteration per (key/value head, key block)
    for t in prange(tasks.shape[0]):
        fn(qs, k, v, do, lse, delta, bias, bidx, has_bias, rowshift, sidx, kmask, kidx,
           has_kmask, heads, hstart, lo, hi, lidx, has_ranges, softcap, block, tasks[t],
           dk, dv)


def exact_backward(q, k, v, out, lse, dout, scale, *, bias=None, bidx=None,
                   key_ranges=None, key_mask=None, kidx=None, kvidx=None, workers=None,
                   softcap=None, dlse=None):
    """Gradients of :func:`exact_attention` with respect to q, k and v.

    FlashAttention-2's backward (Dao 2023, §3.2), in two passes that each write their
    own rows (see the comment above ``_grad_block``): the probabilities are recomputed
    from the forward's log-sum-exp, so the memory is O(n·(E+Ev)) beyond the inputs.

    Parameters
    ----------
    q, k, v, scale, bias, bidx, key_ranges, key_mask, kidx, kvidx, workers, softcap
        As given to :func:`exact_attention` (no general relative matrices): q (B, n, E),
        k (Bk, S, E), v (Bk, S, Ev) of one dtype, C-contiguous, the precision of the
        recomputed logits and of the block products.
    out : (B, n, Ev) ndarray
        The forward's output.
    lse : (B, n) ndarray of float64
        The forward's row log-sum-exps (−inf on rows that see no key).
    dout : (B, n, Ev) ndarray
        Gradient of the loss with respect to ``out``.
    dlse : (B, n) ndarray, optional
        Gradient of the loss with respect to ``lse``: since ``∂lse_i/∂x_ij = P_ij``
        it enters as ``Δ_i − dlse_i`` (``dS_ij = P_ij (dP_ij − Δ_i + dlse_i)``).

    Returns
    -------
    dq : (B, n, E), dk : (Bk, S, E), dv : (Bk, S, Ev) ndarray of float64
        dk and dv summed over the query heads that share a key/value head. Rows that
        see no key contribute nothing.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2, Algorithm 2.
    """
    B, n, E = q.shape
    Bk, S, _ = k.shape
    Ev = v.shape[2]
    dt = q.dtype
    dq = np.zeros((B, n, E))
    dk = np.zeros((Bk, S, E))
    dv = np.zeros((Bk, S, Ev))
    if B == 0 or n == 0 or S == 0:
        return dq, dk, dv
    kvi, has_bias, bs, bi, has_kmask, km, ki = _index_args(B, bias, bidx, key_mask, kidx,
                                                           kvidx)
    has_ranges = key_ranges is not None
    if has_ranges:
        lo, hi, li = _check_ranges(key_ranges, B, n, S)
    else:
        lo = hi = _DUMMY_RANGE
        li = np.zeros(B, np.int64)
    if has_bias:
        shift, sidx = _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges)
    else:
        shift, sidx = _DUMMY_BIAS, np.zeros(B, np.int64)
    qs = np.ascontiguousarray(q * dt.type(scale))
    do = np.ascontiguousarray(dout, dtype=dt)
    lse = np.ascontiguousarray(lse, dtype=np.float64)
    delta = np.einsum("bic,bic->bi", np.asarray(dout, np.float64),
                      np.asarray(out, np.float64))
    if dlse is not None:
        delta = delta - np.where(np.isneginf(lse), 0.0, np.asarray(dlse, np.float64))
    blk = int(_config.BWD_BLOCK)
    cap = 0.0 if softcap is None else float(softcap)
    common = (qs, k, v, do, lse, delta, bs, bi, has_bias, shift, sidx, km, ki, has_kmask)
    nthreads = resolve_workers(workers)
    tq = np.stack(np.broadcast_arrays(np.arange(B, dtype=np.int64)[:, None],
                                      np.arange(0, n, blk, dtype=np.int64)[None, :]),
                  axis=-1).reshape(-1, 2)
    order = np.argsort(kvi, kind="stable")          # query heads of each key/value head
    heads = np.ascontiguousarray(order, dtype=np.int64)
    hstart = np.searchsorted(kvi[order], np.arange(Bk + 1)).astype(np.int64)
    tkv = np.stack(np.broadcast_arrays(np.arange(Bk, dtype=np.int64)[:, None],
                                       np.arange(0, S, blk, dtype=np.int64)[None, :]),
                   axis=-1).reshape(-1, 2)
    with parallel(nthreads):
        _par_grad_q(_grad_q_task, *common, kvi, lo, hi, li, has_ranges, cap, blk,
                    np.ascontiguousarray(tq), dq)
        _par_grad_kv(_grad_kv_task, *common, heads, hstart, lo, hi, li, has_ranges, cap,
                     blk, np.ascontiguousarray(tkv), dk, dv)
    dq *= scale
    return dq, dk, dv
