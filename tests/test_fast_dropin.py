"""The fast path on what a PyTorch/transformers user passes: rectangular attention at
an offset, key padding, and grouped-query heads sharing one key side. Checked against
dense references (tests/naive.py style loops) within the certified bound."""

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention
from numbarope.fast import fast_separable, visible_keys
from numbarope.polynomial import exp_approximation


def _poly_reference(q, k, v, s, coef, off=0, causal=False, keep=None, T=None):
    """Σ_j p(s q_i·k_j) T(i−j) [v_j, 1] over visible real keys, by dense loops."""
    L, S = q.shape[0], k.shape[0]
    j = np.arange(S)
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        w = np.polynomial.polynomial.polyval(s * (k @ q[i]), coef)
        if T is not None:
            w = w * T[i - j + S - 1]
        if causal:
            w = np.where(j <= i + off, w, 0.0)
        if keep is not None:
            w = w * keep
        if w.sum() > 0:
            out[i] = w @ v / w.sum()
    return out


@pytest.mark.parametrize("L, S, off", [(5, 5, 0), (1, 40, 39), (37, 300, 263), (300, 37, 0),
                                       (300, 100, -20), (20, 900, 5), (700, 700, 0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_is_the_polynomial_attention(L, S, off, causal, padded):
    # fast_separable computes exactly (to rounding) the polynomial attention: the
    # same sums as a dense loop over the visible real keys, for one head and for a
    # stack of query heads on one key/value head
    rng = np.random.default_rng(L * 7 + S)
    E, s = 4, 0.5
    coef = exp_approximation(2.0, eps=1e-8).coef
    q = rng.standard_normal((3, L, E)) * 0.4
    k = rng.standard_normal((S, E)) * 0.4
    v = rng.standard_normal((S, 3))
    keep = rng.random(S) < 0.7 if padded else None
    one, _ = fast_separable(q[0], k, v, s, coef, causal=causal, offset=off, key_mask=keep)
    np.testing.assert_allclose(one, _poly_reference(q[0], k, v, s, coef, off, causal, keep),
                               rtol=0, atol=1e-13)
    stacked, _ = fast_separable(q, k, v, s, coef, causal=causal, offset=off, key_mask=keep)
    for h in range(3):
        ref = _poly_reference(q[h], k, v, s, coef, off, causal, keep)
        np.testing.assert_allclose(stacked[h], ref, rtol=0, atol=1e-13)
    # FFT path: any Toeplitz weights over the L + S - 1 offsets
    T = rng.random(L + S - 1) + 0.5
    fft, _ = fast_separable(q, k, v, s, coef, T=T, offset=off, key_mask=keep)
    for h in range(3):
        ref = _poly_reference(q[h], k, v, s, coef, off, False, keep, T)
        np.testing.assert_allclose(fft[h], ref, rtol=0, atol=1e-12)


def test_visible_keys():
    keep = np.array([False, True, True, False, True])
    np.testing.assert_array_equal(visible_keys(4, 5, 0, True, keep), [0, 1, 2, 2])
    np.testing.assert_array_equal(visible_keys(3, 5, -1, True, None), [0, 1, 2])
    np.testing.assert_array_equal(visible_keys(2, 5, 3, True, None), [4, 5])
    assert visible_keys(1, 5, 4, True, None) is None            # decoding: sees all
    assert visible_keys(4, 5, 0, False, keep) is None
    last_padded = np.array([True, True, True, True, False])
    assert visible_keys(2, 5, 3, True, last_padded) is None     # both see the 4 real keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["plain", "bias"])
def test_rectangular_padded_fast_within_bound(causal, kind):
    # a decoding block of 24 queries at the end of a 200-key cache, two batch rows,
    # left padding in one; every head on the fast path, within its certified bound
    rng = np.random.default_rng(5)
    B, H, L, S, E = 2, 2, 24, 200, 4
    q = rng.standard_normal((B, H, L, E)) * 0.5
    k = rng.standard_normal((B, H, S, E)) * 0.5
    v = rng.standard_normal((B, H, S, 3))
    keep = np.ones((B, 1, S), bool)
    keep[1, 0, :37] = False
    kw = {}
    if kind == "bias":           # ALiBi-like decay over t = i + off - j, off = S - L
        kw["bias"] = -0.01 * np.abs(np.arange(L + S - 1) - (S - 1) + (S - L))
    common = dict(rotary=True, is_causal=causal, causal_alignment="bottom_right",
                  key_padding_mask=keep, **kw)
    fast, info = rope_attention(q, k, v, method="fast", eps=1e-4, return_info=True,
                                verify=L, **common)
    exact = rope_attention(q, k, v, method="exact", **common)
    assert (info.method == "fast").all()
    assert (np.abs(fast - exact).max(axis=(-2, -1)) <= info.error_bound).all()
    assert all(h.observed_error <= h.error_bound for h in info.heads)


def _gqa_inputs(n=300, E=4, hq=6, hk=2, same_radius=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hq, n, E))
    k = rng.standard_normal((hk, n, E))
    if same_radius:
        q /= np.linalg.norm(q, axis=-1).max(axis=-1)[:, None, None]
        k /= np.linalg.norm(k, axis=-1).max(axis=-1)[:, None, None]
    return q * 1.5, k * 1.5, rng.standard_normal((hk, n, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_heads_share_the_key_side(causal):
    q, k, v = _gqa_inputs()
    kw = dict(rotary=True, is_causal=causal, method="fast", eps=1e-4)
    out, info = rope_attention(q, k, v, enable_gqa=True, return_info=True, **kw)
    assert (info.shared_heads == 3).all()
    assert all("shared by 3 query heads" in r for r in info.reason)
    # the same numbers as each query head against its own copy of the key/value head
    alone = rope_attention(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), **kw)
    np.testing.assert_allclose(out, alone, rtol=0, atol=1e-14)
    exact = rope_attention(q, k, v, enable_gqa=True, rotary=True, is_causal=causal)
    assert (np.abs(out - exact).max(axis=(-2, -1)) <= info.error_bound).all()


def test_gqa_sharing_keeps_every_bound_with_unequal_radii():
    # one head of a group with a larger radius: the group takes its polynomial (valid
    # on the smaller radii too) or, where that costs more, heads of equal degree share
    q, k, v = _gqa_inputs(seed=3)
    q[1] *= 1.6
    out, info = rope_attention(q, k, v, enable_gqa=True, rotary=True, method="fast",
                               eps=1e-4, return_info=True, verify=300)
    exact = rope_attention(q, k, v, enable_gqa=True, rotary=True)
    err = np.abs(out - exact).max(axis=(-2, -1))
    assert (err <= info.error_bound).all()
    own = numbarope.plan(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), rotary=True,
                         method="fast", eps=1e-4)
    for h, o in zip(info.heads, own.heads):     # a shared polynomial covers each radius
        assert h.radius >= o.radius
    shared = [h for h in info.heads if h.shared_heads > 1]
    for h in shared:
        peers = [g for g in shared if g.head[0] // 3 == h.head[0] // 3 and g.degree == h.degree]
        assert all(np.array_equal(g.coef, h.coef) for g in peers)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_key_side_state_of_earlier_blocks(causal, padded):
    # One sequence in blocks (numbarope._dask's fast long path): the states of the keys
    # before a block, passed as state=, give the same rows as the whole sequence at once.
    # Padded: the block's first 10 keys are padding, so its first causal rows see none
    # of its keys, only the state.
    from numbarope.fast import key_side_state
    rng = np.random.default_rng(11)
    n, E, Ev, s = 900, 6, 3, 0.7
    q, k = (rng.uniform(-0.4, 0.4, (n, E)) for _ in range(2))
    v = rng.standard_normal((n, Ev))
    coef = exp_approximation(1.0, degree=4).coef
    a, b = 350, 700                                    # one block: rows and keys a..b
    keep = np.ones(n, bool)
    if padded:
        keep[a:a + 10] = False
    ref, dref = fast_separable(q, k, v, s, coef, causal=causal, key_mask=keep)
    st = key_side_state(k[:a], v[:a], s, coef)
    S_, s_ = st
    assert S_.shape == (s_.size, Ev) and np.isfinite(S_).all()
    if causal:
        out, den = fast_separable(q[a:b], k[a:b], v[a:b], s, coef, causal=True,
                                  key_mask=keep[a:b], state=st)
    else:
        rest = key_side_state(k[a:][keep[a:]], v[a:][keep[a:]], s, coef)
        out, den = fast_separable(q[a:b], k[:0], v[:0], s, coef,
                                  state=(S_ + rest[0], s_ + rest[1]))
    np.testing.assert_allclose(den, dref[a:b], rtol=1e-12)
    np.testing.assert_allclose(out, ref[a:b], rtol=0, atol=1e-12 * np.abs(v).max())
    with pytest.raises(ValueError, match="state"):
        fast_separable(q[:5], k[:5], v[:5], s, coef, T=np.ones(9), state=st)
