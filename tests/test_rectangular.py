"""Rectangular attention: L queries at positions query_offset .. query_offset+L-1
against S keys at 0 .. S-1 (decoding with a key/value cache), exact and fast paths."""

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention

import naive


def _reference(q, k, v, off, causal, bias=None, W=None, rotary=None):
    """Dense loops: query i at position i + off, key j at j, offset t = i + off - j."""
    L, E = q.shape
    S = k.shape[0]
    s = 1 / np.sqrt(E)
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        qi = q[i] if rotary is None else naive.rotation_matrix(i + off, E) @ q[i]
        logits = np.full(S, -np.inf)
        for j in range(S):
            if causal and j > i + off:
                continue
            kj = k[j] if rotary is None else naive.rotation_matrix(j, E) @ k[j]
            Wt = np.eye(E) if W is None else W[i - j + S - 1]
            logits[j] = s * qi @ Wt @ kj + (0.0 if bias is None else bias[i - j + S - 1])
        if np.all(logits == -np.inf):
            continue
        w = np.exp(logits - logits.max())
        out[i] = w @ v / w.sum()
    return out


def test_known_values_top_left_and_bottom_right():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4))
    k = rng.standard_normal((4, 4))
    v = rng.standard_normal((4, 3))
    top = rope_attention(q, k, v, is_causal=True)                       # torch SDPA
    np.testing.assert_allclose(top[0], v[0], atol=1e-15)
    bottom = rope_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    np.testing.assert_allclose(bottom, _reference(q, k, v, 3, True), atol=1e-14)
    np.testing.assert_allclose(bottom, rope_attention(q, k, v), atol=1e-14)   # sees all 4


@pytest.mark.parametrize("L, S, off", [(1, 7, 6), (3, 11, 8), (5, 5, 2), (6, 3, -2),
                                       (4, 9, 0), (2, 6, -5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["plain", "rotary", "bias", "relative"])
def test_against_reference(L, S, off, causal, kind):
    rng = np.random.default_rng(L * 100 + S)
    E = 4
    q, k = rng.standard_normal((L, E)) * 0.5, rng.standard_normal((S, E)) * 0.5
    v = rng.standard_normal((S, 2))
    kw, rkw = {}, {}
    if kind == "rotary":
        kw["rotary"] = numbarope.Rotary()
        rkw["rotary"] = True
    elif kind == "bias":
        b = rng.standard_normal(L + S - 1)
        b[rng.random(L + S - 1) < 0.2] = -np.inf
        kw["bias"] = rkw["bias"] = b
    elif kind == "relative":
        W = rng.standard_normal((L + S - 1, E, E)) / 2
        kw["relative"] = rkw["W"] = W
    out, info = rope_attention(q, k, v, query_offset=off, is_causal=causal,
                               return_info=True, **kw)
    ref = _reference(q, k, v, off, causal, **rkw)
    assert np.abs(out - ref).max() <= float(info.error_bound) + 1e-15
    assert info.method[()] == "exact"
    # the fast path: an L x S Toeplitz product (gemm, prefix, fft or toeplitz-fft)
    fast, finfo = rope_attention(q, k, v, query_offset=off, is_causal=causal, method="fast",
                                 eps=1e-6, return_info=True, **kw)
    sees = not causal or off + L - 1 >= 0
    assert finfo.method[()] == ("fast" if sees else "exact")    # nothing to approximate
    assert np.abs(fast - ref).max() <= float(finfo.error_bound)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decoding_rows_equal_the_full_causal_attention(dtype):
    """The last L rows of causal self-attention over S tokens are the bottom-right
    rectangular call with those L queries (a key/value cache)."""
    rng = np.random.default_rng(3)
    S, L, E = 300, 5, 8
    q, k, v = (rng.standard_normal((2, S, E)).astype(dtype) for _ in range(3))
    full = rope_attention(q, k, v, rotary=True, is_causal=True, method="exact")
    dec, info = rope_attention(q[:, S - L:], k, v, rotary=True, is_causal=True,
                               causal_alignment="bottom_right", return_info=True)
    bound = info.error_bound.max() * 2
    assert np.abs(dec.astype(np.float64) - full[:, S - L:]).max() <= bound


@pytest.mark.parametrize("L, S, off", [(1, 700, 699), (40, 1000, 960), (300, 200, 0),
                                       (500, 500, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_rectangular_larger_than_a_chunk(L, S, off, causal):
    # several prefix chunks, rows that see every key served apart (L > S), and a
    # decoding block at the end of a long cache
    rng = np.random.default_rng(L + S)
    E = 4
    q, k = rng.standard_normal((L, E)) * 0.5, rng.standard_normal((S, E)) * 0.5
    v = rng.standard_normal((S, 3))
    fast, info = rope_attention(q, k, v, rotary=True, query_offset=off, is_causal=causal,
                                method="fast", eps=1e-5, return_info=True, verify=L)
    exact = rope_attention(q, k, v, rotary=True, query_offset=off, is_causal=causal,
                           method="exact")
    assert info.algorithm[()] == ("prefix" if causal and off < S - 1 else "gemm")
    assert 0 < np.abs(fast - exact).max() <= info.error_bound[()]


def test_no_visible_key_is_exact_zero_on_every_method():
    q = np.ones((2, 4))
    k = np.ones((6, 4))
    for method in ("auto", "exact", "fast"):
        out, info = rope_attention(q, k, k, query_offset=-5, is_causal=True, method=method,
                                   return_info=True)
        assert np.all(out == 0)
    assert "no query sees a key" in info.reason[()]


def test_rectangular_argument_errors():
    q, k = np.zeros((2, 4)), np.zeros((6, 4))
    with pytest.raises(ValueError, match=r"bias has shape \(11,\); expected \(\.\.\., L\+S-1\)"):
        rope_attention(q, k, k, bias=np.zeros(11))
    with pytest.raises(ValueError, match="causal_alignment='diagonal' is unknown"):
        rope_attention(q, k, k, causal_alignment="diagonal")
    with pytest.raises(ValueError, match="not both"):
        rope_attention(q, k, k, query_offset=1, causal_alignment="bottom_right")
    with pytest.raises(TypeError, match="query_offset must be an int"):
        rope_attention(q, k, k, query_offset=1.5)
    with pytest.raises(ValueError, match=r"value has shape \(5, 4\); expected \(\.\.\., 6, Ev\)"):
        rope_attention(q, k, np.zeros((5, 4)))


def test_no_keys_gives_zero_rows():
    out = rope_attention(np.ones((3, 4)), np.zeros((0, 4)), np.zeros((0, 2)))
    assert out.shape == (3, 2) and np.all(out == 0)


@pytest.mark.parametrize("offset", [12, 15, -4])
@pytest.mark.parametrize("scaling", ["dynamic", "longrope"])
def test_sequence_length_rope_uses_one_length_per_call(offset, scaling):
    # keys at 0..S-1, queries at offset..offset+L-1 off the key range: one table, with
    # seq_len = the call's largest position + 1, for queries and keys alike
    from numbarope.rotary import DynamicNTKScaling, LongRopeScaling
    rng = np.random.default_rng(7)
    S, L, E = 12, 3, 8
    if scaling == "dynamic":
        sc = DynamicNTKScaling(factor=2.0, original_max_position_embeddings=12)
    else:
        sc = LongRopeScaling(short_factor=[1.0, 1.1, 1.2, 1.3],
                             long_factor=[2.0, 2.5, 3.0, 4.0],
                             original_max_position_embeddings=12)
    rot = numbarope.Rotary(scaling=sc)
    q, k, v = rng.standard_normal((L, E)), rng.standard_normal((S, E)), rng.standard_normal((S, 3))
    out, info = rope_attention(q, k, v, rotary=rot, query_offset=offset, return_info=True)
    seq_len = max(S, offset + L)
    inv = rot.inv_freq(E, seq_len)
    a = rot.attention_factor

    def rotate(x, pos):
        ang = np.asarray(pos, float)[:, None] * inv[None, :]
        c, s = a * np.cos(ang), a * np.sin(ang)
        h = E // 2
        return np.concatenate([x[:, :h] * c - x[:, h:] * s, x[:, h:] * c + x[:, :h] * s], 1)

    ref = _reference(rotate(q, np.arange(offset, offset + L)), rotate(k, np.arange(S)), v,
                     offset, False)
    assert np.abs(out - ref).max() <= info.error_bound.max()
    # and the logits are a function of i - j: shifting every position by 5 changes nothing
    # when the length does not change the frequencies (seq_len above the original length)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["plain", "bias"])
def test_rectangular_padded_fast_within_bound(causal, kind):
    # what a PyTorch/transformers user passes: a decoding block of 24 queries at the end
    # of a 200-key cache, two batch rows, left padding in one; every head on the fast
    # path, within its certified bound
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
