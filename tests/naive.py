"""Slow, obviously correct references. Everything fast is checked against these."""

import numpy as np


def rotation_matrix(p, head_dim, dim=None, base=10000.0, layout="half"):
    """Explicit E×E RoPE rotation R_p (float64), built pair by pair with loops."""
    E = head_dim
    dim = E if dim is None else dim
    R = np.eye(E)
    for i in range(dim // 2):
        theta = p * base ** (-2.0 * i / dim)
        a, b = (i, i + dim // 2) if layout == "half" else (2 * i, 2 * i + 1)
        c, s = np.cos(theta), np.sin(theta)
        R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
    return R


def attention(q, k, v, *, W=None, bias=None, causal=False, scale=None, softcap=None):
    """Dense softmax attention of one head with explicit loops over (i, j).

    q, k : (n, E); v : (n, Ev); W : callable t -> (E, E) or None;
    bias : callable t -> float or None; softcap : c, logits x -> c·tanh(x/c) before
    the bias. Fully masked rows give 0.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n, E = q.shape
    s = 1.0 / np.sqrt(E) if scale is None else scale
    out = np.zeros((n, v.shape[1]))
    for i in range(n):
        logits = np.full(n, -np.inf)
        for j in range(n):
            if causal and j > i:
                continue
            Wt = np.eye(E) if W is None else W(i - j)
            x = s * q[i] @ Wt @ k[j]
            if softcap is not None:
                x = softcap * np.tanh(x / softcap)
            logits[j] = x + (0.0 if bias is None else bias(i - j))
        if np.all(logits == -np.inf):
            continue
        w = np.exp(logits - logits.max())
        out[i] = w @ v / w.sum()
    return out


def rope_attention(q, k, v, *, dim=None, base=10000.0, layout="half", **kw):
    """RoPE attention via explicit rotation matrices: W_t = R_i^T R_j with t = i - j."""
    E = q.shape[1]
    rq = np.stack([rotation_matrix(i, E, dim, base, layout) @ q[i] for i in range(len(q))]) \
        if len(q) else q
    rk = np.stack([rotation_matrix(j, E, dim, base, layout) @ k[j] for j in range(len(k))]) \
        if len(k) else k
    return attention(rq, rk, v, **kw)


def toeplitz_dense(c, n):
    """Dense n×n Toeplitz matrix T[i, j] = c[i - j + n - 1]."""
    T = np.empty((n, n) + np.shape(c)[1:])
    for i in range(n):
        for j in range(n):
            T[i, j] = c[i - j + n - 1]
    return T


def attention_longdouble(q, k, v, *, bias=None, causal=False, scale=None):
    """Dense softmax attention of one head in extended precision (``np.longdouble``).

    The reference for floating-point error bounds: logits, exp and sums in
    long double (64-bit significand on x86-64: 2^11 times finer than float64).
    The bias enters row by row as ``b_t − max_visible b`` (softmax is invariant
    to a constant per row), so biases of any finite magnitude are exact.
    q, k : (n, E); v : (n, Ev); bias : (2n−1,) array or None. Masked rows give 0.
    """
    ld = np.longdouble
    q, k, v = (np.asarray(a, dtype=np.float64).astype(ld) for a in (q, k, v))
    n, E = q.shape
    s = ld(1.0) / np.sqrt(ld(E)) if scale is None else ld(scale)
    out = np.zeros((n, v.shape[1]), dtype=ld)
    for i in range(n):
        j = np.arange(n)
        vis = (j <= i) if causal else np.ones(n, bool)
        b = np.zeros(n, dtype=ld)
        if bias is not None:
            bt = np.asarray(bias, dtype=np.float64)[i - j + n - 1]
            vis &= np.isfinite(bt)
            if not vis.any():
                continue
            b = (bt - bt[vis].max()).astype(ld)
        if not vis.any():
            continue
        logits = (k[vis] @ q[i]) * s + b[vis]
        w = np.exp(logits - logits.max())
        out[i] = (w @ v[vis]) / w.sum()
    return out


def visible(L, S, off, keep):
    """(L, S) bool: query i (position i + off) sees real key j <= i + off (``off``
    None: every real key)."""
    vis = (np.ones((L, S), bool) if off is None else
           np.arange(S)[None, :] <= np.arange(L)[:, None] + off)
    return vis if keep is None else vis & keep[None, :]


def attention_gradients(q, k, v, dO, s, off=None, keep=None, coef=None, T=None):
    """Softmax attention's gradients (causal with ``off``, query i at position i + off) by the obvious dense formulas (float64):
    A = softmax(s·q kᵀ) over the visible real keys, Δ_i = dO_i·o_i, dX = A∘(dO vᵀ − Δ),
    dq = s·dX k, dk = s·Σ_heads dXᵀ q, dv = Σ_heads Aᵀ dO. With ``coef``: the same
    formulas with A replaced by p(s·q kᵀ)/Σ (the fast backward's sums, in exact form;
    Δ from the polynomial forward's output). With ``T`` ((L+S−1,) Toeplitz weights in
    the storage of :func:`numbarope.ops.fft.toeplitz_weights`, ``T[i − j + S − 1]`` for
    query row i and key j; 0 = masked): every weight is multiplied by T (a relative
    bias ``log T``); ``off`` then only adds the causal cut, the offset is in T."""
    Q = q[None] if q.ndim == 2 else q
    G = dO[None] if dO.ndim == 2 else dO
    L, S = Q.shape[1], k.shape[0]
    X = s * np.einsum("gie,je->gij", Q, k)
    vis = visible(L, S, off, keep)[None]
    Tm = None
    if T is not None:
        Tm = np.asarray(T, np.float64)[np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1]
        vis = vis & (Tm > 0)[None]
    if coef is None:
        X = np.where(vis, X, -np.inf)
        mx = X.max(axis=2, keepdims=True)
        W = np.exp(X - np.where(np.isfinite(mx), mx, 0.0))
    else:
        W = np.where(vis, np.polynomial.polynomial.polyval(X, coef), 0.0)
    if Tm is not None:
        W = W * Tm[None]
    tot = W.sum(axis=2, keepdims=True)
    A = np.divide(W, tot, out=np.zeros_like(W), where=tot > 0)
    o = A @ v
    delta = np.einsum("gic,gic->gi", G, o)
    dX = A * (np.einsum("gic,jc->gij", G, v) - delta[:, :, None])
    dq = s * dX @ k
    dk = s * np.einsum("gij,gie->je", dX, Q)
    dv = np.einsum("gij,gic->jc", A, G)
    return (dq[0] if q.ndim == 2 else dq), dk, dv
