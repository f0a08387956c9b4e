"""Exact attention kernels: streaming ("online") softmax, never an n×n matrix.

Each kernel works on a batch of heads flattened to ``(B, n, E)`` float64
arrays and writes ``out`` in place. Query rows are cut into blocks of
``_config.EXACT_ROW_BLOCK``; every (head, row block) pair is one task of a
``prange`` loop, so the work is race-free by construction (each task owns its
rows of ``out`` and its own buffers); with ``causal`` the blocks are paired
early/late so that each thread's share of the (triangular) work is equal. For
every block of ``_config.EXACT_KEY_BLOCK`` keys (kept in cache across the rows
of the task) and every row, the task forms that row's logits against the block,
and updates the row's running maximum ``m``, denominator ``l`` and numerator
``acc`` (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"; Dao et al. 2022, FlashAttention, Alg. 1):

    m' = max(m, rowmax S);  l = l·e^{m−m'} + Σ e^{S−m'};  acc = acc·e^{m−m'} + e^{S−m'} V

Memory is O(B·n·(E + Ev)) plus O(row block × key block) per thread. A row
with every logit ``-inf`` (fully masked) returns 0, as torch >= 2.5 does.
"""

import numpy as np
from numba import njit, prange

from . import _config

__all__ = ["exact_attention"]

_FM = set(_config.FASTMATH)


@njit(cache=True, fastmath=_FM, inline="always")
def _logits_block(q, k, relative, ridx, general, bias, bidx, has_bias, scale,
                  b, i, j0, jlim, row, wq):
    """row[j − j0] = s·q_iᵀ W_{i−j} k_j + b_{i−j} for j in [j0, jlim)."""
    n = q.shape[1]
    E = q.shape[2]
    if general:
        for j in range(j0, jlim):
            W = relative[ridx[b], i - j + n - 1]
            for c in range(E):
                wq[c] = 0.0
            for a in range(E):
                qa = q[b, i, a]
                for c in range(E):
                    wq[c] += qa * W[a, c]
            s = 0.0
            for c in range(E):
                s += wq[c] * k[b, j, c]
            row[j - j0] = s * scale
    else:
        for j in range(j0, jlim):
            s = 0.0
            for c in range(E):
                s += q[b, i, c] * k[b, j, c]
            row[j - j0] = s * scale
    if has_bias:
        bb = bias[bidx[b]]
        off = i + n - 1
        for j in range(j0, jlim):
            row[j - j0] += bb[off - j]


@njit(parallel=True, cache=True, fastmath=_FM)
def _exact_kernel(q, k, v, relative, ridx, general, bias, bidx, has_bias,
                  causal, scale, row_block, key_block, out):
    B, n, E = q.shape
    Ev = v.shape[2]
    nblk = (n + row_block - 1) // row_block
    for task in prange(B * nblk):
        b = task // nblk
        blk = task % nblk
        if causal:
            # pair cheap early blocks with expensive late ones (0, nb−1, 1, nb−2, …) so
            # that prange's contiguous per-thread ranges carry equal work
            blk = blk // 2 if blk % 2 == 0 else nblk - 1 - blk // 2
        i0 = blk * row_block
        i1 = min(i0 + row_block, n)
        rb = i1 - i0
        S = np.empty(key_block)
        mx = np.full(rb, -np.inf)
        den = np.zeros(rb)
        acc = np.zeros((rb, Ev))
        wq = np.empty(E)
        jend = i1 if causal else n
        for j0 in range(0, jend, key_block):
            j1 = min(j0 + key_block, jend)
            for r in range(rb):
                i = i0 + r
                jlim = min(j1, i + 1) if causal else j1
                if jlim <= j0:
                    continue
                _logits_block(q, k, relative, ridx, general, bias, bidx, has_bias,
                              scale, b, i, j0, jlim, S, wq)
                bm = -np.inf
                for j in range(jlim - j0):
                    bm = max(bm, S[j])
                if bm == -np.inf:
                    continue
                if bm > mx[r]:
                    corr = np.exp(mx[r] - bm)
                    den[r] *= corr
                    for c in range(Ev):
                        acc[r, c] *= corr
                    mx[r] = bm
                m = mx[r]
                d = 0.0
                for j in range(jlim - j0):
                    p = np.exp(S[j] - m)
                    S[j] = p
                    d += p
                den[r] += d
                for j in range(j0, jlim):
                    p = S[j - j0]
                    for c in range(Ev):
                        acc[r, c] += p * v[b, j, c]
        for r in range(rb):
            if den[r] > 0.0:
                inv = 1.0 / den[r]
                for c in range(Ev):
                    out[b, i0 + r, c] = acc[r, c] * inv
            else:
                for c in range(Ev):
                    out[b, i0 + r, c] = 0.0


_DUMMY_REL = np.zeros((1, 1, 1, 1))
_DUMMY_BIAS = np.zeros((1, 1))
_ZERO_IDX = np.zeros(1, dtype=np.int64)


def exact_attention(q, k, v, scale, *, relative=None, ridx=None, bias=None,
                    bidx=None, causal=False):
    """Exact softmax attention of flattened heads (internal entry point).

    Parameters
    ----------
    q, k : (B, n, E) ndarray of float64, C-contiguous
        Queries and keys, already rotated if a rotary embedding applies.
    v : (B, n, Ev) ndarray of float64, C-contiguous
    scale : float
        Logit scale s > 0.
    relative : (Br, 2n−1, E, E) ndarray of float64, optional
        General relative matrices; head ``b`` uses ``relative[ridx[b]]``.
    bias : (Bb, 2n−1) ndarray of float64, optional
        Relative bias (−inf masks); head ``b`` uses ``bias[bidx[b]]``.
    causal : bool
        Mask keys j > i.

    Returns
    -------
    out : (B, n, Ev) ndarray of float64
        ``softmax(s·logits + bias) @ v`` row by row; fully masked rows are 0.
    """
    B, n, E = q.shape
    out = np.empty((B, n, v.shape[2]))
    if B == 0 or n == 0 or v.shape[2] == 0:
        return out
    general = relative is not None
    has_bias = bias is not None
    rel = relative if general else _DUMMY_REL
    ri = np.ascontiguousarray(ridx, dtype=np.int64) if general else np.zeros(B, np.int64)
    bs = bias if has_bias else _DUMMY_BIAS
    bi = np.ascontiguousarray(bidx, dtype=np.int64) if has_bias else np.zeros(B, np.int64)
    _exact_kernel(q, k, v, rel, ri, general, bs, bi, has_bias, bool(causal),
                  float(scale), int(_config.EXACT_ROW_BLOCK),
                  int(_config.EXACT_KEY_BLOCK), out)
    return out
