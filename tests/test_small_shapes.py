"""The smallest shapes on every method and structure: no query rows (n = 0), one
row, head_dim 1, no value columns (Ev = 0); against tests/naive.py. (Origin: the
robustness suite; the exact path's own: tests/test_exact.py.)"""

import numpy as np
import pytest

import naive
from numbarope import plan, rope_attention

N, E, EV = 6, 4, 3


def _qkv(seed=0, batch=(2,), n=N, e=E, ev=EV, dtype=np.float64, amp=0.3):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    k = (rng.standard_normal(batch + (n, e)) * amp).astype(dtype)
    v = rng.standard_normal(batch + (n, ev)).astype(dtype)
    return q, k, v


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
