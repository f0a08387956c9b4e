"""numbarope.ops.fft: any relative bias through its Toeplitz weights T, by FFT over the
features, against dense loops of the same polynomial; stacked heads and padded keys;
threads; T from a structure; the registry entry."""

import numpy as np
import pytest

from _poly_ref import poly_rows, separable_inputs
from numbarope import bias as nb
from numbarope.ops import fft
from numbarope.ops.registry import HeadSpec, get
from numbarope.polynomial import exp_approximation


@pytest.mark.parametrize("L, S, off", [(5, 5, 0), (1, 40, 39), (37, 300, 263), (300, 37, 0),
                                       (300, 100, -20), (20, 900, 5), (700, 700, 0)])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_is_the_polynomial_attention(L, S, off, padded):
    # any Toeplitz weights over the L + S − 1 offsets: the same sums as a dense loop over
    # the real keys, for a stack of query heads on one key/value head
    rng = np.random.default_rng(L * 7 + S)
    E, s = 4, 0.5
    coef = exp_approximation(2.0, eps=1e-8).coef
    q = rng.standard_normal((3, L, E)) * 0.4
    k = rng.standard_normal((S, E)) * 0.4
    v = rng.standard_normal((S, 3))
    keep = rng.random(S) < 0.7 if padded else None
    T = rng.random(L + S - 1) + 0.5
    out, _ = fft.fft_attention(q, k, v, s, coef, T, key_mask=keep)
    for h in range(3):
        ref = poly_rows(q[h], k, v, s, coef, off, False, keep, T)
        np.testing.assert_allclose(out[h], ref, rtol=0, atol=1e-12)
    one, _ = fft.fft_attention(q[0], k, v, s, coef, T, key_mask=keep)
    np.testing.assert_allclose(one, out[0], rtol=0, atol=1e-14)


def test_workers_do_not_change_results():
    rng = np.random.default_rng(77)
    n = 600
    q, k, v, s = separable_inputs(rng, n, E=3)
    coef = exp_approximation(1.0, eps=1e-5).coef
    T = np.exp(-0.01 * np.abs(np.arange(-n + 1, n)))
    res = [fft.fft_attention(q, k, v, s, coef, T, workers=w) for w in (1, 2, -1)]
    for out, den in res[1:]:
        np.testing.assert_allclose(out, res[0][0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(den, res[0][1], rtol=1e-13)


def test_weights_of_a_structure():
    # without T, run takes T = exp(b − max b) of the structure (causal zeros included)
    rng = np.random.default_rng(3)
    L, S, off = 40, 60, 25
    q, k, v, s = separable_inputs(rng, 60)
    q = q[:L]
    coef = exp_approximation(1.0, degree=4).coef
    alg = get("fft")
    for st in (nb.NoBias(), nb.Causal(), nb.Decay(0.05, True), nb.Window(7, 3),
               nb.ALiBi(0.1)):
        T = fft.toeplitz_weights(st, L, S, off)
        b = st.values(L, S, off)
        np.testing.assert_allclose(T, np.exp(b - b.max()), rtol=1e-15)
        out, den = alg.run(q, k, v, s, coef, structure=st, offset=off)
        o2, d2 = fft.fft_attention(q, k, v, s, coef, T)
        assert np.array_equal(out, o2) and np.array_equal(den, d2)
        causal = st.causal
        np.testing.assert_allclose(out, poly_rows(q, k, v, s, coef, off, causal, None, T),
                                   rtol=0, atol=1e-12)
    assert not fft.toeplitz_weights(nb.Window(0, 0), 3, 3, 10).any()     # every offset masked
    with pytest.raises(ValueError, match="one head"):
        fft.toeplitz_weights(nb.ALiBi([0.1, 0.2]), L, S, off)


def test_registry_entry():
    alg = get("fft")
    assert isinstance(alg, fft.FFT) and alg.structures == (nb.RelativeBias,)
    assert alg.bound_kind == "estimated"
    coef = exp_approximation(1.0, degree=3).coef
    for st in (nb.NoBias(), nb.Causal(), nb.Decay(0.1), nb.Window(4, 0),
               nb.Dense(np.zeros(127))):
        h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=st)
        assert alg.unavailable(h) == []
        assert alg.predict(h, 3) > 0 and alg.memory(h, 3) == fft.fft_memory(64, 4, 4, 3)
        assert alg.rounding(h, coef, 1e-6) > 0
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=nb.Dense(np.zeros(127)),
                 row_mass=0.0)
    assert [w.code for w in alg.unavailable(h)] == ["row-mass"]
    assert alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, general=True))
    q, k, v, kw = alg.example(np.random.default_rng(0))
    assert kw["bias"].shape == (2 * len(q) - 1,)
    with pytest.raises(ValueError, match="fft: initial_state"):
        alg.run(q, k, v, 0.5, coef, initial_state=(np.zeros((35, 3)), np.zeros(35)))
    with pytest.raises(ValueError, match="fft: initial_state"):
        alg.run(q, k, v, 0.5, coef, return_state=True)
