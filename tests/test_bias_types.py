"""Typed relative structures of numbarope.bias: values against dense loops over (i, j),
composition, per-head shapes, the old builders, and rope_attention on their arrays."""

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest

import numbarope as nr
from numbarope import bias as nb
from numbarope.bias import (ALiBi, Causal, Decay, Dense, NoBias, Sum, T5Buckets, Window,
                            as_structure)
from numbarope.ops import fast_algorithms

NEG = -np.inf
SHAPES = [(1, 1, 0), (2, 2, 0), (5, 5, 0), (3, 7, 4), (5, 2, -1), (4, 4, 2), (2, 6, -5)]


# ---------------------------------------------------------------- references
def _t5_ref(table, bidirectional, max_distance):
    """b(t) from the (HF-checked) square builder t5_buckets, at any offset t."""
    N = 600
    buckets = nb.t5_buckets(N, np.shape(table)[-1], bidirectional, max_distance)
    return lambda t: np.asarray(table)[..., buckets[t + N - 1]]


def _reference_b(x):
    """b(t) of a structure, written from its definition (scalar or per-head array)."""
    if isinstance(x, NoBias):
        return lambda t: 0.0
    if isinstance(x, Causal):
        return lambda t: 0.0 if t >= 0 else NEG
    if isinstance(x, Window):
        return lambda t: 0.0 if ((x.left is None or t <= x.left)
                                 and (x.right is None or t >= -x.right)) else NEG
    if isinstance(x, Decay):
        r = np.asarray(x.rate)
        return lambda t: np.full(r.shape, NEG) if (x.causal and t < 0) else -r * abs(t)
    if isinstance(x, T5Buckets):
        return _t5_ref(x.table, x.bidirectional, x.max_distance)
    if isinstance(x, Sum):
        fs = [_reference_b(y) for y in x.terms]
        return lambda t: sum(np.asarray(f(t), dtype=float) for f in fs)
    raise TypeError(x)


def _dense_loop(b, L, S, off):
    """out[..., i - j + S - 1] = b(i + off - j), filled by a loop over every (i, j)."""
    if L == 0 or S == 0:
        return np.zeros(np.shape(b(0)) + (0,))
    out = np.full(np.shape(b(0)) + (L + S - 1,), np.nan)
    for i in range(L):
        for j in range(S):
            out[..., i - j + S - 1] = b(i + off - j)
    assert not np.isnan(out).any()
    return out


def _serving(x):
    """Names of the fast algorithms the planner offers a head of structure ``x`` without
    relative matrices W_t: those serving its canonical form, most specific first (a
    structure knows no algorithm; each algorithm declares the structure types it
    serves). toeplitz-fft, which serves any relative bias, is for heads with W_t."""
    c = x.canonical()
    return tuple(a.name for a in fast_algorithms() if not a.general and a.serves(c))


TABLE = np.random.default_rng(0).standard_normal((2, 8))
STRUCTURES = [
    NoBias(), Causal(),
    Window(2), Window(1, 3), Window(None, 0), Window(0, None), Window(None, None), Window(0, 0),
    Decay(0.3), Decay(0.3, causal=True), Decay([0.5, 0.125]), Decay(0.0),
    ALiBi([0.5, 0.25]), ALiBi(0.5, causal=False), ALiBi.from_heads(3),
    T5Buckets(TABLE[0], bidirectional=True, max_distance=5),
    T5Buckets(TABLE, bidirectional=False, max_distance=6),
    T5Buckets(np.arange(8.0)) + Causal(),
    Decay([0.5, 0.25]) + Window(2, 1),
    ALiBi([0.5, 0.25]) + T5Buckets(TABLE, max_distance=5),
]


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("x", STRUCTURES, ids=repr)
@pytest.mark.parametrize("L, S, off", SHAPES)
def test_values_match_dense_loop(x, L, S, off):
    got = x.values(L, S, off)
    ref = _dense_loop(_reference_b(x), L, S, off)
    assert got.dtype == np.float64
    assert got.shape == ref.shape
    assert got.shape[:-1] == (() if x.heads is None else (x.heads,))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("x", STRUCTURES, ids=repr)
def test_materialize_is_square_values(x):
    for n in (0, 1, 4):
        m = x.materialize(n)
        np.testing.assert_array_equal(m, x.values(n, n, 0))
        assert m.shape[-1] == max(2 * n - 1, 0)


@pytest.mark.parametrize("L, S, off", SHAPES + [(0, 3, 0), (3, 0, 1)])
def test_offsets_in_storage_order(L, S, off):
    t = nb.offsets(L, S, off)
    ref = _dense_loop(lambda t: t, L, S, off)
    np.testing.assert_array_equal(t, ref)
    assert t.dtype == np.int64


def test_dense_values_checks_length_and_copies():
    b = np.random.default_rng(1).standard_normal((2, 3, 9))
    d = Dense(b)
    assert d.heads == 3 and d.kind == "dense" and _serving(d) == ("fft",)
    assert not d.causal
    out = d.values(3, 7, 4)                          # 3 + 7 - 1 = 9; the offset is not used
    np.testing.assert_array_equal(out, b)
    out[...] = 0                                     # a copy
    np.testing.assert_array_equal(d.values(5, 5), b)
    with pytest.raises(ValueError, match=r"expected length L\+S-1 = 5 .* L = 3, S = 3"):
        d.materialize(3)
    m = Dense([True, False, True])                   # boolean: True takes part
    np.testing.assert_array_equal(m.materialize(2), [0.0, NEG, 0.0])
    assert Dense(b[0, 0]).heads is None


def test_heads_and_shapes():
    assert NoBias().heads is None and Causal().heads is None and Window(3).heads is None
    assert Decay(0.5).heads is None and Decay(0.5).materialize(3).shape == (5,)
    assert Decay([0.5, 0.1, 0.2]).heads == 3
    assert Decay([0.5, 0.1, 0.2]).values(3, 7, 4).shape == (3, 9)
    assert ALiBi.from_heads(12).heads == 12
    assert T5Buckets(np.zeros(8)).heads is None
    assert T5Buckets(np.zeros((4, 8))).values(2, 5, 3).shape == (4, 6)
    assert (Decay([0.5, 0.25]) + T5Buckets(np.zeros(8))).heads == 2
    assert (Decay(0.5) + Dense(np.zeros((3, 5)))).values(3).shape == (3, 5)


# ---------------------------------------------------------------- facts
@pytest.mark.parametrize("x", STRUCTURES, ids=repr)
def test_causal_property_and_algorithms(x):
    b = _reference_b(x)
    masks_future = all(np.all(np.isneginf(b(t))) for t in range(-40, 0))
    if x.causal:
        assert masks_future
    algorithms = _serving(x)
    assert algorithms[-1] == "fft"
    assert set(algorithms) <= {"gemm", "prefix", "decay", "window", "fft"}
    if "gemm" in algorithms:
        assert all(np.all(np.asarray(b(t)) == 0) for t in range(-40, 41))
    if "prefix" in algorithms:
        assert x.causal and all(np.all(np.asarray(b(t)) == 0) for t in range(0, 41))
    assert isinstance(x.kind, str)


KINDS = [
    ("none", ("gemm", "fft"), NoBias()),
    ("causal", ("prefix", "fft"), Causal()),
    ("window", ("window", "fft"), Window(4, 2)),
    ("window", ("prefix", "fft"), Window(None, 0)),            # canonical: Causal()
    ("window", ("gemm", "fft"), Window(None, None)),           # canonical: NoBias()
    ("decay", ("decay", "fft"), Decay(0.5)),
    ("decay", ("decay", "fft"), Decay([0.5, 0.0], causal=True)),
    ("decay", ("gemm", "fft"), Decay(0.0)),                    # canonical: NoBias()
    ("decay", ("prefix", "fft"), Decay([0.0, 0.0], causal=True)),   # canonical: Causal()
    ("alibi", ("decay", "fft"), ALiBi.from_heads(4)),
    ("t5", ("fft",), T5Buckets(np.zeros(8))),
    ("dense", ("fft",), Dense(np.zeros(5))),
    ("sum", ("fft",), Decay(0.5) + Window(3, 3)),
]


@pytest.mark.parametrize("kind, algorithms, x", KINDS, ids=[repr(r[2]) for r in KINDS])
def test_kinds_and_algorithms(kind, algorithms, x):
    assert (x.kind, _serving(x)) == (kind, algorithms), x


def test_causal_flags():
    assert Causal().causal and not NoBias().causal
    assert Window(3).causal and Window(None, 0).causal and not Window(3, 1).causal
    assert not Window(0, None).causal
    assert Decay(0.1, causal=True).causal and not Decay(0.1).causal
    assert ALiBi(0.1).causal and not ALiBi(0.1, causal=False).causal
    assert not T5Buckets(np.zeros(8)).causal
    dec = np.zeros(4)
    dec[0] = NEG                   # decoder: every t <= 0 is bucket 0
    assert T5Buckets(dec, bidirectional=False, max_distance=3).causal
    enc = np.zeros(8)
    enc[5:] = NEG                  # encoder: t < 0 lands in buckets 5 .. 7
    assert T5Buckets(enc, max_distance=8).causal
    assert (T5Buckets(np.zeros(8)) + Causal()).causal


# ---------------------------------------------------------------- key ranges, canonical form
def _visible(x, L, S, off):
    """(L, S) bool: key j takes part in row i (a finite b(i + off − j) on some head)."""
    vals = np.asarray(x.values(L, S, off)).reshape(-1, max(L + S - 1, 0))
    out = np.zeros((L, S), bool)
    for i in range(L):
        for j in range(S):
            out[i, j] = np.isfinite(vals[:, i - j + S - 1]).any()
    return out


#: structures whose visible keys are exactly their key ranges (contiguous bands)
BANDS = (Causal, Window, Decay)


@pytest.mark.parametrize("x", STRUCTURES, ids=repr)
@pytest.mark.parametrize("L, S, off", SHAPES + [(6, 3, 2), (3, 6, -4)])
def test_key_ranges_hold_every_visible_key(x, L, S, off):
    r = x.key_ranges(L, S, off)
    vis = _visible(x, L, S, off)
    if r is None:                                   # every key, as far as ranges go
        assert not isinstance(x, (Causal, Window)) and not x.causal
        return
    lo, hi = (np.asarray(a) for a in r)
    assert lo.shape == hi.shape == (L,) and lo.dtype.kind == hi.dtype.kind == "i"
    assert np.all((0 <= lo) & (lo <= S) & (0 <= hi) & (hi <= S))
    j = np.arange(S)
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    assert not np.any(vis & ~inside), "a visible key outside its row's range"
    if isinstance(x, BANDS):
        np.testing.assert_array_equal(inside, vis)


@pytest.mark.parametrize("x, canonical", [
    (Decay(0.0), NoBias()), (Decay(0.0, causal=True), Causal()),
    (Decay([0.0, 0.0]), NoBias()), (ALiBi(0.0), Causal()),
    (Window(None, 0), Causal()), (Window(None, None), NoBias()),
    (NoBias(), NoBias()), (Causal(), Causal()), (Window(2), Window(2)),
    (Window(0, None), Window(0, None)), (Decay(0.3), Decay(0.3)),
    (ALiBi([0.5, 0.25]), ALiBi([0.5, 0.25])),
], ids=repr)
def test_canonical_is_the_most_specific_equivalent(x, canonical):
    c = x.canonical()
    assert c == canonical and type(c) is type(canonical)
    assert c.canonical() == c
    for L, S, off in SHAPES:                        # the same values, broadcast over heads
        a, b = x.values(L, S, off), c.values(L, S, off)
        np.testing.assert_array_equal(a, np.broadcast_to(b, a.shape))


# ---------------------------------------------------------------- composition
def test_causal_composition():
    assert Decay(0.25) + Causal() == Decay(0.25, causal=True)
    assert Causal() + Decay(0.25) == Decay(0.25, causal=True)
    assert Window(3, 2) + Causal() == Window(3, 0)
    assert Causal() + Window(None, None) == Window(None, 0)
    assert NoBias() + Causal() == Causal() and Causal() + NoBias() == Causal()
    assert Causal() + Causal() == Causal()
    a = ALiBi([0.5, 0.25], causal=False) + Causal()
    assert type(a) is ALiBi and a == ALiBi([0.5, 0.25])
    t5 = T5Buckets(TABLE, max_distance=5)
    s = t5 + Causal()
    assert isinstance(s, Sum) and s.causal and _serving(s) == ("fft",)
    assert s == Causal() + t5                       # a Sum compares as a multiset
    np.testing.assert_array_equal(s.values(3, 7, 4),
                                  t5.values(3, 7, 4) + Causal().values(3, 7, 4))
    d = Dense(np.zeros(5)) + Causal()
    assert isinstance(d, Sum) and d.causal


def test_general_composition():
    assert NoBias() + Window(2) == Window(2) and Window(2) + NoBias() == Window(2)
    assert Window(3, 1) + Window(1, None) == Window(1, 1)      # bands intersect
    assert Window(None, 2) + Window(4, None) == Window(4, 2)
    d = Decay(0.25) + Decay([0.5, 0.125], causal=True)        # rates add
    assert d == Decay([0.75, 0.375], causal=True) and type(d) is Decay
    assert type(ALiBi(0.5) + ALiBi(0.25)) is ALiBi
    with pytest.raises(ValueError, match="per-head rates do not broadcast"):
        Decay([0.5, 0.25]) + Decay([0.1, 0.2, 0.3])
    s = Decay(0.5) + Window(3, 3) + T5Buckets(np.arange(8.0))
    assert isinstance(s, Sum) and len(s.terms) == 3
    assert _serving(s) == ("fft",)
    # -inf wins, values add
    x = np.array([NEG, 1.0, 2.0, NEG, 0.5])
    y = np.array([0.0, NEG, 1.0, NEG, 0.25])
    np.testing.assert_array_equal((Dense(x) + Dense(y)).materialize(3),
                                  [NEG, NEG, 3.0, NEG, 0.75])
    assert _serving(Sum(Decay(0.5), Decay(0.25))) == ("fft",)   # a Sum has no rate
    assert _serving(Sum(Window(2), Window(3))) == ("fft",)


def test_sums_of_parameter_free_terms_keep_their_algorithms():
    # parameter-free algorithms shared by every term (gemm, prefix, fft)
    assert _serving(Window(None, 0) + Decay(0.0, causal=True)) == ("prefix", "fft")
    assert _serving(Sum(NoBias(), Window(None, None))) == ("gemm", "fft")


def test_plain_arrays_are_dense():
    b = np.linspace(-1, 0, 5)
    for s in (Window(1) + b, b + Window(1), Window(1) + list(b)):
        assert isinstance(s, Sum) and Dense(b) in s.terms
        np.testing.assert_array_equal(s.materialize(3), b + Window(1).materialize(3))
    assert NoBias() + b == Dense(b)
    with pytest.raises(TypeError):
        Window(1) + None
    with pytest.raises(ValueError, match=r"bias must have shape \(\.\.\., L\+S-1\)"):
        Window(1) + 0.5


def test_as_structure():
    assert as_structure(None) == NoBias()
    w = Window(2)
    assert as_structure(w) is w
    assert as_structure(np.zeros(5)) == Dense(np.zeros(5))
    assert as_structure([True, False, True]) == Dense([0.0, NEG, 0.0])


# ---------------------------------------------------------------- builders
@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_equal_to_old_builders(n):
    eq = np.testing.assert_array_equal
    eq(nb.causal_bias(n), Causal().materialize(n))
    eq(nb.causal_bias(n), Window(None, 0).materialize(n))
    for w in (0, 1, 3, 10):
        eq(nb.window_bias(n, w), Window(w, 0).materialize(n))
        eq(nb.window_bias(n, w), Window(w).materialize(n))
        eq(nb.window_bias(n, w, causal=False), Window(w, w).materialize(n))
    for s in (0.5, [0.5, 0.25, 0.0], nb.alibi_slopes(6)):
        for causal in (True, False):
            eq(nb.alibi_bias(n, s, causal), ALiBi(s, causal).materialize(n))
            eq(nb.alibi_bias(n, s, causal), Decay(s, causal).materialize(n))
    eq(nb.alibi_bias(n, nb.alibi_slopes(5)), ALiBi.from_heads(5).materialize(n))
    for table, bidi, md in ((np.arange(32.0), True, 128), (TABLE, False, 6),
                            (TABLE, True, 5)):
        eq(nb.t5_bias(n, table, bidi, md), T5Buckets(table, bidi, md).materialize(n))


def test_from_hf():
    assert Window.from_hf(4) == Window(3, 0)
    assert Window.from_hf(1) == Window(0, 0)
    assert Window.from_hf(4, causal=False) == Window(4, 4)
    np.testing.assert_array_equal(Window.from_hf(4).materialize(9), nb.window_bias(9, 3))
    row = Window.from_hf(4).values(1, 10, 9)        # the last query of a 10-token cache
    assert (row == 0).sum() == 4                    # 4 keys, the query included
    with pytest.raises(ValueError, match="sliding_window must be an int >= 1"):
        Window.from_hf(0)
    with pytest.raises(ValueError, match="sliding_window must be an int >= 1"):
        Window.from_hf(4.0)
    with pytest.raises(ValueError, match="causal must be a bool"):
        Window.from_hf(4, causal="yes")


@pytest.mark.parametrize("W", [1, 3, 5])
@pytest.mark.parametrize("L, S, off", [(6, 6, 0), (3, 7, 4), (5, 2, -1)])
def test_from_hf_matches_transformers_masks(W, L, S, off):
    torch = pytest.importorskip("torch")
    mu = pytest.importorskip("transformers.masking_utils")
    q = torch.arange(L)[:, None]
    kv = torch.arange(S)[None, :]
    # the bidirectional overlay alone: HF's full bidirectional function also drops
    # queries at negative positions (q_idx >= 0), which HF never produces
    for causal, fn in ((True, mu.sliding_window_causal_mask_function(W)),
                       (False, mu.sliding_window_bidirectional_overlay(W))):
        fn = mu.add_offsets_to_mask_function(fn, off, 0)
        allowed = fn(0, 0, q, kv).numpy()
        b = Window.from_hf(W, causal=causal).values(L, S, off)
        ours = np.array([[b[i - j + S - 1] == 0 for j in range(S)] for i in range(L)])
        np.testing.assert_array_equal(ours, np.broadcast_to(allowed, (L, S)))


# ---------------------------------------------------------------- attention
def _softmax_reference(q, k, v, b, off):
    """Dense softmax, loops over (i, j), logit + b(i + off − j); masked rows give 0."""
    L, E = q.shape
    S = k.shape[0]
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        logits = np.array([q[i] @ k[j] / math.sqrt(E) + b(i + off - j) for j in range(S)])
        if np.all(np.isneginf(logits)):
            continue
        w = np.exp(logits - logits.max())
        out[i] = w @ v / w.sum()
    return out


@pytest.mark.parametrize("x", [Window(2, 1), Window.from_hf(3), ALiBi([0.5, 0.25]),
                               Decay(0.3), T5Buckets(TABLE, bidirectional=False,
                                                     max_distance=6) + Causal(),
                               Decay([0.5, 0.25]) + Window(2, 1)], ids=repr)
@pytest.mark.parametrize("L, S, off", [(3, 7, 4), (5, 2, -1), (6, 6, 0)])
def test_rope_attention_with_values(x, L, S, off):
    rng = np.random.default_rng(L * 10 + S)
    H, E = 2, 4
    q, k = rng.standard_normal((H, L, E)), rng.standard_normal((H, S, E))
    v = rng.standard_normal((H, S, 3))
    out = nr.rope_attention(q, k, v, bias=x.values(L, S, off), query_offset=off,
                            method="exact")
    b = _reference_b(x)
    for h in range(H):
        bh = (lambda t, h=h: np.broadcast_to(b(t), (H,))[h]) if x.heads else b
        np.testing.assert_allclose(out[h], _softmax_reference(q[h], k[h], v[h], bh, off),
                                   rtol=0, atol=1e-12)


def test_causal_values_equal_is_causal():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((7, 4)), \
        rng.standard_normal((7, 2))
    a = nr.rope_attention(q, k, v, bias=Causal().values(3, 7, 4), query_offset=4,
                          method="exact")
    b = nr.rope_attention(q, k, v, is_causal=True, query_offset=4, method="exact")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- identity, display
def test_frozen_hashable_and_copied():
    r = np.array([0.5, 0.25])
    d = Decay(r)
    r[0] = 9.0                                      # the structure keeps its own copy
    assert d.rate[0] == 0.5 and not d.rate.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.causal = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        Window(2).left = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sum(Causal(), Dense(np.zeros(3))).terms = ()
    for x in STRUCTURES:                            # pickle and copy keep them equal
        assert pickle.loads(pickle.dumps(x)) == x and copy.deepcopy(x) == x
    assert {Decay([0.5, 0.25]): 1}[Decay(np.array([0.5, 0.25]))] == 1
    assert Decay(0.0) == Decay(-0.0) and hash(Decay(0.0)) == hash(Decay(-0.0))
    assert hash(Sum(Causal(), Decay(0.5))) == hash(Sum(Decay(0.5), Causal()))
    assert Decay(0.5) != Decay(0.5, causal=True) and Window(2) != Window(2, 1)
    assert ALiBi(0.5) != Decay(0.5, causal=True)    # same values, another type
    np.testing.assert_array_equal(ALiBi(0.5).materialize(4),
                                  Decay(0.5, causal=True).materialize(4))
    assert Window(3) != "Window(3)"


def test_repr_readable():
    for x in (NoBias(), Causal(), Window(3), Window(None, 2), Decay(0.5),
              Decay([0.5, 0.25], causal=True), ALiBi([0.5, 0.25])):
        assert eval(repr(x)) == x, repr(x)
    assert repr(Window(3)) == "Window(left=3, right=0)"
    assert repr(ALiBi([0.5, 0.25])) == "ALiBi(slopes=[0.5, 0.25], causal=True)"
    assert repr(T5Buckets(np.zeros((2, 32)))) == \
        "T5Buckets(table=<(2, 32) float64>, bidirectional=True, max_distance=128)"
    assert repr(Decay(0.5) + Window(2, 2)) == \
        "Sum(Decay(rate=0.5, causal=False), Window(left=2, right=2))"
    assert "(16,)" in repr(ALiBi.from_heads(16))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: Decay(-0.5), "rate must be finite and >= 0"),
    (lambda: Decay(np.nan), "rate must be finite and >= 0"),
    (lambda: Decay(np.inf), "rate must be finite and >= 0"),
    (lambda: Decay([0.5, -1.0]), "rate must be finite and >= 0"),
    (lambda: Decay(np.ones((2, 2))), r"rate must be a scalar or have shape \(H,\)"),
    (lambda: Decay("0.5"), "rate must be real numbers"),
    (lambda: Decay(True), "rate must be real numbers"),
    (lambda: Decay(0.5, causal=1), "causal must be a bool"),
    (lambda: ALiBi(-1.0), "slopes must be finite and >= 0"),
    (lambda: ALiBi([0.5, np.nan]), "slopes must be finite and >= 0"),
    (lambda: ALiBi(0.5, causal=None), "causal must be a bool"),
    (lambda: ALiBi.from_heads(0), "num_heads must be an int >= 1"),
    (lambda: Window(1.5), r"left must be an int >= 0 .* or None"),
    (lambda: Window(-1), "left must be an int >= 0"),
    (lambda: Window(True), "left must be an int >= 0"),
    (lambda: Window(2, -1), "right must be an int >= 0"),
    (lambda: Window(2, 0.0), "right must be an int >= 0"),
    (lambda: T5Buckets(np.zeros(3)), "num_buckets must be an int >= 4"),
    (lambda: T5Buckets(np.zeros(1), bidirectional=False), "num_buckets must be an int >= 2"),
    (lambda: T5Buckets([0, 1, np.nan, 3]), r"table must not contain NaN or \+inf"),
    (lambda: T5Buckets([0, 1, np.inf, 3]), r"table must not contain NaN or \+inf"),
    (lambda: T5Buckets(0.0), r"table must have shape \(\.\.\., num_buckets\)"),
    (lambda: T5Buckets(["a"] * 8), "table must be real numbers"),
    (lambda: T5Buckets(np.zeros(8), max_distance=2.0), "max_distance must be an int > "),
    (lambda: T5Buckets(np.zeros(8), max_distance=2),
     r"max_distance must be an int > num_buckets // 4 = 2"),
    (lambda: T5Buckets(np.zeros(8), bidirectional="no"), "bidirectional must be a bool"),
    (lambda: Dense([0.0, np.nan, 0.0]), r"bias must not contain NaN or \+inf"),
    (lambda: Dense([0.0, np.inf, 0.0]), r"bias must not contain NaN or \+inf"),
    (lambda: Dense(0.0), r"bias must have shape \(\.\.\., L\+S-1\)"),
    (lambda: Dense(["a", "b", "c"]), "bias must be real numbers"),
    (lambda: Dense(np.zeros(4)).values(2, 2), r"expected length L\+S-1 = 3"),
    (lambda: Dense(np.zeros(4)).values(3, 7, 4), r"expected length L\+S-1 = 9"),
    (lambda: Window(2).values(-1), "L must be an int >= 0"),
    (lambda: Window(2).values(3.0), "L must be an int >= 0"),
    (lambda: Window(2).values(3, 2.0), "S must be an int >= 0"),
    (lambda: Window(2).values(3, 4, 1.5), "offset must be an int"),
    (lambda: Window(2).materialize(-2), "L must be an int >= 0"),
    (lambda: Sum(), "Sum needs at least one term"),
    (lambda: Sum(Decay([0.5, 0.25]), T5Buckets(np.zeros((3, 8)))),
     "leading .head. shapes do not broadcast"),
    (lambda: nb.offsets(3, -1), "S must be an int >= 0"),
    (lambda: nb.offsets(3, 3, 0.5), "query_offset must be an int"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("st", ["causal-window", "two-sided", "hf"])
def test_window_structure_skips_blocks_and_equals_its_dense_bias(st):
    # the exact path skips key blocks outside a typed Window; the result is the
    # same as with the same bias passed as a plain array (which visits every block)
    from numbarope.bias import Window
    structure = {"causal-window": Window(300, 0), "two-sided": Window(200, 700),
                 "hf": Window.from_hf(1000)}[st]
    rng = np.random.default_rng(4)
    L, S = 1500, 2600
    off = S - L
    q, k = rng.standard_normal((2, L, 8)), rng.standard_normal((2, S, 8))
    v = rng.standard_normal((2, S, 3))
    typed, info = nr.rope_attention(q, k, v, rotary=True, bias=structure,
                                           query_offset=off, method="exact",
                                           return_info=True)
    dense = nr.rope_attention(q, k, v, rotary=True, query_offset=off,
                                     bias=structure.values(L, S, off),
                                     is_causal=structure.causal, method="exact")
    # the same sums, fewer blocks (the online softmax's order differs by the skipped
    # blocks): within the exact path's rounding bound
    assert np.abs(typed - dense).max() <= info.error_bound.max()
    assert info.time_exact.max() < nr.plan(q, k, v, bias=structure.values(L, S, off),
                                                  query_offset=off).time_exact.max()


# -- packed sequences and chunks (issue 23) -------------------------------------

@pytest.mark.parametrize("is_causal", [True, False])
def test_packed_sequences_are_each_sequence_alone(is_causal):
    from numbarope.bias import Packed
    rng = np.random.default_rng(21)
    cu = (0, 4, 4, 13, 20)                      # an empty sequence in the middle
    q, k, v = (rng.standard_normal((3, 20, 8)) for _ in range(3))
    packed = Packed(cu, is_causal)
    out = nr.rope_attention(q, k, v, bias=packed, rotary=True,
                                   positions=packed.positions())
    for a, b in zip(cu, cu[1:]):
        if b > a:
            alone = nr.rope_attention(q[:, a:b], k[:, a:b], v[:, a:b], rotary=True,
                                             is_causal=is_causal)
            np.testing.assert_allclose(out[:, a:b], alone, rtol=0, atol=1e-13)
    assert packed.positions().tolist() == [0, 1, 2, 3] + list(range(9)) + list(range(7))


@pytest.mark.parametrize("bad", [(1, 3), (0, 5, 3), (0, 2.5), "abc", ()])
def test_packed_refuses_bad_cu_seqlens(bad):
    from numbarope.bias import Packed
    with pytest.raises(ValueError, match="cu_seqlens"):
        Packed(bad)


def test_chunked_is_causal_chunks():
    from numbarope.bias import Chunked
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((2, 20, 4)) for _ in range(3))
    out = nr.rope_attention(q, k, v, bias=Chunked(8))
    for a in (0, 8, 16):
        b = min(a + 8, 20)
        np.testing.assert_allclose(out[:, a:b], nr.rope_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        Chunked(0)


def test_chunked_with_a_start():
    # chunks counted from position 3 (a row with 3 left-padding tokens, as
    # transformers builds Llama 4's chunked masks): [0, 3), [3, 11), [11, 19), [19, 20)
    from numbarope.bias import Chunked
    rng = np.random.default_rng(23)
    q, k, v = (rng.standard_normal((2, 20, 4)) for _ in range(3))
    c = Chunked(8, start=3)
    assert c == Chunked(8, start=11) and c.start == 3
    assert c.cu_seqlens(20) == (0, 3, 11, 19, 20)
    out = nr.rope_attention(q, k, v, bias=c)
    for a, b in zip(c.cu_seqlens(20), c.cu_seqlens(20)[1:]):
        np.testing.assert_allclose(out[:, a:b], nr.rope_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="start must be an int"):
        Chunked(8, start=1.5)


def test_a_structure_no_fast_algorithm_serves_is_named_with_what_they_serve():
    # the refusal named the first algorithm's structure ("gemm serves NoBias") as if
    # the head were a gemm head: it now says that none serves it, and what each does
    q = np.random.default_rng(3).standard_normal((1, 256, 8)) * 0.2
    with pytest.raises(nr.FastPathError,
                       match=r"no fast algorithm serves a chunked structure \(Chunked\); "
                             r"they serve gemm: NoBias; prefix: Causal"):
        nr.rope_attention(q, q, q, bias=nr.bias.Chunked(64), method="fast")
    reason = nr.plan(q, q, q, bias=nr.bias.Chunked(64)).heads[0].reason
    assert reason.startswith("fast infeasible: no fast algorithm serves a chunked")
