"""Run a :class:`~numbarope._pipeline.plan.Plan`: exact heads in one batched call of
the streaming kernel, each fast batch through its algorithm; ``verify=`` checks
rows of fast heads against a dense reference and writes what it finds into the
report (new HeadPlans), never into the plan.
"""

from __future__ import annotations

import warnings

import numpy as np

from .. import ops
from ..ops.streaming import exact_attention
from .heads import _key_weights, _sees_keys

__all__ = ["run_plan", "verify_rows"]


def _exact_rows(p, b, rows):
    """Exact output of rows ``rows`` of head b (dense NumPy; O(len(rows)·S·E²)): the
    reference of ``verify=``."""
    S = p.S
    j = np.arange(S)
    kb = p.k[p.kvidx[b]].astype(np.float64)
    out = np.zeros((len(rows), p.Ev))
    real = np.ones(S, bool) if p.kmask is None else np.isfinite(p.kmask[p.kidx[b]])
    for r, i in enumerate(rows):
        e = i - j + S - 1                                      # index of t = i + off − j
        if p.relative is not None:
            W = p.relative[p.ridx[b], e]                        # (S, E, E)
            logit = np.einsum("e,jef,jf->j", p.q[b, i], W, kb)
        else:
            logit = kb @ p.q[b, i].astype(np.float64)
        logit = logit * p.scale
        vis = real
        if p.key_ranges is not None:
            lo, hi = p.key_ranges
            vis = real & (j >= lo[i]) & (j < hi[i])
        if p.bias is not None:      # shifted by the row's largest visible bias (exact)
            bt = p.bias[p.bidx[b], e]
            fin = bt[vis & np.isfinite(bt)]
            logit = logit + (bt - (fin.max() if fin.size else 0.0))
        logit = np.where(vis, logit, -np.inf)
        mx = logit.max(initial=-np.inf)
        if mx == -np.inf:
            continue
        w = np.exp(logit - mx)
        out[r] = (w / w.sum()) @ p.v[p.kvidx[b]]  # convex combination: cannot overflow
    return out


def _value_scale(v, dtype=np.float64, vmax=None):
    """A power of two f with max|f·v| <= 2**1000 (float64) or 2**100 (float32), so that
    sums of weighted values cannot overflow (values near the dtype's maximum); 1.0
    for all ordinary inputs. Exact to undo."""
    vmax = float(np.abs(v).max(initial=0.0)) if vmax is None else float(vmax)
    top = 1000 if np.dtype(dtype) == np.float64 else 100
    return 2.0 ** -(int(np.ceil(np.log2(vmax))) - top) if vmax > 2.0 ** top else 1.0


def _decode_group(p):
    """Group size g > 1 when grouped-query decoding can stack each key/value head's g
    query heads into one task, else 0: one query per head that sees every key (not
    causal, or causal with the query at or after the last key), no bias or relative
    matrices, query heads in key/value order, and one key mask per group."""
    B, Bk = p.q.shape[0], p.k.shape[0]
    if p.n != 1 or Bk >= B or B % Bk or p.bias is not None or p.relative is not None:
        return 0
    if p.key_ranges is not None and (p.key_ranges[0][0] > 0 or p.key_ranges[1][0] < p.S):
        return 0
    g = B // Bk
    if not np.array_equal(p.kvidx, np.arange(B) // g):
        return 0
    if p.kidx is not None and not np.all(p.kidx.reshape(Bk, g) == p.kidx[::g, None]):
        return 0
    return g


def _exact_ranges(p, ids):
    """``key_ranges`` argument of the exact kernel: the problem's per-row ranges, shared
    by every head (one row), or None."""
    if p.key_ranges is None:
        return None
    lo, hi = p.key_ranges
    return (np.ascontiguousarray(lo[None], np.int64), np.ascontiguousarray(hi[None], np.int64),
            np.zeros(len(ids), np.int64))


def run_plan(p, facts, plan, workers=None):
    """Outputs (B, L, Ev) float64 and row log-sum-exps (B, L) of every head, by its plan.

    ``p``: the Problem; ``facts``: its :class:`~numbarope._pipeline.heads.Heads`;
    ``plan``: the :class:`~numbarope._pipeline.plan.Plan`; ``workers``: threads."""
    B = p.q.shape[0]
    out = np.empty((B, p.n, p.Ev))
    lse = np.full((B, p.n), -np.inf)
    exact_ids = np.asarray(plan.exact, np.int64)
    if exact_ids.size:
        cd = facts.compute_dtype
        every = exact_ids.size == B

        def take(a):
            a = a if every else a[exact_ids]
            return np.ascontiguousarray(a, dtype=cd)

        f = _value_scale(p.v, cd)
        v = np.ascontiguousarray(p.v * f if f != 1.0 else p.v, dtype=cd)
        group = _decode_group(p) if every else 0
        if group:
            # one query per head, every key visible: the query heads of a key/value head
            # are rows of one task, so its keys and values are read once, not g times
            Bk = p.k.shape[0]
            qg = take(p.q).reshape(Bk, group, p.E)
            og, lg = exact_attention(
                qg, np.ascontiguousarray(p.k, dtype=cd), v, p.scale, workers=workers,
                key_mask=p.kmask, norms=(facts.qnorms.reshape(Bk, group), facts.knorms),
                kidx=None if p.kidx is None else np.ascontiguousarray(p.kidx[::group]),
                return_lse=True, softcap=p.softcap)
            out[:] = og.reshape(B, 1, p.Ev)
            lse[:] = lg.reshape(B, 1)
            if f != 1.0:
                out /= f
            exact_ids = exact_ids[:0]
    if exact_ids.size:
        out[exact_ids], lse[exact_ids] = exact_attention(
            take(p.q), np.ascontiguousarray(p.k, dtype=cd), v, p.scale,
            kvidx=p.kvidx[exact_ids],
            relative=None if p.relative is None else np.ascontiguousarray(p.relative,
                                                                          dtype=cd),
            ridx=None if p.ridx is None else p.ridx[exact_ids],
            bias=p.bias, bidx=None if p.bidx is None else p.bidx[exact_ids],
            key_ranges=_exact_ranges(p, exact_ids), workers=workers,
            key_mask=p.kmask, kidx=None if p.kidx is None else p.kidx[exact_ids],
            norms=(facts.qnorms if every else facts.qnorms[exact_ids], facts.knorms),
            return_lse=True, softcap=p.softcap)
        if f != 1.0:
            out[exact_ids] /= f
    for members in plan.batches:
        members = list(members)
        b0 = members[0]
        hp, spec = plan.heads[b0], facts.specs[b0]
        T, shift = facts.weights[b0]
        w = _key_weights(p, b0)
        kb = p.k[p.kvidx[b0]].astype(np.float64)
        vb = p.v[p.kvidx[b0]].astype(np.float64)
        f = _value_scale(vb)
        vb = vb * f if f != 1.0 else vb
        mask = None if w is None else w > 0
        alg = ops.get(hp.algorithm)
        q = (p.q[b0] if p.relative is not None else p.q[members]).astype(np.float64)
        res, den = alg.run(q, kb, vb, p.scale, hp.coef, structure=spec.structure, T=T,
                           offset=p.offset, key_mask=mask,
                           relative=None if p.relative is None else p.relative[p.ridx[b0]],
                           workers=workers)
        if p.relative is not None:
            res, den = res[None], den[None]
        # den ≈ Σ_j exp(logit_ij + b_t − max b): the log-sum-exp up to that shift
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[members] = np.where(den > 0, np.log(np.where(den > 0, den, 1.0)) + shift,
                                    -np.inf)
        if f != 1.0:
            res /= f
        if T is not None:
            # rows that see no key: exactly 0 (the FFT leaves rounding noise there)
            blind = ~_sees_keys(p, b0)
            res[:, blind] = 0.0
            lse[np.ix_(members, np.flatnonzero(blind))] = -np.inf
        out[members] = res
    return out, lse


def verify_rows(p, plan, out, verify, stacklevel=3):
    """The plan's HeadPlans with ``observed_error`` on ``verify`` random rows of every
    fast head (a warning where it exceeds the bound); a new tuple, the plan unchanged."""
    heads = list(plan.heads)
    if not verify or p.n == 0:
        return tuple(heads)
    rng = np.random.default_rng(0)
    for b, h in enumerate(heads):
        if h.method != "fast":
            continue
        rows = np.sort(rng.choice(p.n, size=min(int(verify), p.n), replace=False))
        err = float(np.abs(out[b, rows] - _exact_rows(p, b, rows)).max(initial=0.0))
        heads[b] = h = h.with_observed(err)
        if err > h.error_bound:
            if h.radius_given:
                why = (f"the radius={h.radius:.4g} given for this head must be below "
                       f"its true logit radius (omit radius= to use the computed "
                       f"one, which is a proven upper bound)")
            else:
                why = (f"the computed logit radius R={h.radius:.4g} is a proven upper "
                       f"bound, so this points at a numbarope defect: please report "
                       f"it with the inputs")
            warnings.warn(
                f"head {h.head}: verify found an error {err:.3e} above the certified "
                f"bound {h.error_bound:.3e}; {why}", RuntimeWarning, stacklevel=stacklevel)
    return tuple(heads)
