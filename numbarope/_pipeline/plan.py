"""Per-head method choice: :class:`~numbarope.ops.HeadSpec` in, a frozen plan out.

For every head the planner knows the logit radius R, and from it (through
:func:`numbarope.exp_approximation`) the smallest polynomial degree g whose
certified relative error δ gives ``2δ/(1−δ) <= eps``. It then asks every
registered algorithm (:mod:`numbarope.ops`) that serves the head's structure for
its time, memory and floating-point allowance at that polynomial, and picks:

* ``method="exact"``: always exact;
* ``method="fast"``: the cheapest fast algorithm that meets ``eps``, or a
  :class:`~numbarope.FastPathError` (before any work) naming why none can;
* ``method="auto"``: the cheaper of exact and that, by predicted time
  (``_config.AUTO_MARGIN`` in favour of exact on near-ties).

Query heads of one key/value head may then share one polynomial and one key
side (:func:`share_key_sides`). The result is a :class:`Plan`: frozen, and
reusable for another call with the same shapes, structure, mask and options.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .. import _config, ops
from ..ops import FastPathError, Reason
from ..polynomial import _start_degree as _poly_start_degree
from ..polynomial import exp_approximation
from .report import HeadPlan

__all__ = ["plan_head", "plan_heads", "Plan", "RADIUS_GRID"]


#: Relative spacing of the grid the logit radius is rounded up to before a
#: polynomial is certified: the bound then holds on a slightly larger interval
#: [−R', R'] ⊇ [−R, R] (R' <= 1.02 R), and heads or calls with close radii share
#: one certification (10–50 ms each) through the cache.
RADIUS_GRID = 1.02

_FAILED = {}


def _grid_radius(radius):
    """Smallest point of the geometric grid RADIUS_GRID^k that is >= radius (0 stays 0)."""
    if radius <= 0.0:
        return 0.0
    k = np.ceil(np.log(radius) / np.log(RADIUS_GRID) - 1e-12)
    r = float(RADIUS_GRID ** k)
    return r if r >= radius else float(RADIUS_GRID ** (k + 1))


def _polynomial(radius, target, degree, approx, softcap=None):
    """Certified approximant on [−R', R'] (R' = grid radius) of exp, or of
    exp(c·tanh(x/c)) with ``softcap=c``, or (None, reason); cached."""
    r = _grid_radius(radius)
    key = (r, target, degree, approx, _config.MAX_DEGREE, softcap)
    if key in _FAILED:
        return None, _FAILED[key]
    if softcap is not None and approx != "chebyshev":
        _FAILED[key] = (f"softcap: only Chebyshev fits of exp(c·tanh(x/c)) are built "
                        f"(approx={approx!r}); pass approx='chebyshev'")
        return None, _FAILED[key]
    try:
        if degree is not None:
            return exp_approximation(r, degree=degree, kind=approx, softcap=softcap), None
        return exp_approximation(r, eps=target, kind=approx, softcap=softcap), None
    except ValueError as exc:
        why = (str(exc) if degree is not None else
               f"no {approx} polynomial of degree <= MAX_DEGREE={_config.MAX_DEGREE} "
               f"certifies eps at R={radius:.3g}")
        _FAILED[key] = why
        return None, why


@functools.lru_cache(maxsize=4096)
def _start_degree(radius, target, approx, softcap=None):
    """polynomial._start_degree, cached: radii are on the RADIUS_GRID, so calls hit."""
    return _poly_start_degree(radius, target, approx, softcap)


def _rounding_floor(g, top, target):
    """A lower bound of the float64 rounding term in the certificate of any degree-g
    polynomial p with relative error <= target on [-R, R] (``polynomial._horner_floor``:
    γ_2g·Σ|a_k|R^k·e^φ(R), and Σ|a_k|R^k >= p(R) >= (1 − target)·e^φ(R); φ(R) = ``top``,
    R itself or, soft-capped, c·tanh(R/c)): ``2g·2^-53·(1 − target)·e^(2φ(R))``."""
    return 2 * g * 2.0 ** -53 * (1.0 - target) * math.exp(min(2.0 * top, 700.0))


@functools.lru_cache(maxsize=64)
def _floor_radius(target, approx):
    """The radius beyond which no degree certifies ``target`` (exp, no soft-capping):
    there the rounding floor at the lowest degree that can approximate exp
    (``_start_degree``, a lower bound) exceeds it, and both grow with R."""
    def fails(r):
        return _rounding_floor(max(_poly_start_degree(r, target, approx), 1), r,
                               target) > target
    lo, hi = 0.0, 1.0
    while not fails(hi) and hi < 350.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fails(mid) else (mid, hi)
    return lo


def _no_polynomial(h, eps, target, approx, candidates, g):
    """Why no polynomial serves the head (a ``degree-limit`` detail), naming the limit
    that binds rather than only MAX_DEGREE: at head_dim E the feature limit caps the
    degree (C(E+g, g) features) long before MAX_DEGREE; and beyond a radius set by eps
    the float64 rounding of the polynomial, which grows like e^(2R), leaves no degree
    that certifies eps, so a higher MAX_DEGREE would not help. ``g``: a lower bound of
    the degree eps needs at this radius."""
    R, top = float(h.radius), _config.MAX_DEGREE
    cap = getattr(h, "softcap", None)
    phi = R if cap is None else cap * math.tanh(R / cap)
    parts = []
    g_feat = 0
    while g_feat < top and min(a.features(h.E, g_feat + 1)
                               for a in candidates) <= _config.MAX_FEATURES:
        g_feat += 1
    if g_feat < min(g, top):
        more = min(a.features(h.E, g_feat + 1) for a in candidates)
        parts.append(f"at head_dim {h.E} the feature limit allows degree <= {g_feat} only "
                     f"({more:.3g} features at degree {g_feat + 1} > MAX_FEATURES="
                     f"{_config.MAX_FEATURES:.3g}) and R={R:.3g} needs degree >= {g}")
    floor = _rounding_floor(max(g, 1), phi, target)
    if floor > target:
        every = ("" if cap is not None else
                 f" (so for every R > {_floor_radius(target, approx):.3g})")
        parts.append(f"no degree at all certifies eps={eps:g} at R={R:.3g}: the float64 "
                     f"rounding of a polynomial that follows exp on [-R, R] (degree >= "
                     f"{max(g, 1)}) enters its certificate as >= 2g·2^-53·e^(2R) = "
                     f"{floor:.1e}, above the relative error {target:.1e} that eps needs"
                     f"{every}; raising MAX_DEGREE={top} would not help")
    elif g > top:
        parts.append(f"degree >= {g} needed at R={R:.3g} > MAX_DEGREE={top}")
    else:
        text = (f"no {approx} polynomial of degree <= MAX_DEGREE={top} certifies "
                f"eps={eps:g} at R={R:.3g}")
        floor_top = _rounding_floor(top, phi, target)
        if floor_top > target:
            text += (f": near the float64 rounding floor (at degree {top} rounding alone "
                     f"enters the certificate as >= {floor_top:.1e} > {target:.1e}), so "
                     f"raising MAX_DEGREE would not help")
        parts.append(text)
    return "; ".join(parts)


def _screen(h, target, approx, candidates, t_exact, eps=None):
    """A :class:`Reason` to pick exact without certifying (auto only), or None.

    ``_start_degree`` is a lower bound of the degree the certification would find
    (rigorous for Taylor, verified over the tested range for Chebyshev), so if
    even that degree is beyond the limits or every candidate is slower than exact
    there, auto picks exact without spending 10–50 ms on a certification. The same
    when the float64 rounding floor at that degree already exceeds the target: no
    degree certifies it (so a head is not called "exact cheaper" where fast is
    impossible).
    """
    g = _start_degree(_grid_radius(h.radius), target, approx, h.softcap)
    if g > _config.MAX_DEGREE:
        return Reason("degree-limit", "fast infeasible: " + _no_polynomial(
            h, eps, target, approx, candidates, g))
    feats = min(a.features(h.E, g) for a in candidates)
    if feats > _config.MAX_FEATURES:
        return Reason("feature-limit", f"fast infeasible: degree >= {g} needs >= "
                                       f"{feats:.3g} features > MAX_FEATURES="
                                       f"{_config.MAX_FEATURES:.3g}")
    if h.softcap is None and _rounding_floor(max(g, 1), float(h.radius), target) > target:
        return Reason("degree-limit", "fast infeasible: " + _no_polynomial(
            h, eps, target, approx, candidates, g))
    t_fast = min(a.predict(h, g) for a in candidates)
    if t_fast >= t_exact:
        return Reason("exact-cheaper", f"exact {t_fast / t_exact:.1f}x cheaper than fast "
                                       f"even at degree >= {g} ({feats:.3g} features)")
    return None


def _evaluate(alg, h, approx_obj, eps, degree, method):
    """Bound, time, memory of one fast algorithm at this polynomial, and why it fails
    (a Reason) or None."""
    g = approx_obj.degree
    feats = alg.features(h.E, g)
    mem = alg.memory(h, g)
    delta = approx_obj.error_bound
    # the algorithm's floating-point allowance, plus the logits' error from the inputs'
    # preparation (rotation): each weight is then within a factor e^{±logit_error}
    rnd = alg.rounding(h, approx_obj.coef, delta) + math.expm1(min(h.logit_error, 700.0))
    dtot = delta + rnd
    bound = (2 * dtot / (1 - dtot) * h.vmax if dtot < 1 else np.inf) + h.out_rounding
    why = None
    if g > _config.MAX_DEGREE:
        why = Reason("degree-limit", f"degree {g} > MAX_DEGREE={_config.MAX_DEGREE}")
    elif feats > _config.MAX_FEATURES:
        why = Reason("feature-limit", f"degree {g} needs {feats:.3g} features > "
                                      f"MAX_FEATURES={_config.MAX_FEATURES:.3g}")
    elif _config.exceeds_memory(mem):
        why = Reason("memory-limit", f"needs {mem / 2**30:.2f} GiB > limit "
                                     f"{_config.memory_limit() / 2**30:.2f} GiB")
    elif h.vmax > 0 and bound > eps * h.vmax * (1 + 1e-12) and not (
            degree is not None and method == "fast"):    # an explicit degree is honoured
        if h.out_rounding > eps * h.vmax:
            why = Reason("output-rounding", f"the output dtype's rounding alone (u·max|V| = "
                                            f"{h.out_rounding:.2e}) exceeds eps·max|V| = "
                                            f"{eps * h.vmax:.2e}: pass float64 inputs, or a "
                                            f"larger eps")
        elif not dtot < 1 and rnd >= 1 and h.row_mass < 1:
            why = Reason("row-mass", f"the rounding allowance relative to the smallest row "
                                     f"mass (min_i Σ_j exp(b − max b) = {h.row_mass:.2e}) "
                                     f"exceeds 1: a bias spanning this many orders of "
                                     f"magnitude leaves the FFT no certified accuracy; use "
                                     f"method='exact' (or a Decay/Window structure)")
        else:
            why = Reason("misses-eps", f"degree {g} certifies {bound:.2e} > eps·max|V| = "
                                       f"{eps * h.vmax:.2e}")
    kind = ("certified (polynomial) + estimated FFT rounding"
            if alg.bound_kind == "estimated" else "certified")
    fields_ = dict(algorithm=alg.name, degree=g, features=feats, delta=delta,
                   time_fast=alg.predict(h, g), memory_fast=mem, rounding=rnd,
                   bound_kind=kind, coef=approx_obj.coef, error_bound=bound)
    return fields_, why


def _no_structure(h, algorithms):
    """The reason when no fast algorithm serves the head's structure: which do what."""
    if h.general:
        return [Reason("structure", "general relative matrices W_t: no registered fast "
                                    "algorithm serves them with this structure")]
    served = "; ".join(f"{a.name}: {', '.join(t.__name__ for t in a.structures)}"
                       for a in algorithms if a.structures and not a.general)
    return [Reason("structure", f"no fast algorithm serves a {h.structure.kind} structure "
                                f"({type(h.structure).__name__}); they serve {served}")]


def plan_head(h, *, method, eps, degree, approx, why_exact=None, backward=False):
    """Choose the method and algorithm of one head; returns a :class:`HeadPlan`.

    Parameters
    ----------
    h : numbarope.ops.HeadSpec
        The head (sizes, structure, radius, value range, row mass, dtype).
    method, eps, degree, approx
        As :func:`numbarope.rope_attention`.

    Every registered fast algorithm that can serve the head (by structure) is
    evaluated at the certified polynomial; the cheapest by predicted time that
    meets ``eps`` and the limits of ``_config`` is the fast candidate. ``"auto"``
    takes it when it is predicted ``AUTO_MARGIN`` times cheaper than exact.

    Raises
    ------
    ValueError
        With ``method="fast"``, when no algorithm can serve the head, no degree
        <= ``_config.MAX_DEGREE`` meets ``eps`` at this radius, or the memory
        needed exceeds the limit.
    """
    ex = ops.get("streaming")
    t_exact = ex.predict(h)
    common = dict(head=h.head, radius=float(h.radius), time_exact=t_exact,
                  memory_exact=ex.memory(h), radius_given=bool(h.radius_given),
                  precision=h.compute_dtype)

    def exact_only(reason, **fast_fields):
        return HeadPlan(**{**dict(degree=None, features=None, delta=None, time_fast=None,
                                  memory_fast=None), **fast_fields, **common,
                           "method": "exact", "algorithm": "streaming",
                           "error_bound": h.exact_bound, "reason": reason.text,
                           "code": reason.code})

    if h.n == 0 or h.S == 0 or h.Ev == 0:
        return exact_only(Reason("empty", "empty sequence (n = 0)" if h.n == 0 else
                                 "no keys (S = 0)" if h.S == 0 else "no value columns"))
    if t_exact == 0.0:
        return exact_only(Reason("no-visible-key", "no query sees a key (causal, "
                                                   "query_offset < -L + 1)"))
    if method == "exact":
        return exact_only(why_exact or Reason("exact-requested", "method='exact' requested"))
    candidates, refused = [], []
    for alg in ops.fast_algorithms():
        why = alg.unavailable(h)
        if backward and not why and not callable(getattr(alg, "backward", None)):
            why = [Reason("exact-for-gradients", f"the inputs require grad and {alg.name} "
                                                 f"has no backward yet")]
        elif backward and not why and getattr(h, "softcap", None) is not None:
            # the capped logit's derivative sech²(x/c) multiplies every dX_ij: not a
            # sum of feature products, so no fast backward computes it
            why = [Reason("exact-for-gradients", "the inputs require grad and the fast "
                                                 "backward does not differentiate a soft "
                                                 "cap (its sech² factor)")]
        (refused if why else candidates).append((alg, why))
    candidates = [a for a, _ in candidates]
    if not candidates:
        why = [w for _, ws in refused for w in ws if w.code != "structure"] or \
            _no_structure(h, [a for a, _ in refused])
        if method == "fast":
            raise FastPathError(f"method='fast' cannot serve head {h.head}: {why[0].text}; "
                                f"use method='exact' or 'auto'", why[0].code, h.head,
                                why[0].text)
        return exact_only(Reason(why[0].code, f"fast infeasible: {why[0].text}"))
    target = 0.9 * eps / (2.0 + eps)
    if method == "auto" and degree is None:
        screened = _screen(h, target, approx, candidates, t_exact, eps)
        if screened is not None:
            return exact_only(screened)
    # ---- polynomial, then every candidate at it
    approx_obj, why_text = _polynomial(h.radius, target, degree, approx, h.softcap)
    if approx_obj is None:
        if degree is None and not why_text.startswith("softcap"):
            # name the limit that binds (features, float64 rounding), not MAX_DEGREE only
            why_text = _no_polynomial(h, eps, target, approx, candidates, _start_degree(
                _grid_radius(h.radius), target, approx, h.softcap))
        why, fast_fields = Reason("degree-limit", why_text), {}
    else:
        results = [_evaluate(a, h, approx_obj, eps, degree, method) for a in candidates]
        ok = [r for r in results if r[1] is None]
        fast_fields, why = min(ok or results, key=lambda r: r[0]["time_fast"])
    shared = f"key side shared by {h.heads} query heads" if h.heads > 1 else ""
    if method == "fast":
        if why is not None:
            raise FastPathError(
                f"method='fast' cannot serve head {h.head}: R={h.radius:.4g}, eps={eps:g}: "
                f"{why.text}. Use method='exact' or 'auto', a larger eps, or smaller "
                f"logits (scale, or a tighter radius=).", why.code, h.head, why.text)
        return HeadPlan(**common, method="fast", **fast_fields,
                        reason="method='fast' requested" + (f" ({shared})" if shared else ""),
                        code="fast-requested", shared_heads=h.heads)
    # auto
    exact_fields = {k: v for k, v in fast_fields.items()
                    if k not in ("algorithm", "error_bound", "bound_kind", "rounding")}
    if why is not None:
        return exact_only(Reason(why.code, f"fast infeasible: {why.text}"), **exact_fields)
    t_fast, t_ex, both = fast_fields["time_fast"], t_exact, ""
    if backward:            # forward + backward (_config.EXACT/FAST_BACKWARD_FACTOR)
        t_ex = t_exact * _config.EXACT_BACKWARD_FACTOR
        factor = getattr(ops.get(fast_fields["algorithm"]), "backward_factor",
                         _config.FAST_BACKWARD_FACTOR)
        t_fast = t_fast * (1 + factor * (h.E * h.Ev + h.E + h.Ev) / (h.Ev + 1))
        both = " forward+backward"
    if t_fast * _config.AUTO_MARGIN < t_ex:
        return HeadPlan(**common, method="fast", **fast_fields, code="fast-cheaper",
                        shared_heads=h.heads,
                        reason=f"fast{both} {t_ex / t_fast:.1f}x cheaper (degree "
                               f"{fast_fields['degree']}, bound {fast_fields['error_bound']:.1e}"
                               + (f", {shared})" if shared else ")"))
    text = (f"exact{both} {t_fast / t_ex:.1f}x cheaper than fast" if t_fast >= t_ex else
            f"fast{both} predicted only {t_ex / t_fast:.2f}x cheaper, below AUTO_MARGIN="
            f"{_config.AUTO_MARGIN:g} (near-ties go to exact)")
    return exact_only(Reason("exact-cheaper", f"{text} (degree {fast_fields['degree']}, "
                                              f"{fast_fields['features']} features)"),
                      **exact_fields)



def _fast_candidates_equal(heads, members):
    c, a = heads[members[0]].coef, heads[members[0]].algorithm
    return [b for b in members if np.array_equal(heads[b].coef, c) and heads[b].algorithm == a]


def _share_key_side(heads, specs, members, opts):
    """Re-plan a group of query heads on one key/value head with one polynomial (that of
    the group's largest radius, valid for all since the radii are upper bounds) and the
    key side computed once; kept when every head is then fast, on one algorithm, and
    the group's predicted time drops."""
    Rg = max(specs[b].radius for b in members)
    trial = []
    try:
        for b in members:
            trial.append(plan_head(replace(specs[b], radius=Rg,
                                           radius1=max(specs[b].radius1, Rg),
                                           heads=len(members)), **opts))
    except ValueError:       # method="fast" with a bound a smaller head cannot meet
        return False
    if any(h.method != "fast" for h in trial) or len({h.algorithm for h in trial}) > 1:
        return False
    before = sum(h.time_fast if h.method == "fast" else h.time_exact
                 for h in (heads[b] for b in members))
    if sum(h.time_fast for h in trial) >= before:
        return False
    for b, h in zip(members, trial):
        heads[b] = h
    return True


def share_key_sides(heads, specs, groups, opts):
    """Let the fast query heads of each group (query heads on one key/value head with
    the same key mask and bias: the same keys, values and Toeplitz weights) share one
    polynomial and one key side where that is predicted cheaper; in place."""
    if opts["method"] == "exact":
        return
    for members in groups:
        if not any(heads[b].method == "fast" for b in members):
            continue
        if not _share_key_side(heads, specs, members, opts):
            # heads of equal degree still share (one polynomial: their largest radius)
            by_degree = {}
            for b in members:
                if heads[b].method == "fast":
                    by_degree.setdefault(heads[b].degree, []).append(b)
            for sub in by_degree.values():
                if len(sub) > 1:
                    _share_key_side(heads, specs, sub, opts)


def fast_batches(heads, groups):
    """Fast heads in batches that share one key side: a batch is one head, or query heads
    of one key/value head planned with one polynomial and one algorithm."""
    done, batches = set(), []
    for g in groups:
        fast = [b for b in g if heads[b].method == "fast"]
        while fast:
            same = _fast_candidates_equal(heads, fast)
            if len(same) > 1:
                batches.append(tuple(same))
                done.update(same)
            fast = [b for b in fast if b not in same]
    batches += [(b,) for b, h in enumerate(heads) if h.method == "fast" and b not in done]
    return tuple(batches)


@dataclass(frozen=True)
class Plan:
    """What a call runs: per head its :class:`HeadPlan`, and the fast batches.

    ``heads``: one HeadPlan per flattened head (C order of the batch dims);
    ``batches``: tuples of flattened head indices whose fast key side is computed
    once (one head, or the query heads of one key/value head on one polynomial);
    ``exact``: the flattened indices of the exact heads; ``compute_dtype``: the
    exact path's precision. Frozen: a call's verification goes to its report.
    """

    heads: tuple
    batches: tuple
    exact: tuple
    compute_dtype: str

    @property
    def methods(self):
        return tuple(h.method for h in self.heads)


def plan_heads(specs, groups, *, method, eps, degree, approx, compute_dtype,
               why_exact=None, backward=False):
    """A :class:`Plan` for the head specs of one call.

    Parameters
    ----------
    specs : sequence of numbarope.ops.HeadSpec
        One per flattened head.
    groups : sequence of sequences of int
        Query heads that may share one key side (same key/value head, key mask and
        bias; separable logits).
    method, eps, degree, approx
        As :func:`numbarope.rope_attention`.
    compute_dtype : str
        The exact path's precision.
    why_exact : Reason, optional
        The reason given to heads computed exactly because ``method="exact"``.
    backward : bool, optional
        The inputs require grad: only algorithms with a ``backward`` may serve a head
        fast (the others' heads are exact, code ``exact-for-gradients``).
    """
    opts = dict(method=method, eps=eps, degree=degree, approx=approx, backward=backward)
    heads = [plan_head(h, **opts, why_exact=why_exact) for h in specs]
    share_key_sides(heads, specs, groups, opts)
    return Plan(heads=tuple(heads), batches=fast_batches(heads, groups),
                exact=tuple(b for b, h in enumerate(heads) if h.method == "exact"),
                compute_dtype=compute_dtype)
