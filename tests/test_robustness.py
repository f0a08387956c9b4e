"""Robustness: bad input is refused clearly (nothing computed, inputs untouched),
edge cases give the right value, and the numerics are sound.

Checked against ``tests/naive.py`` where a value is involved. Inputs are small
(n <= 24) so that the whole file runs in a few seconds once the numba kernels
are cached.
"""

import re

import numba
import numpy as np
import pytest

import naive
from numbarope import Rotary, apply_rotary, exp_approximation, plan, rope_attention
from numbarope import _config
from numbarope.rotary import rotary_relative_matrices

N, E, EV = 6, 4, 3
ENTRY_POINTS = {
    "rope_attention": lambda *a, **kw: rope_attention(*a, **kw),
    "plan": lambda *a, **kw: plan(*a, **kw),
}


def _qkv(seed=0, batch=(2,), n=N, e=E, ev=EV, dtype=np.float64, amp=0.3):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    k = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    v = rng.standard_normal(batch + (n, ev)).astype(dtype)
    return q, k, v


def _snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def _assert_untouched(arrays, copies):
    for a, c in zip(arrays, copies):
        if a is None:
            continue
        assert a.dtype == c.dtype and a.shape == c.shape
        assert np.array_equal(a, c, equal_nan=True), "an input was modified in place"


def _shape_re(shape):
    return re.escape(str(tuple(shape)))


# =====================================================================
# Bad shapes
# =====================================================================

def _bad_shape_cases():
    q, k, v = _qkv()
    rel = rotary_relative_matrices(N, None, E)
    return [
        # (id, query, key, value, kwargs, exception, regex)
        ("key n", q, k[:, :N - 1], v, {}, ValueError, r"key.*" + _shape_re(k[:, :N - 1].shape)),
        ("key E", q, k[..., :E - 1], v, {}, ValueError, r"key.*" + _shape_re(k[..., :E - 1].shape)),
        ("value n", q, k, v[:, :N - 2], {}, ValueError, r"value.*" + _shape_re(v[:, :N - 2].shape)),
        ("batch", q, k, np.concatenate([v] * 3, axis=0)[:3], {}, ValueError,
         r"broadcast.*" + _shape_re((3, N, EV))),
        ("batch key", q, np.concatenate([k] * 2)[:3], v, {}, ValueError,
         r"broadcast.*key " + _shape_re((3, N, E))),
        ("query 1-d", q[0, 0], k, v, {}, ValueError, r"query.*" + _shape_re((E,))),
        ("value 1-d", q, k, v[0, 0], {}, ValueError, r"value.*" + _shape_re((EV,))),
        ("query E=0", q[..., :0], k[..., :0], v, {}, ValueError, r"E=0"),
        ("relative 2n", q, k, v, {"relative": rel[:-1]}, ValueError,
         r"relative.*" + _shape_re(rel[:-1].shape)),
        ("relative E", q, k, v, {"relative": rel[:, :2, :2]}, ValueError,
         r"relative.*" + _shape_re(rel[:, :2, :2].shape)),
        ("relative 2-d", q, k, v, {"relative": rel[:, 0]}, ValueError,
         r"relative.*" + _shape_re(rel[:, 0].shape)),
        ("relative batch", q, k, v, {"relative": np.stack([rel] * 3)[:, None][:3, 0]}, ValueError,
         r"broadcast.*relative"),
        ("bias length", q, k, v, {"bias": np.zeros(2 * N)}, ValueError,
         r"bias.*" + _shape_re((2 * N,))),
        ("bias n", q, k, v, {"bias": np.zeros(N)}, ValueError, r"bias.*" + _shape_re((N,))),
        ("bias scalar", q, k, v, {"bias": np.float64(0.0)}, ValueError, r"bias.*\(\)"),
        ("bias batch", q, k, v, {"bias": np.zeros((3, 2 * N - 1))}, ValueError,
         r"broadcast.*bias"),
        ("rotary and relative", q, k, v, {"rotary": Rotary(), "relative": rel}, ValueError,
         r"rotary.*relative.*exclusive"),
        ("rotary dim > E", q, k, v, {"rotary": Rotary(dim=E + 2)}, ValueError,
         rf"dim={E + 2}.*head_dim={E}"),
        ("rotary odd E", q[..., :3], k[..., :3], v, {"rotary": True}, ValueError,
         r"even.*head_dim=3"),
        ("rotary wrong type", q, k, v, {"rotary": "half"}, TypeError, r"rotary.*Rotary"),
    ]


_SHAPE_CASES = _bad_shape_cases()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", _SHAPE_CASES, ids=[c[0] for c in _SHAPE_CASES])
def test_bad_shapes_refused(entry, case):
    _, q, k, v, kw, exc, pattern = case
    arrays = [q, k, v] + [a for a in kw.values() if isinstance(a, np.ndarray)]
    copies = _snapshot(*arrays)
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[entry](q, k, v, **kw)
    _assert_untouched(arrays, copies)


@pytest.mark.parametrize("dim", [3, 0, -2])
def test_rotary_dim_not_positive_even(dim):
    with pytest.raises(ValueError, match=rf"dim.*{dim}"):
        Rotary(dim=dim)


def test_rotary_dim_wrong_type():
    with pytest.raises(TypeError, match="dim"):
        Rotary(dim=4.0)


# =====================================================================
# Bad values
# =====================================================================

@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", ["query", "key", "value", "relative"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_refused(entry, name, bad):
    q, k, v = _qkv()
    rel = rotary_relative_matrices(N, None, E)
    arrays = {"query": q, "key": k, "value": v, "relative": rel}
    arrays[name] = arrays[name].copy()
    arrays[name].reshape(-1)[3] = bad
    copies = _snapshot(*arrays.values())
    with pytest.raises(ValueError, match=rf"{name} contains NaN or inf \(1 entries\)"):
        ENTRY_POINTS[entry](arrays["query"], arrays["key"], arrays["value"],
                            relative=arrays["relative"])
    _assert_untouched(list(arrays.values()), copies)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bias_nan_or_plus_inf_refused(entry, bad):
    q, k, v = _qkv()
    b = np.zeros(2 * N - 1)
    b[2] = bad
    with pytest.raises(ValueError, match=r"bias contains NaN or \+inf.*-inf"):
        ENTRY_POINTS[entry](q, k, v, bias=b)


def test_bias_minus_inf_is_a_mask():
    q, k, v = _qkv(batch=())
    b = np.zeros(2 * N - 1)
    b[N - 1 + 2] = -np.inf          # t = i - j = 2 masked
    out = rope_attention(q, k, v, bias=b, method="exact")
    ref = naive.attention(q, k, v, bias=lambda t: b[t + N - 1])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


OPTION_CASES = [
    (dict(scale=0.0), ValueError, r"scale=0\.0.*> 0"),
    (dict(scale=-1.0), ValueError, r"scale=-1\.0.*> 0"),
    (dict(scale=np.nan), ValueError, r"scale=nan.*finite"),
    (dict(scale=np.inf), ValueError, r"scale=inf.*finite"),
    (dict(scale=[1.0, 2.0]), TypeError, r"scale"),
    (dict(eps=0.0), ValueError, r"eps=0\.0.*\(0, 1\)"),
    (dict(eps=1.0), ValueError, r"eps=1\.0.*\(0, 1\)"),
    (dict(eps=2), ValueError, r"eps=2.*\(0, 1\)"),
    (dict(eps=-1e-3), ValueError, r"eps=-0\.001.*\(0, 1\)"),
    (dict(eps=np.nan), ValueError, r"eps=nan.*\(0, 1\)"),
    (dict(eps=None), TypeError, r"eps"),
    (dict(degree=-1), ValueError, r"degree=-1.*MAX_DEGREE"),
    (dict(degree=_config.MAX_DEGREE + 1), ValueError,
     rf"degree={_config.MAX_DEGREE + 1}.*\[0, {_config.MAX_DEGREE}\]"),
    (dict(degree=3.0), TypeError, r"degree.*int"),
    (dict(degree=True), TypeError, r"degree.*int"),
    (dict(method="slow"), ValueError, r"method='slow'.*'auto', 'exact', 'fast'"),
    (dict(method=None), ValueError, r"method=None.*'auto', 'exact', 'fast'"),
    (dict(approx="pade"), ValueError, r"approx='pade'.*'chebyshev', 'taylor'"),
    (dict(radius=-1.0), ValueError, r"radius.*>= 0"),
    (dict(radius=np.nan), ValueError, r"radius.*finite"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kw, exc, pattern", OPTION_CASES,
                         ids=[repr(c[0]) for c in OPTION_CASES])
def test_bad_options_refused(entry, kw, exc, pattern):
    q, k, v = _qkv()
    copies = _snapshot(q, k, v)
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[entry](q, k, v, **kw)
    _assert_untouched([q, k, v], copies)


@pytest.mark.parametrize("verify, exc", [(-1, ValueError), (1.5, TypeError),
                                         (True, TypeError), ("2", TypeError)])
def test_bad_verify_refused(verify, exc):
    q, k, v = _qkv()
    with pytest.raises(exc, match="verify"):
        rope_attention(q, k, v, verify=verify)


@pytest.mark.parametrize("layout", ["full", "HALF", None])
def test_unknown_layout_lists_valid_ones(layout):
    with pytest.raises(ValueError, match=r"layout=.*'half', 'interleaved'"):
        Rotary(layout=layout)


@pytest.mark.parametrize("base", [1.0, 0.5, np.nan, np.inf])
def test_bad_rotary_base(base):
    with pytest.raises(ValueError, match="base"):
        Rotary(base=base)


@pytest.mark.parametrize("radius", [np.ones(3), "big"], ids=["shape", "str"])
def test_radius_bad_shape_or_type_names_argument(radius):
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="radius"):
        rope_attention(q, k, v, radius=radius)


@pytest.mark.parametrize("kw", [dict(eps="0.1"), dict(scale="2"), dict(scale=True)],
                         ids=["eps-str", "scale-str", "scale-bool"])
def test_options_of_wrong_type_refused(kw):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=next(iter(kw))):
        rope_attention(q, k, v, **kw)


def test_rotary_scaling_wrong_type_names_argument():
    with pytest.raises((TypeError, ValueError), match="scaling"):
        Rotary(scaling="a")


# =====================================================================
# Bad dtypes
# =====================================================================

DTYPE_CASES = [
    (np.int64, r"dtype int64.*astype"),
    (np.int32, r"dtype int32.*astype"),
    (np.bool_, r"boolean array, which holds no attention values"),
    (np.complex128, r"dtype complex128"),
    (np.float16, r"float16.*astype\(np\.float32\)"),
    (object, r"dtype object"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", ["query", "key", "value", "relative", "bias"])
@pytest.mark.parametrize("dtype, pattern", DTYPE_CASES,
                         ids=[str(np.dtype(d[0])) for d in DTYPE_CASES])
def test_bad_dtypes_refused(entry, name, dtype, pattern):
    if name == "bias" and dtype is np.bool_:
        pytest.skip("a boolean bias is a mask (tests/test_field_reports.py)")
    q, k, v = _qkv()
    arrays = {"query": q, "key": k, "value": v}
    kw = {}
    if name == "relative":
        kw["relative"] = rotary_relative_matrices(N, None, E).astype(dtype)
    elif name == "bias":
        kw["bias"] = np.zeros(2 * N - 1).astype(dtype)
    else:
        arrays[name] = arrays[name].astype(dtype)
    with pytest.raises(TypeError, match=rf"{name}.*" + pattern):
        ENTRY_POINTS[entry](arrays["query"], arrays["key"], arrays["value"], **kw)


def test_none_and_ragged_refused():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="key is required"):
        rope_attention(q, None, v)
    with pytest.raises(TypeError, match="query could not be converted"):
        rope_attention([[1.0], [1.0, 2.0]], k, v)


def test_nested_lists_accepted():
    q, k, v = _qkv()
    np.testing.assert_array_equal(rope_attention(q.tolist(), k.tolist(), v.tolist()),
                                  rope_attention(q, k, v))


# =====================================================================
# Layouts in memory: strided, transposed, Fortran, read-only inputs work
# =====================================================================

def _views(a, rng):
    """(name, non-contiguous or read-only array equal to a)."""
    big = np.zeros(a.shape[:-2] + (2 * a.shape[-2], a.shape[-1]), a.dtype)
    big[..., ::2, :] = a
    yield "strided rows", big[..., ::2, :]
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    yield "strided features", wide[..., ::2]
    yield "transposed", np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    yield "fortran", np.asfortranarray(a)
    ro = a.copy()
    ro.setflags(write=False)
    yield "read-only", ro
    yield "broadcast", np.broadcast_to(a[:1], a.shape) if a.shape[0] == 1 else ro


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("extra", ["rotary", "bias", "relative"])
def test_noncontiguous_and_readonly_inputs(method, extra):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(seed=3, batch=(1,))
    kw = {"rotary": dict(rotary=Rotary(layout="interleaved")),
          "bias": dict(bias=rng.standard_normal(2 * N - 1), is_causal=True),
          "relative": dict(relative=rotary_relative_matrices(N, None, E))}[extra]
    ref = rope_attention(q, k, v, method=method, **kw)
    for name in ("query", "key", "value"):
        for view_name, view in _views({"query": q, "key": k, "value": v}[name], rng):
            args = {"query": q, "key": k, "value": v}
            args[name] = view
            out = rope_attention(args["query"], args["key"], args["value"], method=method, **kw)
            np.testing.assert_array_equal(out, ref, err_msg=f"{name} {view_name}")
    for name in ("bias", "relative"):
        if name in kw:
            ro = np.asfortranarray(kw[name]) if kw[name].ndim > 1 else kw[name][::-1][::-1]
            ro = ro.copy(order="K")
            ro.setflags(write=False)
            out = rope_attention(q, k, v, method=method, **{**kw, name: ro})
            np.testing.assert_array_equal(out, ref, err_msg=f"read-only {name}")


def test_readonly_and_strided_for_plan_and_apply_rotary():
    q, k, v = _qkv()
    qs = np.repeat(q, 2, axis=-2)[..., ::2, :]
    ro = q.copy()
    ro.setflags(write=False)
    assert str(plan(qs, k, v, rotary=True)) == str(plan(q, k, v, rotary=True))
    assert str(plan(ro, k, v, rotary=True)) == str(plan(q, k, v, rotary=True))
    np.testing.assert_array_equal(apply_rotary(qs), apply_rotary(q))
    np.testing.assert_array_equal(apply_rotary(ro), apply_rotary(q))
    np.testing.assert_array_equal(apply_rotary(q.swapaxes(-1, -2).copy().swapaxes(-1, -2)),
                                  apply_rotary(q))


# =====================================================================
# Inputs are never modified in place
# =====================================================================

_MUTATION_KW = {
    "plain": lambda rng: {},
    "rotary": lambda rng: dict(rotary=Rotary()),
    "rotary-causal": lambda rng: dict(rotary=Rotary(layout="interleaved"), is_causal=True),
    "bias": lambda rng: dict(rotary=True, bias=np.r_[np.full(N - 1, -np.inf),
                                                     rng.standard_normal(N)]),
    "bias-causal": lambda rng: dict(bias=rng.standard_normal((2, 2 * N - 1)), is_causal=True),
    "relative": lambda rng: dict(relative=rotary_relative_matrices(N, None, E)),
    "relative-bias": lambda rng: dict(relative=rotary_relative_matrices(N, None, E),
                                      bias=rng.standard_normal(2 * N - 1), is_causal=True),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["exact", "fast", "auto"])
@pytest.mark.parametrize("setting", sorted(_MUTATION_KW))
def test_inputs_not_modified(setting, method, dtype):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(seed=5, dtype=dtype)
    kw = _MUTATION_KW[setting](rng)
    arrays = [q, k, v] + [a for a in kw.values() if isinstance(a, np.ndarray)]
    copies = _snapshot(*arrays)
    rope_attention(q, k, v, method=method, verify=2 if method == "fast" else 0, **kw)
    _assert_untouched(arrays, copies)
    plan(q, k, v, method=method, **kw)
    _assert_untouched(arrays, copies)


def test_apply_rotary_returns_copy_and_keeps_input():
    q, _, _ = _qkv()
    c = q.copy()
    out = apply_rotary(q, Rotary(), positions=np.arange(N) + 7)
    assert out is not q and not np.shares_memory(out, q)
    np.testing.assert_array_equal(q, c)
    pos = np.arange(N, dtype=np.float64)
    pc = pos.copy()
    apply_rotary(q, positions=pos)
    np.testing.assert_array_equal(pos, pc)


# =====================================================================
# apply_rotary and exp_approximation: their own checks
# =====================================================================

APPLY_ROTARY_CASES = [
    (dict(x=np.zeros((3, 4), np.int64)), TypeError, r"x must be float32 or float64.*int64"),
    (dict(x=np.zeros((3, 4), np.float16)), TypeError, r"float16.*astype\(np\.float32\)"),
    (dict(x=np.zeros((3, 4), np.complex128)), TypeError, r"complex128"),
    (dict(x=np.zeros((3, 4), object)), TypeError, r"object"),
    (dict(x=np.zeros((3, 4), bool)), TypeError, r"bool"),
    (dict(x=np.zeros(4)), ValueError, r"\(\.\.\., n, E\).*\(4,\)"),
    (dict(x=np.zeros((3, 3))), ValueError, r"even.*head_dim=3"),
    (dict(x=np.zeros((3, 4)), rotary=Rotary(dim=6)), ValueError, r"dim=6.*head_dim=4"),
    (dict(x=np.zeros((3, 4)), rotary="half"), TypeError, r"rotary must be a numbarope\.Rotary"),
    (dict(x=np.zeros((3, 4)), positions=[0, 1]), ValueError, r"positions has 2 entries.*n=3"),
    (dict(x=np.zeros((3, 4)), positions=[0, 1, np.nan]), ValueError, r"positions.*NaN or inf"),
    (dict(x=np.zeros((3, 4)), positions=[0, np.inf, 1]), ValueError, r"positions.*NaN or inf"),
]


@pytest.mark.parametrize("kw, exc, pattern", APPLY_ROTARY_CASES,
                         ids=[str(i) for i in range(len(APPLY_ROTARY_CASES))])
def test_apply_rotary_bad_input(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        apply_rotary(**kw)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_apply_rotary_non_finite_x_refused(bad):
    x = np.zeros((3, 4))
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or inf"):
        apply_rotary(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_rotary_keeps_dtype_and_matches_naive(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(dtype)
    for rot in (Rotary(), Rotary(dim=4, layout="interleaved"), Rotary(base=500000.0)):
        out = apply_rotary(x, rot, positions=np.arange(5) + 3)
        assert out.dtype == dtype
        ref = np.stack([naive.rotation_matrix(p + 3, 6, rot.dim, rot.base, rot.layout)
                        @ x[p].astype(np.float64) for p in range(5)])
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol * 10)


EXP_CASES = [
    (dict(radius=np.nan), ValueError, r"radius.*finite"),
    (dict(radius=-1.0), ValueError, r"radius.*>= 0"),
    (dict(radius=np.inf), ValueError, r"radius.*finite"),
    (dict(radius=351.0), ValueError, r"radius=351\.0.*350"),
    (dict(radius="1"), TypeError, r"radius.*str"),
    (dict(radius=True), TypeError, r"radius"),
    (dict(radius=np.ones(2)), TypeError, r"radius"),
    (dict(radius=1.0, eps=0.0), ValueError, r"eps.*\(0, 1\)"),
    (dict(radius=1.0, eps=1.0), ValueError, r"eps.*\(0, 1\)"),
    (dict(radius=1.0, eps=np.nan), ValueError, r"eps.*\(0, 1\)"),
    (dict(radius=1.0, eps="0.1"), TypeError, r"eps.*str"),
    (dict(radius=1.0, degree=-1), ValueError, r"degree.*MAX_DEGREE.*-1"),
    (dict(radius=1.0, degree=_config.MAX_DEGREE + 1), ValueError,
     rf"degree.*\[0, {_config.MAX_DEGREE}\]"),
    (dict(radius=1.0, degree=2.0), TypeError, r"degree.*float"),
    (dict(radius=1.0, eps=0.1, degree=2), TypeError, r"either eps or degree"),
    (dict(radius=1.0, kind="pade"), ValueError, r"kind.*chebyshev.*pade|kind.*pade"),
    (dict(radius=30.0, eps=1e-12), ValueError, r"cannot certify.*MAX_DEGREE"),
]


@pytest.mark.parametrize("kw, exc, pattern", EXP_CASES, ids=[str(i) for i in range(len(EXP_CASES))])
def test_exp_approximation_bad_input(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        exp_approximation(**kw)


def test_exp_approximation_edge_values():
    p0 = exp_approximation(0.0)
    assert p0.degree == 0 and p0(0.3) == 1.0 and p0.error_bound == 0.0
    p = exp_approximation(np.float32(1.0), eps=1e-6)
    assert p.error_bound <= 1e-6
    assert not p.coef.flags.writeable
    x = np.linspace(-1, 1, 101)
    assert np.all(np.abs(p(x) * np.exp(-x) - 1) <= p.error_bound)


# =====================================================================
# Edge cases: n = 0, n = 1, E = 1, Ev = 0
# =====================================================================

@pytest.mark.parametrize("setting", ["plain", "causal", "rotary-bias", "relative"])
@pytest.mark.parametrize("method", ["exact", "fast", "auto"])
def test_n_zero_gives_empty_output(method, setting):
    q, k, v = _qkv(n=0)
    kw = {"plain": {}, "causal": dict(is_causal=True),
          "rotary-bias": dict(rotary=True, bias=np.zeros(0)),
          "relative": dict(relative=np.zeros((0, E, E)))}[setting]
    out, info = rope_attention(q, k, v, method=method, return_info=True, **kw)
    assert out.shape == (2, 0, EV) and out.dtype == np.float64
    assert info.batch_shape == (2,)


def test_plan_n_zero():
    q, k, v = _qkv(n=0)
    info = plan(q, k, v)
    assert len(info.heads) == 2


@pytest.mark.parametrize("method", ["exact", "fast", "auto"])
@pytest.mark.parametrize("setting", ["plain", "causal", "bias", "relative"])
def test_n_one_e_one_ev_zero(method, setting):
    rng = np.random.default_rng(7)
    for n, e, ev in ((1, 4, 3), (5, 1, 2), (5, 4, 0), (1, 1, 1)):
        q, k, v = _qkv(seed=7, n=n, e=e, ev=ev)
        kw = {"plain": {}, "causal": dict(is_causal=True),
              "bias": dict(bias=rng.standard_normal(2 * n - 1)),
              "relative": dict(relative=rng.standard_normal((2 * n - 1, e, e)) * 0.5)}[setting]
        out, info = rope_attention(q, k, v, method=method, return_info=True, **kw)
        assert out.shape == (2, n, ev)
        ref = np.stack([naive.attention(
            q[b], k[b], v[b], causal=setting == "causal",
            W=(lambda t: kw["relative"][t + n - 1]) if setting == "relative" else None,
            bias=(lambda t: kw["bias"][t + n - 1]) if setting == "bias" else None)
            for b in range(2)])
        tol = np.asarray(info.error_bound, dtype=np.float64).max() + 1e-12
        assert np.all(np.abs(out - ref) <= tol), (n, e, ev)
        if n == 1 and ev > 0:         # one key: the output is its value
            np.testing.assert_allclose(out, v, rtol=1e-12, atol=tol)


# =====================================================================
# Fully masked rows: 0, exact and fast
# =====================================================================

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


# =====================================================================
# Huge logits on the exact path
# =====================================================================

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("setting", ["plain", "causal", "bias", "relative"])
def test_huge_logits_exact(setting, dtype):
    rng = np.random.default_rng(13)
    n, e = 12, 4
    q = rng.standard_normal((n, e))
    k = rng.standard_normal((n, e))
    q *= 100 / np.linalg.norm(q, axis=1, keepdims=True)
    k *= 100 / np.linalg.norm(k, axis=1, keepdims=True)        # |s qᵀk| up to 1e4
    v = rng.standard_normal((n, 3))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    kw, nkw = {}, {}
    if setting == "causal":
        kw, nkw = dict(is_causal=True), dict(causal=True)
    elif setting == "bias":
        b = rng.standard_normal(2 * n - 1) * 1e3
        kw, nkw = dict(bias=b), dict(bias=lambda t: b[t + n - 1])
    elif setting == "relative":
        W = rng.standard_normal((2 * n - 1, e, e))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2), keepdims=True)
        kw, nkw = dict(relative=W), dict(W=lambda t: W[t + n - 1])
    out = rope_attention(q, k, v, method="exact", scale=1.0, **kw)
    ref = naive.attention(q, k, v, scale=1.0, **nkw)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    tol = 1e-6 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    # auto must not pick an uncertifiable fast path here
    out_auto = rope_attention(q, k, v, method="auto", scale=1.0, **kw)
    np.testing.assert_array_equal(out_auto, out)


# =====================================================================
# Shift invariance of RoPE
# =====================================================================

@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("offset", [
    1, 1000, 12345,
    2 ** 20, 2 ** 24,
])
def test_shift_invariance(offset, layout):
    rng = np.random.default_rng(17)
    n, e = 16, 8
    q, k, v = (rng.standard_normal((n, e)) for _ in range(3))
    rot = Rotary(layout=layout)

    def run(off):
        pos = off + np.arange(n)
        return rope_attention(apply_rotary(q, rot, positions=pos),
                              apply_rotary(k, rot, positions=pos), v, method="exact")

    base = run(0)
    np.testing.assert_allclose(base, rope_attention(q, k, v, rotary=rot, method="exact"),
                               rtol=0, atol=1e-14)
    rel = np.abs(run(offset) - base).max() / np.abs(base).max()
    assert rel < 1e-12, rel


# =====================================================================
# Determinism and thread count
# =====================================================================

def _det_cases(rng, n, e):
    return {
        "exact": dict(method="exact", rotary=True),
        "exact-relative": dict(method="exact", relative=rotary_relative_matrices(n, None, e),
                               bias=rng.standard_normal(2 * n - 1), is_causal=True),
        "gemm": dict(method="fast", rotary=True),
        "prefix": dict(method="fast", rotary=True, is_causal=True),
        "fft": dict(method="fast", rotary=True, bias=rng.standard_normal(2 * n - 1)),
        "general": dict(method="fast", relative=rotary_relative_matrices(n, None, e)),
    }


def test_determinism_and_threads():
    rng = np.random.default_rng(19)
    n, e = 24, 4
    q, k, v = (rng.standard_normal((3, n, e)) * 0.3 for _ in range(3))
    saved = numba.get_num_threads()
    try:
        for name, kw in _det_cases(rng, n, e).items():
            out, info = rope_attention(q, k, v, return_info=True, **kw)
            expect = "exact" if kw["method"] == "exact" else "fast"
            assert np.all(info.method == expect), name
            if name not in ("exact", "exact-relative"):
                assert np.all(info.algorithm == {"general": "toeplitz-fft"}.get(name, name))
            again = rope_attention(q, k, v, **kw)
            assert np.array_equal(out, again), f"{name}: two identical calls differ"
            if numba.config.NUMBA_NUM_THREADS >= 2:
                numba.set_num_threads(1)
                one = rope_attention(q, k, v, **kw)
                numba.set_num_threads(2)
                two = rope_attention(q, k, v, **kw)
                numba.set_num_threads(saved)
                assert np.abs(one - two).max() <= 1e-12, name
                assert np.abs(one - out).max() <= 1e-12, name
    finally:
        numba.set_num_threads(saved)
    assert numba.get_num_threads() == saved


# =====================================================================
# dtypes of the output
# =====================================================================

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
