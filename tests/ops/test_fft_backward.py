"""numbarope.ops.fft.fft_backward: the fast backward of the fft algorithm (any relative
bias, Toeplitz weights T, by FFT): the same sums as the dense polynomial backward with
T (to rounding); within the bound of numbarope.ops.fft.fft_gradient_bound of the EXACT
softmax gradients (the dense float64 reference of tests/naive.py, attention_gradients),
itself O(δ) and nearly attained in the worst case; rows that see no key and padded or
unseen keys get exactly 0; grouped-query heads, offsets, rectangular; bitwise the same
for any number of threads; end to end through rope_attention with a bias on tensors
that require grad."""

import numpy as np
import pytest

import numbarope
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import fft
from numbarope.ops.registry import get
from numbarope.polynomial import exp_approximation

from _grad_inputs import inputs
from naive import attention_gradients


def weights(kind, L, S, off, rng):
    """Toeplitz weights T[i − j + S − 1] (max 1) of a few kinds of relative bias."""
    t = np.arange(L + S - 1) - (S - 1) + off                # the offset i + off − j
    if kind == "dense":                                     # any bias: N(0, 1) logits
        b = rng.standard_normal(L + S - 1)
    elif kind == "alibi":                                   # causal ALiBi
        b = nb.ALiBi(0.05).values(L, S, off)
    elif kind == "t5":                                      # bidirectional T5 buckets
        b = nb.T5Buckets(rng.standard_normal(32), max_distance=40).values(L, S, off)
    elif kind == "window":                                  # a band: rows outside see none
        b = np.where((t >= -3) & (t <= 6), -0.1 * np.abs(t), -np.inf)
    else:
        raise ValueError(kind)
    b = np.asarray(b, dtype=np.float64)
    return np.exp(b - b.max())


def natural_scales(q, k, v, dO, s, keep, R, T):
    """The gradients' magnitudes from the maxima (what the approximation part multiplies
    δ by): dq: s·max|k|·max‖dO_i‖₁·max|v|; dk: s·max|q|·Σ c_i‖dO_i‖₁·max|v|; dv:
    Σ c_i‖dO_i‖_∞ over rows that see a key, c_i = 1/(1 + (μ_i/max T − 1)e^{−2R}) >=
    every weight of row i (μ_i its mass)."""
    L, S = q.shape[-2], k.shape[0]
    Tm = T[np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1]
    if keep is not None:
        Tm = Tm * keep[None]
    mu = np.tile(Tm.sum(1), dO.size // (L * dO.shape[-1]))
    d = dO.reshape(-1, dO.shape[-1])[mu > 0]
    mu = mu[mu > 0]
    c = 1.0 / (1.0 + np.maximum(mu / T.max() - 1, 0) * np.exp(-2 * R))
    kr, vr = (k, v) if keep is None else (k[keep], v[keep])
    V = np.abs(vr).max()
    return (s * np.abs(kr).max() * np.abs(d).sum(1).max() * V,
            s * np.abs(q).max() * (c @ np.abs(d).sum(1)) * V,
            c @ np.abs(d).max(1))


CASES = [  # G, L, S, offset, E, Ev, R, padded, kind
    (1, 1, 1, 0, 1, 1, 0.3, False, "dense"),
    (1, 7, 9, 2, 2, 3, 1.0, False, "dense"),
    (1, 60, 60, 0, 4, 3, 1.0, False, "alibi"),           # causal, square
    (1, 40, 90, 50, 3, 2, 2.0, True, "alibi"),           # rectangular at the end, padded
    (3, 30, 70, 40, 4, 3, 1.5, True, "t5"),              # G = 3, bidirectional
    (3, 50, 35, 0, 2, 1, 3.0, False, "dense"),           # L > S
    (2, 45, 45, -10, 4, 2, 1.0, True, "window"),         # rows that see no key
]


@pytest.mark.parametrize("case", CASES)
def test_the_sums_of_the_polynomial_backward(case):
    # the monomial columns, their Toeplitz products by FFT and the contractions are
    # exact algebra: the dense backward with P̃ = T·p(x)/Σ agrees to rounding
    G, L, S, off, E, Ev, R, padded, kind = case
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    T = weights(kind, L, S, off, rng)
    coef = exp_approximation(R, eps=1e-5).coef
    out, den = fft.fft_attention(q, k, v, s, coef, T, key_mask=keep)
    grads = fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep)
    ref = attention_gradients(q, k, v, dO, s, keep=keep, coef=coef, T=T)
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and g.dtype == np.float64
        # (one key: the exact dq is 0, the computed one rounding of terms of size ~1)
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10 * max(np.abs(r).max(), 1e-5))


RATIOS = []          # bound / observed error, printed by the last test of the module


@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("eps", [1e-3, 1e-7])
@pytest.mark.parametrize("seed", [0, 1])
def test_within_the_bound_of_the_exact_gradient(case, eps, seed):
    G, L, S, off, E, Ev, R, padded, kind = case
    rng = np.random.default_rng([seed, hash(case) % 2**32])
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    T = weights(kind, L, S, off, rng)
    approx = exp_approximation(R, eps=eps)
    out, den = fft.fft_attention(q, k, v, s, approx.coef, T, key_mask=keep)
    grads = fft.fft_backward(q, k, v, out, den, dO, s, approx.coef, T, key_mask=keep)
    exact = attention_gradients(q, k, v, dO, s, keep=keep, T=T)
    poly = attention_gradients(q, k, v, dO, s, keep=keep, coef=approx.coef, T=T)
    bounds, parts = fft.fft_gradient_bound(q, k, v, dO, s, approx.coef, approx.error_bound,
                                           T, key_mask=keep, parts=True)
    for i, (name, g, r, p, b, sc) in enumerate(zip(
            "qkv", grads, exact, poly, bounds,
            natural_scales(q, k, v, dO, s, keep, R, T))):
        err = np.abs(g - r).max()
        assert err <= b, (name, err, b)
        # the parts add up; the rounding and FFT parts cover the backward's own error
        assert b == pytest.approx(sum(parts[x][i] for x in ("approximation", "rounding",
                                                            "fft")), rel=1e-12)
        assert np.abs(g - p).max() <= parts["rounding"][i] + parts["fft"][i], name
        # not vacuous: O(δ) times the gradient's magnitude from the maxima (the
        # approximation part is 2ε_P + e_Δ <= ~6δ of it; rounding and FFT ~1e-13)
        assert b <= 8 * approx.error_bound * sc + 1e-11 * sc, (name, b, sc)
        if err > 0:
            RATIOS.append(b / err)


@pytest.mark.parametrize("L, S, off, causal, least", [
    (20, 120, 100, False, (0.03, 0.3, 0.6)),
    (60, 60, 0, True, (0.05, 0.08, 0.4))])
def test_bound_is_nearly_attained(L, S, off, causal, least):
    # The worst case of test_gemm_backward.py (one key at logit +R with value +1, the
    # others at −R with value −1, equal rows, p of even degree: P̃/A − 1 ≈ ±2δ) with
    # T ≡ 1, or causal 0/1 weights: the errors reach a sizeable fraction of the bound
    # (measured 0.065, 0.55, 0.94 for dq, dk, dv; causal square 0.13, 0.15, 0.58: the
    # first rows see few keys, their weights are near 1 and their errors near 0)
    R = 1.0
    approx = exp_approximation(R, degree=4)
    q = np.full((L, 1), np.sqrt(R))
    k = np.full((S, 1), -np.sqrt(R))
    k[0] = np.sqrt(R)
    v = np.where(np.arange(S) == 0, 1.0, -1.0)[:, None]
    dO = np.ones((L, 1))
    T = np.ones(L + S - 1)
    if causal:
        T[:S - 1 - off] = 0.0                               # t = i + off − j < 0
    out, den = fft.fft_attention(q, k, v, 1.0, approx.coef, T)
    grads = fft.fft_backward(q, k, v, out, den, dO, 1.0, approx.coef, T)
    ref = attention_gradients(q, k, v, dO, 1.0, T=T)
    bounds = fft.fft_gradient_bound(q, k, v, dO, 1.0, approx.coef, approx.error_bound, T)
    for name, g, r, b, lo in zip("qkv", grads, ref, bounds, least):
        err = np.abs(g - r).max()
        assert lo * b <= err <= b, (name, err / b)


def test_converges_to_the_exact_gradient():
    # the fast backward approximates the exact gradient (not the polynomial forward's):
    # a more accurate p brings it to the exact one
    rng = np.random.default_rng(17)
    R, L, S = 2.0, 50, 80
    q, k, v, dO, s, keep = inputs(rng, 3, L, S, 4, 3, R, True)
    T = weights("dense", L, S, 0, rng)
    ref = attention_gradients(q, k, v, dO, s, keep=keep, T=T)
    errs = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-10):
        coef = exp_approximation(R, eps=eps).coef
        out, den = fft.fft_attention(q, k, v, s, coef, T, key_mask=keep)
        g = fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep)
        errs.append([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(g, ref)])
    errs = np.array(errs)
    assert np.all(errs[1:] < errs[:-1] / 10), errs
    assert np.all(errs[0] > 1e-5) and np.all(errs[-1] < 1e-9), errs


def test_rows_without_keys_and_keys_without_rows_get_zero():
    # a band of offsets: the first rows see no key, the last keys are seen by no row;
    # the forward leaves FFT noise in those rows' den (here made large on purpose):
    # their gradients are exactly 0, as the exact ones; padded keys too
    rng = np.random.default_rng(6)
    L, S, off = 40, 60, -12
    q, k, v, dO, s, keep = inputs(rng, 2, L, S, 4, 3, 1.0, True)
    T = weights("window", L, S, off, rng)
    coef = exp_approximation(1.0, eps=1e-6).coef
    out, den = fft.fft_attention(q, k, v, s, coef, T, key_mask=keep)
    Tm = T[np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1] * keep[None]
    rows, keys = Tm.sum(1) > 0, Tm.sum(0) > 0
    assert not rows.all() and not keys.all() and rows.any()
    den[:, ~rows] = 1e-3                                    # noise where nothing is seen
    dq, dk, dv = fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep)
    assert not dq[:, ~rows].any() and np.abs(dq[:, rows]).min() > 0
    assert not dk[~keys].any() and not dv[~keys].any()
    assert np.abs(dv[keys]).min() > 0
    ref = attention_gradients(q, k, v, dO, s, keep=keep, coef=coef, T=T)
    for g, r in zip((dq, dk, dv), ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10 * np.abs(r).max())
    # the bound counts only the rows that see a key
    b = fft.fft_gradient_bound(q[:, ~rows], k, v, dO[:, ~rows], s, coef, 1e-6,
                               T[:(~rows).sum() + S - 1], key_mask=keep)
    assert b == (0.0, 0.0, 0.0)


def test_workers_and_blocks_do_not_change_results(monkeypatch):
    # several monomial blocks, column tasks and row tasks (small FFT_BLOCK_BYTES,
    # BACKWARD_ROWS, MAX_TASKS): bitwise the same for any number of threads, and the
    # same numbers as one block
    rng = np.random.default_rng(29)
    L, S = 150, 210
    q, k, v, dO, s, keep = inputs(rng, 2, L, S, 4, 3, 1.0, True)
    T = weights("t5", L, S, 30, rng)
    coef = exp_approximation(1.0, degree=3).coef            # 70 monomials of degree <= 4
    out, den = fft.fft_attention(q, k, v, s, coef, T, key_mask=keep)
    one_block = fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep, workers=1)
    N = fft.fft_length(L, S)
    monkeypatch.setattr(_config, "FFT_BLOCK_BYTES", 8 * 4 * 3 * N * 9)     # 9 monomials
    monkeypatch.setattr(_config, "MAX_TASKS", 5)
    monkeypatch.setattr(fft, "BACKWARD_ROWS", 32)
    res = [fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep, workers=w)
           for w in (1, 2, 3, -1)]
    for r in res[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, res[0]))
    for a, b in zip(res[0], one_block):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14 * np.abs(b).max())


def test_registry_method_shapes_and_edges():
    rng = np.random.default_rng(8)
    L, S, off = 12, 20, 8
    q, k, v, dO, s, _ = inputs(rng, 1, L, S, 4, 3, 1.0, False)
    coef = exp_approximation(1.0, eps=1e-4).coef
    alg = get("fft")
    st = nb.ALiBi(0.2)
    out, den = alg.run(q, k, v, s, coef, structure=st, offset=off)
    g = alg.backward(q, k, v, out, den, dO, s, coef, structure=st, offset=off)
    assert [x.shape for x in g] == [(L, 4), (S, 4), (S, 3)]
    T = fft.toeplitz_weights(st, L, S, off)
    g2 = fft.fft_backward(q, k, v, out, den, dO, s, coef, T)
    assert all(np.array_equal(a, b) for a, b in zip(g, g2))
    assert alg.gradient_bound(q, k, v, dO, s, coef, 1e-4, structure=st, offset=off) == \
        fft.fft_gradient_bound(q, k, v, dO, s, coef, 1e-4, T)
    # without a structure or T: no bias, every row sees every key
    o1, d1 = alg.run(q, k, v, s, coef)
    g1 = alg.backward(q, k, v, o1, d1, dO, s, coef)
    ref = attention_gradients(q, k, v, dO, s, coef=coef)
    for a, b in zip(g1, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
    # no real key: zero gradients; no query row: dq empty, dk = dv = 0
    none = np.zeros(S, bool)
    o0, d0 = fft.fft_attention(q, k, v, s, coef, T, key_mask=none)
    z = fft.fft_backward(q, k, v, o0, d0, dO, s, coef, T, key_mask=none)
    assert all(x.shape == y.shape and not x.any() for x, y in zip(z, g))
    e = fft.fft_backward(q[:0], k, v, out[:0], den[:0], dO[:0], s, coef, T[L:])
    assert e[0].shape == (0, 4) and not e[1].any() and not e[2].any()
    # Ev = 0: nothing flows back; T of the wrong length: an error
    z = fft.fft_backward(q, k, v[:, :0], out[:, :0], den, dO[:, :0], s, coef, T)
    assert z[2].shape == (S, 0) and not z[0].any() and not z[1].any()
    with pytest.raises(ValueError, match="L \\+ S − 1"):
        fft.fft_backward(q, k, v, out, den, dO, s, coef, T[1:])
    # the bound of an empty problem is 0, of a void one inf
    assert fft.fft_gradient_bound(q[:0], k, v, dO[:0], s, coef, 1e-4, T[L:]) == (0.0,) * 3
    assert fft.fft_gradient_bound(q, k, v, dO, s, coef, 1.0, T) == (np.inf,) * 3


def _torch_dense(q, k, v, bias, scale, real):
    """torch float64 softmax attention of (B, H, L, E) queries on (B, Hk, S, E) keys
    (grouped-query) with a relative bias b[i − j + S − 1] and a key mask."""
    import torch
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    rep = H // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    B = torch.as_tensor(bias)[torch.arange(L)[:, None] - torch.arange(S)[None, :] + S - 1]
    x = scale * q @ kk.transpose(-1, -2) + B
    x = x.masked_fill(~real[:, :, None, :], -torch.inf)
    return torch.softmax(x, -1).nan_to_num(0.0) @ vv


def test_end_to_end_through_rope_attention():
    # rope_attention(..., bias=Dense(...), method="fast") on tensors that require grad:
    # the heads run fft forward and backward (3 query heads per key/value head, key
    # padding, rectangular at an offset), within the reported gradient bounds of torch
    # autograd through a dense float64 reference with the same bias
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(31)
    B, H, Hk, L, S, E, Ev = 2, 3, 1, 40, 64, 4, 3
    q = (torch.randn(B, H, L, E, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    k = (torch.randn(B, Hk, S, E, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    v = torch.randn(B, Hk, S, Ev, generator=g, dtype=torch.float64).requires_grad_()
    bias = np.random.default_rng(3).normal(size=L + S - 1)
    kpm = torch.ones(B, 1, S, dtype=torch.bool)
    kpm[1, :, :9] = False
    kw = dict(bias=nb.Dense(bias), enable_gqa=True, key_padding_mask=kpm,
              query_offset=S - L)
    out, info = numbarope.rope_attention(q, k, v, method="fast", eps=1e-6, return_info=True,
                                         **kw)
    assert info.heads[0].algorithm == "fft" and set(info.algorithm.ravel()) == {"fft"}
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad(out, (q, k, v), dout)
    ref_out = _torch_dense(q, k, v, bias, E ** -0.5, kpm)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout)
    assert (out - ref_out).abs().max().item() < 1e-6
    gb = info.gradient_bound
    assert gb.shape == (B, H, 3) and np.all(np.isfinite(gb)) and np.all(gb > 0)
    for b in range(B):
        for i in range(H):
            err = (fast[0] - ref[0])[b, i].abs().max().item()
            assert 0 < err <= gb[b, i, 0]
        for c in (1, 2):
            err = (fast[c] - ref[c])[b, 0].abs().max().item()
            assert 0 < err <= gb[b, :, c].sum()
    for a, r in zip(fast, ref):
        assert (a - r).abs().max().item() <= 1e-5 * r.abs().max().item()


def test_ratios_report():
    # bound / observed over test_within_the_bound_of_the_exact_gradient (run in this
    # module's order): the bound is never below the error, and within ~10⁵ of it
    if not RATIOS:
        pytest.skip("run with the bound tests")
    r = np.array(RATIOS)
    print(f"fft backward bound/observed: min {r.min():.3g}, median {np.median(r):.3g}, "
          f"max {r.max():.3g} over {r.size}")
    assert r.min() >= 1 and np.median(r) < 1e5


# ------------------------------------------------------------------ toeplitz-fft

def general_gradients(q, k, v, dO, s, W, T, keep=None, coef=None):
    """Dense float64 gradients of attention with general relative matrices: logits
    x_ij = s·q_iᵀW[i − j + S − 1]k_j, weights T[i − j + S − 1]·exp(x_ij) (or ·p(x_ij)
    with ``coef``: the fast backward's sums in exact form) over the real keys,
    normalised; Δ from that forward's output. q (G, L, E) or (L, E)."""
    Q = q[None] if q.ndim == 2 else q
    D = dO[None] if dO.ndim == 2 else dO
    L, S = Q.shape[1], k.shape[0]
    idx = np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1
    Wm = W[idx]                                             # (L, S, E, E)
    Tm = T[idx] * (1.0 if keep is None else keep[None])
    Wk = np.einsum("ijab,jb->ija", Wm, k)                   # W_ij k_j
    X = s * np.einsum("gia,ija->gij", Q, Wk)
    vis = (Tm > 0)[None]
    if coef is None:
        Xm = np.where(vis, X, -np.inf)
        mx = Xm.max(axis=2, keepdims=True)
        w = np.exp(Xm - np.where(np.isfinite(mx), mx, 0.0))
    else:
        w = np.where(vis, np.polynomial.polynomial.polyval(X, coef), 0.0)
    w = w * Tm[None]
    tot = w.sum(axis=2, keepdims=True)
    A = np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
    o = A @ v
    delta = np.einsum("gic,gic->gi", D, o)
    dX = A * (np.einsum("gic,jc->gij", D, v) - delta[:, :, None])
    dq = s * np.einsum("gij,ija->gia", dX, Wk)
    dk = s * np.einsum("gij,ijab,gia->jb", dX, Wm, Q)       # W_ijᵀ q_i
    dv = np.einsum("gij,gic->jc", A, D)
    return (dq[0] if q.ndim == 2 else dq), dk, dv


def general_inputs(rng, G, L, S, E, Ev, R, padded, causal):
    q, k, v, dO, s, keep = inputs(rng, G, L, S, E, Ev, R, padded)
    W = rng.standard_normal((L + S - 1, E, E))
    W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()        # ‖W_t‖₂ <= 1: radius <= R
    T = np.exp(-0.5 * rng.random(L + S - 1))
    if causal:
        T[:S - 1 - (S - L)] = 0.0                           # bottom-right: t = i + S − L − j
    return q, k, v, dO, s, keep, W, T


GENERAL = [  # G, L, S, E, Ev, R, padded, causal
    (1, 1, 1, 1, 1, 0.5, False, False),
    (1, 20, 20, 2, 2, 1.0, False, True),
    (2, 15, 30, 3, 2, 1.5, True, True),
    (1, 25, 12, 2, 3, 2.0, True, False),
]


@pytest.mark.parametrize("case", GENERAL)
def test_toeplitz_fft_backward_is_the_polynomial_backward(case):
    from numbarope.ops import toeplitz_fft as tf
    G, L, S, E, Ev, R, padded, causal = case
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, v, dO, s, keep, W, T = general_inputs(rng, G, L, S, E, Ev, R, padded, causal)
    coef = exp_approximation(R, eps=1e-5).coef
    res = [tf.fast_general(qh, k, v, s, coef, W, T, key_mask=keep)
           for qh in (q[None] if G == 1 else q)]
    out = np.stack([r[0] for r in res]).reshape(dO.shape)
    den = np.stack([r[1] for r in res]).reshape(dO.shape[:-1])
    grads = tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, W, T, key_mask=keep)
    ref = general_gradients(q, k, v, dO, s, W, T, keep, coef=coef)
    for g, r in zip(grads, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10 * max(np.abs(r).max(), 1e-5))
    # and it approximates the exact gradients to O(δ) (converging: see below)
    exact = general_gradients(q, k, v, dO, s, W, T, keep)
    for g, r in zip(grads, exact):
        assert np.abs(g - r).max() <= 1e-3 * max(np.abs(r).max(), 1e-5)


def test_toeplitz_fft_backward_converges_threads_and_identity():
    from numbarope.ops import toeplitz_fft as tf
    rng = np.random.default_rng(41)
    R, L, S = 1.5, 24, 36
    q, k, v, dO, s, keep, W, T = general_inputs(rng, 1, L, S, 3, 2, R, True, True)
    exact = general_gradients(q, k, v, dO, s, W, T, keep)
    errs = []
    for eps in (1e-2, 1e-5, 1e-9):
        coef = exp_approximation(R, eps=eps).coef
        out, den = tf.fast_general(q, k, v, s, coef, W, T, key_mask=keep)
        g = tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, W, T, key_mask=keep)
        errs.append([np.abs(a - b).max() / np.abs(b).max() for a, b in zip(g, exact)])
    errs = np.array(errs)
    assert np.all(errs[1:] < errs[:-1] / 30), errs
    assert np.all(errs[-1] < 1e-7), errs
    # bitwise the same for any number of threads
    res = [tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, W, T, key_mask=keep,
                                    workers=w) for w in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(*res))
    # W_t = I: the separable fft backward
    eye = np.broadcast_to(np.eye(3), W.shape).copy()
    out, den = tf.fast_general(q, k, v, s, coef, eye, T, key_mask=keep)
    a = tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, eye, T, key_mask=keep)
    b = fft.fft_backward(q, k, v, out, den, dO, s, coef, T, key_mask=keep)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12 * np.abs(y).max())
    # edges: no real key, Ev = 0, wrong shapes
    none = np.zeros(S, bool)
    z = tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, W, T, key_mask=none)
    assert not any(x.any() for x in z)
    with pytest.raises(ValueError, match="relative"):
        tf.toeplitz_fft_backward(q, k, v, out, den, dO, s, coef, W[1:], T)
