"""Key padding masks and per-row rotary positions: a left-padded batch gives, on
its real tokens, the outputs of the unpadded sequences."""

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention


def _masked_reference(q, k, v, keep, causal, off=0):
    L, E = q.shape
    S = k.shape[0]
    logits = q @ k.T / np.sqrt(E)
    ok = keep[None, :] & ((np.arange(S)[None, :] <= np.arange(L)[:, None] + off)
                          if causal else True)
    logits = np.where(ok, logits, -np.inf)
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        if np.isinf(logits[i]).all():
            continue
        w = np.exp(logits[i] - logits[i].max())
        out[i] = w @ v / w.sum()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_key_padding_against_reference(causal, dtype):
    rng = np.random.default_rng(1)
    B, n, E = 3, 23, 4
    q, k, v = (rng.standard_normal((B, n, E)).astype(dtype) * 0.6 for _ in range(3))
    keep = rng.random((B, n)) < 0.7
    keep[2] = False                                   # a fully padded row: zeros
    out, info = rope_attention(q, k, v, key_padding_mask=keep, is_causal=causal,
                               return_info=True)
    for b in range(B):
        ref = _masked_reference(q[b].astype(np.float64), k[b].astype(np.float64),
                                v[b].astype(np.float64), keep[b], causal)
        assert np.abs(out[b] - ref).max() <= info.error_bound[b]
    assert np.all(out[2] == 0)
    fast, finfo = rope_attention(q, k, v, key_padding_mask=keep, is_causal=causal,
                                 method="fast", return_info=True)
    assert finfo.method.tolist() == ["fast"] * B
    for b in range(B):
        ref = _masked_reference(q[b].astype(np.float64), k[b].astype(np.float64),
                                v[b].astype(np.float64), keep[b], causal)
        assert np.abs(fast[b] - ref).max() <= finfo.error_bound[b]
    assert np.all(fast[2] == 0)


def test_all_true_mask_changes_nothing_and_padding_keeps_the_fast_path():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 64, 4)) * 0.2 for _ in range(3))
    out, info = rope_attention(q, k, v, rotary=True, method="fast",
                               key_padding_mask=np.ones((1, 64), bool), return_info=True)
    assert info.method[0] == "fast"
    np.testing.assert_array_equal(out, rope_attention(q, k, v, rotary=True, method="fast"))
    keep = np.ones((1, 64), bool)
    keep[0, :5] = False
    padded, pinfo = rope_attention(q, k, v, rotary=True, method="fast", key_padding_mask=keep,
                                   return_info=True)
    assert pinfo.method[0] == "fast"
    # the padded keys take no part: same as attending to the real keys only, at
    # their own positions (rotated first, then sliced)
    from numbarope.rotary import rotary_tables, rotate
    cos, sin = rotary_tables(numbarope.Rotary(), 64, 4)
    qr, kr = rotate(q[0], numbarope.Rotary(), cos, sin), rotate(k[0], numbarope.Rotary(), cos, sin)
    ref = rope_attention(qr, kr[5:], v[0, 5:], method="exact")
    assert np.abs(padded[0] - ref).max() <= pinfo.error_bound[0]


@pytest.mark.parametrize("causal", [False, True])
def test_left_padded_batch_equals_unpadded_sequences(causal):
    rng = np.random.default_rng(3)
    E, S = 8, 30
    lengths = [30, 21, 9]
    q, k, v = (rng.standard_normal((3, 2, S, E)) for _ in range(3))     # (batch, heads)
    keep = np.zeros((3, 1, S), bool)
    pos = np.zeros((3, 1, S))
    for b, m in enumerate(lengths):
        keep[b, 0, S - m:] = True
        pos[b, 0, S - m:] = np.arange(m)               # HF position_ids of left padding
    out = rope_attention(q, k, v, rotary=True, is_causal=causal, key_padding_mask=keep,
                         positions=pos, causal_alignment="top_left")
    for b, m in enumerate(lengths):
        ref = rope_attention(q[b, :, S - m:], k[b, :, S - m:], v[b, :, S - m:],
                             rotary=True, is_causal=causal)
        np.testing.assert_allclose(out[b, :, S - m:], ref, atol=1e-13)
        if causal:
            assert np.all(out[b, :, :S - m] == 0)     # padded queries see only padding


def test_positions_with_a_key_cache():
    """Decoding: 2 queries at the end of a left-padded cache of 12 keys."""
    rng = np.random.default_rng(4)
    E, S, L, pad = 4, 12, 2, 5
    q, k, v = rng.standard_normal((L, E)), rng.standard_normal((S, E)), rng.standard_normal((S, 3))
    keep = np.r_[np.zeros(pad, bool), np.ones(S - pad, bool)]
    pos = np.r_[np.zeros(pad), np.arange(S - pad)]
    out = rope_attention(q, k, v, rotary=True, is_causal=True, key_padding_mask=keep,
                         positions=pos, causal_alignment="bottom_right")
    qf = np.concatenate([np.zeros((S - pad - L, E)), q])
    full = rope_attention(qf, k[pad:], v[pad:], rotary=True, is_causal=True)
    np.testing.assert_allclose(out, full[-L:], atol=1e-13)


def test_padding_and_positions_errors():
    q = np.zeros((4, 2))
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean"):
        rope_attention(q, q, q, key_padding_mask=np.ones(4))
    with pytest.raises(ValueError, match="integers other than 0 and 1"):
        rope_attention(q, q, q, key_padding_mask=np.array([1, 2, 1, 1]))
    q3 = np.zeros((2, 3, 4, 2))
    with pytest.raises(ValueError, match=r"do not broadcast to the \(batch, head\) dims"):
        rope_attention(q3, q3, q3, key_padding_mask=np.ones((2, 1, 1, 4), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(3,\); expected \(\.\.\., 4\)"):
        rope_attention(q, q, q, key_padding_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="positions set the rotary angles"):
        rope_attention(q, q, q, positions=np.arange(4))
    with pytest.raises(ValueError, match="positions contains NaN"):
        rope_attention(q, q, q, rotary=True, positions=np.r_[0, 1, np.nan, 3])
    with pytest.raises(ValueError, match="queries must be among the keys"):
        rope_attention(q, q, q, rotary=True, positions=np.arange(4), query_offset=2)


# ---- field reports, round 3: the per-row bias shift and the planner see real keys only

@pytest.mark.parametrize("method", ["exact", "auto", "fast"])
def test_huge_bias_with_padding_is_shifted_over_real_keys(method):
    # decoding, L = 1 against S = 5, only the padded key has bias 0: the constant -1e30
    # over the real keys cancels (softmax(s q.k) over the 4 real keys)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    pad = np.array([True, True, True, True, False])
    bias = np.full(5, -1e30)
    bias[0] = 0.0                       # entry e = i - j + S - 1 = 0: key j = 4 (padded)
    out, info = rope_attention(q, k, v, is_causal=True, causal_alignment="bottom_right",
                               key_padding_mask=pad, bias=bias, method=method,
                               return_info=True)
    ref = _masked_reference(q, k, v, pad, False)
    assert np.abs(out - ref).max() <= info.error_bound.max()
    assert np.abs(out - ref).max() < 1e-3 if method == "fast" else 1e-14


@pytest.mark.parametrize("causal", [False, True])
def test_bias_shift_over_real_keys_random(causal):
    # the kind: per row, the largest bias over the keys it sees; padded keys carry biases
    # far above the real ones (a padded key that counted would flush every real weight)
    rng = np.random.default_rng(3)
    B, L, S, E = 3, 3, 11, 4
    q, k, v = (rng.standard_normal((B, n, E)) for n in (L, S, S))
    keep = rng.random((B, S)) < 0.6
    keep[:, :4] = False                 # left padding: offsets only padded keys use
    keep[:, -1] = True
    bias = rng.standard_normal((B, L + S - 1)) * 3 - 1e4
    off = S - L
    for b in range(B):            # a huge bias on every offset a padded key alone uses
        for j in np.flatnonzero(~keep[b]):
            for i in range(L):
                e = i - j + S - 1
                used = any(keep[b, jj] and i2 - jj + S - 1 == e and (not causal or jj <= i2 + off)
                           for i2 in range(L) for jj in range(S))
                if not used:
                    bias[b, e] = 0.0
    out, info = rope_attention(q, k, v, bias=bias, is_causal=causal, query_offset=off,
                               key_padding_mask=keep, method="exact", return_info=True)
    for b in range(B):
        ok = keep[b][None, :] & ((np.arange(S)[None, :] <= np.arange(L)[:, None] + off)
                                 if causal else True)
        bt = bias[b][np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1]
        # the row's largest visible bias first (exact: Sterbenz), then the logits
        bt = bt - np.where(ok, bt, -np.inf).max(axis=1, keepdims=True)
        logits = np.where(ok, q[b] @ k[b].T / 2 + bt, -np.inf)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        ref = (w / w.sum(axis=1, keepdims=True)) @ v[b]
        assert np.abs(out[b] - ref).max() <= info.error_bound[b]
        assert np.abs(out[b] - ref).max() < 1e-12


def test_junk_in_padded_keys_does_not_reach_the_planner():
    # left-padded batch whose padded key/value rows hold junk: R and max|v| come from the
    # real keys, so the fast path still serves it and the bound stays tight
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 1, 96, 4)) * 0.3 for _ in range(3))
    keep = np.ones((2, 1, 96), bool)
    keep[1, :, :10] = False
    k[1, :, :10] = 7.0 * np.sign(k[1, :, :10])          # |k| = 14 in the padding
    v[1, :, :10] = 1e6
    clean = k.copy(), v.copy()
    clean[0][1, :, :10] = 0.0
    clean[1][1, :, :10] = 0.0
    info = numbarope.plan(q, k, v, rotary=True, is_causal=True, key_padding_mask=keep,
                          method="fast")          # was refused: R = 10.5 from the padding
    ref_info = numbarope.plan(q, *clean, rotary=True, is_causal=True, key_padding_mask=keep,
                              method="fast")
    np.testing.assert_allclose(info.radius, ref_info.radius)
    np.testing.assert_allclose(info.error_bound, ref_info.error_bound)
    assert info.radius.max() < 1.0
    out, finfo = rope_attention(q, k, v, rotary=True, is_causal=True, key_padding_mask=keep,
                                method="fast", return_info=True)
    exact = rope_attention(q, *clean, rotary=True, is_causal=True, key_padding_mask=keep,
                           method="exact")
    assert np.all(np.abs(out - exact).max(axis=(-2, -1)) <= finfo.error_bound)


def test_junk_that_overflows_float32_in_padded_keys():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 40, 8)).astype(np.float32) for _ in range(3))
    keep = np.ones((1, 40), bool)
    keep[0, :3] = False
    k[0, :3] = 3e37                      # logits of padded keys overflow float32
    out, info = rope_attention(q, k, v, key_padding_mask=keep, is_causal=True,
                               return_info=True)
    assert np.isfinite(out).all()
    ref = _masked_reference(q[0].astype(np.float64), k[0].astype(np.float64),
                            v[0].astype(np.float64), keep[0], True)
    assert np.abs(out[0] - ref).max() <= info.error_bound[0]


@pytest.mark.parametrize("name", ["key_padding_mask", "positions"])
@pytest.mark.parametrize("H", [2, 3])
def test_batch_by_keys_array_is_never_read_per_head(name, H):
    # transformers' attention_mask (B, S) next to q (B, H, L, E): broadcasting would line
    # B up with the head axis (silently when B == H); refused whatever H is
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, H, 6, 4)) for _ in range(3))
    arr = np.ones((2, 6), bool) if name == "key_padding_mask" else np.tile(np.arange(6), (2, 1))
    kw = {name: arr}
    if name == "positions":
        kw["rotary"] = True
    with pytest.raises(ValueError, match=r"\(2, 1, 6\).*one row per batch entry"):
        rope_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"\(2, 1, 6\)"):
        numbarope.plan(q, k, v, **kw)
    kw[name] = arr[:, None, :]            # the shape the message gives: per batch row
    rope_attention(q, k, v, **kw)
    kw[name] = arr[:1]                    # (1, S): shared by every head, unambiguous
    rope_attention(q, k, v, **kw)
