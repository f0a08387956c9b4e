"""numbarope.ops.prefix: causal attention by chunked prefix sums of key-side states, at
an offset, with key padding and stacked query heads, against dense references; chunk
boundaries, tasks and groups of states; threads; the state in and out; the registry
entry."""

import numpy as np
import pytest

import naive
from _poly_ref import poly_rows, poly_square, separable_inputs
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import prefix
from numbarope.ops.registry import HeadSpec, get
from numbarope.polynomial import exp_approximation


@pytest.mark.parametrize("n", [1, 2, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("chunk", [None, 16])
def test_causal_chunks_against_references(n, chunk, monkeypatch):
    # chunk boundaries (n = c − 1, c, c + 1, many chunks), several groups of stored
    # states (STATE_BYTES small) and tasks (MAX_TASKS small) carry the prefix across
    if chunk is not None:
        monkeypatch.setattr(_config, "CAUSAL_CHUNK", chunk)
        monkeypatch.setattr(_config, "MAX_TASKS", 3)
        monkeypatch.setattr(_config, "STATE_BYTES", 8 * 35 * 4 * 7)   # 7 states of m=35, Ev=3
    rng = np.random.default_rng(n)
    q, k, v, s = separable_inputs(rng, n)
    approx = exp_approximation(1.0, eps=1e-4)
    out, den = prefix.prefix_attention(q, k, v, s, approx.coef)
    np.testing.assert_allclose(out, poly_square(q, k, v, s, approx.coef, True),
                               rtol=0, atol=1e-12)
    exact = naive.attention(q, k, v, causal=True, scale=s)
    assert np.abs(out - exact).max() <= 2 * approx.error_bound / (1 - approx.error_bound) + 1e-12
    assert den.shape == (n,) and np.all(den > 0)


def test_zero_coefficient_and_no_values():
    # a zero coefficient cuts the weight recurrence (second pass); Ev = 0 skips the GEMMs
    rng = np.random.default_rng(5)
    q, k, v, s = separable_inputs(rng, 70)
    coef = np.array([1.0, 0.0, 0.5])
    out, den = prefix.prefix_attention(q, k, v, s, coef)
    np.testing.assert_allclose(out, poly_square(q, k, v, s, coef, True), atol=1e-12)
    out0, den0 = prefix.prefix_attention(q, k, v[:, :0], s, coef)
    assert out0.shape == (70, 0)
    np.testing.assert_allclose(den0, den, rtol=1e-13)


@pytest.mark.parametrize("L, S, off", [(5, 5, 0), (1, 40, 39), (37, 300, 263), (300, 37, 0),
                                       (300, 100, -20), (20, 900, 5), (700, 700, 0)])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_is_the_polynomial_attention(L, S, off, padded):
    # the same sums as a dense loop over the visible real keys, for one head and for a
    # stack of query heads on one key/value head
    rng = np.random.default_rng(L * 7 + S)
    E, s = 4, 0.5
    coef = exp_approximation(2.0, eps=1e-8).coef
    q = rng.standard_normal((3, L, E)) * 0.4
    k = rng.standard_normal((S, E)) * 0.4
    v = rng.standard_normal((S, 3))
    keep = rng.random(S) < 0.7 if padded else None
    one, _ = prefix.prefix_attention(q[0], k, v, s, coef, offset=off, key_mask=keep)
    np.testing.assert_allclose(one, poly_rows(q[0], k, v, s, coef, off, True, keep),
                               rtol=0, atol=1e-13)
    stacked, _ = prefix.prefix_attention(q, k, v, s, coef, offset=off, key_mask=keep)
    for h in range(3):
        ref = poly_rows(q[h], k, v, s, coef, off, True, keep)
        np.testing.assert_allclose(stacked[h], ref, rtol=0, atol=1e-13)


def test_workers_do_not_change_results(monkeypatch):
    monkeypatch.setattr(_config, "CAUSAL_CHUNK", 32)
    rng = np.random.default_rng(77)
    n = 600
    q, k, v, s = separable_inputs(rng, n, E=3)
    coef = exp_approximation(1.0, eps=1e-5).coef
    res = [prefix.prefix_attention(q, k, v, s, coef, workers=w) for w in (1, 2, 3, -1)]
    for out, den in res[1:]:        # the partition does not depend on workers: bitwise
        assert np.array_equal(out, res[0][0]) and np.array_equal(den, res[0][1])


@pytest.mark.parametrize("padded", [False, True])
def test_key_side_state_of_earlier_blocks(padded):
    # One sequence in blocks (the fast long-sequence path): the state of the keys before
    # a block, passed as initial_state, gives the same rows as the whole sequence at
    # once. Padded: the block's first 10 keys are padding, so its first causal rows see
    # none of its keys, only the state.
    rng = np.random.default_rng(11)
    n, E, Ev, s = 900, 6, 3, 0.7
    q, k = (rng.uniform(-0.4, 0.4, (n, E)) for _ in range(2))
    v = rng.standard_normal((n, Ev))
    coef = exp_approximation(1.0, degree=4).coef
    a, b = 350, 700                                    # one block: rows and keys a..b
    keep = np.ones(n, bool)
    if padded:
        keep[a:a + 10] = False
    ref, dref = prefix.prefix_attention(q, k, v, s, coef, key_mask=keep)
    st = prefix.key_state(k[:a], v[:a], s, coef)
    S_, s_ = st
    assert S_.shape == (s_.size, Ev) and np.isfinite(S_).all()
    out, den = prefix.prefix_attention(q[a:b], k[a:b], v[a:b], s, coef, key_mask=keep[a:b],
                                       initial_state=st)
    np.testing.assert_allclose(den, dref[a:b], rtol=1e-12)
    np.testing.assert_allclose(out, ref[a:b], rtol=0, atol=1e-12 * np.abs(v).max())


@pytest.mark.parametrize("G, padded", [(1, False), (3, True)])
def test_state_in_and_out_chain_blocks(G, padded, monkeypatch):
    # rows and keys in two blocks; the first block's returned state passed to the second
    # gives the one-block result (1e-12 relative), for chunks and groups of states
    monkeypatch.setattr(_config, "CAUSAL_CHUNK", 64)
    monkeypatch.setattr(_config, "MAX_TASKS", 3)
    rng = np.random.default_rng(31)
    n, E, Ev, s = 1000, 4, 4, 0.5
    q = rng.uniform(-0.5, 0.5, (G, n, E))
    k = rng.uniform(-0.5, 0.5, (n, E))
    v = rng.standard_normal((n, Ev))
    keep = np.ones(n, bool)
    if padded:
        keep = rng.random(n) < 0.8
        keep[600:640] = False                  # rows of block 2 that see only the state
    coef = exp_approximation(1.0, eps=1e-7).coef
    a = 600
    ref, dref = prefix.prefix_attention(q, k, v, s, coef, key_mask=keep)
    o1, d1, st = prefix.prefix_attention(q[:, :a], k[:a], v[:a], s, coef,
                                         key_mask=keep[:a], return_state=True)
    o2, d2, st2 = prefix.prefix_attention(q[:, a:], k[a:], v[a:], s, coef,
                                          key_mask=keep[a:], initial_state=st,
                                          return_state=True)
    out, den = np.concatenate([o1, o2], axis=1), np.concatenate([d1, d2], axis=1)
    np.testing.assert_allclose(den, dref, rtol=1e-12)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(v).max())
    for x, y in zip(st, prefix.key_state(k[:a], v[:a], s, coef, key_mask=keep[:a])):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13 * np.abs(y).max())
    for x, y in zip(st2, prefix.key_state(k, v, s, coef, key_mask=keep)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13 * np.abs(y).max())


def test_registry_entry():
    alg = get("prefix")
    assert isinstance(alg, prefix.Prefix) and alg.structures == (nb.Causal,)
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=nb.Causal())
    assert alg.unavailable(h) == [] and h.causal
    assert alg.predict(h, 3) > 0 and alg.memory(h, 3) == prefix.prefix_memory(64, 4, 4, 3)
    for st in (nb.NoBias(), nb.Decay(0.1, True), nb.Window(4, 0)):
        why = alg.unavailable(HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=st))
        assert [w.code for w in why] == ["structure"]
    q, k, v, kw = alg.example(np.random.default_rng(0))
    assert kw == dict(rotary=True, is_causal=True)
    coef = exp_approximation(1.0, degree=3).coef
    out, den = alg.run(q, k, v, 0.5, coef, structure=nb.Causal(), offset=3)
    want, dwant = prefix.prefix_attention(q, k, v, 0.5, coef, offset=3)
    assert np.array_equal(out, want) and np.array_equal(den, dwant)
