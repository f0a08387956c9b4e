"""numbarope.ops.window.window_backward: the certified fast backward of sliding windows,
against the dense float64 references of tests/naive.py (attention_gradients with the
window's Toeplitz weights T): the same sums as the dense polynomial backward (to
rounding) for any chunk size, column slices and threads; within the certified bound of
window_gradient_bound against the EXACT gradients (causal and two-sided windows,
offsets, rectangular, padded keys, G = 3 query heads); end to end through
rope_attention with torch."""

import numpy as np
import pytest

import numbarope
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import _common, window
from numbarope.ops.registry import get
from numbarope.polynomial import exp_approximation

from _grad_inputs import inputs
from naive import attention_gradients as dense_gradients


def toeplitz(st, L, S, off):
    """The window's weights T[i − j + S − 1] (1 inside the band, 0 outside)."""
    t = np.arange(L + S - 1) - (S - 1) + off            # t = i + off − j
    left = np.inf if st.left is None else st.left
    right = np.inf if st.right is None else st.right
    return ((t >= -right) & (t <= left)).astype(np.float64)


def scales(q, k, v, dO, s, keep, R, st, off):
    """The gradients' natural magnitudes from the maxima (what the bound multiplies δ
    by): dq: s·max|k|·max‖dO_i‖₁·max|v|; dk: s·max|q|·max_j Σ_{i sees j} c_i‖dO_i‖₁·max|v|;
    dv: max_j Σ_{i sees j} c_i‖dO_i‖_∞, c_i = 1/(1 + (S_i−1)e^{−2R}) >= row i's weights."""
    L, S = q.shape[-2], k.shape[0]
    vis = toeplitz(st, L, S, off)[np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1] > 0
    if keep is not None:
        vis &= keep[None, :]
    Si = vis.sum(1)
    c = np.where(Si > 0, 1.0 / (1.0 + (Si - 1) * np.exp(-2 * R)), 0.0)
    d = dO.reshape(-1, L, dO.shape[-1])
    kr, vr = (k, v) if keep is None else (k[keep], v[keep])
    V = np.abs(vr).max()
    n1 = np.abs(d).sum(-1) * c                          # (G, L)
    ni = np.abs(d).max(-1) * c
    return (s * np.abs(kr).max() * np.abs(d).sum(-1)[:, Si > 0].max() * V,
            s * np.abs(q).max() * (n1.sum(0) @ vis).max() * V,
            (ni.sum(0) @ vis).max())


def run(q, k, v, dO, s, coef, st, off, keep, **kw):
    out, den = window.window_attention(q, k, v, s, coef, st, offset=off, key_mask=keep)
    return window.window_backward(q, k, v, out, den, dO, s, coef, st, offset=off,
                                  key_mask=keep, **kw)


@pytest.fixture
def chunk(monkeypatch):
    """Force the chunk of the forward and the backward (numbarope.ops._common.CHUNK)."""
    def set_chunk(c):
        monkeypatch.setattr(_common, "CHUNK", c)
    return set_chunk


CASES = [  # G, L, S, offset, E, Ev, R, padded, (left, right), chunk
    (1, 1, 1, 0, 1, 1, 0.3, False, (0, 0), 16),
    (1, 60, 60, 0, 4, 3, 1.0, False, (20, 0), 8),          # causal window, square
    (1, 64, 64, 0, 4, 2, 2.0, False, (63, 0), 16),         # = causal
    (1, 150, 200, 50, 8, 8, 0.3, True, (37, 0), 16),       # rectangular, padded
    (3, 40, 70, 30, 8, 4, 2.0, True, (15, 5), 8),          # G = 3, two-sided
    (3, 90, 60, -10, 4, 3, 1.0, True, (9, 33), 8),         # rows that see no key
    (1, 120, 40, 0, 2, 1, 3.0, False, (None, 6), 16),      # left unbounded
    (3, 17, 120, 103, 4, 1, 0.5, False, (50, 50), 16),     # decoding-like block
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
def test_within_the_certified_bound_of_the_exact_gradient(case, eps, chunk):
    G, L, S, off, E, Ev, R, padded, (left, right), c = case
    chunk(c)
    st = nb.Window(left, right)
    for seed in range(2):
        rng = np.random.default_rng([seed, G, L, S])
        q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
        approx = exp_approximation(R, eps=eps)
        grads = run(q, k, v, dO, s, approx.coef, st, off, keep)
        ref = dense_gradients(q, k, v, dO, s, None, keep, T=toeplitz(st, L, S, off))
        bounds = window.window_gradient_bound(q, k, v, dO, s, approx.coef,
                                              approx.error_bound, st, offset=off,
                                              key_mask=keep)
        for name, g, r, b, sc in zip("qkv", grads, ref, bounds,
                                     scales(q, k, v, dO, s, keep, R, st, off)):
            assert g.shape == r.shape and g.dtype == np.float64, name
            err = np.abs(g - r).max()
            assert err <= b, (name, err, b)
            # not vacuous: O(δ) times the gradient's magnitude from the maxima
            assert b <= 8 * approx.error_bound * sc + 1e-12 * sc, (name, b, sc)


@pytest.mark.parametrize("c", [1, 4, 1000])
@pytest.mark.parametrize("G, L, S, off, padded, lr", [
    (1, 80, 80, 0, False, (20, 0)),
    (3, 30, 75, 45, True, (12, 3)),
    (2, 70, 33, -5, True, (None, 4)),
    (1, 50, 90, 0, False, (200, 200)),                     # every key
])
def test_the_sums_of_the_polynomial_backward_for_any_chunk(c, G, L, S, off, padded, lr,
                                                           chunk):
    # tree states, partial chunks and their split are exact algebra: the dense backward
    # with P̃ = T·p(x)/Σ T·p agrees to rounding (chunk 1000: all explicit; 1: all trees)
    chunk(c)
    rng = np.random.default_rng(c + G)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, 4, 3, 1.5, padded)
    coef = exp_approximation(1.5, eps=1e-3).coef
    st = nb.Window(*lr)
    grads = run(q, k, v, dO, s, coef, st, off, keep)
    ref = dense_gradients(q, k, v, dO, s, None, keep, coef=coef, T=toeplitz(st, L, S, off))
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12 * np.abs(r).max())


def test_column_slices_and_threads(monkeypatch, chunk):
    # a tree budget of a few states: the state's columns cut into slices (one tree per
    # slice); several tasks per loop; bitwise the same for any number of threads, and
    # the same sums as without slices
    chunk(8)
    monkeypatch.setattr(_config, "MAX_TASKS", 5)
    cuts = []
    orig = window._slices

    def spy(widths, most):
        out = orig(widths, most)
        cuts.append(len(out))
        return out

    monkeypatch.setattr(window, "_slices", spy)
    rng = np.random.default_rng(29)
    G, L, S, off = 2, 200, 260, 30
    q, k, v, dO, s, keep = inputs(rng, G, L, S, 4, 3, 1.0, True)
    coef = exp_approximation(1.0, degree=3).coef            # m = 35 features
    st = nb.Window(40, 7)
    out, den = window.window_attention(q, k, v, s, coef, st, offset=off, key_mask=keep)
    ref = dense_gradients(q, k, v, dO, s, None, keep, coef=coef, T=toeplitz(st, L, S, off))
    whole = window.window_backward(q, k, v, out, den, dO, s, coef, st, offset=off,
                                   key_mask=keep, workers=1)
    assert cuts == [1, 1]                                   # both passes: one slice
    monkeypatch.setattr(_config, "STATE_BYTES", 8 * 35 * 8 * 60)
    res = [window.window_backward(q, k, v, out, den, dO, s, coef, st, offset=off,
                                  key_mask=keep, workers=w) for w in (1, 2, -1)]
    assert min(cuts[2:]) > 1
    for r in res[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, res[0]))
    for a, b, r in zip(res[0], whole, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(r).max())
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-12 * np.abs(r).max())


def test_workers_do_not_change_results():
    # the default chunk (several chunks at S = 1500), several heads
    rng = np.random.default_rng(7)
    q, k, v, dO, s, keep = inputs(rng, 2, 700, 1500, 6, 5, 1.0, True)
    coef = exp_approximation(1.0, eps=1e-4).coef
    st = nb.Window(300, 100)
    res = [run(q, k, v, dO, s, coef, st, 800, keep, workers=w) for w in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(*res))


def test_padded_keys_get_zero_and_stacked_heads_add(chunk):
    chunk(8)
    rng = np.random.default_rng(5)
    q, k, v, dO, s, keep = inputs(rng, 3, 50, 90, 4, 3, 1.0, True)
    coef = exp_approximation(1.0, eps=1e-5).coef
    st = nb.Window(12, 2)
    dq, dk, dv = run(q, k, v, dO, s, coef, st, 40, keep)
    assert np.all(dk[~keep] == 0) and np.all(dv[~keep] == 0)
    seen = keep & (np.arange(90) >= 40 - 12)                # row 0 (position 40) back 12
    assert np.abs(dv[seen]).min() > 0 and not dv[:28].any()
    # G heads together: dq per head, dk and dv their sums
    for h in range(3):
        g = run(q[h], k, v, dO[h], s, coef, st, 40, keep)
        np.testing.assert_allclose(dq[h], g[0], rtol=0, atol=1e-13 * np.abs(dq).max())
    parts = [run(q[h], k, v, dO[h], s, coef, st, 40, keep) for h in range(3)]
    np.testing.assert_allclose(dk, sum(p[1] for p in parts), rtol=0,
                               atol=1e-13 * np.abs(dk).max())
    np.testing.assert_allclose(dv, sum(p[2] for p in parts), rtol=0,
                               atol=1e-13 * np.abs(dv).max())


def test_shapes_edges_and_registry_method(chunk):
    chunk(8)
    rng = np.random.default_rng(8)
    q, k, v, dO, s, _ = inputs(rng, 1, 12, 20, 4, 3, 1.0, False)
    coef = exp_approximation(1.0, eps=1e-4).coef
    st = nb.Window(3, 0)
    out, den = window.window_attention(q, k, v, s, coef, st, offset=4)
    g = window.window_backward(q, k, v, out, den, dO, s, coef, st, offset=4)
    assert [x.shape for x in g] == [(12, 4), (20, 4), (20, 3)]
    g2 = get("window").backward(q, k, v, out, den, dO, s, coef, structure=st, offset=4)
    assert all(np.array_equal(a, b) for a, b in zip(g, g2))
    with pytest.raises(ValueError, match="structure"):
        get("window").backward(q, k, v, out, den, dO, s, coef, offset=4)
    # keys 1 .. 15 are seen (rows at positions 4 .. 15, three keys back), no others
    assert not g[1][16:].any() and not g[2][16:].any() and not g[2][0].any()
    assert np.abs(g[2][1:16]).min() > 0
    # rows whose window holds no key: 0; no real key; no query row; Ev = 0
    o0, d0 = window.window_attention(q, k, v, s, coef, st, offset=100)
    z = window.window_backward(q, k, v, o0, d0, dO, s, coef, st, offset=100)
    assert all(x.shape == y.shape and not x.any() for x, y in zip(z, g))
    none = np.zeros(20, bool)
    o0, d0 = window.window_attention(q, k, v, s, coef, st, key_mask=none)
    z = window.window_backward(q, k, v, o0, d0, dO, s, coef, st, key_mask=none)
    assert all(x.shape == y.shape and not x.any() for x, y in zip(z, g))
    e = window.window_backward(q[:0], k, v, out[:0], den[:0], dO[:0], s, coef, st)
    assert e[0].shape == (0, 4) and not e[1].any() and not e[2].any()
    o1, d1 = window.window_attention(q, k, v[:, :0], s, coef, st)
    z = window.window_backward(q, k, v[:, :0], o1, d1, dO[:, :0], s, coef, st)
    assert z[2].shape == (20, 0) and not z[0].any() and not z[1].any()
    # the bound: 0 without a visible key, inf when void
    assert window.window_gradient_bound(q, k, v, dO, s, coef, 1e-4, st,
                                        offset=100) == (0.0, 0.0, 0.0)
    assert window.window_gradient_bound(q, k, v, dO, s, coef, 1.0, st) == (np.inf,) * 3


def test_bound_is_nearly_attained(chunk):
    # test_gemm_backward's worst case in every window: one key per window at logit +R
    # with value +1 (every 64th key, the window 63 back), the others at −R with value
    # −1, equal rows, p of even degree: the errors reach a sizeable fraction of the
    # bound and never exceed it (measured 0.13, 0.18, 0.58; with every 16th key and
    # 15 back 0.13, 0.09, 0.40)
    chunk(8)
    R, L = 1.0, 256
    approx = exp_approximation(R, degree=4)
    plus = np.arange(L) % 64 == 0
    q = np.full((L, 1), np.sqrt(R))
    k = np.where(plus, np.sqrt(R), -np.sqrt(R))[:, None]
    v = np.where(plus, 1.0, -1.0)[:, None]
    dO = np.ones((L, 1))
    st = nb.Window(63, 0)
    grads = run(q, k, v, dO, 1.0, approx.coef, st, 0, None)
    ref = dense_gradients(q, k, v, dO, 1.0, None, None, T=toeplitz(st, L, L, 0))
    bounds = window.window_gradient_bound(q, k, v, dO, 1.0, approx.coef,
                                          approx.error_bound, st)
    for name, g, r, b, least in zip("qkv", grads, ref, bounds, (0.05, 0.1, 0.4)):
        err = np.abs(g - r).max()
        assert least * b <= err <= b, (name, err / b)


def test_end_to_end_through_torch():
    # rope_attention(method="fast", bias=Window) on tensors requiring grad runs the
    # window's certified backward: within its bound of torch autograd of a dense float64
    # reference with the same band, GQA and key padding included (batch 1's first rows
    # see only padded keys)
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(31)
    B, Hq, Hk, n, E, Ev = 2, 4, 2, 300, 8, 5
    q = (torch.randn(B, Hq, n, E, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    k = (torch.randn(B, Hk, n, E, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    v = torch.randn(B, Hk, n, Ev, generator=g, dtype=torch.float64).requires_grad_()
    kpm = torch.ones(B, 1, n, dtype=torch.bool)
    kpm[1, :, :25] = False
    st = nb.Window(40, 3)
    kw = {"bias": st, "enable_gqa": True, "key_padding_mask": kpm}
    out, info = rope_attention_fast(q, k, v, kw)
    assert info.heads[0].algorithm == "window"
    assert set(info.algorithm.ravel()) == {"window"}
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad(out, (q, k, v), dout)
    # dense reference: softmax over the band and the real keys, torch autograd
    t = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    band = (t <= 40) & (t >= -3)
    keep = band[None, None] & kpm[:, :, None, :]
    x = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / np.sqrt(E)
    A = torch.softmax(x.masked_fill(~keep, -torch.inf), -1).nan_to_num(0.0)  # no key: 0
    ref_out = A @ v.repeat_interleave(2, 1)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout)
    for b in range(B):
        for h in range(Hk):
            hp = info.heads[b * Hq + 2 * h]
            bq, bk, bv = window.window_gradient_bound(
                q[b, 2 * h:2 * h + 2].detach().numpy(), k[b, h].detach().numpy(),
                v[b, h].detach().numpy(), dout[b, 2 * h:2 * h + 2].numpy(), 1 / np.sqrt(E),
                hp.coef, hp.delta, st, key_mask=kpm[b, 0].numpy())
            eq = (fast[0] - ref[0])[b, 2 * h:2 * h + 2].abs().max().item()
            ek = (fast[1] - ref[1])[b, h].abs().max().item()
            ev = (fast[2] - ref[2])[b, h].abs().max().item()
            assert 0 < eq <= bq and 0 < ek <= bk and 0 < ev <= bv, (eq, bq, ek, bk, ev, bv)
    assert float((fast[2] - ref[2]).abs().max()) <= 1e-3 * float(ref[2].abs().max())


def rope_attention_fast(q, k, v, kw):
    return numbarope.rope_attention(q, k, v, method="fast", eps=1e-4, return_info=True,
                                    **kw)
