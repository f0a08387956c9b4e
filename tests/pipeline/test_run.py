"""numbarope._pipeline.run and the call around it (``numbarope._pipeline.attend``):
a plan is run as planned; ``verify=`` checks rows of fast heads against a dense
reference and writes what it finds into the report (new HeadPlans), never into the
plan; the warnings a call gives before it starts (predicted to take hours; an
explicit degree that certifies nothing) and after verifying (an error above the
bound names its cause). (Origins: new-user findings; field reports, issue 7.)"""

import warnings

import numpy as np
import pytest

import numbarope as nr
import numbarope._pipeline as pipeline
from numbarope._pipeline import plan_problem
from numbarope._pipeline.inputs import make_problem
from numbarope._pipeline.run import run_plan, verify_rows


def _qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


def test_run_plan_runs_the_plan_and_verify_writes_only_the_report():
    q, k, v = _qkv()
    p, _ = make_problem(q, k, v, rotary=True, is_causal=True)
    facts, plan = plan_problem(p, method="fast", eps=1e-3, degree=None, approx="chebyshev")
    assert plan.methods == ("fast", "fast") and plan.exact == ()
    out, lse = run_plan(p, facts, plan)
    assert out.shape == (2, 64, 8) and lse.shape == (2, 64)
    heads = verify_rows(p, plan, out, 8)
    assert all(h.observed_error is None for h in plan.heads)      # the plan unchanged
    assert all(0 < h.observed_error <= h.error_bound for h in heads)
    assert [h.method for h in heads] == list(plan.methods)
    assert verify_rows(p, plan, out, 0) == plan.heads
    ref = nr.rope_attention(q, k, v, rotary=True, is_causal=True, method="exact")
    assert np.abs(out.reshape(ref.shape) - ref).max() <= max(h.error_bound for h in heads)


def _hidden_large_logit(n=500, E=4):
    """Small logits everywhere but one pair (row 1, key 1) that the radius floor's
    sample (evenly spaced rows and keys, the largest norms, the diagonal of the
    sampled rows) does not hold: s·q₁ᵀk₁ = 8, every other |logit| < 0.5."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((n, E)) * 0.05
    k = rng.standard_normal((n, E)) * 0.05
    q[:, 0] = k[:, 0] = 0.0
    q[0, 1] = k[0, 2] = 5.0                 # the largest norms, orthogonal to e₀
    q[1] = k[1] = 0.0
    q[1, 0] = k[1, 0] = 4.0                 # s = 1/2: the logit 8
    v = rng.standard_normal((n, 2))
    return q, k, v


def test_radius_too_small_warns_when_verify_sees_it():
    """New-user findings. A radius below a logit the floor samples is refused
    (tests/pipeline/test_heads.py); one below a logit it misses is caught by verify=."""
    q, k, v = _qkv(s=2.0)
    with pytest.raises(ValueError, match="below a logit"):
        nr.rope_attention(q, k, v, rotary=True, method="fast", radius=0.01, verify=8)
    q, k, v = _hidden_large_logit()
    with pytest.warns(RuntimeWarning, match="radius"):
        nr.rope_attention(q, k, v, method="fast", radius=0.5, verify=500)


def test_verify_warning_names_the_real_cause():
    """Field reports (issue 7), huge finite bias: a radius given too small is named as
    the cause; the reported input (no radius given) gives no warning."""
    rng = np.random.default_rng(10)
    q = rng.standard_normal((6, 4)) * 0.5
    k = rng.standard_normal((6, 4)) * 0.5
    v = rng.standard_normal((6, 2))
    # a radius given too small: the warning names the given radius
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        nr.rope_attention(*_hidden_large_logit(), method="fast", radius=0.5, eps=1e-3,
                          verify=500)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert msgs and "radius=0.5 given for this head" in msgs[0]
    # no radius given: no warning on the reported input (the exact path is right now)
    bias = np.full(11, np.finfo(np.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, info = nr.rope_attention(q, k, v, bias=bias, method="fast", verify=6,
                                      return_info=True)
    assert info.observed_error[()] <= info.error_bound[()]


def test_explicit_degree_that_certifies_nothing_warns():
    """New-user findings, second round."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 256, 4)) * 3 for _ in range(3))
    with pytest.warns(RuntimeWarning, match=r"degree=20 certifies no accuracy"):
        nr.rope_attention(q, k, v, rotary=True, method="fast", degree=20)


def test_a_call_predicted_to_take_hours_warns_before_starting(monkeypatch):
    """New-user findings, second round."""
    monkeypatch.setattr(pipeline, "LONG_CALL_SECONDS", 1e-9)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="predicted to take"):
        nr.rope_attention(q, k, v)
