"""numbarope.ops.packed: packed sequences on the fast path, each sequence by gemm or
prefix, against each sequence computed alone (tests/naive.py) and the exact path."""

import numpy as np
import pytest

import numbarope as nr
from naive import attention as naive_attention
from numbarope.bias import Packed
from numbarope.ops.packed import packed_segments

ROUND = {np.float32: 2 * 2.0 ** -24, np.float64: 2 * 2.0 ** -53}


def _bounded(rng, shape, R):
    """q, k with max‖q‖·max‖k‖/sqrt(E) = R."""
    E = shape[-1]
    out = []
    for _ in range(2):
        x = rng.standard_normal(shape)
        out.append(x / np.linalg.norm(x, axis=-1, keepdims=True).max() * (R * np.sqrt(E))
                   ** 0.5)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("is_causal", [True, False])
def test_packed_fast_is_each_sequence_alone(is_causal, dtype):
    rng = np.random.default_rng(30 + is_causal)
    cu = (0, 1, 40, 40, 97, 150)            # a one-token and an empty sequence
    q, k = _bounded(rng, (2, 150, 6), 2.0)
    v = rng.uniform(-1, 1, (2, 150, 3))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out, info = nr.rope_attention(q, k, v, bias=Packed(cu, is_causal), method="fast",
                                  return_info=True)
    assert set(info.algorithm.ravel()) == {"packed"} and out.dtype == dtype
    for b in range(2):
        ref = np.zeros((150, 3))
        for a, c in zip(cu, cu[1:]):
            if c > a:
                ref[a:c] = naive_attention(q[b, a:c], k[b, a:c], v[b, a:c], causal=is_causal)
        err = np.abs(out[b] - ref).max()
        assert err <= info.error_bound[b] + ROUND[dtype], (err, info.error_bound[b])
        assert info.error_bound[b] <= 1e-3 * np.abs(v[b]).max() * (1 + 1e-9) + ROUND[dtype]


def test_packed_fast_rectangular_gqa_and_padding():
    # queries at the end of the packed keys (query_offset), two query heads per key
    # head, a padded key: fast against exact within the bound
    rng = np.random.default_rng(32)
    cu = (0, 30, 64, 100)
    q, k = _bounded(rng, (4, 100, 4), 1.5)
    q = q[:, 60:]                                        # 40 queries at 60 .. 99
    k, v = k[:2], rng.uniform(-1, 1, (2, 100, 5))
    kpm = np.ones((2, 1, 100), bool)
    kpm[1, 0, 70] = False
    kw = dict(bias=Packed(cu), query_offset=60, enable_gqa=True, key_padding_mask=kpm)
    fast, info = nr.rope_attention(q.reshape(2, 2, 40, 4), k, v, method="fast",
                                   return_info=True, **kw)
    exact = nr.rope_attention(q.reshape(2, 2, 40, 4), k, v, method="exact", **kw)
    assert set(info.algorithm.ravel()) == {"packed"}
    err = np.abs(fast - exact).max(axis=(-2, -1))
    assert np.all(err <= info.error_bound), (err, info.error_bound)


def test_cu_seqlens_is_packed_with_restarting_positions():
    rng = np.random.default_rng(33)
    cu = np.array([0, 5, 12, 20], np.int32)
    q, k, v = (rng.standard_normal((3, 20, 8)) for _ in range(3))
    for causal in (False, True):
        out = nr.rope_attention(q, k, v, cu_seqlens=cu, is_causal=causal, rotary=True)
        for a, c in zip(cu, cu[1:]):
            alone = nr.rope_attention(q[:, a:c], k[:, a:c], v[:, a:c], rotary=True,
                                      is_causal=causal)
            np.testing.assert_allclose(out[:, a:c], alone, rtol=0, atol=1e-13)
    info = nr.plan(q, k, v, cu_seqlens=cu, is_causal=True)
    assert info.method.shape == (3,)
    torch = pytest.importorskip("torch")
    t = nr.rope_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                          cu_seqlens=torch.from_numpy(cu))
    np.testing.assert_allclose(t.numpy(), nr.rope_attention(q, k, v, cu_seqlens=cu),
                               rtol=0, atol=0)


@pytest.mark.parametrize("cu, kw, match", [
    ([0, 5, 19], {}, r"cu_seqlens\[-1\] = 19 must equal the number of keys S = 20"),
    ([[0, 20]], {}, "1-D integer array"),
    ([0.0, 20.0], {}, "1-D integer array"),
    ([0, 30, 20], {}, "non-decreasing"),
    ([0, 20], dict(bias=np.zeros(39)), "either cu_seqlens= or bias="),
])
def test_cu_seqlens_refusals(cu, kw, match):
    q = np.zeros((20, 4))
    with pytest.raises(ValueError, match=match):
        nr.rope_attention(q, q, q, cu_seqlens=cu, **kw)


def test_segments():
    assert packed_segments((0, 3, 3, 8), 8, 8) == [(0, 3, 0, 3), (3, 8, 3, 8)]
    # two queries at positions 6, 7 of a cache of 8 keys
    assert packed_segments((0, 3, 8), 2, 8, offset=6) == [(0, 2, 3, 8)]
    # queries past the packed total are in no sequence
    assert packed_segments((0, 4), 6, 6) == [(0, 4, 0, 4)]


@pytest.mark.parametrize("is_causal", [True, False])
def test_packed_backward_is_each_sequence_alone_within_its_bound(is_causal):
    # the certified fast backward, sequence by sequence: the polynomial's gradients of
    # each sequence alone (tests/naive.py) to rounding, the exact ones within the bound
    from naive import attention_gradients
    from numbarope.ops import get
    from numbarope.polynomial import exp_approximation
    rng = np.random.default_rng(40 + is_causal)
    cu, n, E, Ev = (0, 1, 40, 40, 97, 150), 150, 6, 3
    q, k = _bounded(rng, (n, E), 1.0)
    v, dO = rng.standard_normal((n, Ev)), rng.standard_normal((n, Ev))
    keep = rng.random(n) < 0.8
    keep[[0, 40, 97]] = True
    s = 1 / np.sqrt(E)
    approx = exp_approximation(1.0, eps=1e-6)
    alg, st = get("packed"), Packed(cu, is_causal)
    out, den = alg.run(q, k, v, s, approx.coef, structure=st, key_mask=keep)
    dq, dk, dv = alg.backward(q, k, v, out, den, dO, s, approx.coef, structure=st,
                              key_mask=keep)
    bound = alg.gradient_bound(q, k, v, dO, s, approx.coef, approx.error_bound,
                               structure=st, key_mask=keep)
    poly = [np.zeros_like(x) for x in (dq, dk, dv)]
    exact = [np.zeros_like(x) for x in (dq, dk, dv)]
    for a, c in zip(cu, cu[1:]):
        if c > a:
            sl = slice(a, c)
            args = (q[sl], k[sl], v[sl], dO[sl], s, 0 if is_causal else None, keep[sl])
            for ref, coef in ((poly, approx.coef), (exact, None)):
                g = attention_gradients(*args, coef=coef)
                for r, x in zip(ref, g):
                    r[sl] = x
    for got, p, e, b in zip((dq, dk, dv), poly, exact, bound):
        assert np.abs(got - p).max() <= 1e-10 * np.abs(p).max()
        assert 0 < np.abs(got - e).max() <= b


def test_cu_seqlens_trains_through_the_fast_path():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(41)
    cu = np.array([0, 30, 31, 90], np.int32)
    q, k = (torch.randn(2, 90, 8, generator=g, dtype=torch.float64) * 0.25 for _ in range(2))
    v, dout = (torch.randn(2, 90, 4, generator=g, dtype=torch.float64) for _ in range(2))
    grads = []
    for method in ("fast", "exact"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, info = nr.rope_attention(*x, cu_seqlens=cu, is_causal=True, rotary=True,
                                      method=method, eps=1e-7, return_info=True)
        out.backward(dout)
        grads.append([t.grad for t in x])
        if method == "fast":
            assert set(info.algorithm.ravel()) == {"packed"}
            assert info.gradient_bound.shape == (2, 3)
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
