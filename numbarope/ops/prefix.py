"""Causal mask (any offset, key padding): chunked prefix sums of key-side states.

With ``p(q'ᵀk') = φ(q')ᵀψ(k')`` (the polynomial method, Alman & Song 2025, §4;
:mod:`numbarope.ops._common`), causal attention is a sum over a prefix of the keys::

    num_i = Σ_{j visible to i} p(q'_iᵀk'_j) [v_j, 1],   out_i = num_i[:Ev] / num_i[Ev].

The keys are cut into chunks of C = :func:`prefix_chunk` keys; each chunk's state
``Σ_{j∈c} ψ(k'_j)[v_j, 1]ᵀ`` is formed once, an exclusive prefix sum of the states
gives every row the state of the chunks before its last visible key
(``φ(q'_i)ᵀS``), and the keys of its own chunk are taken by Horner on the logits,
masked (:func:`numbarope.ops._common._scan`, the masked chunk kernel
:func:`numbarope.ops._common._horner_block` without a decay). Work
``O((G·L + S)·m·(Ev+1) + G·L·C·(E + Ev + g))``.

Rectangular attention at an offset (query i at position ``i + offset`` sees the keys
at positions ``<= i + offset``), padded keys (removed: the real keys keep their
order) and G query heads on one key/value head are all served. The planner gives
this algorithm a head only when the causal mask hides some real key from some row
(else :mod:`numbarope.ops.gemm` serves it).

State in, state out: ``initial_state=(S₀, s₀)`` is the state (:func:`key_state`) of
keys before key 0 that every query row sees in full (the earlier blocks of one long
sequence); ``return_state=True`` returns the state of this call's real keys plus the
initial one, for the next block.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §4.2
(any summation order of k terms is within γ_{k−1}).
"""

import numpy as np
from numba import njit, prange

from .. import _config
from .. import bias as _bias
from .._runtime.threads import parallel, prange_loop, resolve_workers, task_array
from ._bounds import causal_gradient_bound
from ._common import (_add_rows_to_state, _FM, _check_state, _example_qkv, _ranges, _scan, _Side,
                      _setup, _shaped, add_states, backward_chunk, key_side_state, prefix_chunk,
                      scan_memory, visible_keys)
from ._cost import COST_CONSTANTS
from ._features import _features_block, n_features
from .registry import Algorithm, register

__all__ = ["Prefix", "prefix_attention", "prefix_backward", "key_state", "add_states",
           "prefix_memory", "prefix_chunk"]

#: The key-side state of a block of keys alone (:func:`numbarope.ops._common.key_side_state`):
#: ``key_state(k, v, scale, coef, *, key_mask=None, workers=None) -> (S, s)``; the same
#: state as :mod:`numbarope.ops.gemm`'s.
key_state = key_side_state


def prefix_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`prefix_attention`:
    :func:`numbarope.ops._common.scan_memory` with :func:`prefix_chunk` keys per chunk
    (the stored chunk states of a group, the tasks' states, per thread a feature block
    and the intra-chunk logits). Parameters as :func:`numbarope.ops.gemm.gemm_memory`."""
    S = n if S is None else S
    return scan_memory(n, S, E, Ev, degree, heads, prefix_chunk(n_features(E, degree)))


def prefix_attention(q, k, v, scale, coef, *, offset=0, key_mask=None, workers=None,
                     initial_state=None, return_state=False):
    """Fast causal attention: query i (position ``i + offset``) sees the real keys at
    positions ``<= i + offset``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any; G query heads sharing this key/value
        head are computed together (key side once).
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    offset : int, optional
        Position of query 0 (default 0).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part.
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The result
        does not depend on it (bitwise).
    initial_state : tuple of ndarray, optional
        ``(S₀, s₀)`` of shapes (m, Ev) and (m,): the key-side state (:func:`key_state`)
        of keys before key 0 that every query row sees in full.
    return_state : bool, optional
        Also return the state of this call's real keys plus ``initial_state`` (the
        ``initial_state`` of the next block).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_{j visible} p(s·q_iᵀk_j)`` (rows with den <= 0, no visible key, get out = 0).
    state : (S, s), with ``return_state=True``

    Notes
    -----
    Accuracy: each weight sum is ``Σ_j p(q'_iᵀk'_j)[v_j, 1]`` with p formed in float64
    from the same features (or by Horner inside a chunk); only the order of the
    additions differs from a running sum (chunk states, task totals, prefix). The
    rounding bound γ_{n+m+2g+2}·Σ|φ_αψ_α| of
    :func:`numbarope.ops._bounds.rounding_term` counts the terms, not their order
    (Higham 2002, §4.2), so it holds.
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    F = _Side(coef, E)
    if initial_state is not None:
        initial_state = _check_state(initial_state, F.m, Ev, "prefix")
    nw = resolve_workers(workers)
    nk = kpos.size
    if (G * L == 0 or (nk == 0 and initial_state is None)) and not return_state:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    lim = visible_keys(L, S, offset, True, key_mask)
    if lim is None:                       # every row sees every real key
        lim = np.full(L, nk, np.int64)
    num, den, St, st = _scan(qs, ks, v64, np.tile(lim, G), F, nw, prefix_chunk(F.m),
                             state=initial_state)
    res = _shaped(num, den, G, L, Ev, single)
    return res + ((St, st),) if return_state else res


class Prefix(Algorithm):
    """Causal mask (any offset, key padding): chunked prefix sums of key-side states,
    a masked polynomial inside each chunk (:func:`prefix_attention`)."""

    name = "prefix"
    structures = (_bias.Causal,)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(prefix_chunk(m), max(h.S, 1))
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * ch * (2 * degree + 3)) / h.heads

    def memory(self, h, degree):
        return prefix_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`prefix_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); ``structure`` (``Causal()``) and ``T``
        are not read. ``initial_state`` / ``return_state``: the state ``(S, s)`` of
        :func:`key_state` of keys before key 0."""
        return prefix_attention(q, k, v, scale, coef, offset=offset, key_mask=key_mask,
                                workers=workers, initial_state=initial_state,
                                return_state=return_state)

    #: forward+backward ≈ forward × (1 + backward_factor·(E·Ev + E + Ev)/(Ev + 1)):
    #: measured 15× the forward at E = Ev = 16 (numbarope._config.FAST_BACKWARD_FACTOR)
    backward_factor = 0.85

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs: :func:`prefix_backward`
        (``out``, ``den`` the forward's results; returns ``(dq, dk, dv)``; ``structure``
        and ``T`` are not read: causal, no bias)."""
        return prefix_backward(q, k, v, out, den, dout, scale, coef, offset=offset,
                               key_mask=key_mask, workers=workers)

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """:func:`numbarope.ops._bounds.causal_gradient_bound` of :meth:`backward`'s
        results."""
        return causal_gradient_bound(q, k, v, dout, scale, coef, delta, offset=offset,
                                     key_mask=key_mask, radius=radius)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True, is_causal=True))


register(Prefix())


# ------------------------------------------------------------------ the backward
#
# The certified fast backward of the causal prefix (issue 22): the formulas of
# :func:`numbarope.ops.gemm.gemm_backward` with causal sums. Row i (sorted by its number
# of visible real keys lim_i) takes the keys of the whole chunks before b_i = lim_i // c
# through a key state, and its keys b_i·c .. lim_i − 1 explicitly (rows that see every
# key, b_i = nch, through the total state); a key of chunk J thus receives the rows with
# b_i > J through a row state and the rows with b_i = J explicitly:
#
#   A. prefix over key chunks J = 0 .. nch: dq_i (b_i = J) += Σ_a C_ia (φ_iᵀZ)[e, a]
#      with Z = Σ_{j < J·c} ψ_j k'_je [v_j, 1]_a (then Z += chunk J's keys),
#      C_i = √s·[dO_i/D_i, −Δ_i/D_i];
#   B. suffix over row groups J = nch .. 0: dk_j (j in chunk J) += Σ_a √s[v_j, 1]_a
#      (ψ_jᵀZq)[e, a], dv_j += ψ_jᵀU, Zq[e, a] = Σ_{b_i > J} φ_i q'_ie [dO_i/D_i,
#      −Δ_i/D_i]_a, U = Σ_{b_i > J} φ_i dO_i/D_i (then Zq, U += the rows of b_i = J);
#   L. explicit, per chunk J, rows b_i = J against keys J·c .. lim_i − 1: w_it = p(q'_i·k'_t)
#      by Horner, M_it = w_it·√s(dO_i·v_t − Δ_i)/D_i, dq_i += Σ_t M_it k'_t,
#      dk_t += Σ_i M_it q'_i, dv_t += Σ_i w_it dO_i/D_i.
#
# Threads: A and B are serial over the chunks (one running state), parallel over
# tasks of whole column units — unit e is the Ev + 1 columns [e, ·] of the state, whose
# task alone writes output column e (B: one more unit, U, for dv) — so no task sums
# into another's output; L is parallel over tasks of whole chunks, each owning its rows
# and keys. The three results are added in a fixed order: bitwise the same for any
# number of threads (the partitions depend on the sizes only).

#: Keys per chunk of :func:`prefix_backward`; None: :func:`prefix_chunk` (the forward's).
BACKWARD_CHUNK = None
#: State columns per task of the backward's two scans (whole units of Ev + 1 columns):
#: fewer columns per task give more tasks but thinner GEMMs (one thread, m = 969, E = Ev
#: = 16: 64 columns, 4 tasks per scan, ~10% slower than one task of 272 or 288).
BACKWARD_COLUMNS = 64


@njit(cache=True, nogil=True, fastmath=_FM)
def _scan_columns(st, B, A, at, C, steps, u0, u1, cb, sparent, svar, sratio, sw0, spost,
                  sweight, aparent, avar, aratio, aw0, apost, aweight, out1, out2):
    # One task of a backward scan: the column units u0 <= u < u1 of a running state,
    # unit e < E the na = A.shape[1] columns Z[e, a] = Σ feat(x_r) B[r, e] A[r, a] over
    # the state side's rows added so far, unit E (when u1 > E) the out2.shape[1] columns
    # Σ feat(x_r) A[r, a]. Step t: first the apply side's rows steps[t, 0] .. steps[t, 1]:
    # out1[i, e] = Σ_a C[i, a] (feat(y_i)ᵀZ)[e, a], out2[i, a] = feat(y_i)ᵀZ[E, a]; then
    # the state side's rows steps[t, 2] .. steps[t, 3] are added. Features of the state
    # side from st (E, rows) with the s* tables, of the apply side from at with a*; in
    # blocks of cb rows. Apply rows met before any state row keep their 0.
    m = sparent.shape[0]
    E = B.shape[1]
    na = A.shape[1]
    ne = max(0, min(u1, E) - u0)
    nx = out2.shape[1] if u1 > E else 0
    width = ne * na + nx
    Z = np.zeros((m, width))
    T = np.empty((m, width))
    fb = np.empty(m * cb)
    yb = np.empty(cb * max(width, 1))
    empty = True
    for t in range(steps.shape[0]):
        a0, a1, s0, s1 = steps[t, 0], steps[t, 1], steps[t, 2], steps[t, 3]
        for i0 in range(a0, a1, cb):
            if empty:
                break
            i1 = min(i0 + cb, a1)
            n = i1 - i0
            P = fb[:m * n].reshape((m, n))
            R = yb[:n * width].reshape((n, width))
            _features_block(at, i0, i1, aparent, avar, aratio, aw0, apost, aweight, P, 0)
            np.dot(P.T, Z, R)
            for r in range(n):
                i = i0 + r
                row = R[r]
                ci = C[i]
                o = out1[i]
                for e in range(ne):
                    base = e * na
                    acc = 0.0
                    for a in range(na):
                        acc += ci[a] * row[base + a]
                    o[u0 + e] = acc
                if nx:
                    o2 = out2[i]
                    base = ne * na
                    for a in range(nx):
                        o2[a] = row[base + a]
        empty = _add_rows_to_state(st, s0, s1, cb, sparent, svar, sratio, sw0, spost,
                                   sweight, A, B, u0, ne, na, nx, fb, yb, Z, T, empty)


@njit(cache=True, nogil=True, fastmath=_FM)
def _local_chunks(qs, ks, v, Cd, cdel, pc, lim, rstart, j0, j1, c, ss, dq, dk, dv):
    # The explicit part of chunks j0 <= J < j1: rows rstart[J] <= i < rstart[J+1] (sorted
    # by lim, all with J·c <= lim_i < J·c + c) against the keys J·c <= t < lim_i, in
    # blocks of c rows: X = q'k'ᵀ, w = p(X) by Horner (masked), M = w·ss·(Cd vᵀ + cdel),
    # dq[rows] = M k', dk[keys] += Mᵀq', dv[keys] += wᵀCd (Cd = dO/D, cdel = −Δ/D).
    g = pc.shape[0] - 1
    for J in range(j0, j1):
        k0 = J * c
        for r0 in range(rstart[J], rstart[J + 1], c):
            r1 = min(r0 + c, rstart[J + 1])
            kb = lim[r1 - 1]                      # the block's largest lim
            n = kb - k0
            if n <= 0:
                continue
            X = np.dot(qs[r0:r1], ks[k0:kb].T)
            Pm = np.dot(Cd[r0:r1], v[k0:kb].T)
            M = np.empty_like(X)
            for r in range(r1 - r0):
                i = r0 + r
                tb = min(max(lim[i] - k0, 0), n)
                xr = X[r]
                pr = Pm[r]
                mr = M[r]
                d = cdel[i]
                for t in range(tb):
                    x = xr[t]
                    p = pc[0]
                    for e in range(1, g + 1):
                        p = p * x + pc[e]
                    xr[t] = p
                    mr[t] = p * (ss * (pr[t] + d))
                for t in range(tb, n):
                    xr[t] = 0.0
                    mr[t] = 0.0
            dq[r0:r1] = np.dot(M, ks[k0:kb])
            dk[k0:kb] += np.dot(M.T, qs[r0:r1])
            dv[k0:kb] += np.dot(X.T, Cd[r0:r1])


@prange_loop(lambda st, B, A, at, C, steps, tasks, *rest:
             (st, B, A, at, C, steps, 0, 0, *rest))
def _par_scan_columns(fn, st, B, A, at, C, steps, tasks, cb, sparent, svar, sratio, sw0,
                      spost, sweight, aparent, avar, aratio, aw0, apost, aweight, out1, out2):
    for i in prange(tasks.shape[0]):
        fn(st, B, A, at, C, steps, tasks[i, 0], tasks[i, 1], cb, sparent, svar, sratio, sw0,
           spost, sweight, aparent, avar, aratio, aw0, apost, aweight, out1, out2)


@prange_loop(lambda qs, ks, v, Cd, cdel, pc, lim, rstart, tasks, *rest:
             (qs, ks, v, Cd, cdel, pc, lim, rstart, 0, 0, *rest))
def _par_local_chunks(fn, qs, ks, v, Cd, cdel, pc, lim, rstart, tasks, c, ss, dq, dk, dv):
    for i in prange(tasks.shape[0]):
        fn(qs, ks, v, Cd, cdel, pc, lim, rstart, tasks[i, 0], tasks[i, 1], c, ss, dq, dk, dv)


def backward_chunk_keys(m):
    """Keys per chunk of :func:`prefix_backward`: :data:`BACKWARD_CHUNK`, or the
    forward's :func:`prefix_chunk`."""
    return int(BACKWARD_CHUNK) if BACKWARD_CHUNK else prefix_chunk(m)


def _unit_tasks(widths):
    """Contiguous ranges of column units, about :data:`BACKWARD_COLUMNS` columns each,
    balanced by width: from the sizes only."""
    widths = np.asarray(widths, dtype=np.float64)
    k = int(max(1, min(len(widths), round(widths.sum() / max(1, BACKWARD_COLUMNS)))))
    return _ranges(0, len(widths), k, widths)


def prefix_backward(q, k, v, out, den, dout, scale, coef, *, offset=0, key_mask=None,
                    workers=None):
    r"""Certified fast gradients of causal softmax attention (:func:`prefix_attention`).

    The gradients of the EXACT causal attention ``o_i = Σ_{j visible} A_ij v_j``,
    ``A_ij = exp(x_ij)/Σ_{l visible} exp(x_il)``, ``x_ij = s·q_iᵀk_j`` (query i at
    position ``i + offset`` sees the real keys at positions ``<= i + offset``),
    approximated as :func:`numbarope.ops.gemm.gemm_backward` does: A replaced by the
    forward's own weights ``P̃_ij = w_ij/D_i``, ``w_ij = p(x_ij) = φ(q'_i)ᵀψ(k'_j)``
    (``q' = √s q``, ``k' = √s k``; Alman & Song 2025, §4), o by the forward's õ, and
    the exact formulas (Dao 2023, §3.2) with ``Δ̃_i = dO_i·õ_i``::

        dQ_i = (√s/D_i) Σ_{j vis. i} w_ij (dO_i·v_j − Δ̃_i) k'_j
        dK_j = √s Σ_{i sees j} (w_ij/D_i) (dO_i·v_j − Δ̃_i) q'_i
        dV_j = Σ_{i sees j} w_ij dO_i/D_i

    Row i sees a prefix of ``lim_i`` real keys. Its keys of the whole chunks (C keys
    each) before chunk ``b_i = lim_i // C`` come through a key state,
    ``Z = Σ_j ψ_j (k'_j ⊗ [v_j, 1])`` (m × E·(Ev+1)), a PREFIX over key chunks, as
    ``dQ_i = Σ_a √s[dO_i/D_i, −Δ̃_i/D_i]_a (φ_iᵀZ)[·, a]``; the keys ``b_i·C .. lim_i − 1``
    explicitly, ``w_ij`` by Horner on the logits (as the forward's masked chunk kernel),
    ``M_ij = w_ij √s (dO_i·v_j − Δ̃_i)/D_i``, ``dQ_i += Σ_j M_ij k'_j``. Dually a key of
    chunk J receives the rows with ``b_i > J`` through a row state ``Zq = Σ_i φ_i
    (q'_i ⊗ [dO_i/D_i, −Δ̃_i/D_i])`` and ``U = Σ_i φ_i (dO_i/D_i)ᵀ`` (m × (E·(Ev+1) +
    Ev)), a SUFFIX over row groups (``dK_j = Σ_a √s[v_j, 1]_a (ψ_jᵀZq)[·, a]``,
    ``dV_j = ψ_jᵀU``), and the rows with ``b_i = J`` explicitly (``dK_j += Σ_i M_ij q'_i``,
    ``dV_j += Σ_i w_ij dO_i/D_i``). Rows that see every real key use the total key state
    (no explicit part). Rows with ``D_i <= 0`` or no visible key contribute nothing and
    get ``dq = 0``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, as given to :func:`prefix_attention` (rotated; G query heads sharing
        this key/value head).
    k : (S, E) ndarray of float64
    v : (S, Ev) ndarray of float64
    out : (L, Ev) or (G, L, Ev) ndarray of float64
        The forward's output õ (:func:`prefix_attention` with the same inputs).
    den : (L,) or (G, L) ndarray of float64
        The forward's denominators D_i.
    dout : (L, Ev) or (G, L, Ev) ndarray of float64
        Gradient of the loss with respect to ``out``.
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        The forward's polynomial p (monomial coefficients).
    offset : int, optional
        Position of query 0, as in the forward.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys get ``dk = dv = 0``.
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

    Notes
    -----
    **Accuracy.** :func:`numbarope.ops._bounds.causal_gradient_bound` bounds
    ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|`` against the
    exact causal softmax gradients (a proof, from maxima of the inputs and the rows'
    numbers of visible keys): each row's P̃ is within ``ε_P`` of its causal softmax,
    plus the rounding of these passes (state and explicit routes counted separately).

    **Cost.** The two scans: ``(G·L + S)·m·(2E·(Ev+1) + Ev)`` multiply-adds in GEMMs
    (as :func:`numbarope.ops.gemm.gemm_backward`'s four passes; ``m = C(E+g, g)``),
    features formed once per task; the explicit part ``O(G·L·C·(E + Ev + g))`` (about
    C/2 keys per row, a few % of the whole at C = 256). Against the exact causal
    backward's ~``7·G·L·S·(E+Ev)/4``: measured on 2 shared cores (E = Ev = 16, R = 0.5,
    eps = 1e-3, g = 3, m = 969, square causal): n = 16384 1.1 s against 1.05 s
    (exact, float64) and 0.5 s (float32); n = 65536 4.1 s against 11 s and 5.2 s; the
    fast forward takes 0.06 s and 0.33 s (its state, m × (Ev+1), is ~2E times narrower).

    **Memory.** Inputs' float64 copies and three partial results (state, explicit),
    ``O((G·L + S)·(E + Ev))``; per task a slice of the running state (the whole state
    is m × (2E(Ev+1) + Ev) over all tasks), a feature block and its products; per
    explicit task a C × C block. No per-chunk states are stored.

    **Threads.** The scans run serially over the chunks (one running state), parallel
    over tasks of whole column units of about :data:`BACKWARD_COLUMNS` columns each
    (unit e: the columns ``[e, ·]``, whose task alone writes output column e; for
    E = Ev = 16: 4 tasks for dq, 5 for dk/dv — more cores than that are not used by
    the scans); BLAS at one thread inside. The explicit part is parallel over tasks of
    whole chunks. A parallel-over-chunks scan (stored chunk states, as the forward) is
    not done: its states are E + 1 times the forward's.

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
    lim = visible_keys(L, S, offset, True, key_mask)
    lim = np.full(L, nk, np.int64) if lim is None else np.asarray(lim, np.int64)
    lim = np.tile(lim, G)
    F = _Side(coef, E)
    nw = resolve_workers(workers)
    m = F.m
    c = backward_chunk_keys(m)
    nch = -(-nk // c)
    sq = float(np.sqrt(scale))
    ok = (D > 0) & (lim > 0)
    inv = np.zeros(nq)
    inv[ok] = 1.0 / D[ok]                                   # 1/D_i (0: no weight)
    delta = np.einsum("ic,ic->i", dO, O)                   # Δ̃_i = dO_i·õ_i
    order = np.argsort(lim, kind="stable")                 # rows by lim: b_i increasing
    lim = np.ascontiguousarray(lim[order])
    qso = np.ascontiguousarray(qs[order])
    Cd = np.ascontiguousarray(dO[order] * inv[order, None])          # dO_i/D_i
    cdel = np.ascontiguousarray(-(delta[order] * inv[order]))         # −Δ̃_i/D_i
    b = np.where(lim == 0, -1, np.where(lim >= nk, nch, lim // c))
    rstart = np.searchsorted(b, np.arange(nch + 2)).astype(np.int64)  # rows of b = J
    J = np.arange(nch + 1, dtype=np.int64)
    stepsA = np.stack([rstart[:-1], rstart[1:], np.minimum(J * c, nk),
                       np.minimum(J * c + c, nk)], axis=1)
    Jr = nch - J                                            # nch, nch − 1, .., 0
    stepsB = np.stack([np.minimum(Jr * c, nk), np.minimum(Jr * c + c, nk), rstart[Jr],
                       rstart[Jr + 1]], axis=1)
    stepsA = np.ascontiguousarray(stepsA, dtype=np.int64)
    stepsB = np.ascontiguousarray(stepsB, dtype=np.int64)
    rowA = np.empty((nq, Ev + 1))                           # [dO/D, −Δ/D]
    rowA[:, :Ev] = Cd
    rowA[:, Ev] = cdel
    keyA = np.empty((nk, Ev + 1))                           # [v, 1]
    keyA[:, :Ev] = v64
    keyA[:, Ev] = 1.0
    qt = np.ascontiguousarray(qso.T)
    kt = np.ascontiguousarray(ks.T)
    tasksA = _unit_tasks([Ev + 1] * E)
    tasksB = _unit_tasks([Ev + 1] * E + [Ev])
    cb = backward_chunk(m, max(Ev + 1, max((b_ - a_) * (Ev + 1) + Ev
                                           for a_, b_ in tasksB)))
    dqA = np.zeros((nq, E))
    dkB = np.zeros((nk, E))
    dvB = np.zeros((nk, Ev))
    dqL = np.zeros((nq, E))
    dkL = np.zeros((nk, E))
    dvL = np.zeros((nk, Ev))
    work = (np.diff(rstart[:nch + 1]) + 1).astype(np.float64)
    tasksL = _ranges(0, nch, min(nch, _config.MAX_TASKS), work)
    with parallel(nw):
        # A: prefix over key chunks → dq
        _par_scan_columns(_scan_columns, kt, ks, keyA, qt, rowA * sq, stepsA,
                          task_array(tasksA), cb, *F.keys(), *F.queries(), dqA,
                          np.zeros((nq, 0)))
        # B: suffix over row groups → dk, dv
        _par_scan_columns(_scan_columns, qt, qso, rowA, kt, keyA * sq, stepsB,
                          task_array(tasksB), cb, *F.queries(), *F.keys(), dkB, dvB)
        # L: the explicit part of every chunk
        _par_local_chunks(_local_chunks, qso, ks, v64, Cd, cdel, F.pc, lim, rstart,
                          task_array(tasksL), c, sq, dqL, dkL, dvL)
    dq[order] = dqA + dqL
    dkr = dkB + dkL
    dvr = dvB + dvL
    if nk == S:
        dk, dv = dkr, dvr
    else:
        dk[kpos] = dkr
        dv[kpos] = dvr
    return dq.reshape(shape_q), dk, dv
