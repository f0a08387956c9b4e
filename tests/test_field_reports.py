"""Field reports (issue 7): huge finite biases, boolean masks, the exact path's error
bound (the subnormal weights and the exp kernel: tests/ops/test_streaming.py and
tests/ops/test_exp.py). Each quoted case is a test with its right value,
and each kind is covered beyond the quoted input."""

import warnings

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention

import naive


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


def test_verify_warning_names_the_real_cause():
    q, k, v = _report_inputs()
    # a radius given too small: the warning names the given radius
    big = q * 20
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            rope_attention(big, k * 20, v, method="fast", radius=0.05, eps=1e-3, verify=6)
        except ValueError:
            pytest.skip("fast refused")
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert msgs and "radius=0.05 given for this head" in msgs[0]
    # no radius given: no warning on the reported input (the exact path is right now)
    bias = np.full(11, np.finfo(np.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, info = rope_attention(q, k, v, bias=bias, method="fast", verify=6,
                                   return_info=True)
    assert info.observed_error[()] <= info.error_bound[()]


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


def test_integer_bias_advice_does_not_change_meaning():
    q, k, v = _report_inputs()
    with pytest.raises(TypeError, match=r"bias is added to the logits.*np\.where"):
        rope_attention(q, k, v, bias=np.zeros(11, np.int64))


# ---------------------------------------------------------------- exact error bound
@pytest.mark.parametrize("setting", ["plain", "rotary", "causal", "bias", "relative"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_bound_holds_against_long_double(setting, dtype):
    rng = np.random.default_rng(7)
    n, E = 37, 8
    worst = 0.0
    for amp in (0.3, 1.5, 4.0):
        q, k, v = (rng.standard_normal((n, E)) * amp for _ in range(3))
        kw, rkw = {}, {}
        if setting == "rotary":
            q = numbarope.apply_rotary(q, numbarope.Rotary())
            k = numbarope.apply_rotary(k, numbarope.Rotary())
        elif setting == "causal":
            kw, rkw = dict(is_causal=True), dict(causal=True)
        elif setting == "bias":
            b = rng.standard_normal(2 * n - 1) * 3
            kw, rkw = dict(bias=b), dict(bias=b)
        qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
        ref_q, ref_k = qd.astype(np.float64), kd.astype(np.float64)
        if setting == "relative":
            W = rng.standard_normal((2 * n - 1, E, E)) / np.sqrt(E)
            kw = dict(relative=W.astype(dtype))
            # reference: logits q W_t k computed in long double
            ld = np.longdouble
            j = np.arange(n)
            out_ref = np.zeros((n, E))
            for i in range(n):
                Wi = W.astype(dtype).astype(ld)[i - j + n - 1]
                lg = np.einsum("e,jef,jf->j", ref_q[i].astype(ld), Wi,
                               ref_k.astype(ld)) / np.sqrt(ld(E))
                w = np.exp(lg - lg.max())
                out_ref[i] = (w @ vd.astype(ld)) / w.sum()
        else:
            out_ref = naive.attention_longdouble(ref_q, ref_k, vd, **rkw).astype(np.float64)
        out, info = rope_attention(qd, kd, vd, method="exact", return_info=True, **kw)
        err = np.abs(out.astype(np.float64) - out_ref).max()
        bound = float(info.error_bound)
        assert 0 < bound and err <= bound, (amp, err, bound)
        worst = max(worst, err / bound)
    assert worst > 1e-4       # the bound is not vacuous by orders of magnitude


def test_exact_bound_reported_for_float64_readme_example():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 256, 16)) * 0.4
    k = rng.standard_normal((2, 256, 16)) * 0.4
    v = rng.standard_normal((2, 256, 16))
    out, info = rope_attention(q, k, v, rotary=True, method="exact", return_info=True)
    assert np.all(info.error_bound > 0) and np.all(info.error_bound < 1e-11)


def test_precision_option():
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


@pytest.mark.parametrize("workers", [1, 2, -1, None])
def test_workers_give_identical_exact_results(workers):
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((3, 300, 8)) for _ in range(3))
    ref = rope_attention(q, k, v, method="exact", workers=1, is_causal=True)
    out = rope_attention(q, k, v, method="exact", workers=workers, is_causal=True)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("bad, exc, pat", [(0, ValueError, "workers=0"),
                                           (-1000, ValueError, "workers=-1000"),
                                           (1.5, TypeError, "workers must be an int")])
def test_bad_workers_refused(bad, exc, pat):
    q = np.zeros((4, 2))
    with pytest.raises(exc, match=pat):
        rope_attention(q, q, q, workers=bad)


def test_boolean_bias_through_the_cli(tmp_path):
    from numbarope.cli import main
    t = np.arange(-5, 6)
    keep = (t >= 0) & (t <= 1)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((6, 4)) * 0.5 for _ in range(3))
    np.savez(tmp_path / "in.npz", query=q, key=k, value=v, bias=keep)
    assert main(["run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"),
                 "--method", "exact", "--no-rotary", "-q"]) in (0, None)
    with np.load(tmp_path / "out.npz") as d:
        out = d["out"]
    ref = naive.attention(q, k, v, bias=lambda tt: 0.0 if keep[tt + 5] else -np.inf)
    np.testing.assert_allclose(out, ref, atol=1e-14)


def test_ctrl_c_stops_the_call_and_frees_the_threads():
    """SIGINT during a long exact call: KeyboardInterrupt comes back once the running
    chunks finish, no kernel keeps running, and the next call works (it used to hang)."""
    import subprocess
    import sys
    code = r"""
import os, signal, threading, time
import numpy as np, numbarope
q = np.random.default_rng(0).standard_normal((1, 200000, 16)).astype(np.float32)
numbarope.rope_attention(q[:, :256], q[:, :256], q[:, :256], method="exact")   # compile
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    numbarope.rope_attention(q, q, q, method="exact")
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
out = numbarope.rope_attention(q[:, :1000], q[:, :1000], q[:, :1000], method="exact")
print("next call ok", out.shape)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "interrupted" in res.stdout and "next call ok (1, 1000, 16)" in res.stdout
