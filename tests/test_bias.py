import numpy as np
import pytest

import naive
import numbarope as nr
from numbarope import bias as nb


def test_offsets_and_causal():
    assert nb.offsets(3).tolist() == [-2, -1, 0, 1, 2]
    assert nb.offsets(0).shape == (0,)
    b = nb.causal_bias(3)
    assert np.isneginf(b[:2]).all() and (b[2:] == 0).all()


def test_causal_bias_equals_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((11, 4)) for _ in range(3))
    a = nr.rope_attention(q, k, v, rotary=True, bias=nb.causal_bias(11), method="exact")
    b = nr.rope_attention(q, k, v, rotary=True, is_causal=True, method="exact")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_alibi_slopes_known():
    np.testing.assert_allclose(nb.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    s6 = nb.alibi_slopes(6)       # 4 heads of the power-of-2 rule + 2 interleaved
    np.testing.assert_allclose(s6[:4], 2.0 ** (-2.0 * np.arange(1, 5)))
    np.testing.assert_allclose(s6[4:], [2.0 ** -1, 2.0 ** -3])


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_and_window_match_naive(causal):
    rng = np.random.default_rng(1)
    n = 13
    q, k, v = (rng.standard_normal((n, 4)) for _ in range(3))
    for b in (nb.alibi_bias(n, 0.3, causal=causal), nb.window_bias(n, 4, causal=causal)):
        ref = naive.rope_attention(q, k, v, bias=lambda t: b[t + n - 1])
        out = nr.rope_attention(q, k, v, rotary=True, bias=b, method="exact")
        np.testing.assert_allclose(out, ref, atol=1e-12)
        fast, info = nr.rope_attention(q * 0.3, k * 0.3, v, rotary=True, bias=b,
                                       method="fast", return_info=True)
        ref = naive.rope_attention(q * 0.3, k * 0.3, v, bias=lambda t: b[t + n - 1])
        assert np.abs(fast - ref).max() <= info.error_bound


def test_t5_buckets_follow_hf():
    table = np.arange(32, dtype=float)
    b = nb.t5_bias(200, table, bidirectional=True, max_distance=128)
    n = 200
    at = lambda t: b[t + n - 1]   # noqa: E731
    assert at(0) == 0              # j - i = 0
    assert at(-1) == 17            # j - i = +1 -> upper half
    assert at(1) == 1
    assert at(7) == 7 and at(8) == 8
    assert at(199) == 15           # saturates at the last bucket of the half
    d = nb.t5_bias(50, table, bidirectional=False)
    assert d[49 - 5] == 0          # decoder: future keys (j > i) share bucket 0
    assert (np.diff(d[49:]) >= 0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="n must be"):
        nb.offsets(-1)
    with pytest.raises(ValueError, match="window"):
        nb.window_bias(4, -2)
    with pytest.raises(ValueError, match="num_heads"):
        nb.alibi_slopes(0)
    with pytest.raises(ValueError, match="slopes"):
        nb.alibi_bias(4, np.nan)
    with pytest.raises(ValueError, match="table"):
        nb.t5_bias(4, np.zeros((2, 3, 4)))
