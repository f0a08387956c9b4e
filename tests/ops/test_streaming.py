"""The exact path, numbarope.ops.streaming: the kernel with per-row key ranges against
dense float64 references (explicit loops), the per-row bias shift over the keys a row
sees, the visited pairs, the error bound, and the registry entry."""

import math
import zlib

import numpy as np
import pytest

import naive
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import streaming as st
from numbarope.ops._exp import EXP_FLUSH, exp_kernel
from numbarope.ops.registry import HeadSpec


# ---------------------------------------------------------------- references

def dense(q, k, v, scale, lo=None, hi=None, bias=None, real=None, W=None):
    """One head, row by row: row i attends to the real keys j with lo[i] <= j < hi[i]
    and a finite bias b[i − j + S − 1], the bias shifted by its maximum over them
    first. Returns (out (n, Ev), lse (n,)) in float64; rows that see nothing: 0, −inf."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n, E = q.shape
    S = k.shape[0]
    out = np.zeros((n, v.shape[1]))
    lse = np.full(n, -np.inf)
    j = np.arange(S)
    for i in range(n):
        sees = np.ones(S, bool)
        if lo is not None:
            sees &= (lo[i] <= j) & (j < hi[i])
        if real is not None:
            sees &= real
        b = np.zeros(S) if bias is None else np.asarray(bias, np.float64)[i - j + S - 1]
        sees &= b > -np.inf
        if not sees.any():
            continue
        js = j[sees]
        if W is None:
            logits = scale * (k[js] @ q[i])
        else:
            Wt = np.asarray(W, np.float64)[i - js + S - 1]          # (m, E, E)
            logits = scale * np.einsum("e,mef,mf->m", q[i], Wt, k[js])
        sh = b[js].max()
        x = logits + (b[js] - sh)
        m = x.max()
        w = np.exp(x - m)
        out[i] = w @ v[js] / w.sum()
        lse[i] = m + np.log(w.sum()) + sh
    return out, lse


def ranges_of(kind, n, S, offset=0, rng=None):
    """(lo, hi) (n,) int64 of a kind of structure."""
    p = np.arange(n, dtype=np.int64) + offset
    if kind == "all":
        return np.zeros(n, np.int64), np.full(n, S, np.int64)
    if kind == "causal":
        return nb.Causal().key_ranges(n, S, offset)
    if kind == "window":
        return nb.Window(7, 3).key_ranges(n, S, offset)
    if kind == "chunked":            # Llama 4 attention_chunk_size: c·⌊p/c⌋ <= j <= p
        c = 13
        return np.clip(c * (p // c), 0, S), np.clip(p + 1, 0, S)
    if kind == "nondecreasing":      # ends rise by jumps (not a deque case)
        lo = np.sort(rng.integers(0, S, n))
        hi = np.minimum(np.sort(rng.integers(0, S + 1, n)) + 5, S)
        return lo, np.maximum(hi, lo)
    if kind == "nonmonotone":        # anything, empty rows included
        a, b = rng.integers(0, S + 1, n), rng.integers(0, S + 1, n)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        hi[::7] = lo[::7]            # empty
        return lo, hi
    if kind == "packed":             # three sequences packed along the rows, causal
        cuts = [0, n // 3, (2 * n) // 3, n]
        lo = np.empty(n, np.int64)
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo[a:b] = a
        return np.minimum(lo, S), np.clip(np.arange(n) + 1, 0, S)
    raise ValueError(kind)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 rows and 16 keys: few rows cross many blocks (skips, partial
    blocks and per-row masks inside them)."""
    monkeypatch.setattr(_config, "EXACT_ROW_BLOCK", 32)
    monkeypatch.setattr(_config, "EXACT_KEY_BLOCK", 16)


# ---------------------------------------------------------------- key ranges

KINDS = ["all", "causal", "window", "chunked", "nondecreasing", "nonmonotone", "packed"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra", ["plain", "bias", "pad", "bias+pad+gqa"])
def test_key_ranges_against_dense(kind, extra, small_blocks):
    rng = np.random.default_rng(zlib.crc32(f'{kind} {extra}'.encode()))
    n, S, E, Ev, off = 70, 90, 4, 3, 15
    G = 2 if "gqa" in extra else 1
    B, Bk = 2 * G, 2
    q = rng.standard_normal((B, n, E))
    k = rng.standard_normal((Bk, S, E))
    v = rng.standard_normal((Bk, S, Ev))
    lo, hi = ranges_of(kind, n, S, off, rng)
    kw = dict(key_ranges=(lo[None], hi[None], np.zeros(B, np.int64)),
              kvidx=np.arange(B) // G, return_lse=True)
    bias = real = None
    if "bias" in extra:
        bias = rng.standard_normal((B, n + S - 1)) * 2
        bias[:, rng.random(n + S - 1) < 0.1] = -np.inf
        kw.update(bias=bias, bidx=np.arange(B))
    if "pad" in extra:
        real = rng.random((Bk, S)) < 0.7
        real[:, :4] = False                      # left padding too
        kw.update(key_mask=np.where(real, 0.0, -np.inf), kidx=np.arange(B) // G)
    out, lse = st.exact_attention(q, k, v, 0.4, **kw)
    for b in range(B):
        hk = b // G
        ro, rl = dense(q[b], k[hk], v[hk], 0.4, lo, hi,
                       None if bias is None else bias[b],
                       None if real is None else real[hk])
        np.testing.assert_allclose(out[b], ro, atol=1e-13, rtol=0)
        np.testing.assert_array_equal(np.isfinite(lse[b]), np.isfinite(rl))
        fin = np.isfinite(rl)
        np.testing.assert_allclose(lse[b][fin], rl[fin], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["causal", "chunked", "nonmonotone"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_key_ranges_default_blocks_and_dtypes(kind, dtype):
    rng = np.random.default_rng(3)
    n, S, E, Ev = 300, 1100, 8, 5                  # two key blocks of 512 and a part
    q, k = (rng.standard_normal((1, m, E)).astype(dtype) for m in (n, S))
    v = rng.standard_normal((1, S, Ev)).astype(dtype)
    lo, hi = ranges_of(kind, n, S, 700, rng)
    bias = rng.standard_normal((1, n + S - 1))
    out = st.exact_attention(q, k, v, 0.3, key_ranges=(lo, hi), bias=bias,
                             bidx=np.zeros(1, np.int64))
    assert out.dtype == dtype
    ro, _ = dense(q[0], k[0], v[0], 0.3, lo, hi, bias[0])
    np.testing.assert_allclose(out[0], ro, atol=3e-6 if dtype == np.float32 else 1e-13)


def test_per_head_ranges_and_general_W(small_blocks):
    rng = np.random.default_rng(4)
    n, S, E = 40, 50, 3
    q = rng.standard_normal((3, n, E))
    k = rng.standard_normal((3, S, E))
    v = rng.standard_normal((3, S, 2))
    W = rng.standard_normal((2, n + S - 1, E, E)) / 2
    r = [ranges_of(x, n, S, 5, rng) for x in ("chunked", "causal", "nonmonotone")]
    lo = np.stack([x[0] for x in r])
    hi = np.stack([x[1] for x in r])
    lidx = np.array([2, 0, 1])
    out = st.exact_attention(q, k, v, 0.5, relative=W, ridx=np.array([0, 1, 0]),
                             key_ranges=(lo, hi, lidx))
    for b in range(3):
        ro, _ = dense(q[b], k[b], v[b], 0.5, lo[lidx[b]], hi[lidx[b]],
                      W=W[[0, 1, 0][b]])
        np.testing.assert_allclose(out[b], ro, atol=1e-13)


def test_structure_key_ranges_are_the_old_causal_and_window():
    # the pipeline passes Structure.key_ranges: causal is lo = 0, hi = clip(p + 1);
    # Window(l, r) is clip(p − l) .. clip(p + r + 1)
    n, S, off = 9, 12, 2
    p = np.arange(n) + off
    lo, hi = nb.Causal().key_ranges(n, S, off)
    np.testing.assert_array_equal(lo, 0)
    np.testing.assert_array_equal(hi, np.clip(p + 1, 0, S))
    lo, hi = nb.Window(3, 2).key_ranges(n, S, off)
    np.testing.assert_array_equal(lo, np.clip(p - 3, 0, S))
    np.testing.assert_array_equal(hi, np.clip(p + 3, 0, S))


def test_ranges_that_skip_blocks_equal_full_masking(small_blocks):
    # a range is a promise: the same result as masking the keys outside it with -inf
    rng = np.random.default_rng(5)
    n, S = 80, 200
    q, k, v = rng.standard_normal((1, n, 4)), rng.standard_normal((1, S, 4)), \
        rng.standard_normal((1, S, 2))
    lo, hi = ranges_of("chunked", n, S, 60)
    out = st.exact_attention(q, k, v, 0.5, key_ranges=(lo, hi))
    ro, _ = dense(q[0], k[0], v[0], 0.5, lo, hi)
    np.testing.assert_allclose(out[0], ro, atol=1e-13)


def test_empty_ranges_and_fully_masked_rows():
    rng = np.random.default_rng(6)
    n, S = 6, 8
    q, k, v = rng.standard_normal((1, n, 2)), rng.standard_normal((1, S, 2)), \
        rng.standard_normal((1, S, 3))
    lo = np.array([0, 3, 5, 2, 0, 8])
    hi = np.array([0, 3, 8, 4, 8, 8])              # rows 0, 1 and 5: no key
    real = np.ones(S, bool)
    real[2:4] = False                               # row 3: only padded keys
    bias = np.zeros((1, n + S - 1))
    bias[0, 4 - np.arange(5, 8) + S - 1] = -np.inf  # row 4: keys 5..7 masked by the bias
    out, lse = st.exact_attention(q, k, v, 1.0, key_ranges=(lo, hi), bias=bias,
                                  bidx=[0], key_mask=np.where(real, 0.0, -np.inf)[None],
                                  kidx=[0], return_lse=True)
    for i in (0, 1, 3, 5):
        assert np.all(out[0, i] == 0) and lse[0, i] == -np.inf
    ro, rl = dense(q[0], k[0], v[0], 1.0, lo, hi, bias[0], real)
    np.testing.assert_allclose(out[0], ro, atol=1e-14)
    np.testing.assert_allclose(lse[0, [2, 4]], rl[[2, 4]], rtol=1e-14)


def test_ranges_outside_the_keys_are_clipped_and_bad_shapes_refused():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 5, 2)) for _ in range(3))
    a = st.exact_attention(q, k, v, 1.0, key_ranges=(np.full(5, -4), np.full(5, 99)))
    np.testing.assert_array_equal(a, st.exact_attention(q, k, v, 1.0))
    with pytest.raises(ValueError, match="shape"):
        st.exact_attention(q, k, v, 1.0, key_ranges=(np.zeros(4), np.ones(4)))
    with pytest.raises(ValueError, match="lidx"):
        st.exact_attention(q, k, v, 1.0, key_ranges=(np.zeros((3, 5)), np.ones((3, 5))))
    with pytest.raises(ValueError, match="lidx"):
        st.exact_attention(q, k, v, 1.0,
                           key_ranges=(np.zeros((1, 5)), np.ones((1, 5)), [0, 1]))


def test_workers_do_not_change_results_with_ranges():
    # within rounding: the row block (exact_blocks) depends on the thread count, and
    # with it the width of a row block's last key block (as in the original release)
    rng = np.random.default_rng(8)
    n, S = 700, 900
    q, k, v = (rng.standard_normal((2, m, 8)) for m in (n, S, S))
    lo, hi = ranges_of("chunked", n, S, 100)
    bias = rng.standard_normal((1, n + S - 1))
    kw = dict(key_ranges=(lo, hi), bias=bias, bidx=[0, 0], return_lse=True)
    ref = st.exact_attention(q, k, v, 0.3, workers=1, **kw)
    for w in (2, -1):
        got = st.exact_attention(q, k, v, 0.3, workers=w, **kw)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=4e-15)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-15)
    a = st.exact_attention(q, k, v, 0.3, workers=2, **kw)        # same blocks: bitwise
    b = st.exact_attention(q, k, v, 0.3, workers=2, **kw)
    np.testing.assert_array_equal(a[0], b[0])


def test_gather_key_ranges():
    c = nb.Causal().key_ranges(4, 6, 1)
    w = nb.Window(1, 0).key_ranges(4, 6, 1)
    assert st.gather_key_ranges([None, None], 4, 6) is None
    lo, hi, lidx = st.gather_key_ranges([c, None, w, c], 4, 6)
    assert lo.shape == hi.shape == (3, 4)
    np.testing.assert_array_equal(lidx, [0, 1, 2, 0])
    np.testing.assert_array_equal(hi[1], 6)
    np.testing.assert_array_equal(lo[2], w[0])


# ---------------------------------------------------------------- the bias row shift

def brute_shift(bias, n, S, lo, hi, real):
    out = np.zeros(n)
    for i in range(n):
        vals = [bias[i - j + S - 1] for j in range(max(lo[i], 0), min(hi[i], S))
                if real is None or real[j]]
        vals = [x for x in vals if np.isfinite(x)]
        if vals:
            out[i] = max(vals)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pad", [None, "left", "random"])
def test_bias_row_shift_against_brute_force(kind, pad):
    rng = np.random.default_rng(zlib.crc32(f'{kind} {pad}'.encode()))
    n, S = 60, 75
    lo, hi = ranges_of(kind, n, S, 9, rng)
    bias = rng.standard_normal((3, n + S - 1)) * 5
    bias[1, rng.random(n + S - 1) < 0.5] = -np.inf
    bias[2] = -np.inf
    real = None
    if pad == "left":
        real = np.arange(S) >= 10
    elif pad == "random":
        real = rng.random(S) < 0.3
    got = st.bias_row_shift(bias, n, S, (lo, hi), real)
    for r in range(3):
        np.testing.assert_array_equal(got[r], brute_shift(bias[r], n, S, lo, hi, real))
    np.testing.assert_array_equal(got[2], 0.0)


@pytest.mark.parametrize("kind", ["all", "causal", "window", "chunked", "nonmonotone"])
@pytest.mark.parametrize("bias", ["random", "alibi", "masked"])
def test_bias_row_shift_ways_agree(kind, bias):
    # the deque (monotone ranges only), the tree and probing give the brute-force maxima
    rng = np.random.default_rng(zlib.crc32(f'{kind} {bias}'.encode()))
    n, S = 90, 120
    lo, hi = ranges_of(kind, n, S, -20, rng)
    t = np.arange(n + S - 1) - (S - 1) - 20
    b = (rng.standard_normal(n + S - 1) if bias == "random"
         else -0.3 * np.abs(t).astype(float))
    if bias == "masked":
        b[rng.random(b.size) < 0.9] = -np.inf
    real = rng.random(S) < 0.5
    runs = st._key_runs(real)
    ref = brute_shift(b, n, S, lo, hi, real)
    modes = [st._TREE, st._PROBE] + ([st._DEQUE] if kind in ("all", "causal", "window")
                                     else [])
    for mode in modes:
        m = st._range_row_max(b, runs, lo, hi, S, mode)
        np.testing.assert_array_equal(np.where(np.isfinite(m), m, 0.0), ref)


def test_bias_row_shift_way_chosen():
    rng = np.random.default_rng(18)
    n = S = 4000
    runs = st._key_runs(rng.random(S) < 0.5)
    lo, hi = ranges_of("all", n, S)
    assert st._shift_mode(runs, lo, hi, S) == st._PROBE           # scattered padding
    assert st._shift_mode(runs[:1], lo, hi, S) == st._DEQUE        # one run
    lo, hi = ranges_of("causal", n, S)
    assert st._shift_mode(runs[:3], lo, hi, S) == st._DEQUE
    lo, hi = ranges_of("chunked", n, S)
    assert st._shift_mode(runs[:1], lo, hi, S) == st._TREE         # a jumping end


def test_bias_row_shift_old_signature_cases():
    # no range: every key; causal with an offset; no key: zeros
    rng = np.random.default_rng(12)
    n, S = 7, 10
    b = rng.standard_normal((1, n + S - 1))
    np.testing.assert_array_equal(st.bias_row_shift(b, n, S)[0],
                                  brute_shift(b[0], n, S, [0] * n, [S] * n, None))
    lo, hi = nb.Causal().key_ranges(n, S, -3)
    np.testing.assert_array_equal(st.bias_row_shift(b, n, S, (lo, hi))[0],
                                  brute_shift(b[0], n, S, lo, hi, None))
    assert np.all(st.bias_row_shift(b, n, S, key_mask=np.zeros(S, bool)) == 0)
    assert st.bias_row_shift(b[:, :0], 0, S).shape == (1, 0)


@pytest.mark.parametrize("where", ["padding", "range", "both"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_bias_where_a_row_cannot_see_is_exact(where, dtype, small_blocks):
    """Every key a row sees carries the bias −1e30, and the offsets only unseen keys use
    carry 0 (or −1e30 the other way round): with the shift over the keys a row sees,
    the result is plain softmax over them, exactly; counting an unseen key would flush
    every visible weight."""
    rng = np.random.default_rng(13)
    n, S, P, c = 48, 48, 5, 8
    q, k = (rng.standard_normal((1, n, 4)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((1, S, 3)).astype(dtype)
    t = np.arange(n + S - 1) - (S - 1)                    # offsets t = i − j (offset 0)
    kw = dict(return_lse=True)
    lo = hi = real = None
    if where in ("padding", "both"):
        # right padding, no causal mask: row i's padded keys use e = i .. i+P-1, its
        # real keys e >= i + P >= P. Bias 0 on e < P, -1e30 from P on.
        real = np.arange(S) < S - P
        kw.update(key_mask=np.where(real, 0.0, -np.inf)[None], kidx=[0])
        e = np.arange(n + S - 1)
        bias = np.where(e < P, 0.0, -1e30)
    if where in ("range", "both"):
        # chunked local attention, chunk c: rows see offsets 0 .. c-1; 0 beyond
        p = np.arange(n)
        lo, hi = np.clip(c * (p // c), 0, S), np.clip(p + 1, 0, S)
        kw.update(key_ranges=(lo, hi))
        seen = (t >= 0) & (t < c)
        bias = np.where(seen, -1e30, 0.0)
        if where == "both":
            real = np.arange(S) >= P                      # left padding too
            kw.update(key_mask=np.where(real, 0.0, -np.inf)[None], kidx=[0])
            bias = np.where(seen, -1e30, 0.0)
    out, lse = st.exact_attention(q, k, v, 0.5, bias=bias[None], bidx=[0], **kw)
    ref, rl = dense(q[0], k[0], v[0], 0.5, lo, hi, None, real)    # no bias: plain softmax
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out[0], ref, atol=tol, rtol=0)
    fin = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse[0]), fin)
    # lse includes the bias: −1e30 + the plain log-sum-exp (which it absorbs)
    np.testing.assert_allclose(lse[0][fin], -1e30, rtol=1e-15)
    # the other way round: -1e30 on the unseen offsets only
    out2 = st.exact_attention(q, k, v, 0.5, bias=np.where(bias == 0, -1e30, 0.0)[None],
                              bidx=[0], **{x: y for x, y in kw.items() if x != "return_lse"})
    np.testing.assert_allclose(out2[0], ref, atol=tol, rtol=0)


# ---------------------------------------------------------------- moved kernel tests

def test_weights_below_flush_are_zero_and_results_right():
    """Logits arranged so that all weights but one per row lie in the subnormal
    range (e^-745 .. e^-708 relative to the maximum): the flushed weights would
    change the result by far less than its bound."""
    rng = np.random.default_rng(5)
    n, E = 64, 2
    q = np.zeros((1, n, E))
    k = np.zeros((1, n, E))
    q[0, :, 0] = 1.0
    k[0, :, 0] = -rng.uniform(708, 745, n)       # logit = -k (scale 1)
    k[0, 0, 0] = 0.0                             # one visible key at logit 0 per row
    v = rng.standard_normal((1, n, 3))
    out = st.exact_attention(q, k, v, 1.0)
    np.testing.assert_allclose(out[0], np.broadcast_to(v[0, 0], (n, 3)), rtol=0, atol=1e-300)
    x = np.array([-707.9, -708.1, -744.0, -np.inf, 0.0])
    y = exp_kernel(x)
    assert y[0] > 0 and y[1] == 0 and y[2] == 0 and y[3] == 0 and y[4] == 1.0
    assert EXP_FLUSH[np.dtype(np.float64)] == -708.0


# ---------------------------------------------------------------- kernel basics

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_logits_no_overflow(dtype):
    rng = np.random.default_rng(14)
    q, k = (rng.standard_normal((1, 200, 4)).astype(dtype) * 30 for _ in range(2))
    v = rng.standard_normal((1, 200, 3)).astype(dtype)
    lo, hi = nb.Causal().key_ranges(200, 200, 0)
    out = st.exact_attention(q, k, v, 1.0, key_ranges=(lo, hi))
    ro, _ = dense(q[0], k[0], v[0], 1.0, lo, hi)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], ro, atol=1e-3 if dtype == np.float32 else 1e-10)


def test_empty_shapes():
    z = np.zeros((2, 0, 3))
    out, lse = st.exact_attention(z, np.zeros((2, 4, 3)), np.zeros((2, 4, 2)), 1.0,
                                  return_lse=True)
    assert out.shape == (2, 0, 2) and lse.shape == (2, 0)
    out, lse = st.exact_attention(np.ones((1, 3, 2)), np.zeros((1, 0, 2)),
                                  np.zeros((1, 0, 5)), 1.0, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    out = st.exact_attention(np.ones((1, 3, 2)), np.ones((1, 3, 2)), np.ones((1, 3, 0)),
                             1.0, key_ranges=(np.zeros(3), np.arange(1, 4)))
    assert out.shape == (1, 3, 0)


def test_inputs_not_modified():
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((1, 50, 4)) for _ in range(3))
    bias = rng.standard_normal((1, 99))
    lo, hi = ranges_of("chunked", 50, 50)
    copies = [a.copy() for a in (q, k, v, bias, lo, hi)]
    st.exact_attention(q, k, v, 0.5, bias=bias, bidx=[0], key_ranges=(lo, hi))
    for a, c in zip((q, k, v, bias, lo, hi), copies):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------- pairs

@pytest.mark.parametrize("n, S, off", [(5, 7, 0), (5, 7, 3), (5, 7, -3), (5, 7, -10),
                                       (10, 3, 1), (4, 4, 100), (0, 3, 0), (3, 0, 0),
                                       (1000, 1000, 0), (257, 1000, 743)])
def test_visible_pairs_causal_closed_form(n, S, off):
    ref = float(np.clip(np.arange(n) + off + 1, 0, S).sum())
    assert st.visible_pairs(n, S, causal=True, offset=off) == ref
    r = nb.Causal().key_ranges(n, S, off)
    assert st.visible_pairs(n, S, r) == ref
    assert st.visible_pairs(n, S) == n * S


@pytest.mark.parametrize("kind", KINDS)
def test_visited_pairs_are_the_kernels_blocks(kind):
    rng = np.random.default_rng(16)
    n, S, rb, kb = 100, 130, 32, 16
    lo, hi = ranges_of(kind, n, S, 20, rng)
    ref = 0
    for i0 in range(0, n, rb):
        i1 = min(i0 + rb, n)
        if not np.any(hi[i0:i1] > lo[i0:i1]):
            continue
        a = lo[i0:i1].min()
        a -= a % kb
        ref += (i1 - i0) * max(hi[i0:i1].max() - a, 0)
    assert st.visited_pairs(n, S, (lo, hi), rb, kb) == ref
    assert st.visited_pairs(n, S, (lo, hi), rb, kb) >= st.visible_pairs(n, S, (lo, hi))
    assert st.visited_pairs(n, S) == n * S
    assert st.pairs_visited(n, S, 20, (lo, hi)) == st.visited_pairs(n, S, (lo, hi))
    assert st.pairs_visited(n, S, 20, None) == n * S
    w = nb.Window(3, 0).key_ranges(n, S, S + 10)         # no row sees a key: no work
    assert st.visited_pairs(n, S, w, rb, kb) == st.visible_pairs(n, S, w) == 0


# ---------------------------------------------------------------- the error bound

@pytest.mark.parametrize("kind", ["all", "window", "chunked"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_bound_holds_against_long_double(kind, dtype, small_blocks):
    rng = np.random.default_rng(17)
    n, E = 37, 8
    worst = 0.0
    for amp in (0.3, 1.5, 4.0):
        q, k, v = (rng.standard_normal((n, E)) * amp for _ in range(3))
        qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
        lo, hi = ranges_of(kind, n, n)
        # the ranges as a -inf bias for the long-double reference (square, offset 0)
        t = np.arange(2 * n - 1) - (n - 1)
        bias = rng.standard_normal(2 * n - 1)
        ldbias = bias.copy()
        if kind == "window":
            ldbias[(t > 7) | (t < -3)] = -np.inf
        ref = naive.attention_longdouble(qd, kd, vd, bias=ldbias,
                                         scale=1 / np.sqrt(E)).astype(np.float64)
        if kind == "chunked":          # not Toeplitz: the dense reference row by row
            ref, _ = dense(qd, kd, vd, 1 / np.sqrt(E), lo, hi, bias)
        s = 1 / np.sqrt(E)
        out = st.exact_attention(qd[None], kd[None], vd[None], s, bias=bias[None],
                                 bidx=[0], key_ranges=(lo, hi))[0]
        qn = np.linalg.norm(qd.astype(np.float64), axis=1).max()
        kn = np.linalg.norm(kd.astype(np.float64), axis=1).max()
        R = s * qn * kn
        bound = st.exact_error_bound(n, E, R, R, np.abs(vd).max(), np.dtype(dtype).name,
                                     has_bias=True)
        err = np.abs(out.astype(np.float64) - ref).max()
        assert 0 < bound and err <= bound, (amp, err, bound)
        worst = max(worst, err / bound)
    assert worst > 1e-5        # the bound is not vacuous by orders of magnitude


def test_exact_bound_properties():
    b = st.exact_error_bound(1000, 16, 5.0, 5.0, 1.0)
    assert 0 < b < 1e-12
    assert st.exact_error_bound(0, 16, 5.0, 5.0, 1.0) == 0.0
    assert st.exact_error_bound(1000, 16, 5.0, 5.0, 0.0) == 0.0
    assert st.exact_error_bound(1000, 16, 5.0, 5.0, 1.0, logit_error=1e-9) > b
    assert st.exact_error_bound(1000, 16, 5.0, 5.0, 1.0, logit_error=2.0) == np.inf
    assert st.exact_error_bound(1000, 16, 5.0, 5.0, 1.0, "float32") > b
    assert st.exact_error_bound(1000, 16, 5.0, 5.0, 1.0, general=True) > b
    assert st.exact_error_bound(1000, 16, 1e300, 1e300, 1.0) == np.inf
    assert math.isfinite(st.exact_error_bound(10 ** 7, 128, 50.0, 50.0, 1e3, "float32"))


# ---------------------------------------------------------------- the registry entry

def test_streaming_serves_every_structure():
    import numbarope.ops as ops
    alg = ops.get("streaming")
    assert isinstance(alg, st.Streaming)
    assert alg.name == "streaming" and alg.fast is False and alg.bound_kind == "exact"
    assert alg not in ops.fast_algorithms()

    class Chunked(nb.Structure):
        kind = "chunked"

    for s in (nb.NoBias(), nb.Causal(), nb.Window(3, 0), nb.Decay(0.1), nb.Dense(np.zeros(3)),
              Chunked()):
        assert alg.serves(s)
        for general in (False, True):
            h = HeadSpec((), 10, 10, 4, 4, 1.0, 1.0, 1.0, general=general, structure=s)
            assert alg.unavailable(h) == []


def test_streaming_predict_and_memory():
    alg = st.Streaming()
    h = HeadSpec((), 1000, 1000, 16, 16, 1.0, 1.0, 1.0)
    t_full = alg.predict(h)
    h.pairs = st.visible_pairs(1000, 1000, causal=True)
    assert 0.45 < alg.predict(h) / t_full < 0.55
    h.pairs = 0.0
    assert alg.predict(h) == 0.0                   # the planner's "no-visible-key"
    h32 = HeadSpec((), 1000, 1000, 16, 16, 1.0, 1.0, 1.0, compute_dtype="float32")
    assert alg.predict(h32) < t_full
    hg = HeadSpec((), 1000, 1000, 16, 16, 1.0, 1.0, 1.0, general=True)
    assert alg.predict(hg) > t_full
    assert alg.memory(h) > 8 * 1000 * 64
    assert st.predict_exact(1000, 16, 16) == t_full
    r = nb.Window(50, 0).key_ranges(8000, 8000, 0)     # whole key blocks near the band
    assert st.predict_exact(8000, 16, 16, key_range=r) < st.predict_exact(8000, 16, 16) / 8
    assert st.exact_memory(1000, 16, 16) == alg.memory(h)


# ---------------------------------------------------------------- the decoding kernel

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g, n, S", [(1, 1, 1), (3, 1, 5), (3, 1, 700), (1, 4, 1030),
                                     (4, 4, 257), (2, 2, 3000)])
@pytest.mark.parametrize("masked", [False, True])
def test_decoding_kernel_against_dense(dtype, g, n, S, masked):
    # few rows per key/value head (g stacked query heads × n rows <= DECODE_ROWS) take
    # the decoding kernel (chunks of keys, merged in order); every row against the
    # dense float64 reference, with key padding and bottom-right causal ranges
    assert g * n <= _config.DECODE_ROWS
    rng = np.random.default_rng(zlib.crc32(f"{g}{n}{S}{masked}".encode()))
    Bk, E, Ev = 2, 16, 8
    B = Bk * g
    q = rng.standard_normal((B, n, E)).astype(dtype)
    k = rng.standard_normal((Bk, S, E)).astype(dtype)
    v = rng.standard_normal((Bk, S, Ev)).astype(dtype)
    kvidx = np.repeat(np.arange(Bk), g)
    kw, real = {}, np.ones((Bk, S), bool)
    if masked:
        real = rng.random((Bk, S)) < 0.8
        real[:, 0] = True
        kw["key_mask"] = np.where(real, 0.0, -np.inf)
        kw["kidx"] = kvidx.copy()
        lo = np.zeros(n, np.int64)
        hi = np.arange(S - n + 1, S + 1, dtype=np.int64)             # causal, bottom right
        kw["key_ranges"] = (lo[None], hi[None], np.zeros(B, np.int64))
    assert st._decode_stack(B, n, kvidx, Bk, kw.get("kidx", np.zeros(B, np.int64)),
                            masked, np.zeros(B, np.int64), masked) == g
    out, lse = st.exact_attention(q, k, v, 0.3, kvidx=kvidx, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == (B, n, Ev)
    tol = 5e-6 if dtype == np.float32 else 1e-13
    for b in range(B):
        lo_, hi_ = (lo, hi) if masked else (None, None)
        ref, rl = dense(q[b], k[kvidx[b]], v[kvidx[b]], 0.3, lo_, hi_, real=real[kvidx[b]])
        np.testing.assert_allclose(out[b], ref, atol=tol, rtol=0)
        np.testing.assert_allclose(lse[b], rl, atol=tol * 10, rtol=0)


def test_decoding_kernel_is_bitwise_independent_of_workers():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((6, 1, 64)).astype(np.float32)
    k = rng.standard_normal((2, 5000, 64)).astype(np.float32)
    v = rng.standard_normal((2, 5000, 64)).astype(np.float32)
    kvidx = np.repeat(np.arange(2), 3)
    one = st.exact_attention(q, k, v, 0.125, kvidx=kvidx, workers=1)
    two = st.exact_attention(q, k, v, 0.125, kvidx=kvidx, workers=2)
    np.testing.assert_array_equal(one, two)


def test_decoding_kernel_flags_non_finite_logits():
    # the kernel has no finiteness pass: a NaN/inf logit makes its head's rows NaN,
    # which the callers see and send to the full checks
    q = np.ones((1, 1, 4))
    k = np.ones((1, 40, 4))
    v = np.ones((1, 40, 2))
    k[0, 17, 2] = np.inf
    out = st.exact_attention(q, k, v, 0.5)
    assert np.isnan(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compute", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["heads_last", "contiguous", "strided"])
def test_kernel_inputs_round_once_as_astype_then_scale(dtype, compute, layout):
    # q, k, v (B, H, L, E) as transformers passes them (transposed views of (B, L, H, E)),
    # C-contiguous, or sliced: the bits of q.astype(compute) * compute(scale) and of
    # k, v .astype(compute), C-contiguous (B·H, L, E), with their rows' sums of squares
    rng = np.random.default_rng(0)

    def make(h, e):
        x = rng.standard_normal((2, 37, h, 2 * e)).astype(dtype)
        if layout == "heads_last":
            return x[..., :e].copy().transpose(0, 2, 1, 3)
        if layout == "contiguous":
            return np.ascontiguousarray(x[..., :e].transpose(0, 2, 1, 3))
        return x[..., ::2].transpose(0, 2, 1, 3)

    q, k, v = make(9, 16), make(3, 16), make(3, 8)
    for scale in (0.125, 1 / 3, 7.1):
        qf, kf, vf, (sq, sk, vmax) = st.kernel_inputs(q, k, v, scale, compute)
        want = np.ascontiguousarray(q.astype(compute).reshape(18, 37, 16)) * \
            np.dtype(compute).type(scale)
        for got, ref in ((qf, want), (kf, k.astype(compute).reshape(6, 37, 16)),
                         (vf, v.astype(compute).reshape(6, 37, 8))):
            assert got.dtype == compute and got.flags.c_contiguous
            np.testing.assert_array_equal(got, ref)
        for got, x in ((sq, qf), (sk, kf)):
            np.testing.assert_allclose(got, (x.astype(np.float64) ** 2).sum(-1), rtol=1e-13)
        assert np.abs(vf).max() <= vmax <= np.abs(vf).max() * np.sqrt(8) * (1 + 1e-5)
    assert st.kernel_inputs(q[0], k[0], v[0], 0.5, compute)[0].shape == (9, 37, 16)
    assert st.kernel_inputs(q[0, 0], k[0, 0], v[0, 0], 0.5, compute)[0].shape == (1, 37, 16)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_kernel_inputs_refuse_nan_inf(which, bad):
    # NaN/inf in any of q, k, v (or a finite q that overflows at the scale): None
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((1, 5, 3, 8)).astype(np.float32).transpose(0, 2, 1, 3)
              for _ in range(3)]
    assert st.kernel_inputs(*arrays, 0.5, np.float32) is not None
    arrays[which] = arrays[which].copy()
    arrays[which][0, 1, 4, 7] = bad
    assert st.kernel_inputs(*arrays, 0.5, np.float32) is None
    arrays[which][0, 1, 4, 7] = 3e38
    assert (st.kernel_inputs(*arrays, 4.0, np.float32) is None) == (which == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_run_with_kernel_inputs_stats_is_exact_attention(causal):
    # the sums of squares kernel_inputs returns stand for exact_run's own passes over
    # q, k, v: the same bits (n·S above EXACT_ALWAYS_MAX: the norms decide)
    rng = np.random.default_rng(2)
    L = 700
    q = rng.standard_normal((1, L, 6, 16)).astype(np.float32).transpose(0, 2, 1, 3)
    k, v = (rng.standard_normal((1, L, 2, 16)).astype(np.float32).transpose(0, 2, 1, 3)
            for _ in range(2))
    kvidx = np.repeat(np.arange(2), 3)
    kr = None
    if causal:
        kr = (np.zeros((1, L), np.int64), np.arange(1, L + 1, dtype=np.int64)[None],
              np.zeros(6, np.int64))
    qf, kf, vf, stats = st.kernel_inputs(q, k, v, 0.25, np.float32)
    plan = st.exact_plan(6, L, 2, L, 16, 16, kvidx=kvidx, key_ranges=kr)
    assert not plan.small
    out, lse = st.exact_run(plan, qf, kf, vf, 0.25, prescaled=True, stats=stats)
    want, wlse = st.exact_attention(np.ascontiguousarray(q.reshape(6, L, 16)), kf, vf, 0.25,
                                    kvidx=kvidx, key_ranges=kr, return_lse=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, wlse)


def _gqa_causal(L, S, ranges):
    # 6 query heads on 2 key/value heads (E = Ev = 16, float32); causal key ranges or None
    rng = np.random.default_rng(L)
    q = rng.standard_normal((6, L, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, S, 16)).astype(np.float32) for _ in range(2))
    kr = None
    if ranges:
        kr = (np.zeros((1, L), np.int64), np.arange(1, L + 1, dtype=np.int64)[None],
              np.zeros(6, np.int64))
    return q, k, v, np.repeat(np.arange(2), 3), kr


@pytest.mark.parametrize("L,S,ranges", [(40, 40, True), (1, 300, False), (300, 300, True)])
def test_exact_run_of_a_kept_plan_is_exact_attention(L, S, ranges):
    # a plan made once and run again (the fast lane's way), with q scaled beforehand,
    # gives exact_attention's bits
    q, k, v, kvidx, kr = _gqa_causal(L, S, ranges)
    want, wl = st.exact_attention(q, k, v, 0.3, kvidx=kvidx, key_ranges=kr, return_lse=True)
    plan = st.exact_plan(6, L, 2, S, 16, 16, kvidx=kvidx, key_ranges=kr)
    assert (plan.decode is not None) == (L == 1)
    for _ in range(2):
        got, gl = st.exact_run(plan, q * np.float32(0.3), k, v, 0.3, prescaled=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(gl, wl)


@pytest.mark.parametrize("L,S,workers", [(40, 40, 1), (300, 300, 2), (1, 300, 2),
                                         (4, 300, 2)])
def test_exact_run_heads_last_writes_the_transformers_layout(L, S, workers):
    # heads_last = H: the kernel writes (B/H, n, H, Ev) (transformers' layout) and
    # returns its (B/H, H, n, Ev) view: the values of the usual layout, on the inline,
    # parallel and decoding paths
    q, k, v, kvidx, kr = _gqa_causal(L, S, L == S)
    plan = st.exact_plan(6, L, 2, S, 16, 16, kvidx=kvidx, key_ranges=kr, workers=workers)
    want, wl = st.exact_run(plan, q, k, v, 0.3)
    got, gl = st.exact_run(plan, q, k, v, 0.3, heads_last=3)
    assert got.shape == (2, 3, L, 16)
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous
    np.testing.assert_array_equal(got.reshape(6, L, 16), want)
    np.testing.assert_array_equal(gl, wl)
