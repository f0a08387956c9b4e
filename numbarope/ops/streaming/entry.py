"""The exact path's entry point, :func:`exact_attention`."""


from typing import NamedTuple

import numpy as np

from ... import _config
from ..._runtime.threads import parallel, resolve_workers
from .decode import decode_plan, decode_run
from .kernel import (_DUMMY_BIAS, _DUMMY_REL, EXACT_HEADROOM, _exact_tasks,
                     _index_args, _Layout, _layout, _par_exact, _row_shifts, exact_on_team,
                     norm_bounds, row_norms)

# ------------------------------------------------------------------ the entry point

def exact_attention(q, k, v, scale, *, relative=None, ridx=None, bias=None, bidx=None,
                    key_ranges=None, key_mask=None, kidx=None, kvidx=None, norms=None,
                    workers=None, return_lse=False, softcap=None, team=None):
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
        General relative matrices; head ``b`` uses ``relative[ridx[b]]``; the pair
        (i, j) uses entry ``i − j + S − 1``.
    bias : (Bb, n+S−1) ndarray of float64, optional
        Relative bias (−inf masks); head ``b`` uses ``bias[bidx[b]]``, the pair
        (i, j) entry ``i − j + S − 1``. Shifted per row by :func:`bias_row_shift`
        over the keys the row sees (exact for softmax).
    key_ranges : (lo, hi, lidx), optional
        ``lo``, ``hi``: (P, n) int64; ``lidx``: (B,) int64. Row i of head b sees at
        most the keys ``lo[lidx[b], i] <= j < hi[lidx[b], i]`` (clipped to [0, S];
        empty when hi <= lo). None: every key. Causal is ``lo = 0``, ``hi = clip(i +
        offset + 1, 0, S)``; a window ``Window(left, right)`` is ``clip(i + offset −
        left, 0, S) .. clip(i + offset + right + 1, 0, S)``
        (:meth:`numbarope.bias.Structure.key_ranges`, :func:`gather_key_ranges`).
        A block of rows visits the key blocks from the smallest ``lo`` to the largest
        ``hi`` of its rows, empty rows included (give an empty row ``lo = hi`` within
        its neighbours' span), none when no row of it sees a key. ``lidx`` may be
        omitted for P = 1 or P = B.
    key_mask : (Bk', S) ndarray of float64, optional
        0 for real keys, −inf for padding; head ``b`` uses ``key_mask[kidx[b]]``.
    norms : (ndarray (B, n), ndarray (Bk, S)), optional
        Upper bounds of the row norms of (unscaled) q and of k, if the caller
        has them (:func:`row_norms`); computed otherwise.
    workers : int, optional
        Threads (scipy.fft's meaning; default all cores).
    return_lse : bool
        Also return the row log-sum-exp ``log Σ_j exp(s·logit_ij + b_ij)``.
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2): the logit ``x = s·q_iᵀk_j`` (times W with
        general matrices) becomes ``c·tanh(x/c)`` before the bias is added.
    team : numbarope._runtime.omp_team.Team, optional
        torch's OpenMP team: a parallel call without relative matrices runs its
        tasks on it instead of numba's threads (the same bits); the callers pass it
        for torch tensors.

    Returns
    -------
    out : (B, n, Ev) ndarray of the compute dtype
        ``softmax(s·logits + bias) @ v`` row by row over the keys each row sees;
        fully masked rows are 0.
    lse : (B, n) ndarray of float64
        Only with ``return_lse``; −inf on fully masked rows.
    """
    B, n, E = q.shape
    S = k.shape[1]
    if B == 0 or n == 0 or S == 0:       # no rows, or no keys: every row fully masked
        out, lse = np.zeros((B, n, v.shape[2]), q.dtype), np.full((B, n), -np.inf)
        return (out, lse) if return_lse else out
    plan = exact_plan(B, n, k.shape[0], S, E, v.shape[2], kvidx=kvidx,
                      key_ranges=key_ranges, has_kmask=key_mask is not None, kidx=kidx,
                      bias=bias, bidx=bidx, general=relative is not None,
                      softcap=softcap is not None and bool(softcap), workers=workers)
    out, lse = exact_run(plan, q, k, v, scale, key_mask, relative=relative, ridx=ridx,
                         norms=norms, softcap=softcap, team=team)
    return (out, lse) if return_lse else out


_DUMMY_RELS = {np.dtype(d): _DUMMY_REL.astype(d) for d in (np.float32, np.float64)}


class ExactPlan(NamedTuple):
    """What the exact kernel needs beyond the arrays: fixed by the sizes, the index
    arrays and the threads (:func:`exact_plan`). A caller that sees the same shapes
    again (a model's layers) keeps it and calls :func:`exact_run`."""

    B: int
    n: int
    Bk: int
    S: int
    E: int
    Ev: int
    layout: _Layout
    kvi: np.ndarray             # (B,) key/value head of each head
    has_bias: bool
    bs: np.ndarray              # (Bb, n+S-1) float64 bias, or a dummy
    bi: np.ndarray              # (B,)
    has_kmask: bool
    ki: np.ndarray              # (B,) key-mask row of each head
    has_ranges: bool
    general: bool
    decode: object              # the DecodePlan of few rows per head, or None
    nthreads: int
    zeros: np.ndarray           # (B,) int64 zeros (index arrays the call does not use)
    small: tuple                # (qnorm, knorm) zeros of heads small enough to compute
    #                             every block's maximum (n·S <= EXACT_ALWAYS_MAX), or ()


def exact_plan(B, n, Bk, S, E, Ev, *, kvidx=None, key_ranges=None, has_kmask=False,
               kidx=None, bias=None, bidx=None, general=False, softcap=False, workers=None):
    """The :class:`ExactPlan` of q (B, n, E) on k (Bk, S, E), v (Bk, S, Ev) with the
    index arrays and options of :func:`exact_attention` (``has_kmask``: a key mask
    will be passed to :func:`exact_run`; ``general``: relative matrices will be;
    ``softcap``: a soft cap will be). Reads no data."""
    kvi, has_bias, bs, bi, _, _, ki = _index_args(B, bias, bidx, None, kidx, kvidx)
    if has_kmask:
        ki = (np.zeros(B, np.int64) if kidx is None
              else np.ascontiguousarray(kidx, dtype=np.int64))
    nthreads = resolve_workers(workers)
    lay = _layout(B, n, S, E * E if general else E + Ev, key_ranges, nthreads)
    dp = None
    if not general and not has_bias and not softcap:
        dp = decode_plan(B, n, Bk, S, E, Ev, kvi, ki, has_kmask, lay.lo, lay.hi, lay.li,
                         key_ranges is not None)
    small = ()
    if not general and n * S <= _config.EXACT_ALWAYS_MAX:   # (read by the kernel, never
        small = (np.zeros((B, n)), np.zeros((Bk, -(-S // lay.kb))))   # written)
    return ExactPlan(B, n, Bk, S, E, Ev, lay, kvi, has_bias, bs, bi, has_kmask, ki,
                     key_ranges is not None, general, dp, nthreads, np.zeros(B, np.int64),
                     small)


def exact_run(plan, q, k, v, scale, key_mask=None, *, relative=None, ridx=None, norms=None,
              softcap=None, team=None, prescaled=False, heads_last=0, stats=None):
    """``(out (B, n, Ev) of the compute dtype, lse (B, n) float64)``: the exact kernel
    under ``plan`` (:func:`exact_plan`), the arrays and options as
    :func:`exact_attention` takes them. ``prescaled``: q is already ``q·scale`` in its
    dtype (one rounding, as the kernel would make it; not with relative matrices):
    the same bits. ``heads_last = H`` (H divides B): ``out`` is ``(B/H, H, n, Ev)``, the
    transposed view of a C-contiguous ``(B/H, n, H, Ev)`` array — the layout
    transformers returns attention in, written by the kernel (no transposed copy
    after the call) — with the same values. ``stats``: what :func:`kernel_inputs`
    returned with q, k, v (their row sums of squares and a bound of max |v|: no pass
    over them here)."""
    B, n, E = q.shape
    dt = q.dtype
    Ev = v.shape[2]
    S = k.shape[1]
    lay = plan.layout
    general = plan.general
    has_kmask = plan.has_kmask
    km = np.ascontiguousarray(key_mask, dtype=np.float64) if has_kmask else _DUMMY_BIAS
    kvi, has_bias, bs, bi, ki = plan.kvi, plan.has_bias, plan.bs, plan.bi, plan.ki
    has_ranges = plan.has_ranges
    lo, hi, li = lay.lo, lay.hi, lay.li
    nthreads = plan.nthreads
    softcap = 0.0 if softcap is None else float(softcap)
    if plan.decode is not None:
        out, lse, _ = decode_run(plan.decode, q, k, v, 1.0 if prescaled else scale, km,
                                 nthreads, team)
        if heads_last:            # (one row: both layouts are the same memory)
            out = out.reshape(B // heads_last, heads_last, n, Ev)
            if n > 1:
                out = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        return out, lse
    ohead = heads_last or 1
    obuf = np.empty((B // ohead, n, ohead * Ev), dt)
    lse = np.empty((B, n))
    rel = relative if general else _DUMMY_RELS[dt]
    ri = np.ascontiguousarray(ridx, dtype=np.int64) if general else plan.zeros
    if has_bias:
        shift, sidx = _row_shifts(n, S, bs, bi, km, ki, has_kmask, lo, hi, li, has_ranges)
    else:
        shift, sidx = _DUMMY_BIAS, plan.zeros
    rb, kb = lay.rb, lay.kb
    if general:
        gscale = float(scale)
        qnorm = knorm = np.zeros((1, 1))
        headroom = -np.inf
    elif plan.small:
        # small heads: every block's maximum is computed (a pass over a few logits),
        # no norms are needed (their pass costs more than the maxima it saves);
        # decided by n and S alone, so a head's bits do not depend on its batch
        if not prescaled:
            q = q * q.dtype.type(scale)
        gscale = 1.0
        qnorm, knorm = plan.small       # read by the kernel, never decisive: headroom −inf
        headroom = -np.inf
    else:           # fold the scale into q: the GEMM then gives the logits (one rounding)
        if not prescaled:
            q = q * q.dtype.type(scale)
        gscale = 1.0
        # bounds of the logits per row and key block, slightly enlarged for rounding
        if stats is not None:  # kernel_inputs' sums of squares (of q·scale, k)
            qn0, kn0 = norm_bounds(stats[0], E, dt), norm_bounds(stats[1], E, dt)
        elif norms is None:
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
        vmax = float(np.abs(v).max(initial=0.0)) if stats is None else stats[2]
        cap = np.log(float(np.finfo(dt).max) / 16 / kb / max(vmax, 1e-300))
        headroom = float(min(EXACT_HEADROOM[np.dtype(dt)], cap))
        if headroom < 1.0:
            headroom = -np.inf          # always compute the maximum

    if softcap:
        headroom = -np.inf           # capped logits: every block's maximum is computed
    args = (q, k, v, rel, ri, general, bs, bi, has_bias, shift, sidx, gscale, rb, kb, qnorm,
            knorm, headroom, km, ki, has_kmask, kvi, lo, hi, li, has_ranges, softcap)
    if lay.inline:      # a small call: a parallel region costs more than it saves
        _exact_tasks(*args, lay.tasks, obuf, lse, ohead)
    elif team is not None and nthreads > 1 and not general and all(
            a.flags.c_contiguous for a in (q, k, v, bs, shift, km, qnorm, knorm, lo, hi)):
        # torch tensors: on torch's own threads (the same groups, the same bits)
        exact_on_team(team, nthreads, q, k, v, bs, bi, has_bias, shift, sidx, gscale, rb,
                      kb, qnorm, knorm, headroom, km, ki, has_kmask, kvi, lo, hi, li,
                      has_ranges, softcap, lay.tasks, lay.waves, obuf, lse, ohead)
    else:
        with parallel(nthreads):
            for wave in lay.waves:
                _par_exact(_exact_tasks, *args, lay.tasks, wave, obuf, lse, ohead)
    if has_bias:              # undo the per-row bias shift
        lse += shift[sidx]
    if heads_last:
        return obuf.reshape(B // ohead, n, ohead, Ev).transpose(0, 2, 1, 3), lse
    return obuf, lse
