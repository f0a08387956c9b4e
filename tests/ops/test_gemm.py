"""numbarope.ops.gemm: every query sees every key, no bias (two GEMMs through a
key-side state), against dense references of the same polynomial; threads; the key-side
state in and out (a sequence in blocks); the registry entry."""

import numpy as np
import pytest

import naive
from _poly_ref import poly_rows, poly_square, separable_inputs
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import gemm
from numbarope.ops.registry import HeadSpec, get
from numbarope.polynomial import exp_approximation


@pytest.mark.parametrize("n", [1, 5, 130, 1000])
def test_gemm_tasks_against_reference(n, monkeypatch):
    monkeypatch.setattr(_config, "FEATURE_BLOCK_BYTES", 8 * 35 * 16)  # 16-row feature blocks
    monkeypatch.setattr(_config, "MAX_TASKS", 5)
    rng = np.random.default_rng(10 + n)
    q, k, v, s = separable_inputs(rng, n)
    approx = exp_approximation(1.0, eps=1e-4)
    out, _ = gemm.gemm_attention(q, k, v, s, approx.coef)
    np.testing.assert_allclose(out, poly_square(q, k, v, s, approx.coef, False),
                               rtol=0, atol=1e-12)
    exact = naive.attention(q, k, v, scale=s)
    assert np.abs(out - exact).max() <= 2 * approx.error_bound / (1 - approx.error_bound) + 1e-12


def test_zero_coefficient_and_no_values():
    # a zero coefficient cuts the weight recurrence (second pass); Ev = 0 skips the GEMMs
    rng = np.random.default_rng(5)
    q, k, v, s = separable_inputs(rng, 70)
    coef = np.array([1.0, 0.0, 0.5])
    out, den = gemm.gemm_attention(q, k, v, s, coef)
    np.testing.assert_allclose(out, poly_square(q, k, v, s, coef, False), atol=1e-12)
    out0, den0 = gemm.gemm_attention(q, k, v[:, :0], s, coef)
    assert out0.shape == (70, 0)
    np.testing.assert_allclose(den0, den, rtol=1e-13)


@pytest.mark.parametrize("L, S", [(5, 5), (1, 40), (37, 300), (300, 37), (20, 900)])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_is_the_polynomial_attention(L, S, padded):
    # the same sums as a dense loop over the real keys, for one head and for a stack of
    # query heads on one key/value head
    rng = np.random.default_rng(L * 7 + S)
    E, s = 4, 0.5
    coef = exp_approximation(2.0, eps=1e-8).coef
    q = rng.standard_normal((3, L, E)) * 0.4
    k = rng.standard_normal((S, E)) * 0.4
    v = rng.standard_normal((S, 3))
    keep = rng.random(S) < 0.7 if padded else None
    one, _ = gemm.gemm_attention(q[0], k, v, s, coef, key_mask=keep)
    np.testing.assert_allclose(one, poly_rows(q[0], k, v, s, coef, keep=keep), rtol=0,
                               atol=1e-13)
    stacked, _ = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
    for h in range(3):
        np.testing.assert_allclose(stacked[h], poly_rows(q[h], k, v, s, coef, keep=keep),
                                   rtol=0, atol=1e-13)


def test_workers_do_not_change_results():
    rng = np.random.default_rng(77)
    n = 600
    q, k, v, s = separable_inputs(rng, n, E=3)
    coef = exp_approximation(1.0, eps=1e-5).coef
    res = [gemm.gemm_attention(q, k, v, s, coef, workers=w) for w in (1, 2, 3, -1)]
    for out, den in res[1:]:        # the partition does not depend on workers: bitwise
        assert np.array_equal(out, res[0][0]) and np.array_equal(den, res[0][1])


@pytest.mark.parametrize("padded", [False, True])
def test_key_side_state_of_earlier_blocks(padded):
    # One sequence in blocks (the fast long-sequence path): the states of the keys before
    # a block and after it, passed as initial_state, give the same rows as the whole
    # sequence at once.
    rng = np.random.default_rng(11)
    n, E, Ev, s = 900, 6, 3, 0.7
    q, k = (rng.uniform(-0.4, 0.4, (n, E)) for _ in range(2))
    v = rng.standard_normal((n, Ev))
    coef = exp_approximation(1.0, degree=4).coef
    a, b = 350, 700
    keep = np.ones(n, bool)
    if padded:
        keep[a:a + 10] = False
    ref, dref = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
    st = gemm.key_state(k[:a], v[:a], s, coef)
    S_, s_ = st
    assert S_.shape == (s_.size, Ev) and np.isfinite(S_).all()
    rest = gemm.key_state(k[a:], v[a:], s, coef, key_mask=keep[a:])
    out, den = gemm.gemm_attention(q[a:b], k[:0], v[:0], s, coef,
                                   initial_state=gemm.add_states(st, rest))
    np.testing.assert_allclose(den, dref[a:b], rtol=1e-12)
    np.testing.assert_allclose(out, ref[a:b], rtol=0, atol=1e-12 * np.abs(v).max())
    o2, d2 = gemm.apply_state(q[a:b], gemm.add_states(st, rest), s, coef)
    assert np.array_equal(o2, out) and np.array_equal(d2, den)


@pytest.mark.parametrize("G, padded", [(1, False), (3, True)])
def test_state_in_and_out_chain_blocks(G, padded):
    # keys in two blocks: the state returned by the first, passed to the second, gives
    # the one-block result (1e-12 relative); the state out is key_state's (bitwise)
    rng = np.random.default_rng(23)
    S, E, Ev, s = 1100, 4, 5, 0.5
    q = rng.uniform(-0.5, 0.5, (G, 300, E))
    k = rng.uniform(-0.5, 0.5, (S, E))
    v = rng.standard_normal((S, Ev))
    keep = rng.random(S) < 0.8 if padded else None
    coef = exp_approximation(1.0, eps=1e-7).coef
    a = 420
    ref, dref = gemm.gemm_attention(q, k, v, s, coef, key_mask=keep)
    k1 = None if keep is None else keep[:a]
    k2 = None if keep is None else keep[a:]
    _, _, st1 = gemm.gemm_attention(q[:, :0], k[:a], v[:a], s, coef, key_mask=k1,
                                    return_state=True)
    st_ref = gemm.key_state(k[:a], v[:a], s, coef, key_mask=k1)
    assert all(np.array_equal(x, y) for x, y in zip(st1, st_ref))
    out, den, st2 = gemm.gemm_attention(q, k[a:], v[a:], s, coef, key_mask=k2,
                                        initial_state=st1, return_state=True)
    np.testing.assert_allclose(den, dref, rtol=1e-12)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(v).max())
    whole = gemm.key_state(k, v, s, coef, key_mask=keep)
    for x, y in zip(st2, whole):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max())
    with pytest.raises(ValueError, match="initial_state"):
        gemm.gemm_attention(q, k, v, s, coef, initial_state=(st1[0][:, :2], st1[1]))


def test_registry_entry():
    alg = get("gemm")
    assert isinstance(alg, gemm.Gemm) and alg.structures == (nb.NoBias,)
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=nb.NoBias())
    assert alg.unavailable(h) == []
    assert alg.predict(h, 3) > 0 and alg.memory(h, 3) > 0
    for st in (nb.Causal(), nb.Decay(0.1), nb.Window(4, 0)):
        why = alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=st))
        assert [w.code for w in why] == ["structure"]
    assert alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, general=True))
    assert gemm.gemm_memory(64, 4, 4, 3) == alg.memory(h, 3)
    q, k, v, kw = alg.example(np.random.default_rng(0))
    assert kw == dict(rotary=True) and q.shape == k.shape
    out, den = alg.run(q, k, v, 0.5, exp_approximation(1.0, degree=3).coef,
                       structure=nb.NoBias())
    assert out.shape == v.shape and np.all(den > 0)
