"""numbarope._pipeline.heads: per-head facts, computed once, one HeadSpec per head —
the logit radius and max|v| over the keys each head sees, the compute precision, the
head's canonical structure (its own parameters selected), the Toeplitz weights and
the smallest row mass of a relative bias, the exact path's bound, and which query
heads may share a key side. (End to end, padded keys' junk never reaching these
facts: tests/test_padding.py.)"""

import numpy as np
import pytest

from numbarope import bias as nb
from numbarope.ops import HeadSpec
from numbarope._pipeline.heads import Heads, head_facts, separable_head_spec
from numbarope._pipeline.inputs import make_problem


def _facts(q, k, v, radius=None, fast=True, **kw):
    p, _ = make_problem(q, k, v, **kw)
    return p, head_facts(p, radius, fast=fast)


def _qkv(B=2, L=16, S=None, E=4, Ev=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    S = L if S is None else S
    return (rng.standard_normal((B, L, E)).astype(dtype),
            rng.standard_normal((B, S, E)).astype(dtype),
            rng.standard_normal((B, S, Ev)).astype(dtype))


def test_one_spec_per_head_with_its_sizes_radius_and_values():
    q, k, v = _qkv(B=3)
    p, f = _facts(q, k, v, scale=0.5)
    assert isinstance(f, Heads) and len(f.specs) == 3
    assert all(isinstance(h, HeadSpec) for h in f.specs)
    for b, h in enumerate(f.specs):
        assert (h.head, h.n, h.S, h.E, h.Ev, h.offset) == ((b,), 16, 16, 4, 3, 0)
        R = 0.5 * np.linalg.norm(q[b], axis=1).max() * np.linalg.norm(k[b], axis=1).max()
        assert R <= h.radius <= R * (1 + 1e-12) and h.radius1 >= h.radius
        assert h.vmax == np.abs(v[b]).max() and not h.radius_given
        assert h.compute_dtype == "float64" and h.out_rounding == 0.0
        assert 0 < h.exact_bound < 1e-12
        assert h.structure == nb.NoBias() and not h.general


def test_a_given_radius_replaces_the_computed_one():
    q, k, v = _qkv(B=2)
    q = q * 1e-3                        # logits below 0.25: a true (loose) bound
    _, f = _facts(q, k, v, radius=[0.25, 40.0])
    assert [h.radius for h in f.specs] == [0.25, 40.0]
    assert all(h.radius_given and h.radius1 >= h.radius for h in f.specs)
    with pytest.raises(ValueError, match="radius has shape"):
        _facts(q, k, v, radius=np.ones(3))


def test_padded_keys_enlarge_neither_the_radius_nor_max_v():
    q, k, v = _qkv(B=1)
    keep = np.ones(16, bool)
    keep[:5] = False
    k2, v2 = k.copy(), v.copy()
    k2[:, :5], v2[:, :5] = 1e6, -1e9                  # junk in the padded keys
    _, ref = _facts(q, k[:, 5:], v[:, 5:], query_offset=5)
    _, f = _facts(q, k2, v2, key_padding_mask=keep)
    assert f.specs[0].radius == ref.specs[0].radius
    assert f.specs[0].vmax == ref.specs[0].vmax == np.abs(v[0, 5:]).max()


@pytest.mark.parametrize("kw, structures", [
    (dict(), [nb.NoBias(), nb.NoBias()]),
    (dict(is_causal=True), [nb.Causal(), nb.Causal()]),
    (dict(bias=nb.Window(None, 0)), [nb.Causal(), nb.Causal()]),
    (dict(bias=nb.Window(None, None)), [nb.NoBias(), nb.NoBias()]),
    (dict(bias=nb.Window(3, 1)), [nb.Window(3, 1), nb.Window(3, 1)]),
    (dict(bias=nb.Decay([0.5, 0.0])), [nb.Decay(0.5), nb.NoBias()]),
    (dict(bias=nb.Decay([0.5, 0.0]), is_causal=True),
     [nb.Decay(0.5, causal=True), nb.Causal()]),
    (dict(bias=nb.ALiBi([0.25, 0.125])),
     [nb.Decay(0.25, causal=True), nb.Decay(0.125, causal=True)]),
], ids=lambda x: repr(x) if isinstance(x, dict) else "")
def test_each_head_gets_its_canonical_structure(kw, structures):
    q, k, v = _qkv(B=2)
    _, f = _facts(q, k, v, **kw)
    assert [h.structure for h in f.specs] == structures
    assert [h.causal for h in f.specs] == [s.causal for s in structures]


def test_an_array_bias_is_dense_one_per_bias_row():
    q, k, v = _qkv(B=2)
    b = np.random.default_rng(1).standard_normal((2, 31))
    _, f = _facts(q, k, v, bias=b)
    assert [h.structure for h in f.specs] == [nb.Dense(b[0]), nb.Dense(b[1])]
    _, shared = _facts(q, k, v, bias=b[0])
    assert shared.specs[0].structure is shared.specs[1].structure


def test_causal_decoding_at_the_end_of_the_keys_is_no_bias():
    # one query at the last position sees every key: the causal mask hides nothing
    q, k, v = _qkv(B=1, L=1, S=16)
    _, f = _facts(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert f.specs[0].structure == nb.NoBias()
    _, top = _facts(q, k, v, is_causal=True)           # top-left: query 0 sees key 0
    assert top.specs[0].structure == nb.Causal()


def test_toeplitz_weights_and_row_mass():
    q, k, v = _qkv(B=1)
    _, none = _facts(q, k, v)
    assert none.weights == ((None, 0.0),) and none.specs[0].row_mass == 1.0
    b = np.linspace(-3.0, 5.0, 31)
    _, f = _facts(q, k, v, bias=b)
    T, shift = f.weights[0]
    assert shift == 5.0 and T.max() == 1.0
    np.testing.assert_allclose(T, np.exp(b - 5.0), rtol=1e-15)
    masses = [T[i:i + 16].sum() for i in range(16)]     # row i sees T[i .. i+15]
    np.testing.assert_allclose(f.specs[0].row_mass, min(masses), rtol=1e-12)
    # row 0 sees only offsets of bias -2000: finite logits, every weight underflows
    _, steep = _facts(q, k, v, bias=np.r_[np.full(16, -2000.0), np.zeros(15)])
    assert steep.specs[0].row_mass == 0.0
    _, exact_only = _facts(q, k, v, bias=b, fast=False)  # not computed for exact calls
    assert exact_only.weights == ((None, 0.0),)


def test_float32_precision_and_its_upgrade():
    q, k, v = _qkv(B=1, dtype=np.float32)
    p, f = _facts(q, k, v)
    assert f.compute_dtype == np.float32 and f.specs[0].compute_dtype == "float32"
    assert f.specs[0].out_rounding == 2.0 ** -24 * f.specs[0].vmax
    _, big = _facts(q * np.float32(1e20), k * np.float32(1e20), v)
    assert big.compute_dtype == np.float64          # the logits would overflow float32
    with pytest.raises(ValueError, match="precision='float32' cannot hold these logits"):
        _facts(q * np.float32(1e20), k * np.float32(1e20), v, precision="float32")


def test_query_heads_on_one_key_value_head_may_share():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, 8, 4))
    k, v = rng.standard_normal((2, 2, 8, 4))
    _, f = _facts(q, k, v, enable_gqa=True)
    assert f.groups == ((0, 1), (2, 3))
    _, rel = _facts(q, k, v, enable_gqa=True, relative=np.zeros((15, 4, 4)))
    assert rel.groups == ()                           # W_t: no separable key side
    bias = rng.standard_normal((4, 15))
    _, own = _facts(q, k, v, enable_gqa=True, bias=bias)
    assert own.groups == ()                           # each head its own bias


def test_separable_head_spec_matches_head_facts():
    """The spec of a head built from statistics alone (a long sequence in blocks) is
    the one head_facts gives the in-memory call."""
    q, k, v = _qkv(B=1, L=64)
    for causal, rate in ((False, None), (True, None), (True, 0.25)):
        kw = dict(is_causal=causal) if rate is None else dict(bias=nb.Decay(rate, causal))
        _, f = _facts(q, k, v, **kw)
        h = f.specs[0]
        sep = separable_head_spec((0,), 64, 64, 4, 3, h.radius, h.vmax, causal, "float64",
                                  0.0, rate=rate)
        assert sep.structure == h.structure and sep.pairs == h.pairs
        assert (sep.n, sep.S, sep.E, sep.Ev, sep.radius, sep.vmax) == \
            (h.n, h.S, h.E, h.Ev, h.radius, h.vmax)
        np.testing.assert_allclose(sep.exact_bound, h.exact_bound, rtol=1e-12)


def test_radius_below_a_visible_logit_is_refused():
    # issue 24: radius= below the true logit bound voided the certificate silently
    import numbarope as nr
    rng = np.random.default_rng(40)
    q, k, v = (rng.standard_normal((2, 200, 8)) for _ in range(3))
    R = nr.plan(q, k, v).radius
    with pytest.raises(ValueError, match=r"radius=1 is below a logit of this call"):
        nr.rope_attention(q, k, v, radius=1.0)
    with pytest.raises(ValueError, match=r"head \(1,\)"):
        nr.plan(q, k, v, radius=[R[0], 0.5])
    nr.rope_attention(q, k, v, radius=R)                 # a true bound is accepted
    # keys no query sees (padding, after the causal cut) do not count
    k2 = k.copy()
    k2[:, 150] *= 1e3
    kpm = np.ones((2, 200), bool)
    kpm[:, 150] = False
    small = float(nr.plan(q, k, v).radius.max()) * 1.01
    nr.plan(q, k2, v, radius=small, key_padding_mask=kpm)
    k3 = k.copy()
    k3[:, -1] *= 1e3                                      # seen by the last query only
    nr.plan(q[:, :100], k3, v, radius=small, is_causal=True)


def test_plan_does_not_rotate_but_plans_the_same():
    # issue 24: plan(rotary=) rotated (4 s and 2 GB more at n = 2^20, E = 64) though
    # nothing it reports depends on the rotation
    import numbarope as nr
    from numbarope._pipeline.inputs import make_problem
    rng = np.random.default_rng(41)
    q, k, v = (rng.standard_normal((3, 300, 8)) * 0.3 for _ in range(3))
    planned = nr.plan(q, k, v, rotary=True, is_causal=True)
    _, run = nr.rope_attention(q, k, v, rotary=True, is_causal=True, return_info=True)
    for name in ("method", "algorithm", "degree"):
        np.testing.assert_array_equal(getattr(planned, name), getattr(run, name))
    for name in ("radius", "error_bound"):         # norms rounded without the rotation
        np.testing.assert_allclose(getattr(planned, name), getattr(run, name), rtol=1e-12)
    p, _ = make_problem(q, k, v, rotary=True, rotate=False)
    assert p.unrotated and p.rotated and p.q.dtype == np.float64
    np.testing.assert_array_equal(p.q, q)                 # not rotated
    # a radius below a diagonal logit is still refused without the rotation
    R = float(np.max(np.abs(np.einsum("bie,bie->bi", q, k)))) / np.sqrt(8)
    with pytest.raises(ValueError, match="below a logit"):
        nr.plan(q, k, v, rotary=True, radius=R / 2)
