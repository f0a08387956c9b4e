"""The fast lane: exact calls with a reused plan, for decoding steps and model layers.

A transformers model calls attention once per layer with the same shapes (every
layer of a decoding step, every step), and nearly always on the exact path: its
logit radii are far above what a polynomial serves cheaply. For such calls the
full pipeline (a Problem, per-head facts, a plan per head, the certified bound per
head) costs milliseconds of Python around a kernel of microseconds. This lane
keeps, per shape signature (shapes, dtype, mask kind, options), what the full
pipeline derived once (:class:`_Entry`): the flattened layout, the key ranges, and
the largest logit radius ``R*`` at which the planner would choose the fast path
for these shapes (the planner's choice is monotone in R). A call then costs: a
lower bound of each head's radius (one key row), the comparison with ``R*``, the
kernel, and the checks.

It serves only what it can decide alike: no bias array (typed ``Causal``,
``Window``, ``Chunked`` and ``Packed`` structures only), no relative matrices, no
positions, no ``radius=``/``degree=``/``verify=``, ``return_info=False``
(the per-head certified bound is the report's job), float32/float64 inputs of one
dtype without broadcasting, or float16/bfloat16 torch tensors (widened exactly to
float32 and computed as the full pipeline computes them, the result rounded back).
A ``rotary=`` call (float32/float64 inputs) is rotated as the full pipeline rotates
it (:func:`~.inputs._rotate`: float64, the same positions), then served alike.
Anything else, a head whose radius might be below ``R*``, or a non-finite result
(NaN/inf inputs, logits beyond float32) goes to the full pipeline, which then
decides, refuses or computes exactly as it would have:
the lane returns nothing it could not have returned, and the same bits (it runs
the same kernel on the same arrays).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..bias import Causal, Chunked, NoBias, Packed, Window
from ..ops.streaming import (decode_plan, decode_run, exact_plan, exact_run, kernel_inputs,
                             pairs_visited)
from .._runtime.interop import is_torch
from .._runtime.omp_team import team as torch_team
from .._runtime.threads import resolve_workers
from .heads import head_facts
from .inputs import _all_finite, _rotate, as_rotary, check_shapes, make_problem
from .plan import RADIUS_GRID, plan_head

__all__ = ["try_fast_exact", "clear"]

_cache: dict = {}
_families: dict = {}          # the last entry of each family (see _family)
_NO_MASK = np.zeros((1, 1))
_lock = threading.Lock()
#: Shape signatures kept (a model has a handful: prefill, decode, a few batch sizes).
MAX_ENTRIES = 64


@dataclass(frozen=True)
class _Entry:
    """What the full pipeline derived once for a shape signature."""

    batch_shape: tuple
    offset: int                    # position of query 0 among the keys (rotary angles)
    B: int
    Bk: int
    L: int
    S: int
    E: int
    Ev: int
    kvidx: np.ndarray
    lo: np.ndarray | None          # key ranges (L,), or None
    hi: np.ndarray | None
    r_star: float                  # largest radius at which "auto" may pick fast (0: never)
    compute: np.dtype
    scale: float
    kidx: np.ndarray | None        # key-mask row of each head (with a padding mask)
    decode: tuple                  # DecodePlan (or None) without, with a key mask
    ranges: tuple | None           # key_ranges of exact_attention (read-only)
    spec: object = None            # head 0's HeadSpec (the planner's probe of a family)
    structure: object = None       # the typed structure of the key ranges (or None)
    bias: np.ndarray | None = None  # a typed window's values (with bidx), as the full
    bidx: np.ndarray | None = None  # pipeline passes them to the kernel
    plans: dict = field(default_factory=dict)   # ExactPlan per (key mask?, threads)


def clear():
    """Forget every reused plan (tests; after ``numbarope.calibrate``)."""
    with _lock:
        _cache.clear()
        _families.clear()


def _numpy(x):
    """``(array, kind)``: a float32/float64 numpy view of x and what it came as — None
    (a numpy array), True (a float32/float64 torch tensor, viewed), or the torch dtype
    of a float16/bfloat16 tensor (widened exactly to float32, as the full pipeline
    widens it: the result goes back to that dtype) — or None (not for this lane)."""
    if type(x) is np.ndarray:         # (subclasses, np.matrix: the full pipeline)
        return (x, None) if x.dtype in _FLOATS and x.dtype.isnative else None
    if is_torch(x):
        try:     # raises for tensors that require grad, live elsewhere, or are bfloat16
            a = x.numpy()
        except RuntimeError:
            return None
        except TypeError:
            a = None
        if a is not None and a.dtype in _FLOATS:
            return a, True
        torch = _torch()
        if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu":
            return None
        return x.detach().to(torch.float32).numpy(), x.dtype
    return None


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _result_ok(out, lse):
    """Every output finite and no log-sum-exp NaN or +inf; -1 if some lse is -inf (a row
    that saw nothing: checked against its keys), 1 otherwise, 0 when something is off."""
    return _lse_status(lse) if _all_finite(out) else 0


@njit(cache=True, nogil=True)
def _lse_status(lse):
    # (flags accumulated without an early exit: the loop vectorises)
    bad = False
    neg = False
    ls = lse.reshape(-1)
    for i in range(ls.size):
        x = ls[i]
        bad |= (x != x) | (x == np.inf)
        neg |= x == -np.inf
    return 0 if bad else -1 if neg else 1


def _threshold(spec, method, eps, approx):
    """Largest grid radius at which ``plan_head`` picks fast for this head, 0 when it
    never does (even at a radius of 1e-12)."""
    if method == "exact":
        return 0.0
    opts = dict(method="auto", eps=eps, degree=None, approx=approx)

    def fast(r):
        from dataclasses import replace
        return plan_head(replace(spec, radius=r, radius1=r), **opts).method == "fast"

    lo_k, hi_k = int(np.floor(np.log(1e-12) / np.log(RADIUS_GRID))), \
        int(np.ceil(np.log(400.0) / np.log(RADIUS_GRID)))
    if not fast(RADIUS_GRID ** lo_k):
        return 0.0
    while hi_k - lo_k > 1:          # fast at lo_k; bisect for the last grid point that is
        mid = (lo_k + hi_k) // 2
        if fast(RADIUS_GRID ** mid):
            lo_k = mid
        else:
            hi_k = mid
    return float(RADIUS_GRID ** hi_k)        # an upper side: heads at or below go back


def _family(sig):
    """The signature without the number of keys (a decoding cache grows by one key a
    step: every step is a new signature of one family)."""
    q, k, v, dt, gqa, causal, qo, align, kpm, *rest = sig
    return (q, k[:-2] + (k[-1],), v[:-2] + (v[-1],), dt, gqa, causal, qo, align,
            None if kpm is None else kpm[:-1], *rest)


def _entry(key, query, key_, value, method, eps, approx, arrays):
    """Run the full pipeline's preparation once and keep what a call reuses."""
    p, _ = make_problem(query, key_, value, **arrays)
    sh = p.shapes
    facts = head_facts(p, None, fast=False)
    natural = np.dtype(p.precision if p.precision is not None else p.dtype)
    if facts.compute_dtype != natural:
        return None          # these data need another precision: not a reusable plan
    spec = facts.specs[0] if facts.specs else None
    if method == "exact":
        r_star = 0.0
    else:
        specs = {(type(h.structure), h.general) for h in facts.specs}
        if len(specs) != 1:
            return None
        r_star = _threshold(spec, method, eps, approx)
    lo, hi = (None, None) if p.key_ranges is None else p.key_ranges
    structure = p.structure if p.structure is not None else Causal() if p.causal else None
    return _store(key, sh, p.k.shape[0], p.kvidx, lo, hi, r_star, facts.compute_dtype,
                  p.scale, arrays["key_padding_mask"], spec, structure, p.bias, p.bidx)


def _derive(key, fam, query, key_, value, method, eps, approx, arrays):
    """The entry of a new number of keys from its family's (``fam``): shapes, key
    ranges and kernel plans computed for the new sizes, nothing read from the data.
    Only where the family never serves the fast path (R* = 0) and the planner's probe
    at the smallest radius says so for the new sizes too; else None (a full entry)."""
    if fam.r_star != 0.0 or fam.spec is None or fam.bias is not None:
        return None                  # (a window's bias values depend on the sizes)
    kpm = arrays["key_padding_mask"]
    sh = check_shapes(query.shape, key_.shape, value.shape,
                      enable_gqa=arrays["enable_gqa"], query_offset=arrays["query_offset"],
                      causal_alignment=arrays["causal_alignment"],
                      key_padding_mask=None if kpm is None else kpm.shape)
    ranges = (fam.structure.key_ranges(sh.L, sh.S, sh.offset)
              if fam.structure is not None else None)
    if method != "exact":
        from dataclasses import replace
        probe = replace(fam.spec, n=sh.L, S=sh.S, offset=sh.offset, radius=1e-12,
                        radius1=1e-12, pairs=pairs_visited(sh.L, sh.S, sh.offset, ranges))
        if plan_head(probe, method="auto", eps=eps, degree=None,
                     approx=approx).method == "fast":
            return None
    lo, hi = (None, None) if ranges is None else ranges
    return _store(key, sh, fam.Bk, fam.kvidx, lo, hi, 0.0, fam.compute, fam.scale, kpm,
                  fam.spec, fam.structure)


def _store(key, sh, Bk, kvidx, lo, hi, r_star, compute, scale, kpm, spec, structure,
           bias=None, bidx=None):
    B, L, S = sh.heads, sh.L, sh.S
    kidx = None
    if kpm is not None:
        lead = kpm.shape[:-1]
        ids = np.arange(int(np.prod(lead, dtype=np.int64))).reshape(lead)
        kidx = np.ascontiguousarray(np.broadcast_to(ids, sh.batch_shape).reshape(-1))
    kvidx = np.ascontiguousarray(kvidx, dtype=np.int64)
    has_r = lo is not None
    rl, rh = (lo[None], hi[None]) if has_r else (None, None)
    ranges = None
    if has_r:    # read-only, the same objects every call: the kernel's layout is kept
        ranges = (np.array(rl), np.array(rh), np.zeros(B, np.int64))
        for a in ranges:
            a.setflags(write=False)
    decode = tuple(
        decode_plan(B, L, Bk, S, sh.E, sh.Ev, kvidx,
                    kidx if masked else np.zeros(B, np.int64), masked, rl, rh,
                    np.zeros(B, np.int64), has_r)
        for masked in ((False, True) if kidx is not None else (False,))) \
        if bias is None else (None, None)          # the decoding kernel takes no bias
    e = _Entry(batch_shape=sh.batch_shape, offset=sh.offset, B=B, Bk=Bk, L=L, S=S,
               E=sh.E, Ev=sh.Ev, kvidx=kvidx, lo=lo, hi=hi, r_star=r_star,
               compute=compute, scale=scale, kidx=kidx, decode=decode,
               ranges=ranges, spec=spec, structure=structure, bias=bias, bidx=bidx)
    with _lock:
        for c, k_ in ((_cache, key), (_families, _family(key))):
            if len(c) >= MAX_ENTRIES:
                c.pop(next(iter(c)))
            c[k_] = e
    return e


def try_fast_exact(query, key, value, *, method, eps, approx, workers, return_lse,
                   rotary=None, relative=None, bias=None, is_causal=False, scale=None,
                   precision=None, enable_gqa=False, query_offset=None,
                   causal_alignment="top_left", key_padding_mask=None, positions=None,
                   softcap=None, heads_last=False):
    """The result the full pipeline would give, or None where this lane does not serve
    the call (see the module docstring). ``heads_last`` (the transformers backend): a
    (B, H, L, Ev) result may be the transposed view of a contiguous (B, L, H, Ev)
    array, the layout transformers wants (its ``transpose(1, 2).contiguous()`` is then
    free)."""
    if method not in ("auto", "exact") or softcap is not None:
        return None                  # "fast" computes or refuses in the full pipeline
    if relative is not None or positions is not None:
        return None
    try:
        rot = as_rotary(rotary)
    except TypeError:
        return None                  # (the full pipeline's message)
    if bias is not None and not isinstance(bias, (NoBias, Causal, Window, Chunked, Packed)):
        return None
    causal = bool(is_causal) or isinstance(bias, Causal)
    conv = [_numpy(x) for x in (query, key, value)]
    if any(c is None for c in conv):
        return None
    (q, tq), (k, tk), (v, tv) = conv
    if not (q.dtype == k.dtype == v.dtype) or not (tq == tk == tv):
        return None                  # (a float16/bfloat16 tensor beside a float32 one too)
    if rot is not None and tq not in (None, True):
        return None                  # (float16/bfloat16 with rotary: the full pipeline)
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2 or 0 in q.shape or 0 in k.shape \
            or 0 in v.shape:
        return None                  # empty: the full pipeline's answer or message
    kpm = key_padding_mask
    if kpm is not None:
        kpm = kpm.numpy() if is_torch(kpm) else np.asarray(kpm)
        if kpm.dtype != np.bool_:
            return None
    sig = (q.shape, k.shape, v.shape, q.dtype.str if tq in (None, True) else tq,
           bool(enable_gqa), causal, query_offset,
           causal_alignment, None if kpm is None else kpm.shape, scale, method, eps, approx,
           precision, bias if isinstance(bias, (Window, Chunked, Packed)) else None, rot)
    try:
        e = _cache.get(sig)
    except TypeError:
        return None                  # (an unhashable Rotary: scaling with arrays)
    if e is None:
        arrays = dict(rotary=rot, bias=bias, is_causal=is_causal, scale=scale,
                      precision=precision, enable_gqa=enable_gqa, query_offset=query_offset,
                      causal_alignment=causal_alignment, key_padding_mask=kpm)
        try:
            fam = _families.get(_family(sig))
            if fam is not None:
                e = _derive(sig, fam, q, k, v, method, eps, approx, arrays)
            if e is None:        # (float16/bfloat16: the problem as the full pipeline
                low = tq not in (None, True)     # sees it, with their rounding)
                e = _entry(sig, query if low else q, key if low else k,
                           value if low else v, method, eps, approx, arrays)
        except (ValueError, TypeError):
            return None          # the full pipeline raises it, with its message
        if e is None:
            return None
    if q.shape[:-2] != e.batch_shape or k.shape[:-2] != (e.batch_shape[:-1] + (k.shape[-3],)
                                                         if enable_gqa else e.batch_shape):
        return None                          # broadcast leading dims: the full pipeline
    dtype = q.dtype
    if rot is not None:      # float64, at the positions the full pipeline rotates at
        q, k = _rotate(q, k, rot, None, e.L, e.S, e.E, e.offset)
    masked = kpm is not None and not kpm.all()
    dp = e.decode[masked]
    stats = None
    if dp is None:   # the main kernel: q scaled as it takes it, k and v contiguous, each
        # checked for NaN/inf and its rows' squares summed, in one pass over each (the
        # main kernel masks what a row cannot see before any check: NaN/inf are
        # refused as the full pipeline does; q·scale: NaN/inf in q, or a finite q that
        # overflowed at a scale > 1)
        taken = kernel_inputs(q, k, v, e.scale, e.compute)
        if taken is None:
            return None
        qf, kf, vf, stats = taken
    else:            # the decoding kernel scales q itself
        qf = np.ascontiguousarray(q.reshape(e.B, e.L, e.E), dtype=e.compute)
        kf = np.ascontiguousarray(k.reshape(e.Bk, e.S, e.E), dtype=e.compute)
        vf = np.ascontiguousarray(v.reshape(e.Bk, e.S, e.Ev), dtype=e.compute)
    kmask = kidx = None
    if masked:
        kmask = np.where(kpm.reshape(-1, e.S), 0.0, -np.inf)
        kidx = e.kidx
    if e.r_star > 0.0:            # auto: every head's radius above R* means exact
        j = e.S - 1                # one key per key/value head: a lower bound of max‖k‖
        if kmask is not None and not np.isfinite(kmask[:, j]).all():
            return None
        if stats is not None:
            qn, kn = np.sqrt(stats[0].max(axis=1)), np.sqrt(stats[1][:, j])
        else:
            qn = np.sqrt(np.einsum("bie,bie->b", qf, qf, dtype=np.float64) if e.L == 1 else
                         np.einsum("bie,bie->bi", qf, qf, dtype=np.float64).max(axis=1))
            kn = np.sqrt(np.einsum("be,be->b", kf[:, j], kf[:, j], dtype=np.float64))
        # (q already scaled on the main kernel's side: its rounding, <= u relative,
        # is inside the margin)
        r_low = (1.0 if dp is None else e.scale) * qn * kn[e.kvidx] * (1 - 1e-6)
        if not np.all(r_low > e.r_star):
            return None
    nthreads = resolve_workers(workers)
    team = torch_team() if tq is not None else None
    if dp is not None:       # the decoding kernel flags NaN/inf itself, at no extra
        # pass (a non-finite logit or value makes its head's output NaN), and checks
        # its outputs as it writes them
        # (with torch tensors, on torch's own threads: they spin between its operators)
        out, lse, ok = decode_run(dp, qf, kf, vf, e.scale,
                                  _NO_MASK if kmask is None else kmask, nthreads, team)
    else:
        plan = e.plans.get((masked, nthreads))
        if plan is None:
            plan = e.plans[masked, nthreads] = exact_plan(
                e.B, e.L, e.Bk, e.S, e.E, e.Ev, kvidx=e.kvidx, key_ranges=e.ranges,
                has_kmask=masked, kidx=kidx, bias=e.bias, bidx=e.bidx, workers=nthreads)
        hl = e.batch_shape[-1] if heads_last and len(e.batch_shape) == 2 else 0
        with np.errstate(all="ignore"):
            out, lse = exact_run(plan, qf, kf, vf, e.scale, kmask, team=team,
                                 prescaled=True, heads_last=hl, stats=stats)
        ok = _result_ok(out.transpose(0, 2, 1, 3) if hl else out, lse)   # (contiguous)
    if ok == 0:
        return None              # NaN/inf inputs or logits beyond float32: full pipeline
    if ok < 0 and _sees_some_key(e, kmask, kidx, lse):
        return None              # a row with keys lost them (underflow): full pipeline
    out = out.reshape(e.batch_shape + (e.L, e.Ev)).astype(dtype, copy=False)
    if tq is not None:
        out = _torch().from_numpy(out)     # q's dtype, contiguous; lse float64
        if tq is not True:                 # back to float16/bfloat16, as output_like
            out = out.to(tq)
        if return_lse:
            return out, _torch().from_numpy(lse.reshape(e.batch_shape + (e.L,)))
        return out
    if return_lse:
        return out, lse.reshape(e.batch_shape + (e.L,))
    return out


def _torch():
    """torch (imported: the inputs were tensors)."""
    global _TORCH
    if _TORCH is None:
        import torch
        _TORCH = torch
    return _TORCH


_TORCH = None


def _sees_some_key(e, kmask, kidx, lse):
    """Whether a row with lse = −inf has a visible key (then something underflowed)."""
    has_r = e.lo is not None
    return bool(_any_row_sees_a_key(
        lse.reshape(-1, e.L), e.lo if has_r else _NO_RANGE, e.hi if has_r else _NO_RANGE,
        has_r, e.S, _NO_MASK if kmask is None else kmask,
        kidx if kmask is not None else _NO_RANGE, kmask is not None))


_NO_RANGE = np.zeros(1, np.int64)


@njit(cache=True, nogil=True)
def _any_row_sees_a_key(lse, lo, hi, has_ranges, S, kmask, kidx, has_kmask):
    # (left padding makes rows that see no key: one pass, not a Python loop over them)
    for b in range(lse.shape[0]):
        for i in range(lse.shape[1]):
            if lse[b, i] != -np.inf:
                continue
            a = lo[i] if has_ranges else 0
            c = hi[i] if has_ranges else S
            if c <= a:
                continue
            if not has_kmask:
                return True
            m = kmask[kidx[b]]
            for j in range(a, c):
                if m[j] == 0.0:
                    return True
    return False
