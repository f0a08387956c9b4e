"""numbarope._pipeline.inputs: arrays and options in, a frozen Problem out.

Everything a call is refused for is refused here, before any work, with a message
that names the argument and what to do: shapes (``check_shapes``, the one shape-only
validator), NaN/inf, options, dtypes, memory; inputs of any memory layout are
accepted and never modified in place. ``rope_attention`` and ``plan`` refuse alike.
(Origins: the robustness suite; new-user findings; field reports, issue 7.)
"""

import re

import numpy as np
import pytest

from numbarope import Rotary, apply_rotary, plan, rope_attention
from numbarope import _config
from numbarope._pipeline.inputs import Problem, Shapes, check_shapes, make_problem
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
    # new-user report: degree= with method="exact" was silently ignored
    (dict(degree=3, method="exact"), ValueError, r"degree=3.*method='exact' uses none"),
    (dict(degree=0, method="exact"), ValueError, r"degree=0.*method='exact'"),
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
        pytest.skip("a boolean bias is a mask (tests/test_masks.py)")
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




# =====================================================================
# What new users and field reports ran into
# =====================================================================

def _nu_qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


def test_rotary_message_for_head_dim_one_is_actionable():
    """New-user findings."""
    q = np.zeros((3, 1))
    with pytest.raises(ValueError, match="cannot be rotated: use rotary=None"):
        rope_attention(q, q, q, rotary=True)


def test_rotary_string_refused_naming_none_false():
    """New-user findings, second round (the steep-bias finding's last check)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 128, 4)) * 0.1 for _ in range(3))
    with pytest.raises(TypeError, match="None/False"):
        rope_attention(q, k, v, rotary="half")


def test_big_endian_is_accepted():
    """New-user findings."""
    q, k, v = _nu_qkv()
    ref = rope_attention(q, k, v, rotary=True, method="exact")
    out = rope_attention(q.astype(">f8"), k.astype(">f8"), v.astype(">f8"), rotary=True,
                         method="exact")
    np.testing.assert_array_equal(out, ref)


def test_masked_array_refused():
    """New-user findings."""
    q, k, v = _nu_qkv()
    with pytest.raises(TypeError, match="masked"):
        rope_attention(np.ma.masked_less(q, 0), k, v)


@pytest.mark.parametrize("kw, exc", [(dict(radius="1"), TypeError),
                                     (dict(return_info="yes"), TypeError)])
def test_option_types(kw, exc):
    """New-user findings."""
    q, k, v = _nu_qkv()
    with pytest.raises(exc, match=next(iter(kw))):
        rope_attention(q, k, v, **kw)


def test_integer_bias_advice_does_not_change_meaning():
    """Field reports (issue 7), boolean masks: an integer bias is refused with the two
    ways to write a mask."""
    rng = np.random.default_rng(10)
    q, k = rng.standard_normal((2, 6, 4)) * 0.5
    v = rng.standard_normal((6, 2))
    with pytest.raises(TypeError, match=r"bias is added to the logits.*np\.where"):
        rope_attention(q, k, v, bias=np.zeros(11, np.int64))


def test_single_head_memory_refusal_gives_applicable_advice(monkeypatch):
    """New-user findings, second round."""
    monkeypatch.setattr(_config, "memory_limit", lambda: 1000)
    monkeypatch.setattr(_config, "SMALL_REQUEST", 0)     # check even tiny requests
    q = np.zeros((1, 64, 4))
    with pytest.raises(ValueError, match=r"one head of this length does not fit"):
        rope_attention(q, q, q)
    q2 = np.zeros((3, 64, 4))
    with pytest.raises(ValueError, match=r"split the batch"):
        rope_attention(q2, q2, q2)


# =====================================================================
# check_shapes and make_problem themselves
# =====================================================================

def test_check_shapes_reads_shapes_only():
    sh = check_shapes((2, 6, 5, 8), (2, 3, 9, 8), (2, 3, 9, 4), enable_gqa=True,
                      causal_alignment="bottom_right", bias=(6, 13),
                      key_padding_mask=(2, 1, 9))
    assert isinstance(sh, Shapes)
    assert (sh.batch_shape, sh.kv_shape, sh.group) == ((2, 6), (2, 3), 2)
    assert (sh.L, sh.S, sh.E, sh.Ev, sh.offset, sh.heads) == (5, 9, 8, 4, 4, 12)
    sq = check_shapes((7, 4), (7, 4), (7, 2), query_offset=-3)
    assert (sq.batch_shape, sq.group, sq.offset, sq.heads) == ((), 1, -3, 1)
    with pytest.raises(ValueError, match=r"key has shape \(9, 5\); expected \(\.\.\., S, 8\)"):
        check_shapes((5, 8), (9, 5), (9, 4))
    with pytest.raises(ValueError, match=r"bias has shape \(12,\).*\(\.\.\., 13\)"):
        check_shapes((5, 8), (9, 8), (9, 4), bias=(12,))
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        check_shapes((6, 5, 8), (3, 9, 8), (3, 9, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(8,\); expected"):
        check_shapes((5, 8), (9, 8), (9, 4), key_padding_mask=(8,))


def test_make_problem_flattens_the_batch_and_is_frozen():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 2, 9, 8)).astype(np.float32)
    p, out_torch = make_problem(q, k, v, rotary=True, enable_gqa=True, is_causal=True,
                                causal_alignment="bottom_right")
    assert isinstance(p, Problem) and out_torch is None
    assert p.batch_shape == (2, 4) and (p.n, p.S, p.E, p.Ev, p.offset) == (5, 9, 8, 8, 4)
    assert p.q.shape == (8, 5, 8) and p.k.shape == (4, 9, 8) and p.v.shape == (4, 9, 8)
    np.testing.assert_array_equal(p.kvidx, [0, 0, 1, 1, 2, 2, 3, 3])
    assert p.q.dtype == np.float64 and p.rotated      # rotated in float64
    assert p.dtype == np.float32 and p.out_unit == 2.0 ** -24
    assert p.causal and p.bias is None and p.scale == 1 / np.sqrt(8)
    with pytest.raises(AttributeError):
        p.causal = False


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")     # numpy's, on np.matrix
def test_np_matrix_inputs_are_plain_arrays():
    # issue 24: np.matrix (always 2-D, * is a product) crashed inside numba
    import numbarope
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 4))
    m = np.matrix(a)
    out = numbarope.rope_attention(m, m, m, is_causal=True)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, numbarope.rope_attention(a, a, a, is_causal=True))


def test_ragged_positions_are_refused_by_name():
    # new-user finding: positions=(a, b) of different lengths raised numpy's own error
    import numbarope as nr
    q = np.zeros((8, 4))
    with pytest.raises(ValueError, match="positions must be one array"):
        nr.rope_attention(q, q, q, rotary=True, positions=(np.arange(8), np.arange(7)))
