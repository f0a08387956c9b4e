"""Fast path (polynomial method + Toeplitz/FFT) against the exact path.

Every check is two-sided in spirit: the error must be within the *reported*
certified bound ``info.error_bound`` and within the user's ``eps·max|V|``.
Inputs are bounded: queries and keys are scaled so that the logit radius
``R = s·max‖q‖·max‖k‖`` (×max‖W_t‖₂) is a chosen value <= ~1.
"""

import numpy as np
import pytest

import numbarope
from numbarope import (Rotary, exp_approximation, plan, rope_attention,
                       rotary_relative_matrices)
from numbarope.ops._features import n_features
from numbarope.ops.toeplitz_fft import fast_general, general_features

#: allowance for the final rounding of the output to the input dtype (both the
#: fast and the exact result are rounded; |out| <= max|V|)
ROUND = {np.float32: 2 * 2.0 ** -24, np.float64: 2 * 2.0 ** -53}


def _bounded(rng, shape, R, scale):
    """Rows scaled so that scale·max‖q‖·max‖k‖ = R exactly."""
    c = np.sqrt(R / scale)
    out = []
    for _ in range(2):
        x = rng.standard_normal(shape)
        x /= np.linalg.norm(x, axis=-1, keepdims=True).max()
        out.append(x * c)
    return out


def _problem(rng, algorithm, n, E, R=1.0, Ev=3, batch=()):
    """Inputs and keyword arguments that select ``algorithm``."""
    s = 1.0 / np.sqrt(E)
    q, k = _bounded(rng, batch + (n, E), R, s)
    v = rng.uniform(-1, 1, batch + (n, Ev))
    kw = {}
    if algorithm in ("gemm", "prefix", "fft") and E >= 2:
        # rotary over all features (E even) or a partial rotary (E odd)
        kw["rotary"] = Rotary(dim=E - E % 2, layout="half" if n % 2 else "interleaved")
    if algorithm == "prefix":
        kw["is_causal"] = True
    elif algorithm == "fft":
        kw["bias"] = rng.standard_normal(2 * n - 1)
    elif algorithm == "toeplitz-fft":
        W = rng.standard_normal((2 * n - 1, E, E))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()     # max_t ‖W_t‖₂ = 1
        kw["relative"] = W
    return q, k, v, kw


def _check(q, k, v, kw, dtype, eps=1e-3, algorithm=None, **fast_kw):
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out, info = rope_attention(q, k, v, method="fast", eps=eps, return_info=True, **kw,
                               **fast_kw)
    ref = rope_attention(q, k, v, method="exact", **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert np.all(info.method == "fast")
    if algorithm == "prefix" and q.shape[-2] == 1:
        algorithm = "gemm"            # one query, causal: it sees every key
    if algorithm is not None:
        assert np.all(info.algorithm == algorithm), info.algorithm
    lead = out.shape[:-2]
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64)).reshape(
        lead + (-1,)).max(axis=-1, initial=0.0)
    vmax = np.abs(v.astype(np.float64)).reshape(lead + (-1,)).max(axis=-1, initial=0.0)
    bound = np.asarray(info.error_bound, dtype=np.float64)
    assert np.all(np.isfinite(out))
    assert np.all(err <= bound + ROUND[dtype] * vmax), (err, bound)
    if "degree" not in fast_kw:
        assert np.all(err <= eps * vmax + ROUND[dtype] * vmax), (err, eps * vmax)
        assert np.all(bound <= (eps * (1 + 1e-9) + ROUND[dtype]) * vmax), (bound, eps * vmax)
    return out, ref, info, err


# ------------------------------------------------------------ algorithm matrix
SEPARABLE_SIZES = [(1, 1), (2, 2), (2, 16), (7, 3), (13, 16), (31, 8), (64, 2), (300, 3)]
GENERAL_SIZES = [(1, 1), (2, 2), (2, 8), (7, 3), (13, 2), (31, 3), (64, 1), (127, 2)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("algorithm", ["gemm", "prefix", "fft"])
@pytest.mark.parametrize("n, E", SEPARABLE_SIZES)
def test_separable_within_bound(algorithm, n, E, dtype):
    rng = np.random.default_rng(1000 + 17 * n + E)
    q, k, v, kw = _problem(rng, algorithm, n, E, R=1.0)
    _check(q, k, v, kw, dtype, eps=1e-3, algorithm=algorithm)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, E", GENERAL_SIZES)
def test_general_within_bound(n, E, dtype):
    rng = np.random.default_rng(2000 + 17 * n + E)
    q, k, v, kw = _problem(rng, "toeplitz-fft", n, E, R=1.0)
    _check(q, k, v, kw, dtype, eps=1e-3, algorithm="toeplitz-fft")


@pytest.mark.parametrize("algorithm", ["gemm", "prefix", "fft", "toeplitz-fft"])
def test_batched_heads_each_within_own_bound(algorithm):
    rng = np.random.default_rng(3000)
    n, E = 31, 2
    q, k, v, kw = _problem(rng, algorithm, n, E, R=0.9, batch=(2, 3))
    q[0, 1] *= 0.1          # heads with different radii
    v[1, 2] *= 50.0         # and different value ranges (the bound scales with max|V|)
    out, ref, info, err = _check(q, k, v, kw, np.float64, eps=1e-3, algorithm=algorithm)
    assert info.error_bound.shape == (2, 3)
    assert info.radius[0, 1] < info.radius[0, 0]
    assert info.error_bound[1, 2] > info.error_bound[1, 1]


def test_fft_with_window_bias_and_causal_bias():
    rng = np.random.default_rng(3100)
    n, E = 64, 4
    q, k, v, _ = _problem(rng, "gemm", n, E, R=1.0)
    t = np.arange(-(n - 1), n)
    window = np.where(np.abs(t) <= 5, 0.0, -np.inf)
    _check(q, k, v, dict(bias=window, rotary=True), np.float64, algorithm="fft")
    alibi = -0.25 * np.abs(t)
    _check(q, k, v, dict(bias=alibi, is_causal=True), np.float64, algorithm="fft")
    W = np.broadcast_to(np.eye(E), (2 * n - 1, E, E))
    _check(q, k, v, dict(bias=alibi, is_causal=True, relative=W), np.float64,
           algorithm="toeplitz-fft")
    _check(q, k, v, dict(is_causal=True, relative=W), np.float64, algorithm="toeplitz-fft")


@pytest.mark.parametrize("relative", [False, True])
def test_fully_masked_rows_fast_are_zero(relative):
    # causal + b_0 = b_1 = -inf: rows 0 and 1 see no key at all (exact gives 0)
    rng = np.random.default_rng(3200)
    bad = []
    for n in (7, 13, 31, 64):
        q, k, v, _ = _problem(rng, "gemm", n, 4, R=1.0)
        b = np.zeros(2 * n - 1)
        b[n - 1:n + 1] = -np.inf
        kw = dict(bias=b, is_causal=True)
        if relative:
            kw["relative"] = np.broadcast_to(np.eye(4), (2 * n - 1, 4, 4))
        out, info = rope_attention(q, k, v, method="fast", return_info=True, **kw)
        ref = rope_attention(q, k, v, method="exact", **kw)
        np.testing.assert_array_equal(ref[:2], 0.0)
        err = np.abs(out - ref).max()
        if not (np.all(out[:2] == 0.0) and err <= info.error_bound):
            bad.append((n, err, float(info.error_bound)))
    assert not bad, bad


@pytest.mark.parametrize("relative", [False, True])
def test_bias_underflow_is_refused_or_within_bound(relative):
    rng = np.random.default_rng(3300)
    n, E = 7, 4
    q, k, v, _ = _problem(rng, "gemm", n, E, R=1.0)
    b = np.zeros(2 * n - 1)
    b[n - 1] = -800.0            # finite (not a mask): causal row 0 sees only key 0
    kw = dict(bias=b, is_causal=True)
    if relative:
        kw["relative"] = np.broadcast_to(np.eye(E), (2 * n - 1, E, E))
    ref = rope_attention(q, k, v, method="exact", **kw)
    np.testing.assert_allclose(ref[0], v[0], rtol=1e-14)
    try:
        out, info = rope_attention(q, k, v, method="fast", return_info=True, **kw)
    except ValueError:
        return                   # refusing is a correct answer
    err = np.abs(out - ref).max()
    assert err <= info.error_bound, (err, info.error_bound)


# --------------------------------------------------------- random bounded cases
def test_random_bounded_cases():
    rng = np.random.default_rng(4242)
    algorithms = ["gemm", "prefix", "fft", "toeplitz-fft"]
    for case in range(20):
        algorithm = algorithms[case % 4]
        n = int(rng.choice([1, 2, 3, 5, 7, 11, 13, 17, 31, 64, 100]))
        E = int(rng.choice([1, 2, 3] if algorithm == "toeplitz-fft" else [1, 2, 3, 4, 8]))
        dtype = [np.float64, np.float32][int(rng.integers(2))]
        eps = float(10 ** rng.uniform(-6, -2))
        R = float(rng.uniform(0.05, 1.2))
        approx = ["chebyshev", "taylor"][int(rng.integers(2))]
        q, k, v, kw = _problem(rng, algorithm, n, E, R=R, Ev=int(rng.integers(1, 5)))
        v *= 10 ** rng.uniform(-3, 3)
        try:
            _check(q, k, v, kw, dtype, eps=eps, algorithm=algorithm, approx=approx)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {algorithm} n={n} E={E} {dtype.__name__} "
                                 f"eps={eps:.2e} R={R:.3f} {approx}: {exc}") from None


# ------------------------------------------------- general path fed RoPE matrices
@pytest.mark.parametrize("layout, dim", [("half", None), ("interleaved", None), ("half", 2)])
@pytest.mark.parametrize("extra", [{}, {"is_causal": True}, {"bias": "random"}])
def test_general_path_with_rotary_matrices_equals_rotary(layout, dim, extra):
    rng = np.random.default_rng(5000)
    n, E = 31, 4
    q, k = _bounded(rng, (n, E), 0.8, 0.5)
    v = rng.uniform(-1, 1, (n, 2))
    extra = dict(extra)
    if extra.get("bias") == "random":
        extra["bias"] = rng.standard_normal(2 * n - 1)
    rot = Rotary(dim=dim, layout=layout, base=50.0)
    W = rotary_relative_matrices(n, rot, head_dim=E)
    a = rope_attention(q, k, v, rotary=rot, method="exact", **extra)
    b = rope_attention(q, k, v, relative=W, method="exact", **extra)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    fa, ia = rope_attention(q, k, v, rotary=rot, method="fast", degree=6, return_info=True,
                            **extra)
    fb, ib = rope_attention(q, k, v, relative=W, method="fast", degree=6, return_info=True,
                            **extra)
    assert ib.algorithm == "toeplitz-fft" and ia.algorithm != "toeplitz-fft"
    assert ia.degree == ib.degree == 6
    np.testing.assert_allclose(fa, fb, rtol=0, atol=1e-10)
    # and the fast result is genuinely an approximation of the exact one
    assert 0 < np.abs(fa - a).max() <= ia.error_bound


# -------------------------------------------------------------- approximant kinds
@pytest.mark.parametrize("algorithm", ["gemm", "fft", "toeplitz-fft"])
def test_chebyshev_and_taylor_within_bound(algorithm):
    rng = np.random.default_rng(6000)
    q, k, v, kw = _problem(rng, algorithm, 31, 2, R=1.0)
    degs = {}
    for approx in ("chebyshev", "taylor"):
        _, _, info, err = _check(q, k, v, kw, np.float64, eps=1e-5, algorithm=algorithm,
                                 approx=approx)
        degs[approx] = int(info.degree)
    assert degs["taylor"] > degs["chebyshev"], degs
    # at equal degree, Chebyshev's bound is far smaller (DESIGN §2: ~8e-6 vs ~5e-4 at g=6)
    _, _, ic, _ = _check(q, k, v, kw, np.float64, approx="chebyshev", degree=6)
    _, _, it, _ = _check(q, k, v, kw, np.float64, approx="taylor", degree=6)
    assert ic.error_bound * 10 < it.error_bound


@pytest.mark.parametrize("algorithm", ["gemm", "prefix", "fft", "toeplitz-fft"])
@pytest.mark.parametrize("degree", [1, 3, 8])
def test_degree_is_used(algorithm, degree):
    rng = np.random.default_rng(7000 + degree)
    q, k, v, kw = _problem(rng, algorithm, 13, 2, R=0.7)
    _, _, info, err = _check(q, k, v, kw, np.float64, algorithm=algorithm, degree=degree)
    assert info.degree == degree
    assert info.features == (general_features(2, degree) if algorithm == "toeplitz-fft"
                             else n_features(2, degree))



def test_fast_with_degree_is_honoured_and_bound_reported():
    """New-user findings."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 64, 8)) * 0.3
    v = rng.standard_normal((2, 64, 8))
    out, info = rope_attention(q, k, v, rotary=True, degree=0, method="fast",
                                  return_info=True)
    ex = rope_attention(q, k, v, rotary=True, method="exact")
    assert (info.degree == 0).all()
    assert np.abs(out - ex).max() <= info.error_bound.max()

def test_higher_degree_is_more_accurate():
    rng = np.random.default_rng(7100)
    q, k, v, kw = _problem(rng, "gemm", 64, 4, R=1.0)
    errs, bounds = [], []
    for g in (2, 4, 8):
        _, _, info, err = _check(q, k, v, kw, np.float64, degree=g)
        errs.append(float(err))
        bounds.append(float(info.error_bound))
    assert errs[0] > errs[1] > errs[2] and bounds[0] > bounds[1] > bounds[2]


def test_degree_zero_is_uniform_average():
    # p = constant: every weight is equal, so out[i] = mean of the visible values
    rng = np.random.default_rng(7200)
    n = 13
    q, k, v, _ = _problem(rng, "gemm", n, 2, R=0.5)
    out = rope_attention(q, k, v, method="fast", degree=0)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=0), v.shape), atol=1e-14)
    out = rope_attention(q, k, v, method="fast", degree=0, is_causal=True)
    np.testing.assert_allclose(out, np.cumsum(v, axis=0) / np.arange(1, n + 1)[:, None],
                               atol=1e-14)


# ------------------------------------------------------------ refusals / planning
def test_fast_refuses_huge_radius():
    rng = np.random.default_rng(8000)
    n, E = 31, 4
    q, k = _bounded(rng, (n, E), 200.0, 0.5)
    v = rng.uniform(-1, 1, (n, 2))
    with pytest.raises(ValueError, match=r"R=200\b.*eps=1e-06.*radius") as exc:
        rope_attention(q, k, v, method="fast", eps=1e-6)
    assert "method='exact'" in str(exc.value)
    with pytest.raises(ValueError, match=r"R=200\b"):
        plan(q, k, v, method="fast", eps=1e-6)
    with pytest.raises(ValueError, match=r"R=200\b"):
        rope_attention(q, k, v, method="fast", eps=1e-6, rotary=True, return_info=True)
    # auto serves it exactly, and says why
    out, info = rope_attention(q, k, v, eps=1e-6, return_info=True)
    assert info.method == "exact" and info.code == "degree-limit"
    np.testing.assert_array_equal(out, rope_attention(q, k, v, method="exact"))


def test_auto_per_head_choice():
    rng = np.random.default_rng(8100)
    n, E = 4096, 4
    s = 0.5
    q = np.empty((2, n, E))
    k = np.empty((2, n, E))
    q[0], k[0] = _bounded(rng, (n, E), 30.0, s)      # large radius: exact
    q[1], k[1] = _bounded(rng, (n, E), 0.3, s)       # long bounded head: fast
    v = rng.uniform(-1, 1, (2, n, 4))
    out, info = rope_attention(q, k, v, rotary=True, return_info=True)
    assert list(info.method) == ["exact", "fast"]
    assert list(info.algorithm) == ["streaming", "gemm"]
    np.testing.assert_allclose(info.radius, [30.0, 0.3], rtol=1e-9)
    assert 0 < info.error_bound[0] < 1e-11 and 0 < info.error_bound[1] <= 1e-3   # exact: rounding
    ref = rope_attention(q, k, v, rotary=True, method="exact")
    np.testing.assert_array_equal(out[0], ref[0])
    err1 = np.abs(out[1] - ref[1]).max()
    assert 0 < err1 <= info.error_bound[1]
    # plan() makes the same choice without computing
    p = plan(q, k, v, rotary=True)
    assert list(p.method) == ["exact", "fast"]


@pytest.mark.parametrize("algorithm", ["gemm", "fft", "toeplitz-fft"])
def test_verify_fills_observed_error(algorithm):
    rng = np.random.default_rng(8200)
    n = 64
    q, k, v, kw = _problem(rng, algorithm, n, 2, R=1.0, batch=(2,))
    out, info = rope_attention(q, k, v, method="fast", approx="taylor", degree=3,
                               verify=5, return_info=True, **kw)
    ref = rope_attention(q, k, v, method="exact", **kw)
    full = np.abs(out - ref).max(axis=(1, 2))
    obs = np.asarray(info.observed_error, dtype=np.float64)
    assert obs.shape == (2,)
    assert np.all(obs > 0) and np.all(obs <= info.error_bound)
    assert np.all(obs <= full * (1 + 1e-9) + 1e-15)    # a subset of the rows
    # without verify nothing is observed; exact heads are not verified
    _, info0 = rope_attention(q, k, v, method="fast", return_info=True, **kw)
    assert all(h.observed_error is None for h in info0.heads)
    _, info1 = rope_attention(q, k, v, method="exact", verify=3, return_info=True, **kw)
    assert all(h.observed_error is None for h in info1.heads)


# --------------------------------------------------------------- float32 rounding
def test_float32_bound_covers_output_rounding():
    # a high-degree polynomial bound (~1e-11) is below what a float32 output can meet
    # (~2**-24·max|V|): the reported bound must include that final rounding
    rng = np.random.default_rng(9000)
    q, k, v, _ = _problem(rng, "gemm", 31, 4, R=0.8)
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    out, info = rope_attention(q, k, v, method="fast", degree=14, return_info=True)
    truth = rope_attention(q.astype(np.float64), k.astype(np.float64),
                           v.astype(np.float64), method="exact")
    assert np.abs(out.astype(np.float64) - truth).max() <= info.error_bound


# ------------------------------------------------------------ threads
# (the separable algorithms' kernel tests are in tests/ops/test_gemm.py, test_prefix.py,
# test_fft.py, test_decay.py, test_window.py)
def _separable_inputs(rng, n, E=4, Ev=3, R=1.0):
    s = 1.0 / np.sqrt(E)
    q, k = _bounded(rng, (n, E), R, s)
    return q, k, rng.uniform(-1, 1, (n, Ev)), s


def test_workers_do_not_change_results():
    rng = np.random.default_rng(77)
    n = 600
    q, k, v, s = _separable_inputs(rng, n, E=3)
    coef = exp_approximation(1.0, eps=1e-5).coef
    res = []
    for workers in (1, 2, -1):
        W = np.broadcast_to(np.eye(3), (2 * n - 1, 3, 3))
        res.append(fast_general(q, k, v, s, coef, W, np.ones(2 * n - 1), workers=workers))
    for out, den in res[1:]:
        np.testing.assert_allclose(out, res[0][0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(den, res[0][1], rtol=1e-13)




# ------------------------------------------------------------ soft-capped logits
def _softcap_cases(rng, n):
    t = np.arange(-(n - 1), n)
    W = rng.standard_normal((2 * n - 1, 2, 2))
    W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
    return [("gemm", {}), ("prefix", dict(is_causal=True)),
            ("window", dict(bias=numbarope.bias.Window(9, 0))),
            ("decay", dict(bias=numbarope.bias.ALiBi(0.2, causal=True))),
            ("decay", dict(bias=numbarope.bias.Decay(0.1))),
            ("fft", dict(bias=-0.1 * np.abs(t))),
            ("toeplitz-fft", dict(relative=W))]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cap", [0.7, 2.0])
@pytest.mark.parametrize("case", range(7))
def test_softcap_fast_within_bound(case, cap, dtype):
    # issue 23: the polynomial of exp(c·tanh(x/c)) on every fast algorithm, against
    # the exact path with the same cap, within the certified bound and eps
    rng = np.random.default_rng(4000 + case)
    n = 70
    algorithm, kw = _softcap_cases(rng, n)[case]
    E = 2 if algorithm == "toeplitz-fft" else 4          # W_t: E² features per degree
    q, k, v, _ = _problem(rng, "gemm", n, E, R=2.5 if E == 4 else 1.5)
    _check(q, k, v, dict(kw, softcap=cap), dtype, eps=1e-3, algorithm=algorithm)


def test_softcap_fast_against_naive():
    from naive import attention as naive_attention
    rng = np.random.default_rng(4100)
    n, E, cap = 40, 4, 1.5
    q, k, v, _ = _problem(rng, "gemm", n, E, R=3.0)
    for causal in (False, True):
        out, info = rope_attention(q, k, v, is_causal=causal, softcap=cap, method="fast",
                                   return_info=True)
        ref = naive_attention(q, k, v, causal=causal, softcap=cap)
        assert np.abs(out - ref).max() <= info.error_bound
        plain = naive_attention(q, k, v, causal=causal)
        assert np.abs(out - plain).max() > 10 * info.error_bound    # the cap is applied


def test_softcap_extremes_plan_without_warnings():
    # new-user findings: softcap=1e20 overflowed the planner; tiny caps leaked numpy
    # warnings from the certificate (and c = 1e-8 certifies a constant polynomial)
    import warnings
    rng = np.random.default_rng(4200)
    q, k, v = (rng.standard_normal((1, 256, 8)) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in (1e-8, 1e-3, 1e20):
            out, info = rope_attention(q, k, v, softcap=c, return_info=True)
            ref = rope_attention(q, k, v, softcap=c, method="exact")
            assert np.abs(out - ref).max() <= info.error_bound.max()
        out, info = rope_attention(q, k, v, softcap=1e-8, method="fast", return_info=True)
        assert info.degree[0] == 0
        assert np.abs(out - rope_attention(q, k, v, softcap=1e-8, method="exact")).max() \
            <= info.error_bound[0]
