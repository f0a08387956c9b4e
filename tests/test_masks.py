"""Masks and huge biases in ``bias=``: −inf entries mask, a boolean bias is a mask
(True = take part, as torch SDPA's ``attn_mask``), any finite bias magnitude is
served exactly (masks written as a huge negative number included), and rows that see
no key at all give 0 on every method and path. Against tests/naive.py.
(Origins: field reports, issue 7 — huge finite biases, boolean masks; the
robustness suite.)"""

import numpy as np
import pytest

import naive
import numbarope
from numbarope import Rotary, rope_attention
from numbarope.rotary import rotary_relative_matrices

N, E, EV = 6, 4, 3


def _qkv(seed=0, batch=(2,), n=N, e=E, ev=EV, dtype=np.float64, amp=0.3):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    k = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    v = rng.standard_normal(batch + (n, ev)).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------- -inf masks
def test_bias_minus_inf_is_a_mask():
    q, k, v = _qkv(batch=())
    b = np.zeros(2 * N - 1)
    b[N - 1 + 2] = -np.inf          # t = i - j = 2 masked
    out = rope_attention(q, k, v, bias=b, method="exact")
    ref = naive.attention(q, k, v, bias=lambda t: b[t + N - 1])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- boolean masks
def test_boolean_bias_is_a_mask_as_reported():
    t = np.arange(-5, 6)
    keep = (t >= 0) & (t <= 1)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((6, 4)) * 0.5 for _ in range(3))
    masked = rope_attention(q, k, v, bias=np.where(keep, 0.0, -np.inf), method="exact")
    for method in ("exact", "auto"):
        out = rope_attention(q, k, v, bias=keep, method=method)
        np.testing.assert_allclose(out, masked, atol=1e-14)
    ref = naive.attention(q, k, v, bias=lambda tt: 0.0 if keep[tt + 5] else -np.inf)
    np.testing.assert_allclose(masked, ref, atol=1e-14)


def test_boolean_bias_batched_and_through_plan():
    rng = np.random.default_rng(4)
    n = 7
    q, k, v = (rng.standard_normal((3, n, 4)) * 0.3 for _ in range(3))
    keep = rng.random((3, 2 * n - 1)) < 0.6
    keep[:, n - 1] = True
    out = rope_attention(q, k, v, bias=keep, method="exact")
    ref = rope_attention(q, k, v, bias=np.where(keep, 0.0, -np.inf), method="exact")
    np.testing.assert_array_equal(out, ref)
    info = numbarope.plan(q, k, v, bias=keep)
    assert info.batch_shape == (3,)


# ---------------------------------------------------------------- huge finite bias
def _report_inputs():
    rng = np.random.default_rng(10)
    q = rng.standard_normal((6, 4)) * 0.5
    k = rng.standard_normal((6, 4)) * 0.5
    v = rng.standard_normal((6, 2))
    return q, k, v


def test_constant_finfo_min_bias_cancels_as_reported():
    q, k, v = _report_inputs()
    bias = np.full(11, np.finfo(np.float32).min)
    plain = rope_attention(q, k, v, method="exact")
    np.testing.assert_allclose(plain[0], [-0.213399, -0.530448], atol=5e-7)
    for method in ("exact", "auto"):
        out = rope_attention(q, k, v, bias=bias, method=method)
        np.testing.assert_allclose(out[0], [-0.213399, -0.530448], atol=5e-7)
        np.testing.assert_allclose(out, plain, atol=1e-14)
    fast, fi = rope_attention(q, k, v, bias=bias, method="fast", return_info=True)
    ex, ei = rope_attention(q, k, v, bias=bias, method="exact", return_info=True)
    assert np.abs(fast - ex).max() <= fi.error_bound[()] + ei.error_bound[()]


@pytest.mark.parametrize("magnitude", [1e3, 1e10, 1e30, float(np.finfo(np.float32).max),
                                       1e300])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_any_finite_bias_magnitude_is_exact(magnitude, dtype, causal):
    """A random bias plus a huge constant, and masks written as -magnitude: exact,
    fast and the long-double reference agree within their bounds."""
    rng = np.random.default_rng(1)
    n = 9
    q, k, v = (rng.standard_normal((n, 4)) * 0.4 for _ in range(3))
    b = rng.standard_normal(2 * n - 1)
    b[rng.random(2 * n - 1) < 0.3] = -np.inf
    b[n - 1] = 0.0                                   # every row sees its own key
    huge = np.where(np.isfinite(b), b - magnitude, -magnitude * 2)   # masks as finite
    huge = np.maximum(huge, -1.7e308)
    # the value of the formula for the bias given (b is partly absorbed by -magnitude)
    ref = naive.attention_longdouble(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                     bias=huge, causal=causal).astype(np.float64)
    if magnitude <= 1e3:        # the small part of the bias survives: masks act as -inf
        ref_b = naive.attention_longdouble(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                           bias=b, causal=causal).astype(np.float64)
        np.testing.assert_allclose(ref, ref_b, atol=1e-12)
    qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
    for method in ("exact", "fast"):
        out, info = rope_attention(qd, kd, vd, bias=huge, is_causal=causal, method=method,
                                   eps=1e-3, return_info=True)
        err = np.abs(out.astype(np.float64) - ref).max()
        # masks written as -2·magnitude are below the visible ones by `magnitude`:
        # they contribute e^{-magnitude} (0 for magnitude >= 1e3)
        assert err <= float(info.error_bound), (method, err, info.error_bound)


# ---------------------------------------------------------------- rows that see no key
def _mask_cases():
    allmask = np.full(2 * N - 1, -np.inf)
    diag = np.zeros(2 * N - 1)
    diag[N - 1] = -np.inf               # t = 0 masked: with causal, row 0 sees nothing
    past = np.where(np.arange(-(N - 1), N) > 2, 0.0, -np.inf)   # only t > 2: rows 0..2 empty
    return [("all -inf", allmask, False, list(range(N))),
            ("causal + diag", diag, True, [0]),
            ("t > 2 only", past, False, [0, 1, 2]),
            ("t > 2 causal", past, True, [0, 1, 2])]


@pytest.mark.parametrize("general", [False, True], ids=["separable", "relative"])
@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("case", _mask_cases(), ids=[c[0] for c in _mask_cases()])
def test_fully_masked_rows_are_zero(case, method, general):
    _, b, causal, empty_rows = case
    q, k, v = _qkv(seed=11)
    kw = dict(bias=b, is_causal=causal)
    if general:
        kw["relative"] = rotary_relative_matrices(N, None, E)
    else:
        kw["rotary"] = Rotary()
    out, info = rope_attention(q, k, v, method=method, return_info=True, **kw)
    assert np.all(np.isfinite(out))
    assert np.all(out[:, empty_rows] == 0.0)
    ref = np.stack([naive.rope_attention(q[h], k[h], v[h], bias=lambda t: b[t + N - 1],
                                         causal=causal) for h in range(2)])
    bound = np.asarray(info.error_bound, dtype=np.float64).max()
    assert np.abs(out - ref).max() <= bound + 1e-12
