"""numbarope.ops.decay: exponential decay by chunked decayed scans, against two dense
float64 references over all (query, key) pairs (tests/ops/_poly_ref.py):

* the same polynomial, ``Σ_j p(s·q_iᵀk_j)·T(i+offset−j)[v_j, 1]`` with ``p`` by
  ``np.polynomial.polynomial.polyval``: the fast result must agree to rounding;
* true softmax attention (``exp``) with bias ``log T``: the error must be within
  ``2(δ+ρ)/(1−δ−ρ)·max|v|``, ρ = ``recurrence_rounding``.

Decay weights are taken relative to each row's nearest visible key
(``γ^{|t| − t0}``): the same softmax, and what ``decay_attention`` returns as ``den``.
Also: the decayed state in and out, the helpers that combine states, the registry entry.
"""

import numpy as np
import pytest

from _poly_ref import Dense, agree, decay_log, dense, inputs
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import _common, decay
from numbarope.ops._bounds import recurrence_rounding
from numbarope.ops._features import n_features
from numbarope.ops.decay import decay_attention
from numbarope.ops.gemm import apply_state
from numbarope.ops.registry import HeadSpec, get
from numbarope.polynomial import exp_approximation

RATES = (0.0, 0.01, 0.5, 5.0, 800.0)
#: (L, S, offset): square below and above a chunk, rectangular (decoding block at the
#: end, queries beyond the keys, negative offsets)
SHAPES = ((5, 5, 0), (257, 257, 0), (700, 700, 0), (1500, 1500, 0), (40, 1000, 960),
          (300, 37, 0), (50, 300, -20), (30, 200, -100))


@pytest.fixture(scope="module")
def coef():
    return exp_approximation(1.0, eps=1e-6).coef


@pytest.mark.parametrize("L,S,offset", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_decay_matches_dense_polynomial(coef, L, S, offset, causal):
    rng = np.random.default_rng(L + S)
    q, k, v, s = inputs(rng, L, S)
    mask = rng.random(S) < 0.7
    for key_mask in (None, mask):
        ref = Dense(q, k, v, s, offset, key_mask, coef)
        for rate in RATES:
            got = decay_attention(q, k, v, s, coef, rate, causal, offset=offset,
                                  key_mask=key_mask)
            agree(got, ref(decay_log(rate, causal)))


@pytest.mark.parametrize("chunk,state_bytes", [(1, 2**28), (7, 2**28), (7, 20_000)])
def test_small_chunks_many_tasks_and_groups(coef, chunk, state_bytes, monkeypatch):
    """Tiny chunks: many chunks per task; with little STATE_BYTES, several groups of
    chunk states and two-sided decay as two scans (else one pass); workers 1 and 2
    bitwise equal."""
    monkeypatch.setattr(_common, "CHUNK", chunk)
    monkeypatch.setattr(_config, "STATE_BYTES", state_bytes)
    rng = np.random.default_rng(chunk)
    for L, S, offset in ((300, 300, 0), (90, 250, 100), (120, 40, -10)):
        q, k, v, s = inputs(rng, L, S)
        mask = rng.random(S) < 0.8
        for causal in (True, False):
            for rate in (0.05, 5.0):
                a = decay_attention(q, k, v, s, coef, rate, causal, workers=1, offset=offset,
                                    key_mask=mask)
                b = decay_attention(q, k, v, s, coef, rate, causal, workers=2, offset=offset,
                                    key_mask=mask)
                assert all(np.array_equal(x, y) for x, y in zip(a, b))
                agree(a, dense(q, k, v, s, decay_log(rate, causal), offset, mask, coef))


def test_workers_bitwise_equal(coef):
    rng = np.random.default_rng(7)
    q, k, v, s = inputs(rng, 1500, 1500, E=6, Ev=5)
    for causal in (True, False):
        a = decay_attention(q, k, v, s, coef, 0.01, causal, workers=1)
        for w in (2, 3):
            b = decay_attention(q, k, v, s, coef, 0.01, causal, workers=w)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_stacked_heads(coef):
    """G = 3 query heads on one key/value head: the same as one head at a time."""
    rng = np.random.default_rng(3)
    q, k, v, s = inputs(rng, 200, 260, G=3)
    mask = rng.random(260) < 0.8
    for rate, causal in ((0.05, False), (0.5, True)):
        out, den = decay_attention(q, k, v, s, coef, rate, causal, offset=30, key_mask=mask)
        assert out.shape == (3, 200, 3) and den.shape == (3, 200)
        for h in range(3):
            o1, d1 = decay_attention(q[h], k, v, s, coef, rate, causal, offset=30,
                                     key_mask=mask)
            np.testing.assert_allclose(out[h], o1, rtol=0, atol=1e-14)
            agree((out[h], den[h]), dense(q[h], k, v, s, decay_log(rate, causal), 30, mask,
                                          coef))


def test_edge_cases(coef):
    rng = np.random.default_rng(5)
    q, k, v, s = inputs(rng, 50, 60)
    # rate = inf: only the nearest key(s); with every key at its own position, v itself
    out, _ = decay_attention(q, k, v, s, coef, np.inf, False)
    np.testing.assert_allclose(out, v[:50], atol=1e-15)
    # no value columns, no real keys
    assert decay_attention(q, k, v[:, :0], s, coef, 0.1, True)[0].shape == (50, 0)
    none = np.zeros(60, bool)
    got = decay_attention(q, k, v, s, coef, 0.1, False, key_mask=none)
    assert not got[0].any() and not got[1].any()
    # rows whose causal past holds no key: 0
    out, den = decay_attention(q, k, v, s, coef, 0.3, True, offset=-50)
    assert not out.any() and not den.any()
    for bad in (-1.0, np.nan, "x", [0.1, 0.2]):
        with pytest.raises(ValueError):
            decay_attention(q, k, v, s, coef, bad, True)


@pytest.mark.parametrize("R,eps", [(1.0, 1e-3), (3.0, 1e-3), (2.0, 1e-10)])
def test_error_within_certified_bound(R, eps):
    """max|out − softmax| <= 2(δ+ρ)/(1−δ−ρ)·max|v| against true softmax (exp) attention;
    1e-13·max|v| covers the dense float64 reference's own rounding."""
    approx = exp_approximation(R, eps=eps)
    rng = np.random.default_rng(int(R * 10))
    E, Ev = 4, 3
    m = n_features(E, approx.degree)
    cases = [(600, 600, 0, None), (40, 1000, 960, None), (300, 37, 0, None),
             (400, 500, -30, rng.random(500) < 0.6)]
    for L, S, offset, key_mask in cases:
        q, k, v, s = inputs(rng, L, S, E, Ev, R)
        vmax = np.abs(v).max()
        R1 = s * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
        softmax = Dense(q, k, v, s, offset, key_mask)
        for rate, causal in ((0.01, True), (0.3, False), (5.0, False), (800.0, True)):
            out, _ = decay_attention(q, k, v, s, approx.coef, rate, causal, offset=offset,
                                     key_mask=key_mask)
            ref, _ = softmax(decay_log(rate, causal))
            rho = recurrence_rounding("decay", S, m, approx.coef, R, R1, approx.error_bound,
                                      chunk=decay.decay_chunk(m, E, Ev, approx.degree),
                                      rate=rate)
            d = approx.error_bound + rho
            bound = 2 * d / (1 - d) * vmax
            err = np.abs(out - ref).max()
            assert err <= bound + 1e-13 * vmax, (L, S, rate, causal, err, bound)


def test_rounding_allowance_shape():
    """ρ grows with S, shrinks with larger chunks, and is finite and tiny at R = 1."""
    approx = exp_approximation(1.0, eps=1e-3)
    c = approx.coef
    d = approx.error_bound
    a = recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, chunk=16)
    b = recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, chunk=256)
    assert 0 < b < a < 1e-10
    assert recurrence_rounding("decay", 4096, 969, c, 1.0, 1.0, d, rate=0.0) < a
    w = recurrence_rounding("window", 4096, 969, c, 1.0, 1.0, d)
    assert 0 < w < recurrence_rounding("window", 65536, 969, c, 1.0, 1.0, d) < 1e-10
    with pytest.raises(ValueError):
        recurrence_rounding("fft", 10, 10, c, 1.0, 1.0, d)


def test_rate_zero_is_the_prefix_scan(coef, monkeypatch):
    """The one masked chunk kernel: at rate 0 every decay factor is exactly 1, so the
    decayed scan computes the prefix's sums (to rounding: the decayed key states weight
    the values before the GEMM)."""
    from numbarope.ops import prefix
    monkeypatch.setattr(_common, "CHUNK", 32)
    monkeypatch.setattr(_config, "CAUSAL_CHUNK", 32)
    rng = np.random.default_rng(4)
    q, k, v, s = inputs(rng, 400, 500, G=2)
    mask = rng.random(500) < 0.8
    a = decay_attention(q, k, v, s, coef, 0.0, True, offset=60, key_mask=mask)
    b = prefix.prefix_attention(q, k, v, s, coef, offset=60, key_mask=mask)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-13)


# ------------------------------------------------------------------ state in, state out
@pytest.mark.parametrize("rate", [0.0, 0.003, 0.05, 2.0])
@pytest.mark.parametrize("G, padded", [(1, False), (3, True)])
def test_state_in_and_out_chain_blocks(rate, G, padded, monkeypatch):
    """Rows and keys in three blocks: each block's returned state (referenced at its last
    position) is the next block's initial_state (referenced at position −1): the chained
    result is the one-block result (out 1e-12·max|v|; den 1e-12 relative where every row
    sees its own key), and the states equal key_state's and add_states' (1e-12)."""
    monkeypatch.setattr(_common, "CHUNK", 48)
    rng = np.random.default_rng(41)
    n, E, Ev = 1200, 4, 3
    q, k, v, s = inputs(rng, n, n, E, Ev, G=G)
    keep = None
    if padded:
        keep = rng.random(n) < 0.8
        keep[500:530] = False                  # rows of block 2 that see only the state
    coef = exp_approximation(1.0, eps=1e-7).coef
    cuts = [0, 500, 880, n]
    ref, dref = decay_attention(q, k, v, s, coef, rate, True, key_mask=keep)
    st = None
    outs, dens = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        km = None if keep is None else keep[a:b]
        o, d, st_new = decay_attention(q[..., a:b, :], k[a:b], v[a:b], s, coef, rate, True,
                                       key_mask=km, initial_state=st, return_state=True)
        # the returned state is key_state of all keys so far, referenced at b − 1
        whole = decay.key_state(k[:b], v[:b], s, coef, rate,
                                key_mask=None if keep is None else keep[:b])
        for x, y in zip(st_new, whole):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max())
        if st is not None:     # add_states of the earlier state and this block's own
            own = decay.key_state(k[a:b], v[a:b], s, coef, rate, key_mask=km)
            joined = decay.add_states(st, own, rate, b - a)
            for x, y in zip(joined, whole):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max())
        st = st_new
        outs.append(o)
        dens.append(d)
    out = np.concatenate(outs, axis=-2)
    den = np.concatenate(dens, axis=-1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(v).max())
    if not padded:             # every row sees a key at its own position: the same den
        np.testing.assert_allclose(den, dref, rtol=1e-12)


def test_state_rows_that_see_only_the_state(coef):
    """Rows before the block's first real key see only the initial state: their weights
    are relative to position −1, and out is the softmax over the earlier keys."""
    rng = np.random.default_rng(9)
    q, k, v, s = inputs(rng, 300, 300)
    keep = np.ones(300, bool)
    keep[200:260] = False
    rate = 0.02
    ref, _ = decay_attention(q, k, v, s, coef, rate, True, key_mask=keep)
    st = decay.key_state(k[:200], v[:200], s, coef, rate)
    out, den = decay_attention(q[200:], k[200:], v[200:], s, coef, rate, True,
                               key_mask=keep[200:], initial_state=st)
    np.testing.assert_allclose(out, ref[200:], rtol=0, atol=1e-12)
    # rows 200 .. 259 (positions 0 .. 59 of the block): weights relative to position −1
    # (t0 = position + 1), so den is the state's own φ(q)ᵀs, with no decay factor
    _, d0 = apply_state(q[200:260], st, s, coef)
    np.testing.assert_allclose(den[:60], d0, rtol=1e-14)


def test_state_helpers_and_refusals(coef):
    rng = np.random.default_rng(2)
    q, k, v, s = inputs(rng, 60, 60)
    st = decay.key_state(k, v, s, coef, 0.1)
    sh = decay.shift_state(st, 0.1, 5)
    f = decay.decay_factors(0.1, [5])[0]
    assert np.array_equal(sh[0], st[0] * f) and np.array_equal(sh[1], st[1] * f)
    assert decay.decay_factors(0.1, [0])[0] == 1.0
    assert decay.decay_factors(1.0, [701])[0] == 0.0        # beyond DECAY_CUT: exactly 0
    np.testing.assert_allclose(decay.decay_factors(0.1, np.arange(5)),
                               np.exp(-0.1 * np.arange(5)), rtol=1e-15)
    with pytest.raises(ValueError, match="causal"):
        decay_attention(q, k, v, s, coef, 0.1, False, initial_state=st)
    with pytest.raises(ValueError, match="causal"):
        decay_attention(q, k, v, s, coef, 0.1, False, return_state=True)
    with pytest.raises(ValueError, match="offset"):
        decay_attention(q, k, v, s, coef, 0.1, True, offset=-2, initial_state=st)
    with pytest.raises(ValueError, match="initial_state"):
        decay_attention(q, k, v, s, coef, 0.1, True, initial_state=st[0])
    alg = get("decay")
    with pytest.raises(ValueError, match="T= and initial_state"):
        alg.run(q, k, v, s, coef, structure=nb.Decay(0.1, True), T=np.ones(119),
                initial_state=st)
    with pytest.raises(ValueError, match="scalar rate"):
        alg.run(q, k, v, s, coef, structure=nb.Decay([0.1, 0.2], True))
    # with no query rows: only the state
    _, _, st2 = decay_attention(q[:0], k, v, s, coef, 0.1, True, return_state=True)
    for x, y in zip(st2, st):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13 * np.abs(y).max())


def test_registry_entry(coef):
    alg = get("decay")
    assert isinstance(alg, decay.Decay) and alg.structures == (nb.Decay,)
    for causal in (True, False):
        h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=nb.Decay(0.1, causal))
        assert alg.unavailable(h) == [] and h.causal == causal
        assert alg.predict(h, 3) > 0 and alg.memory(h, 3) == decay.decay_memory(64, 4, 4, 3)
        assert 0 < alg.rounding(h, coef, 1e-6) < 1e-10
    for st in (nb.NoBias(), nb.Causal(), nb.Window(4, 0)):
        why = alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=st))
        assert [w.code for w in why] == ["structure"]
    q, k, v, kw = alg.example(np.random.default_rng(0))
    assert kw["bias"] == nb.ALiBi([0.05])
    # run: the structure's rate and causal mask; with T, den in T's normalisation
    rng = np.random.default_rng(1)
    q, k, v, s = inputs(rng, 40, 50)
    st = nb.Decay(0.2, False)
    out, den = alg.run(q, k, v, s, coef, structure=st, offset=5)
    o2, d2 = decay_attention(q, k, v, s, coef, 0.2, False, offset=5)
    assert np.array_equal(out, o2) and np.array_equal(den, d2)
    b = st.values(40, 50, 5)
    T = np.exp(b - b.max())
    _, dT = alg.run(q, k, v, s, coef, structure=st, offset=5, T=T)
    ref = Dense(q, k, v, s, 5, None, coef)
    t = ref.t
    W = np.polynomial.polynomial.polyval(s * q @ k.T, coef) * T[t + 50 - 1 - 5]
    np.testing.assert_allclose(dT, W.sum(axis=1), rtol=1e-12)
