"""numbarope._pipeline.plan: HeadSpecs in, a frozen Plan out.

Unit tests on hand-made :class:`numbarope.ops.HeadSpec` s (no arrays): per head the
cheapest registered algorithm serving the head's structure that meets ``eps``, or exact
with a machine-readable code (degree-limit, feature-limit, memory-limit, misses-eps,
output-rounding, row-mass, structure); ``method="fast"`` raises FastPathError with that
code, before any work; query heads of one key/value head share one polynomial and key
side. Then the same choices seen end to end through ``rope_attention`` / ``plan``.
"""

from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

import numbarope as nr
from numbarope import _config
from numbarope import bias as nb
from numbarope.ops import REASONS, FastPathError, HeadSpec
from numbarope._pipeline.plan import Plan, plan_head, plan_heads

AUTO = dict(method="auto", eps=1e-3, degree=None, approx="chebyshev")
FAST = dict(AUTO, method="fast")


def _spec(n=8192, S=None, E=4, Ev=4, R=0.5, vmax=1.0, head=(), **kw):
    """One head of n queries against S keys, logit radius R, max|v| = vmax."""
    S = n if S is None else S
    return HeadSpec(head, n, S, E, Ev, R, R, vmax, **kw)


def _dense(n=8192, S=None):
    return nb.Dense(np.zeros(n + (n if S is None else S) - 1))


# ------------------------------------------------------------------- the choice
@pytest.mark.parametrize("structure, general, algorithm", [
    (nb.NoBias(), False, "gemm"),
    (nb.Causal(), False, "prefix"),
    (nb.Decay(0.3), False, "decay"),
    (nb.Decay(0.3, causal=True), False, "decay"),
    (nb.ALiBi(0.25), False, "decay"),
    (nb.Window(64, 0), False, "window"),
    (nb.Window(64, 64), False, "window"),
    (_dense(), False, "fft"),
    (nb.NoBias(), True, "toeplitz-fft"),
    (nb.Causal(), True, "toeplitz-fft"),
], ids=repr)
def test_small_radius_long_sequence_is_fast_on_the_algorithm_serving_it(structure, general,
                                                                        algorithm):
    h = plan_head(_spec(structure=structure, general=general), **AUTO)
    assert (h.method, h.algorithm, h.code) == ("fast", algorithm, "fast-cheaper"), h.reason
    assert h.time_fast * _config.AUTO_MARGIN < h.time_exact
    assert 0 < h.error_bound <= 1e-3 and h.delta is not None and h.degree >= 1
    assert h.coef is not None and len(h.coef) == h.degree + 1
    # method="fast" takes the same algorithm, and says it was asked for
    f = plan_head(_spec(structure=structure, general=general), **FAST)
    assert (f.method, f.algorithm, f.code) == ("fast", algorithm, "fast-requested")


def test_short_sequence_is_exact_cheaper():
    h = plan_head(_spec(n=16), **AUTO)
    assert (h.method, h.algorithm, h.code) == ("exact", "streaming", "exact-cheaper")
    assert h.error_bound == 0.0          # the spec's exact_bound (here 0)
    assert plan_head(_spec(n=16), **FAST).method == "fast"     # fast on request


@pytest.mark.parametrize("R", [30.0, 300.0])
def test_large_radius_is_a_degree_limit(R):
    h = plan_head(_spec(R=R), **AUTO)
    assert (h.method, h.code) == ("exact", "degree-limit") and "MAX_DEGREE" in h.reason
    with pytest.raises(FastPathError, match=rf"R={R:g}.*MAX_DEGREE") as e:
        plan_head(_spec(R=R, head=(2, 1)), **FAST)
    assert e.value.code == "degree-limit" and e.value.head == (2, 1)
    assert "MAX_DEGREE" in e.value.detail


def test_max_degree_is_read_at_plan_time(monkeypatch):
    assert plan_head(_spec(R=2.0), **AUTO).degree > 2
    monkeypatch.setattr(_config, "MAX_DEGREE", 2)
    h = plan_head(_spec(R=2.0), **AUTO)
    assert (h.method, h.code) == ("exact", "degree-limit")
    # here the degree limit is the cause, and the text says so (a higher one would help)
    assert "> MAX_DEGREE=2" in h.reason and "would not help" not in h.reason


@pytest.mark.parametrize("R, n", [(30.0, 8192), (56.3, 8192), (30.0, 256)])
def test_beyond_the_rounding_floor_no_degree_is_blamed_on_max_degree(R, n, monkeypatch):
    """New-user report: 'degree >= 25 needed at R = 56.3 > MAX_DEGREE = 24' read as if a
    higher limit would help; beyond R ~ 13 at eps=1e-3 no degree certifies (float64
    rounding grows like e^(2R)). Same code, the real cause in the text, for auto (also at
    a short n, where the screen used to call it 'exact cheaper') and fast."""
    from numbarope._pipeline.plan import _floor_radius
    h = plan_head(_spec(n=n, R=R), **AUTO)
    assert (h.method, h.code) == ("exact", "degree-limit"), h.reason
    with pytest.raises(FastPathError) as e:
        plan_head(_spec(n=n, R=R), **FAST)
    assert e.value.code == "degree-limit"
    r_floor = _floor_radius(0.9e-3 / 2.001, "chebyshev")
    for text in (h.reason, e.value.detail):
        assert "no degree at all certifies eps=0.001" in text, text
        assert "would not help" in text and "MAX_DEGREE=24" in text
        assert f"every R > {r_floor:.3g}" in text
        assert "feature limit" not in text              # E = 4: features do not bind
    # the claim holds: just beyond that radius even a higher limit certifies nothing
    assert 12 < r_floor < 14
    monkeypatch.setattr(_config, "MAX_DEGREE", 40)
    with pytest.raises(ValueError, match="cannot certify"):
        nr.exp_approximation(r_floor * 1.01, eps=0.9e-3 / 2.001)


def test_fast_refusal_names_the_feature_limit_at_a_large_head_dim():
    """New-user report: at head_dim 64, method='fast' blamed the degree limit where the
    feature count C(64+g, g) (degree <= 4 under MAX_FEATURES) is the limit."""
    with pytest.raises(FastPathError) as e:
        plan_head(_spec(E=64, R=13.8), **FAST)
    text = str(e.value)
    assert e.value.code == "degree-limit"                   # the code is unchanged
    assert "at head_dim 64 the feature limit allows degree <= 4 only" in text, text
    assert "features at degree 5 > MAX_FEATURES=2e+06" in text
    assert text.index("feature limit") < text.index("MAX_DEGREE")
    # auto's screen: the same head is a feature limit, as before
    assert plan_head(_spec(E=64, R=13.8), **AUTO).code == "feature-limit"


@pytest.mark.parametrize("E", [64, 256])
def test_large_head_dim_is_a_feature_limit(E):
    h = plan_head(_spec(E=E, R=2.0), **AUTO)
    assert (h.method, h.code) == ("exact", "feature-limit") and "MAX_FEATURES" in h.reason
    with pytest.raises(FastPathError, match="features > MAX_FEATURES") as e:
        plan_head(_spec(E=E, R=2.0), **FAST)
    assert e.value.code == "feature-limit"


def test_memory_limit(monkeypatch):
    monkeypatch.setattr(_config, "memory_limit", lambda: 1000)
    monkeypatch.setattr(_config, "SMALL_REQUEST", 0)       # check even small requests
    h = plan_head(_spec(), **AUTO)
    assert (h.method, h.code) == ("exact", "memory-limit") and "GiB" in h.reason
    with pytest.raises(FastPathError, match="needs .* GiB > limit") as e:
        plan_head(_spec(), **FAST)
    assert e.value.code == "memory-limit"


def test_an_explicit_degree_misses_eps_on_auto_and_is_honoured_on_fast():
    h = plan_head(_spec(), **dict(AUTO, degree=0))
    assert (h.method, h.code) == ("exact", "misses-eps") and "certifies" in h.reason
    f = plan_head(_spec(), **dict(FAST, degree=1))
    assert (f.method, f.degree, f.code) == ("fast", 1, "fast-requested")
    assert f.error_bound > 1e-3                # reported, not refused


def test_float32_output_rounding_above_eps():
    h = _spec(out_rounding=2.0 ** -24, compute_dtype="float32", head=(3, 1))
    with pytest.raises(FastPathError, match="output dtype.s rounding alone") as e:
        plan_head(h, **dict(FAST, eps=1e-8))
    assert e.value.code == "output-rounding" and e.value.head == (3, 1)
    a = plan_head(h, **dict(AUTO, eps=1e-8))
    assert (a.method, a.code) == ("exact", "output-rounding")


def test_underflowing_row_mass_leaves_the_fft_no_bound():
    h = _spec(structure=_dense(), row_mass=1e-300)
    with pytest.raises(FastPathError, match="smallest row mass") as e:
        plan_head(h, **FAST)
    assert e.value.code == "row-mass"
    assert plan_head(h, **AUTO).code == "row-mass"


class _Chunked(nb.Structure):
    """A structure no registered algorithm declares (not a relative bias)."""
    kind = "chunked"


def test_a_structure_no_algorithm_serves():
    h = _spec(structure=_Chunked(), head=(0,))
    with pytest.raises(FastPathError, match="a chunked structure") as e:
        plan_head(h, **FAST)
    assert e.value.code == "structure"
    a = plan_head(h, **AUTO)
    assert (a.method, a.algorithm, a.code) == ("exact", "streaming", "structure")


def test_exact_requested_empty_and_no_visible_key():
    h = plan_head(_spec(exact_bound=1e-15), **dict(AUTO, method="exact"))
    assert (h.method, h.algorithm, h.code) == ("exact", "streaming", "exact-requested")
    assert h.error_bound == 1e-15 and h.degree is None and h.time_fast is None
    for spec in (_spec(n=0), _spec(S=0), _spec(Ev=0)):
        assert plan_head(spec, **FAST).code == "empty"      # even on method="fast"
    assert plan_head(_spec(pairs=0.0), **FAST).code == "no-visible-key"


def test_every_refusal_and_choice_code_is_documented():
    codes = {plan_head(s, **o).code for s, o in [
        (_spec(), AUTO), (_spec(n=16), AUTO), (_spec(R=300.0), AUTO),
        (_spec(E=64, R=2.0), AUTO), (_spec(), dict(AUTO, degree=0)),
        (_spec(structure=_Chunked()), AUTO), (_spec(n=0), AUTO), (_spec(pairs=0.0), AUTO),
        (_spec(), FAST), (_spec(), dict(AUTO, method="exact"))]}
    assert codes <= set(REASONS) and len(codes) == 10


# ------------------------------------------------------- query heads sharing a key side
def _group(radii, structure=nb.NoBias(), n=8192, S=None):
    return [replace(_spec(n=n, S=S, R=r, structure=structure), head=(b,))
            for b, r in enumerate(radii)]


def _plan(specs, groups, method="fast", eps=1e-4):
    return plan_heads(specs, groups, method=method, eps=eps, degree=None,
                      approx="chebyshev", compute_dtype="float64")


def test_query_heads_of_one_key_value_head_share_one_key_side():
    p = _plan(_group((0.5, 0.5, 0.5)), [(0, 1, 2)])
    assert isinstance(p, Plan) and p.batches == ((0, 1, 2),) and p.exact == ()
    assert p.methods == ("fast",) * 3
    assert [h.shared_heads for h in p.heads] == [3, 3, 3]
    assert all("shared by 3 query heads" in h.reason for h in p.heads)
    assert all(np.array_equal(h.coef, p.heads[0].coef) for h in p.heads)
    # no group: each head alone
    alone = _plan(_group((0.5, 0.5, 0.5)), [])
    assert alone.batches == ((0,), (1,), (2,)) and {h.shared_heads for h in alone.heads} == {1}


def test_a_shared_polynomial_covers_the_largest_radius_of_the_group():
    p = _plan(_group((0.5, 0.8, 0.5)), [(0, 1, 2)])
    assert p.batches == ((0, 1, 2),)
    assert [h.radius for h in p.heads] == [0.8, 0.8, 0.8]        # valid for every head
    assert len({h.degree for h in p.heads}) == 1


def test_heads_of_equal_degree_share_where_the_whole_group_would_cost_more():
    # the causal head of radius 2.4 needs a higher degree; one polynomial for all three
    # costs more than two, so the two heads of equal degree share
    p = _plan(_group((1.5, 2.4, 1.5), nb.Causal()), [(0, 1, 2)])
    assert p.batches == ((0, 2), (1,))
    assert [h.shared_heads for h in p.heads] == [2, 1, 2]
    assert p.heads[0].degree == p.heads[2].degree < p.heads[1].degree
    assert [h.radius for h in p.heads] == [1.5, 2.4, 1.5]
    # decoding-like (few queries, many keys): the key side dominates, all three share
    d = _plan(_group((1.5, 2.4, 1.5), nb.Causal(), n=64, S=4096), [(0, 1, 2)])
    assert d.batches == ((0, 1, 2),) and {h.radius for h in d.heads} == {2.4}


def test_exact_plans_share_nothing_and_plans_are_frozen():
    p = _plan(_group((0.5, 0.5)), [(0, 1)], method="exact")
    assert p.batches == () and p.exact == (0, 1) and p.compute_dtype == "float64"
    with pytest.raises(FrozenInstanceError):
        p.heads = ()
    with pytest.raises(FrozenInstanceError):
        p.heads[0].method = "fast"


# ---------------------------------------------------------------- end to end
def _inputs(n=2048, E=4, s=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, E)) * s, rng.standard_normal((n, E)) * s,
            rng.standard_normal((n, 3)))


def test_every_plan_has_a_documented_code():
    q, k, v = _inputs()
    cases = [dict(method="exact"), dict(method="fast"), dict(), dict(eps=1e-9),
             dict(is_causal=True), dict(bias=np.zeros(2 * 2048 - 1)),
             dict(degree=0)]
    seen = set()
    for kw in cases:
        info = nr.plan(q, k, v, **kw)
        assert info.code[()] in REASONS, kw
        seen.add(info.code[()])
    big = nr.plan(q * 100, k * 100, v)
    assert big.code[()] == "degree-limit"
    assert {"exact-requested", "fast-requested"} <= seen
    empty = nr.plan(q[:0], k[:0], v[:0])
    assert empty.code[()] == "empty"


def _qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


def test_auto_with_degree_never_misses_eps():
    """New-user findings: auto with an explicit degree that cannot meet eps is exact."""
    q, k, v = _qkv()
    out, info = nr.rope_attention(q, k, v, rotary=True, degree=0, return_info=True)
    assert (info.method == "exact").all()
    assert info.heads[0].code == "misses-eps" and "certifies" in info.heads[0].reason
    ex = nr.rope_attention(q, k, v, rotary=True, method="exact")
    assert np.abs(out - ex).max() <= 1e-3 * np.abs(v).max()


def test_float32_fast_refuses_eps_below_output_rounding():
    """New-user findings: float32 output rounding alone above eps."""
    q, k, v = (a.astype(np.float32) for a in _qkv())
    with pytest.raises(ValueError, match="output dtype.s rounding"):
        nr.rope_attention(q, k, v, rotary=True, method="fast", eps=1e-8)
    out, info = nr.rope_attention(q, k, v, rotary=True, eps=1e-8, return_info=True)
    assert (info.method == "exact").all()


def test_steep_bias_on_the_fast_path_says_why():
    """New-user findings, second round: a bias spanning e^100 leaves the FFT no
    certified accuracy; the refusal names the row mass (it said "degree 4 certifies
    inf > eps·max|V|")."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 128, 4)) * 0.1 for _ in range(3))
    with pytest.raises(nr.FastPathError, match="smallest row mass") as e:
        nr.rope_attention(q, k, v, bias=np.linspace(-50, 50, 255), method="fast")
    assert e.value.code == "row-mass"
