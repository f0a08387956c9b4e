"""One call, in the order the data flows: inputs → heads → plan → run → report.

* :mod:`.inputs`: arrays and options in, a frozen :class:`~.inputs.Problem` out
  (:func:`~.inputs.check_shapes` is the shape-only validator every front end calls);
* :mod:`.heads`: per-head facts, one :class:`~numbarope.ops.HeadSpec` per head;
* :mod:`.plan`: HeadSpecs to a frozen :class:`~.plan.Plan` through the registry;
* :mod:`.run`: the plan run through :mod:`numbarope.ops`, ``verify=`` into the report;
* :mod:`.report`: :class:`~.report.HeadPlan`, :class:`~.report.AttentionInfo`.

:func:`plan_problem` and :func:`attend` chain them; the public API
(:mod:`numbarope.api`) and the backends call these, never each other.
"""

from __future__ import annotations

import warnings

import numpy as np

from .._runtime.interop import output_like, requires_grad
from .fastlane import try_fast_exact
from .grad import attention_with_grad
from .heads import Heads, head_facts
from .inputs import Problem, check_shapes, make_problem
from .plan import Plan, plan_heads
from .report import AttentionInfo, HeadPlan
from .run import run_plan, verify_rows

__all__ = ["Problem", "Heads", "Plan", "HeadPlan", "AttentionInfo", "check_shapes",
           "make_problem", "head_facts", "plan_heads", "run_plan", "verify_rows",
           "plan_problem", "attend", "attention", "LONG_CALL_SECONDS"]

#: Predicted seconds of a call above which rope_attention warns before starting.
LONG_CALL_SECONDS = 3600.0


def plan_problem(p, *, method, eps, degree, approx, radius=None, grad=False):
    """``(Heads, Plan)`` of a problem: per-head facts, then the registry's choice
    (``grad``: the inputs require grad, so only algorithms with a backward — the exact
    path, gemm, prefix — may serve a head)."""
    facts = head_facts(p, radius, fast=method != "exact")
    plan = plan_heads(facts.specs, facts.groups, method=method, eps=eps, degree=degree,
                      approx=approx, compute_dtype=facts.compute_dtype.name, backward=grad)
    return facts, plan


def _warn_long(heads, stacklevel):
    """Warn before a call the cost model predicts to take over LONG_CALL_SECONDS."""
    total = sum(h.time_fast if h.method == "fast" else h.time_exact for h in heads)
    if total > LONG_CALL_SECONDS:
        h = max(heads, key=lambda h: h.time_exact if h.method == "exact" else h.time_fast)
        warnings.warn(
            f"this call is predicted to take {total / 3600:.3g} hours on this machine "
            f"({len(heads)} heads; head {h.head}: {h.method}, {h.reason}); interrupt with "
            f"Ctrl-C, or check numbarope.plan(...) first", RuntimeWarning,
            stacklevel=stacklevel)


def attend(p, *, method, eps, degree, approx, radius=None, verify=0, workers=None,
           stacklevel=3, grad=False):
    """Plan and run one problem: ``(out (B, L, Ev) float64, lse (B, L), AttentionInfo)``."""
    facts, plan = plan_problem(p, method=method, eps=eps, degree=degree, approx=approx,
                               radius=radius, grad=grad)
    _warn_long(plan.heads, stacklevel + 1)
    for h in plan.heads:
        if h.method == "fast" and not np.isfinite(h.error_bound):
            warnings.warn(
                f"head {h.head}: degree={h.degree} certifies no accuracy at logit radius "
                f"R={h.radius:.3g} (error_bound=inf): the output may lie far outside the "
                f"range of value; use method='exact' or 'auto', or omit degree=",
                RuntimeWarning, stacklevel=stacklevel + 1)
    out, lse = run_plan(p, facts, plan, workers)
    heads = verify_rows(p, plan, out, verify, stacklevel=stacklevel + 1)
    return out, lse, AttentionInfo(list(heads), p.batch_shape, eps)


def attention(query, key, value, *, method, eps, degree=None, approx="chebyshev",
              radius=None, verify=0, workers=None, return_lse=False, return_info=False,
              stacklevel=3, heads_last=False, **arrays):
    """:func:`numbarope.rope_attention` after its options were checked: the arrays (and
    their options, ``arrays``: rotary, relative, bias, is_causal, scale, precision,
    enable_gqa, query_offset, causal_alignment, key_padding_mask, positions) through
    the pipeline, the result packaged as the inputs came (numpy, or torch of torch's
    promoted dtype). What the API and every backend call. Calls the fast lane serves
    (:mod:`.fastlane`: exact, with what was derived for their shapes reused) skip
    the per-call planning (``heads_last``: the lane may return its result as the
    transposed view of a (B, L, H, Ev) array, for the transformers backend)."""
    if requires_grad(query, key, value, arrays.get("relative"), arrays.get("bias")):
        return attention_with_grad(query, key, value, method=method, eps=eps, degree=degree,
                                   approx=approx, radius=radius, verify=verify,
                                   workers=workers, return_lse=return_lse,
                                   return_info=return_info, attend=attend,
                                   stacklevel=stacklevel + 1, **arrays)
    if not (return_info or verify or degree is not None or radius is not None):
        res = try_fast_exact(query, key, value, method=method, eps=eps, approx=approx,
                             workers=workers, return_lse=return_lse,
                             heads_last=heads_last, **arrays)
        if res is not None:
            return res
    p, out_torch = make_problem(query, key, value, **arrays)
    out, lse, info = attend(p, method=method, eps=eps, degree=degree, approx=approx,
                            radius=radius, verify=verify, workers=workers,
                            stacklevel=stacklevel + 1)
    out = out.reshape(p.batch_shape + (p.n, p.Ev)).astype(p.dtype, copy=False)
    out = output_like(out, (out_torch,))
    res = (out,)
    if return_lse:
        res += (output_like(lse.reshape(p.batch_shape + (p.n,)),
                            ("float64",) if out_torch is not None else ()),)
    if return_info:
        res += (info,)
    return res[0] if len(res) == 1 else res
