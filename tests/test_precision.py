"""Dtypes, precision and range, end to end: the output dtype (one promotion rule),
the compute precision (``precision=``; float32 upgraded to float64 where the logits
would overflow it, or refused when float32 was asked for), the float32 output
rounding in the bound, and values and logits near the ends of a dtype's range.
(Origins: new-user findings, two rounds; field reports, issue 7; the robustness
suite.)"""

import warnings

import numpy as np
import pytest

import numbarope as nr
from numbarope import rope_attention
from numbarope.rotary import rotary_relative_matrices

N, E, EV = 6, 4, 3


def _qkv(seed=0, batch=(2,), n=N, e=E, ev=EV, dtype=np.float64, amp=0.3):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    k = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    v = rng.standard_normal(batch + (n, ev)).astype(dtype)
    return q, k, v


def _nu_qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


# ---------------------------------------------------------------- the output dtype
@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("dq, dk, dv, expect", [
    (np.float32, np.float32, np.float32, np.float32),
    (np.float64, np.float64, np.float64, np.float64),
    (np.float32, np.float64, np.float32, np.float64),
    (np.float32, np.float32, np.float64, np.float64),
    (np.float64, np.float32, np.float32, np.float64),
])
def test_output_dtype(dq, dk, dv, expect, method):
    q, k, v = _qkv(seed=23)
    q, k, v = q.astype(dq), k.astype(dk), v.astype(dv)
    for kw in ({}, dict(rotary=True), dict(bias=np.zeros(2 * N - 1, np.float32)),
               dict(relative=rotary_relative_matrices(N, None, E).astype(np.float32))):
        out = rope_attention(q, k, v, method=method, **kw)
        assert out.dtype == expect, kw
        ref = rope_attention(q.astype(np.float64), k.astype(np.float64),
                             v.astype(np.float64), method="exact", **kw)
        tol = 1e-5 if expect == np.float32 else 1e-12
        assert np.abs(out - ref).max() <= tol + (1e-3 if method == "fast" else 0)


# ---------------------------------------------------------------- compute precision
def test_precision_option():
    """Field reports (issue 7), exact error bound."""
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 50, 8)).astype(np.float32) for _ in range(3))
    o32, i32 = rope_attention(q, k, v, method="exact", return_info=True)
    o64, i64 = rope_attention(q, k, v, method="exact", precision="float64", return_info=True)
    assert o32.dtype == o64.dtype == np.float32
    assert set(i32.precision.ravel()) == {"float32"} and set(i64.precision.ravel()) == {"float64"}
    assert np.all(i64.error_bound < i32.error_bound)
    assert np.abs(o32.astype(np.float64) - o64).max() <= i32.error_bound.max() + i64.error_bound.max()
    with pytest.raises(ValueError, match="precision='float16' is unknown"):
        rope_attention(q, k, v, precision="float16")


def test_float32_exact_reports_output_rounding():
    """New-user findings."""
    q, k, v = (a.astype(np.float32) for a in _nu_qkv())
    out, info = nr.rope_attention(q, k, v, rotary=True, method="exact", return_info=True)
    ref = nr.rope_attention(*(a.astype(np.float64) for a in (q, k, v)), rotary=True,
                            method="exact")
    assert (info.error_bound > 0).all()
    assert np.abs(out - ref).max() <= info.error_bound.max()


def test_logits_beyond_float32_use_float64_or_are_refused():
    """New-user findings, second round."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 32, 8)) for _ in range(3))
    q32, k32, v32 = ((q * 1e20).astype(np.float32), (k * 1e20).astype(np.float32),
                     v.astype(np.float32))
    out, info = rope_attention(q32, k32, v32, rotary=True, return_info=True)
    assert list(info.precision) == ["float64"] and np.abs(out).max() > 0.1
    ref = rope_attention(q32, k32, v32, rotary=True, precision="float64")
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match=r"precision='float32' cannot hold these logits"):
        rope_attention(q32, k32, v32, rotary=True, precision="float32")
    with pytest.raises(ValueError, match=r"overflow float64"):
        rope_attention(q * 1e150, k * 1e160, v, rotary=True)


# ---------------------------------------------------------------- near the ends of the range
def test_huge_values_do_not_overflow():
    """New-user findings."""
    q = np.zeros((1, 9, 4))
    for vmax in (1e308, np.finfo(np.float64).max):
        v = np.full((1, 9, 3), vmax)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for method in ("exact", "fast"):
                out = nr.rope_attention(q, q, v, method=method)
                np.testing.assert_allclose(out, vmax, rtol=1e-12)


def test_float32_values_near_the_maximum_stay_finite():
    """New-user findings, second round."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 32, 8)) for _ in range(3))
    vb = (v / np.abs(v).max() * 3e38).astype(np.float32)
    out, info = rope_attention((q * 0.3).astype(np.float32), (k * 0.3).astype(np.float32),
                               vb, rotary=True, return_info=True)
    ref = rope_attention(q * 0.3, k * 0.3, vb.astype(np.float64), rotary=True,
                         method="exact", precision="float64")
    assert np.isfinite(out).all()
    assert np.abs(out.astype(np.float64) - ref).max() <= info.error_bound.max()


def test_squares_overflowing_the_input_dtype_are_not_an_overflow():
    # ‖q‖² overflows float32 although the logits (~1e20) are finite in float32
    """New-user findings, second round."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 64, 8)) for _ in range(3))
    qq = (q * 1e19).astype(np.float32)
    out = nr.rope_attention(qq, k.astype(np.float32), v.astype(np.float32))
    ref = nr.rope_attention(qq.astype(np.float64), k, v)
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 1e-4
    big = nr.rope_attention(q * 1e160, k, v, method="exact")     # logits ~1e160: finite
    assert np.isfinite(big).all()
