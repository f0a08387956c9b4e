"""The row log-sum-exp (``return_lse=True``) of rope_attention, exact and fast, plain,
causal, with a large bias, and padded at an offset, against a dense float64
reference; and two key blocks merged with their lse give the whole (the exact path)."""

import numpy as np
import pytest

import numbarope


def _lse_reference(q, k, s, off=0, causal=False, bias=None, keep=None):
    L, S = q.shape[0], k.shape[0]
    x = s * q @ k.T
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    if bias is not None:
        x = x + bias[i - j + S - 1]
    if causal:
        x = np.where(j <= i + off, x, -np.inf)
    if keep is not None:
        x = np.where(keep[None, :], x, -np.inf)
    with np.errstate(divide="ignore"):
        m = x.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("kind", ["plain", "causal", "bias", "padded-offset"])
def test_lse_and_merging_key_blocks(method, kind):
    rng = np.random.default_rng(11)
    L, S, E = 40, 90, 4
    q, k = rng.standard_normal((L, E)) * 0.5, rng.standard_normal((S, E)) * 0.5
    v = rng.standard_normal((S, 3))
    kw, ref = {}, {}
    if kind == "causal":
        kw = ref = dict(causal=True)
        kw = dict(is_causal=True)
    elif kind == "bias":
        b = rng.standard_normal(L + S - 1) * 30         # large: the shifts must come back
        kw, ref = dict(bias=b), dict(bias=b)
    elif kind == "padded-offset":
        keep = rng.random(S) < 0.8
        kw = dict(key_padding_mask=keep, query_offset=50, is_causal=True)
        ref = dict(keep=keep, off=50, causal=True)
    out, lse, info = numbarope.rope_attention(q, k, v, method=method, eps=1e-6,
                                             return_lse=True, return_info=True, **kw)
    want = _lse_reference(q, k, 0.5, **ref)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    tol = 1e-12 if method == "exact" else 1e-5
    assert np.abs(lse[fin] - want[fin]).max() <= tol * max(1, np.abs(want[fin]).max())
    if kind in ("plain", "causal"):
        # two key blocks merged with their lse give the whole (exact path)
        h = S // 2
        o1, l1 = numbarope.rope_attention(q, k[:h], v[:h], method="exact", return_lse=True,
                                          **kw)
        o2, l2 = numbarope.rope_attention(q, k[h:], v[h:], method="exact", return_lse=True,
                                          query_offset=-h, **kw)
        tot = np.logaddexp(l1, l2)
        w1 = np.where(np.isfinite(l1), np.exp(l1 - tot), 0.0)[:, None]
        w2 = np.where(np.isfinite(l2), np.exp(l2 - tot), 0.0)[:, None]
        ex = numbarope.rope_attention(q, k, v, method="exact", **kw)
        np.testing.assert_allclose(w1 * o1 + w2 * o2, ex, atol=1e-13)
        np.testing.assert_allclose(tot, want, atol=1e-12)
