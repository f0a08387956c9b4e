"""Every query sees every key, no bias: two GEMMs through a key-side state.

With ``p(q'ᵀk') = φ(q')ᵀψ(k')`` (the polynomial method, Alman & Song 2025, §4;
:mod:`numbarope.ops._common`), when every query row sees every real key with weight
1 the numerator and denominator of every row are one product with the same state::

    S = Σ_j ψ(k'_j) v_jᵀ  (m × Ev),   s = Σ_j ψ(k'_j)  (m,),
    num_i = φ(q'_i)ᵀ S,   den_i = φ(q'_i)ᵀ s,   out_i = num_i / den_i,

``O((G·L + S)·m·(Ev+1))`` work for G query heads of L rows on S keys, m = C(E+g, g)
features; features are formed in blocks kept in L2 next to their GEMM, never as an
``n × m`` array.

State in, state out: ``initial_state=(S₀, s₀)`` adds the state of further keys that
every row sees (e.g. the earlier blocks of one long sequence: :func:`key_state` of
each block, combined by :func:`add_states`), ``return_state=True`` returns the state
of this call's keys plus the initial one. :func:`apply_state` is the query side alone.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §3.1.
"""

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._bounds import gradient_bound
from ._common import (_FM, _check_state, _example_qkv, _key_states, _query_apply, _ranges,
                      _row_blocks, _Side, _setup, _shaped, _state_tasks, add_states,
                      backward_chunk, base_memory, gemm_chunk, key_side_state)
from ._cost import COST_CONSTANTS
from ._features import _features_block, n_features
from .registry import Algorithm, register

__all__ = ["Gemm", "gemm_attention", "gemm_backward", "key_state", "add_states",
           "apply_state", "gemm_memory"]

#: The key-side state of a block of keys alone (:func:`numbarope.ops._common.key_side_state`):
#: ``key_state(k, v, scale, coef, *, key_mask=None, workers=None) -> (S, s)``.
key_state = key_side_state


def gemm_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`gemm_attention`.

    Parameters
    ----------
    n, E, Ev, degree : int
        Query rows n (= L), head_dim, value columns, polynomial degree.
    S : int, optional
        Key rows (default n).
    heads : int, optional
        Query heads computed together on one key/value head (grouped-query).

    Returns
    -------
    int
        Bytes of float64 work arrays, not counting inputs/outputs: the copies
        (:func:`~numbarope.ops._common.base_memory`), the tasks' private states and per
        thread a feature block, its product and a running state.
    """
    S = n if S is None else S
    m = n_features(E, degree)
    ev1 = Ev + 1
    nw = resolve_workers(None)
    cf = min(gemm_chunk(m), max(n, S, 1))
    per_thread = 8 * (m * cf + 2 * m * ev1)        # feature block, product, running S
    states = _state_tasks(m, ev1, -(-S // cf)) * m * ev1
    return base_memory(n, S, E, Ev, heads) + 8 * states + nw * per_thread


def gemm_attention(q, k, v, scale, coef, *, key_mask=None, workers=None, initial_state=None,
                   return_state=False):
    """Fast attention in which every query row sees every real key, no bias.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any. G query heads that share this
        key/value head (grouped-query attention) are computed together: the key-side
        state is formed once for all of them.
    k : (S, E) ndarray of float64
        Keys, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part.
    workers : int, optional
        Threads for the feature kernels and the GEMMs (scipy.fft's meaning; None:
        :func:`numbarope.get_workers`). The result does not depend on it (bitwise).
    initial_state : tuple of ndarray, optional
        ``(S₀, s₀)`` of shapes (m, Ev) and (m,): the key-side state (:func:`key_state`)
        of further keys that every query row sees in full, added to this call's.
    return_state : bool, optional
        Also return the state of this call's real keys plus ``initial_state``.

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j p(s·q_iᵀk_j)`` (rows with den <= 0 get out = 0).
    state : (S, s), with ``return_state=True``
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    F = _Side(coef, E)
    if initial_state is not None:
        initial_state = _check_state(initial_state, F.m, Ev, "gemm")
    nw = resolve_workers(workers)
    if G * L == 0 and not return_state:
        return _shaped(np.zeros((0, Ev)), np.zeros(0), G, L, Ev, single)
    if kpos.size == 0 and initial_state is None:
        res = _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
        return res + ((np.zeros((F.m, Ev)), np.zeros(F.m)),) if return_state else res
    St, st = _key_states(ks, v64, F, nw)
    if initial_state is not None:
        St += initial_state[0]
        st += initial_state[1]
    num, den = _query_apply(qs, St, st, F, nw)
    res = _shaped(num, den, G, L, Ev, single)
    return res + ((St, st),) if return_state else res


def apply_state(q, state, scale, coef, *, workers=None):
    """The query side alone: ``out_i = φ(q'_i)ᵀS / φ(q'_i)ᵀs`` for a state ``(S, s)``
    (:func:`key_state`, :func:`add_states`) of keys every row sees — what
    ``gemm_attention(q, k[:0], v[:0], ..., initial_state=state)`` gives.

    Returns ``(out, den)`` shaped as :func:`gemm_attention`'s.
    """
    Q = np.asarray(q)
    E = Q.shape[-1]
    S0 = np.asarray(state[0])
    Ev = S0.shape[1]
    return gemm_attention(Q, np.zeros((0, E)), np.zeros((0, Ev)), scale, coef,
                          workers=workers, initial_state=state)


class Gemm(Algorithm):
    """Every query sees every key, no bias: two GEMMs through a key-side state
    ``Σ_j ψ(k_j)[v_j, 1]ᵀ`` (Alman & Song 2025, §4, the polynomial method;
    :func:`gemm_attention`)."""

    name = "gemm"
    structures = (_bias.NoBias,)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * (h.Ev + 1)) / h.heads

    def memory(self, h, degree):
        return gemm_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`gemm_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); ``structure``, ``T`` and ``offset`` are
        not read: every row sees every real key with weight 1. ``initial_state`` /
        ``return_state``: the state ``(S, s)`` of :func:`key_state`."""
        return gemm_attention(q, k, v, scale, coef, key_mask=key_mask, workers=workers,
                              initial_state=initial_state, return_state=return_state)

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs: :func:`gemm_backward`
        (``out``, ``den`` the forward's results; returns ``(dq, dk, dv)``; ``structure``,
        ``T`` and ``offset`` are not read: every row sees every real key)."""
        return gemm_backward(q, k, v, out, den, dout, scale, coef, key_mask=key_mask,
                             workers=workers)

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """:func:`numbarope.ops._bounds.gradient_bound` of :meth:`backward`'s results."""
        return gradient_bound(q, k, v, dout, scale, coef, delta, key_mask=key_mask,
                              radius=radius)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True))


register(Gemm())


# ------------------------------------------------------------------ the backward
#
# The certified fast backward (issue 22): the gradients of the EXACT softmax attention,
# with the forward's own weights P̃_ij = p(s q_iᵀk_j)/D_i in place of the softmax
# probabilities; every sum over keys or rows is a GEMM through a state (below and in
# :func:`gemm_backward`'s docstring). Four passes, each a thin prange over tasks
# whose partition depends on the sizes only:
#
#   1. key state    Z  = Σ_j ψ_j [v_j ⊗ k'_j, k'_j]ᵀ                 (m × (Ev·E + E))
#   2. query apply  dq_i = Σ_c a_ic (φ_iᵀZ)[c] − b_i (φ_iᵀZ)[Ev]        (a = dO·√s/D, b = Δ·√s/D)
#   3. query state  Zq = Σ_i φ_i [(dO_i/D_i) ⊗ q'_i, (Δ_i/D_i) q'_i, dO_i/D_i]ᵀ
#                                                                   (m × (Ev·E + E + Ev))
#   4. key apply    dk_j = Σ_c √s v_jc (ψ_jᵀZq)[c] − √s (ψ_jᵀZq)[Ev],  dv_j = (ψ_jᵀZq)[Ev+1]
#
# (x' = √s x: the features' scaled inputs of _setup; the chain rule's s·k_j is √s·k'_j.)
# States (1, 3) are summed over tasks of whole feature blocks, each task into a private
# state, run in waves of ``workers`` tasks and added in task order: the same sum for
# any number of threads, and at most ``workers`` + 1 states in memory. The products
# v ⊗ k' (and (dO/D) ⊗ q') are formed block by block next to their GEMM, never as an
# n × Ev·E array.

@njit(cache=True, nogil=True, fastmath=_FM)
def _outer_rows(A, B, c, r0, r1, Y, with_a):
    # Y[r] = [A_r ⊗ B_r, c_r·B_r, (A_r if with_a)] for rows r0 <= r < r1 of A (rows × Ev),
    # B (rows × E), c (rows,): column a·E + e of the first part is A[r, a]·B[r, e].
    Ev = A.shape[1]
    E = B.shape[1]
    for r in range(r1 - r0):
        i = r0 + r
        y = Y[r]
        b = B[i]
        for a in range(Ev):
            f = A[i, a]
            o = a * E
            for e in range(E):
                y[o + e] = f * b[e]
        f = c[i]
        o = Ev * E
        for e in range(E):
            y[o + e] = f * b[e]
        if with_a:
            o += E
            for a in range(Ev):
                y[o + a] = A[i, a]


@njit(cache=True, nogil=True, fastmath=_FM)
def _backward_state(xt, A, B, c, with_a, r0, r1, cb, parent, var, ratio, w0, post, weight,
                    Z):
    # Z = Σ_{r0 <= r < r1} feat(x_r) Y_rᵀ, Y_r = [A_r ⊗ B_r, c_r B_r, (A_r)] (_outer_rows),
    # features and products in blocks of cb rows; Z is overwritten.
    m = parent.shape[0]
    width = Z.shape[1]
    w = max(1, min(cb, r1 - r0))
    fb = np.empty(m * w)
    yb = np.empty(w * width)
    T = np.empty((m, width))
    first = True
    for j0 in range(r0, r1, cb):
        j1 = min(j0 + cb, r1)
        n = j1 - j0
        P = fb[:m * n].reshape((m, n))
        Y = yb[:n * width].reshape((n, width))
        _features_block(xt, j0, j1, parent, var, ratio, w0, post, weight, P, 0)
        _outer_rows(A, B, c, j0, j1, Y, with_a)
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
        Z[:] = 0.0


@njit(cache=True, nogil=True, fastmath=_FM)
def _backward_apply(xt, Z, A, c, r0, r1, cb, parent, var, ratio, w0, post, weight, out1,
                    out2):
    # For rows r0 <= r < r1, with R_r = feat(x_r)ᵀZ (blocks of cb rows):
    # out1[r, e] = Σ_a A[r, a]·R_r[a·E + e] − c[r]·R_r[Ev·E + e]; out2[r] = R_r[Ev·E + E:]
    # when out2 has columns.
    m = parent.shape[0]
    width = Z.shape[1]
    E = out1.shape[1]
    Ev = A.shape[1]
    E2 = out2.shape[1]
    w = max(1, min(cb, r1 - r0))
    fb = np.empty(m * w)
    rb = np.empty(w * width)
    for i0 in range(r0, r1, cb):
        i1 = min(i0 + cb, r1)
        n = i1 - i0
        P = fb[:m * n].reshape((m, n))
        R = rb[:n * width].reshape((n, width))
        _features_block(xt, i0, i1, parent, var, ratio, w0, post, weight, P, 0)
        np.dot(P.T, Z, R)
        for r in range(n):
            i = i0 + r
            row = R[r]
            o = out1[i]
            f = c[i]
            for e in range(E):
                o[e] = -f * row[Ev * E + e]
            for a in range(Ev):
                f = A[i, a]
                base = a * E
                for e in range(E):
                    o[e] += f * row[base + e]
            if E2:
                o2 = out2[i]
                base = Ev * E + E
                for a in range(E2):
                    o2[a] = row[base + a]


@prange_loop(lambda xt, A, B, c, with_a, tasks, cb, parent, var, ratio, w0, post, weight, Zt:
             (xt, A, B, c, with_a, 0, 0, cb, parent, var, ratio, w0, post, weight, Zt[0]))
def _par_backward_state(fn, xt, A, B, c, with_a, tasks, cb, parent, var, ratio, w0, post,
                        weight, Zt):
    for i in prange(tasks.shape[0]):
        fn(xt, A, B, c, with_a, tasks[i, 0], tasks[i, 1], cb, parent, var, ratio, w0, post,
           weight, Zt[i])


@prange_loop(lambda xt, Z, A, c, tasks, *rest: (xt, Z, A, c, 0, 0, *rest))
def _par_backward_apply(fn, xt, Z, A, c, tasks, cb, parent, var, ratio, w0, post, weight,
                        out1, out2):
    for i in prange(tasks.shape[0]):
        fn(xt, Z, A, c, tasks[i, 0], tasks[i, 1], cb, parent, var, ratio, w0, post, weight,
           out1, out2)


def _backward_tasks(rows, cb):
    """Ranges of whole blocks of cb rows, at most MAX_TASKS, each of >= 4 blocks where
    there are enough (a task's private state costs an m × width addition): from the
    sizes only."""
    nb = -(-rows // cb)
    k = max(1, min(nb // 4, _config.MAX_TASKS))
    return [(a * cb, min(b * cb, rows)) for a, b in _ranges(0, nb, k)]


def _backward_state_sum(x, A, B, c, with_a, feats, width, nw, cb):
    """``Σ_r feat(x_r) [A_r ⊗ B_r, c_r B_r, (A_r)]ᵀ`` (m × width) over all rows of x:
    tasks of whole blocks (:func:`_backward_tasks`), run in waves of ``nw`` tasks with
    private states added in task order (the same sum for any ``nw``)."""
    m = feats[0].shape[0]
    Z = np.zeros((m, width))
    rows = x.shape[0]
    if rows == 0:
        return Z
    xt = np.ascontiguousarray(x.T)
    tasks = _backward_tasks(rows, cb)
    Zt = np.empty((min(nw, len(tasks)), m, width))
    with parallel(nw):
        for t0 in range(0, len(tasks), nw):
            wave = tasks[t0:t0 + nw]
            _par_backward_state(_backward_state, xt, A, B, c, with_a, task_array(wave), cb,
                                *feats, Zt)
            for i in range(len(wave)):
                Z += Zt[i]
    return Z


def _backward_apply_rows(x, Z, A, c, feats, nw, cb, E, E2):
    """:func:`_backward_apply` over all rows of x, in tasks of whole blocks of cb rows
    (each task writes its own rows). Returns ``(out1 (rows, E), out2 (rows, E2))``."""
    rows = x.shape[0]
    out1 = np.zeros((rows, E))
    out2 = np.zeros((rows, E2))
    if rows == 0:
        return out1, out2
    xt = np.ascontiguousarray(x.T)
    with parallel(nw):
        _par_backward_apply(_backward_apply, xt, Z, A, c, task_array(_row_blocks(0, rows, cb)),
                            cb, *feats, out1, out2)
    return out1, out2


def gemm_backward(q, k, v, out, den, dout, scale, coef, *, key_mask=None, workers=None):
    r"""Certified fast gradients of softmax attention (every row sees every real key).

    The gradients of the EXACT attention ``o_i = Σ_j A_ij v_j``, ``A_ij =
    exp(x_ij)/Σ_l exp(x_il)``, ``x_ij = s·q_iᵀk_j``, approximated by replacing A with
    the forward's own weights ``P̃_ij = w_ij / D_i``, ``w_ij = p(x_ij) =
    φ(q'_i)ᵀψ(k'_j)`` (``q' = √s q``, ``k' = √s k``; Alman & Song 2025, §4, the
    polynomial method, as :func:`gemm_attention`), and the exact output o by the
    forward's output õ. With the exact formulas (Dao 2023, FlashAttention-2, §3.2:
    ``Δ_i = dO_i·o_i``, ``dX_ij = A_ij (dO_i·v_j − Δ_i)``, ``dV_j = Σ_i A_ij dO_i``,
    ``dQ_i = s Σ_j dX_ij k_j``, ``dK_j = s Σ_i dX_ij q_i``) every sum over keys or
    rows becomes a GEMM through a state — the fast-backward idea of Chen, Huo, Li,
    Liang, Shi, Song (2024) — with φ_i = φ(q'_i), ψ_j = ψ(k'_j), ``Δ̃_i = dO_i·õ_i``::

        dV_j = ψ_jᵀ U,                          U  = Σ_i φ_i (dO_i/D_i)ᵀ        (m × Ev)
        dQ_i = (√s/D_i)[Σ_c dO_ic (φ_iᵀT)_c − Δ̃_i φ_iᵀK̃],
                 T = Σ_j ψ_j ⊗ v_j ⊗ k'_j (m × Ev × E),  K̃ = Σ_j ψ_j k'_jᵀ  (m × E)
        dK_j = √s[Σ_c v_jc (ψ_jᵀW)_c − ψ_jᵀW₃],
                 W = Σ_i φ_i ⊗ (dO_i/D_i) ⊗ q'_i,        W₃ = Σ_i φ_i (Δ̃_i/D_i) q'_iᵀ

    (``s·k_j = √s·k'_j``: the features' scaled inputs carry one √s). Two states,
    ``[T, K̃]`` (m × (Ev·E + E), over the keys) and ``[W, W₃, U]`` (m × (Ev·E + E +
    Ev), over the rows of all query heads), each applied to the other side: four
    passes, no n × S term. Rows with ``D_i <= 0`` (the forward returned 0 for them)
    contribute nothing.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, as given to :func:`gemm_attention` (rotated; G query heads sharing
        this key/value head).
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output õ (:func:`gemm_attention` with the same inputs).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators D_i.
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        The forward's polynomial p (monomial coefficients).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0``.
    workers : int, optional
        Threads (None: :func:`numbarope.get_workers`). The result does not depend on
        it (bitwise): task partitions depend on the sizes only.

    Returns
    -------
    dq : (L, E) or (G, L, E) ndarray of float64
        With respect to the rotated q given (as :func:`numbarope.ops.streaming.exact_backward`).
    dk : (S, E) ndarray of float64
        Summed over the G query heads.
    dv : (S, Ev) ndarray of float64
        Summed over the G query heads.

    Notes
    -----
    **Accuracy.** :func:`numbarope.ops._bounds.gradient_bound` bounds
    ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|`` against the
    exact softmax gradients: the forward's relative weight error ε = δ + ρ gives
    ``|P̃_ij − A_ij| <= 2ε/(1−ε)·A_ij``, plus the rounding of these passes (a proof,
    from maxima of the inputs).

    **Cost.** ``4·(G·L + S)·m·E·(Ev+1)`` multiply-adds in four GEMM passes (``m =
    C(E+g, g)``), against the exact backward's ~``7·G·L·S·(E+Ev)/2`` and two
    exponentials per pair: in flops it pays where ``S`` exceeds about ``m·(Ev+1)/2``
    (E = Ev = 16, m = 969: S ≈ 8000; measured on 2 cores: 2-3× slower than the exact
    float64 backward at S = 4096, faster from S ≈ 16384, ~10× at 65536).

    **Memory.** Inputs' float64 copies, O((G·L + S)·(E + Ev)); per thread a feature
    block (:func:`backward_chunk` rows), its products and two m × (Ev·E + E + Ev)
    states; plus the summed state. No n × m or n × Ev·E array.

    **Threads.** Parallel over blocks of rows (or keys): numbarope's prange loops
    (:mod:`numbarope._runtime.threads`), BLAS at one thread inside; the states' tasks
    run in waves of ``workers`` and are added in task order.

    References
    ----------
    J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
    Fourier Transform", arXiv:2505.11892 (2025), §4.
    Y. Chen, J. Huo, X. Li, Y. Liang, Z. Shi, Z. Song, "Fast Gradient Computation for
    RoPE Attention in Almost Linear Time", arXiv:2412.17316 (2024; v3, 2025, by Y. Cao,
    J. Huo, Y. Liang, Z. Shi, Z. Song: "RoPE Attention Can Be Trained in Almost Linear
    Time").
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", arXiv:2307.08691 (2023), §3.2.
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    nq = G * L
    O = np.asarray(out, dtype=np.float64).reshape(nq, Ev)
    dO = np.asarray(dout, dtype=np.float64).reshape(nq, Ev)
    D = np.asarray(den, dtype=np.float64).reshape(nq)
    dq = np.zeros((nq, E))
    dk = np.zeros((S, E))
    dv = np.zeros((S, Ev))
    shape_q = (L, E) if single else (G, L, E)
    if nq == 0 or kpos.size == 0:
        return dq.reshape(shape_q), dk, dv
    F = _Side(coef, E)
    nw = resolve_workers(workers)
    m = F.m
    sq = float(np.sqrt(scale))
    ok = D > 0
    inv = np.zeros(nq)
    inv[ok] = 1.0 / D[ok]                                   # ĉ_i = 1/D_i (0: no weight)
    delta = np.einsum("ic,ic->i", dO, O)                   # Δ̃_i = dO_i·õ_i
    # passes 1-2: dq_i = Σ_c (dO_ic √s/D_i)(φ_iᵀT)_c − (Δ̃_i √s/D_i) φ_iᵀK̃
    wk = Ev * E + E
    cb = backward_chunk(m, Ev * E + E + Ev)
    Z = _backward_state_sum(ks, v64, ks, np.ones(ks.shape[0]), False, F.keys(), wk, nw, cb)
    cq = inv * sq
    dq, _ = _backward_apply_rows(qs, Z, dO * cq[:, None], delta * cq, F.queries(), nw, cb, E,
                                 0)
    del Z
    # passes 3-4: the row state [W, W₃, U]; dk_j = √s[Σ_c v_jc (ψ_jᵀW)_c − ψ_jᵀW₃]
    wq = Ev * E + E + Ev
    Zq = _backward_state_sum(qs, dO * inv[:, None], qs, delta * inv, True, F.queries(), wq,
                             nw, cb)
    dkr, dvr = _backward_apply_rows(ks, Zq, v64 * sq, np.full(ks.shape[0], sq), F.keys(), nw,
                                    cb, E, Ev)
    if kpos.size == S:
        dk, dv = dkr, dvr
    else:
        dk[kpos] = dkr
        dv[kpos] = dvr
    return dq.reshape(shape_q), dk, dv
