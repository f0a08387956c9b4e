"""numbarope.ops.decay.decay_backward: the certified fast backward of exponential decay
(causal and two-sided, offsets, padded keys, grouped-query heads), against

* the dense backward with the forward's polynomial weights (tests/naive.py,
  attention_gradients(..., coef=coef, T=T)): the same sums, to rounding, for any chunk;
* the EXACT softmax gradients with the bias −rate·|t|: within the certified bound of
  numbarope.ops.decay.decay_gradient_bound, itself O(δ), and nearly attained by
  adversarial inputs;

workers 1 and 2 bitwise equal; the registry method (den in T's normalisation); end to
end through numbarope.rope_attention with torch tensors that require grad."""

import numpy as np
import pytest

import numbarope
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import _common, decay
from numbarope.ops.decay import decay_attention, decay_backward, decay_gradient_bound
from numbarope.ops.registry import get
from numbarope.polynomial import exp_approximation

from _grad_inputs import inputs
from naive import attention_gradients


def toeplitz(L, S, off, rate, causal):
    """(L+S−1,) weights T[i − j + S − 1] = e^{−rate·|t|}, t = i + off − j (0 for t < 0
    when causal): attention_gradients' T."""
    t = np.arange(L + S - 1) - (S - 1) + off
    T = np.exp(-rate * np.abs(t))
    return np.where(t < 0, 0.0, T) if causal else T


def relative_gradients(q, k, v, dO, s, rate, causal, off, keep, coef):
    """The dense polynomial backward with each row's weights relative to its nearest
    visible key (γ^{|t| − t0}), for rates whose absolute weights underflow (800, inf)."""
    Q = q[None] if q.ndim == 2 else q
    D = dO[None] if dO.ndim == 2 else dO
    L, S = Q.shape[1], k.shape[0]
    t = np.arange(L)[:, None] + off - np.arange(S)[None, :]
    vis = np.ones((L, S), bool) if keep is None else np.broadcast_to(keep, (L, S)).copy()
    if causal:
        vis &= t >= 0
    d = np.where(vis, np.abs(t), np.iinfo(np.int64).max // 2)
    rel = d - d.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        T = np.where(rel == 0, 1.0, np.exp(-rate * rel))
    T = np.where(vis, T, 0.0)
    W = np.polynomial.polynomial.polyval(s * np.einsum("gie,je->gij", Q, k), coef) * T
    tot = W.sum(axis=2, keepdims=True)
    A = np.divide(W, tot, out=np.zeros_like(W), where=tot > 0)
    o = A @ v
    delta = np.einsum("gic,gic->gi", D, o)
    dX = A * (np.einsum("gic,jc->gij", D, v) - delta[:, :, None])
    dq = s * dX @ k
    dk = s * np.einsum("gij,gie->je", dX, Q)
    dv = np.einsum("gij,gic->jc", A, D)
    return (dq[0] if q.ndim == 2 else dq), dk, dv


def scales(q, k, v, dO, s, keep, R, M):
    """The gradients' natural magnitudes from the maxima (what the bound multiplies δ
    by), with c_i = 1/(1 + (M_i−1)e^{−2R}) >= row i's weights, M_i its decayed mass."""
    kr, vr = (k, v) if keep is None else (k[keep], v[keep])
    d = dO.reshape(-1, dO.shape[-1])
    c = 1.0 / (1.0 + (M - 1) * np.exp(-2 * R))
    V = np.abs(vr).max()
    return (s * np.abs(kr).max() * np.abs(d).sum(1).max() * V,
            s * np.abs(q).max() * (c @ np.abs(d).sum(1)) * V,
            c @ np.abs(d).max(1))


def masses(L, S, G, off, rate, causal, keep):
    """Each row's decayed mass Σ_j γ^{|t_ij| − t0_i} and whether it sees a key, for the
    rows of all G heads."""
    t = np.arange(L)[:, None] + off - np.arange(S)[None, :]
    vis = np.ones((L, S), bool) if keep is None else np.broadcast_to(keep, (L, S)).copy()
    if causal:
        vis &= t >= 0
    d = np.where(vis, np.abs(t), 10**9)
    M = np.where(vis, np.exp(-rate * (d - d.min(axis=1, keepdims=True))), 0.0).sum(1)
    return np.tile(M, G), np.tile(vis.any(1), G)


def agree(grads, ref, q, k, v, dO):
    """To rounding: 1e-10 of the largest entry, with a floor for gradients that are 0
    exactly (a row that sees one key: dq = 0, computed as a rounding error)."""
    floor = 1e-15 * np.abs(dO).max() * np.abs(v).max() * (1 + np.abs(q).max() + np.abs(k).max())
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and g.dtype == np.float64 and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10 * np.abs(r).max() + floor)


@pytest.fixture
def chunk(monkeypatch):
    """Force the chunk size of the forward and the backward (_common.CHUNK)."""
    def set_chunk(c):
        monkeypatch.setattr(_common, "CHUNK", c)
    return set_chunk


CASES = [  # G, L, S, offset, E, Ev, R, padded, rate, causal
    (1, 1, 1, 0, 1, 1, 0.3, False, 0.5, False),
    (1, 7, 7, 0, 2, 3, 1.0, False, 0.1, True),             # n < chunk
    (1, 60, 60, 0, 4, 3, 1.0, False, 0.05, True),          # several chunks, square
    (1, 60, 60, 0, 4, 3, 1.0, False, 0.05, False),
    (1, 64, 64, 0, 4, 2, 2.0, False, 0.0, False),          # no decay: every key
    (1, 80, 100, 20, 4, 3, 0.3, True, 0.02, True),         # rectangular at the end, padded
    (1, 80, 100, 20, 4, 3, 0.3, True, 0.02, False),
    (1, 20, 200, 180, 4, 3, 2.0, True, 0.1, True),         # prefill with a cache
    (1, 120, 40, 0, 2, 1, 3.0, False, 0.3, True),          # rows beyond the keys
    (1, 120, 40, 0, 2, 1, 3.0, False, 0.3, False),
    (1, 90, 70, -15, 4, 3, 1.0, True, 0.2, True),          # rows that see no key
    (1, 90, 70, -15, 4, 3, 1.0, True, 0.2, False),         # rows before every key
    (3, 40, 70, 30, 4, 4, 2.0, True, 0.3, False),          # G = 3 query heads
    (3, 40, 70, 30, 4, 4, 2.0, True, 0.3, True),
    (3, 50, 50, 0, 3, 2, 1.0, False, 5.0, False),          # fast decay
]


@pytest.mark.parametrize("case", CASES)
def test_the_sums_of_the_polynomial_backward(case, chunk):
    # state routes (decayed scans), explicit routes (the row's own chunk) and the two
    # sides are exact algebra: the dense backward with P̃ = T p(x)/Σ T p agrees to rounding
    G, L, S, off, E, Ev, R, padded, rate, causal = case
    chunk(8)
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    coef = exp_approximation(R, eps=1e-3).coef
    out, den = decay_attention(q, k, v, s, coef, rate, causal, offset=off, key_mask=keep)
    grads = decay_backward(q, k, v, out, den, dO, s, coef, rate, causal, offset=off,
                           key_mask=keep)
    ref = attention_gradients(q, k, v, dO, s, None, keep, coef=coef,
                              T=toeplitz(L, S, off, rate, causal))
    agree(grads, ref, q, k, v, dO)


@pytest.mark.parametrize("c", [4, 16, 1000])
@pytest.mark.parametrize("rate, causal", [(800.0, False), (np.inf, False), (800.0, True),
                                          (0.1, False)])
def test_any_chunk_and_rates_that_underflow(c, rate, causal, chunk):
    # chunk 1000: everything explicit; 4: mostly states. Rates whose absolute weights
    # underflow (800, inf: the nearest visible key(s) alone) against a dense reference
    # with weights relative to each row's nearest key, as the forward's
    chunk(c)
    rng = np.random.default_rng(c)
    G, L, S, off = 2, 40, 60, 30
    q, k, v, dO, s, keep = inputs(rng, G, L, S, 4, 3, 1.5, True)
    coef = exp_approximation(1.5, eps=1e-3).coef
    out, den = decay_attention(q, k, v, s, coef, rate, causal, offset=off, key_mask=keep)
    grads = decay_backward(q, k, v, out, den, dO, s, coef, rate, causal, offset=off,
                           key_mask=keep)
    ref = relative_gradients(q, k, v, dO, s, rate, causal, off, keep, coef)
    agree(grads, ref, q, k, v, dO)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_within_the_certified_bound_of_the_exact_gradient(case, eps, chunk):
    G, L, S, off, E, Ev, R, padded, rate, causal = case
    chunk(16)
    for seed in range(2):
        rng = np.random.default_rng([seed, abs(hash(case)) % 2**32])
        q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
        approx = exp_approximation(R, eps=eps)
        out, den = decay_attention(q, k, v, s, approx.coef, rate, causal, offset=off,
                                   key_mask=keep)
        grads = decay_backward(q, k, v, out, den, dO, s, approx.coef, rate, causal,
                               offset=off, key_mask=keep)
        ref = attention_gradients(q, k, v, dO, s, None, keep,
                                  T=toeplitz(L, S, off, rate, causal))
        bounds = decay_gradient_bound(q, k, v, dO, s, approx.coef, approx.error_bound, rate,
                                      causal, offset=off, key_mask=keep)
        M, seen = masses(L, S, G, off, rate, causal, keep)   # rows that see no key
        d = dO.reshape(-1, Ev)                                # take no part
        sc = scales(q, k, v, d[seen], s, keep, R, M[seen])
        for name, g, r, b, x in zip("qkv", grads, ref, bounds, sc):
            err = np.abs(g - r).max()
            assert err <= b, (name, err, b)
            # not vacuous: O(δ) times the gradient's magnitude from the maxima
            assert b <= 8 * approx.error_bound * x + 1e-12 * x, (name, b, x)


@pytest.mark.parametrize("L, S, off, rate, causal, least", [
    (60, 60, 0, 0.01, True, (0.05, 0.1, 0.4)),
    (20, 60, 40, 0.01, True, (0.05, 0.2, 0.4)),
    (60, 60, 0, 0.01, False, (0.05, 0.2, 0.5)),
    (60, 60, 0, 0.1, False, (0.05, 0.1, 0.3))])
def test_bound_is_nearly_attained(L, S, off, rate, causal, least, chunk):
    # the worst case of test_gemm_backward.py with a slow decay: key 0 at logit +R with
    # value +1, the others at −R with value −1, equal rows, p of even degree (errors of
    # opposite signs at ±R): the errors reach a sizeable fraction of the bound (measured
    # 0.11-0.13 dq, 0.14-0.38 dk, 0.42-0.71 dv) and never exceed it
    chunk(16)
    R = 1.0
    approx = exp_approximation(R, degree=4)
    q = np.full((L, 1), np.sqrt(R))
    k = np.full((S, 1), -np.sqrt(R))
    k[0] = np.sqrt(R)
    v = np.where(np.arange(S) == 0, 1.0, -1.0)[:, None]
    dO = np.ones((L, 1))
    out, den = decay_attention(q, k, v, 1.0, approx.coef, rate, causal, offset=off)
    grads = decay_backward(q, k, v, out, den, dO, 1.0, approx.coef, rate, causal, offset=off)
    ref = attention_gradients(q, k, v, dO, 1.0, None, None, T=toeplitz(L, S, off, rate, causal))
    bounds = decay_gradient_bound(q, k, v, dO, 1.0, approx.coef, approx.error_bound, rate,
                                  causal, offset=off)
    for name, g, r, b, lo in zip("qkv", grads, ref, bounds, least):
        err = np.abs(g - r).max()
        assert lo * b <= err <= b, (name, err / b)


def test_bound_without_decay_is_the_causal_bound():
    # rate 0, causal: the masses are the rows' key counts and the approximation parts
    # those of causal_gradient_bound (the counts of roundings differ by the factors)
    from numbarope.ops._bounds import causal_gradient_bound
    rng = np.random.default_rng(9)
    q, k, v, dO, s, keep = inputs(rng, 3, 20, 50, 4, 3, 1.0, True)
    a = exp_approximation(1.0, eps=1e-3)
    b1 = decay_gradient_bound(q, k, v, dO, s, a.coef, a.error_bound, 0.0, True, offset=30,
                              key_mask=keep)
    b2 = causal_gradient_bound(q, k, v, dO, s, a.coef, a.error_bound, offset=30,
                               key_mask=keep)
    np.testing.assert_allclose(b1, b2, rtol=1e-6)
    assert all(x >= y for x, y in zip(b1, b2))


@pytest.mark.parametrize("causal", [True, False])
def test_workers_do_not_change_results(causal, monkeypatch):
    # several chunks per explicit task, several column tasks per scan (4 columns: one
    # unit each), feature blocks of 8 rows: bitwise the same for any number of threads
    monkeypatch.setattr(_common, "CHUNK", 16)
    monkeypatch.setattr(_config, "MAX_TASKS", 5)
    monkeypatch.setattr(decay, "BACKWARD_COLUMNS", 4)
    monkeypatch.setattr(_common, "BACKWARD_BLOCK_BYTES", 8 * 35 * 8)
    monkeypatch.setattr(_common, "BACKWARD_MIN_ROWS", 8)
    rng = np.random.default_rng(29)
    q, k, v, dO, s, keep = inputs(rng, 2, 200, 300, 4, 3, 1.0, True)
    coef = exp_approximation(1.0, degree=3).coef            # m = 35 features
    out, den = decay_attention(q, k, v, s, coef, 0.05, causal, offset=90, key_mask=keep)
    res = [decay_backward(q, k, v, out, den, dO, s, coef, 0.05, causal, offset=90,
                          key_mask=keep, workers=w) for w in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(res[0], res[1]))
    ref = attention_gradients(q, k, v, dO, s, None, keep, coef=coef,
                              T=toeplitz(200, 300, 90, 0.05, causal))
    for a, b in zip(res[0], ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


def test_registry_method_edges_and_padding(chunk):
    chunk(8)
    rng = np.random.default_rng(8)
    q, k, v, dO, s, keep = inputs(rng, 1, 30, 40, 4, 3, 1.0, True)
    keep[:5] = False
    coef = exp_approximation(1.0, eps=1e-4).coef
    alg = get("decay")
    for causal in (True, False):
        st = nb.Decay(0.2, causal=causal)
        T = toeplitz(30, 40, 5, 0.2, causal)
        out, den = decay_attention(q, k, v, s, coef, 0.2, causal, offset=5, key_mask=keep)
        g = decay_backward(q, k, v, out, den, dO, s, coef, 0.2, causal, offset=5,
                           key_mask=keep)
        # den in T's normalisation (run with T), converted back: the same gradients
        o2, d2 = alg.run(q, k, v, s, coef, structure=st, T=T, offset=5, key_mask=keep)
        g2 = alg.backward(q, k, v, o2, d2, dO, s, coef, structure=st, T=T, offset=5,
                          key_mask=keep)
        for a, b in zip(g, g2):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15 * np.abs(a).max())
        # T's weights underflow at some rows' nearest keys: den recomputed
        T0 = T * 1e-310
        g3 = alg.backward(q, k, v, o2, d2 * 1e-310, dO, s, coef, structure=st, T=T0,
                          offset=5, key_mask=keep)
        assert all(np.array_equal(a, b) for a, b in zip(g, g3))
        # padded keys get 0, the real keys something (causal: those at positions <= 34)
        assert not g[1][~keep].any() and not g[2][~keep].any()
        seen = keep & (np.arange(40) <= 34 if causal else True)
        assert np.abs(g[2][seen]).min() > 0 and not g[2][~seen].any()
    # causal rows that see no key get dq = 0
    out, den = decay_attention(q, k, v, s, coef, 0.2, True, offset=-10)
    dq = decay_backward(q, k, v, out, den, dO, s, coef, 0.2, True, offset=-10)[0]
    assert not dq[:10].any() and np.abs(dq[11:]).min() > 0
    # no real key, no row, Ev = 0: zeros of the right shapes
    none = np.zeros(40, bool)
    o0, d0 = decay_attention(q, k, v, s, coef, 0.2, False, key_mask=none)
    z = decay_backward(q, k, v, o0, d0, dO, s, coef, 0.2, False, key_mask=none)
    assert [x.shape for x in z] == [(30, 4), (40, 4), (40, 3)] and not any(x.any() for x in z)
    e = decay_backward(q[:0], k, v, out[:0], den[:0], dO[:0], s, coef, 0.2, False)
    assert e[0].shape == (0, 4) and not e[1].any() and not e[2].any()
    assert decay_gradient_bound(q[:0], k, v, dO[:0], s, coef, 1e-4, 0.2) == (0.0,) * 3
    assert decay_gradient_bound(q, k, v, dO, s, coef, 1.0, 0.2) == (np.inf,) * 3
    with pytest.raises(ValueError, match="rate"):
        decay_backward(q, k, v, out, den, dO, s, coef, -1.0, True)
    with pytest.raises(ValueError, match="scalar rate"):
        alg.backward(q, k, v, out, den, dO, s, coef, structure=nb.Decay([0.1, 0.2]))


@pytest.mark.parametrize("causal", [False, True])
def test_end_to_end_through_torch(causal):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(11 + causal)
    H, Hk, L, S, E, Ev = 3, 1, 50, 70, 4, 3
    q = torch.randn(2, H, L, E, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(2, Hk, S, E, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(2, Hk, S, Ev, generator=g, dtype=torch.float64)
    dout = torch.randn(2, H, L, Ev, generator=g, dtype=torch.float64)
    kpm = torch.rand(2, 1, S, generator=g) < 0.8
    kpm[..., -1] = True
    rates = [0.1, 0.3, 0.05]
    bias = numbarope.bias.Decay(rates, causal=causal)

    def grads(fn):
        x = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*x)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in x]

    info = []

    def ours(q, k, v):
        out, inf = numbarope.rope_attention(
            q, k, v, method="fast", bias=bias, eps=1e-6, enable_gqa=True,
            causal_alignment="bottom_right", key_padding_mask=kpm.numpy(), return_info=True)
        info.append(inf)
        return out

    def ref(q, k, v):
        t = torch.arange(L)[:, None] + (S - L) - torch.arange(S)[None, :]
        b = -torch.tensor(rates, dtype=torch.float64)[:, None, None] * t.abs()
        if causal:
            b = b.masked_fill(t < 0, -torch.inf)
        b = b.masked_fill(~kpm[:, :, None, :], -torch.inf)           # (2, 3, L, S)
        x = E ** -0.5 * q @ k.repeat_interleave(H, 1).transpose(-1, -2) + b
        return torch.softmax(x, -1) @ v.repeat_interleave(H, 1)

    a, b = grads(ours), grads(ref)
    assert all(h.algorithm == "decay" for h in info[0].heads)
    for x, y in zip(a, b):
        assert x.dtype == torch.float64
        assert float((x - y).abs().max() / y.abs().max()) < 1e-5
