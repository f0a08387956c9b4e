"""The algorithm registry: one object per algorithm, structured reasons, and a
planner that walks the registry (an unknown name is an error, never a fall-through)."""

import numpy as np
import pytest

import numbarope
from numbarope import algorithms
from numbarope.algorithms import REASONS, HeadSpec, Reason


def test_registry_names_and_unknown_names():
    assert set(algorithms.registry()) >= {"streaming", "gemm", "prefix", "fft", "toeplitz-fft"}
    with pytest.raises(ValueError, match="unknown algorithm 'fft2'.*registered"):
        algorithms.get("fft2")
    with pytest.raises(ValueError, match="unknown reason code"):
        Reason("because", "text")
    with pytest.raises(TypeError, match="Algorithm instance"):
        algorithms.register("gemm")


@pytest.mark.parametrize("structure, general, serving", [
    ("none", False, {"gemm", "fft"}),
    ("causal", False, {"prefix", "fft"}),
    ("dense", False, {"fft"}),
    ("causal", True, {"toeplitz-fft"}),
])
def test_each_algorithm_says_why_it_cannot_serve(structure, general, serving):
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=structure, general=general)
    for alg in algorithms.fast_algorithms():
        why = alg.unavailable(h)
        assert (not why) == (alg.name in serving), (alg.name, why)
        assert all(isinstance(w, Reason) and w.code in REASONS for w in why)


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
        info = numbarope.plan(q, k, v, **kw)
        assert info.code[()] in REASONS, kw
        seen.add(info.code[()])
    big = numbarope.plan(q * 100, k * 100, v)
    assert big.code[()] == "degree-limit"
    assert {"exact-requested", "fast-requested"} <= seen
    empty = numbarope.plan(q[:0], k[:0], v[:0])
    assert empty.code[()] == "empty"


class _Cheap(algorithms.Gemm):
    """The gemm kernel, claiming to cost nothing: the planner must take it."""
    name = "cheap-gemm"
    runs = 0

    def predict(self, h, degree):
        return 1e-12

    def run(self, *a, **kw):
        type(self).runs += 1
        return super().run(*a, **kw)


def test_a_registered_algorithm_is_considered_and_run():
    q, k, v = _inputs()
    algorithms.register(_Cheap())
    try:
        out, info = numbarope.rope_attention(q, k, v, rotary=True, return_info=True)
        assert info.algorithm[()] == "cheap-gemm" and info.method[()] == "fast"
        assert _Cheap.runs == 1
        exact = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
        assert np.abs(out - exact).max() <= info.error_bound[()]
    finally:
        algorithms.unregister("cheap-gemm")
    assert "cheap-gemm" not in algorithms.registry()
    assert numbarope.plan(q, k, v, rotary=True).algorithm[()] != "cheap-gemm"


def _lse_reference(q, k, s, off=0, causal=False, bias=None, keep=None):
    L, S = q.shape[0], k.shape[0]
    x = s * q @ k.T
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    if bias is not None:
        x = x + bias[i - j + S - 1]
    if causal:
        x = np.where(j <= i + off, x, -np.inf)
    if keep is not None:
        x = np.where(keep[None, :], x, -np.inf)
    with np.errstate(divide="ignore"):
        m = x.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("kind", ["plain", "causal", "bias", "padded-offset"])
def test_lse_and_merging_key_blocks(method, kind):
    rng = np.random.default_rng(11)
    L, S, E = 40, 90, 4
    q, k = rng.standard_normal((L, E)) * 0.5, rng.standard_normal((S, E)) * 0.5
    v = rng.standard_normal((S, 3))
    kw, ref = {}, {}
    if kind == "causal":
        kw = ref = dict(causal=True)
        kw = dict(is_causal=True)
    elif kind == "bias":
        b = rng.standard_normal(L + S - 1) * 30         # large: the shifts must come back
        kw, ref = dict(bias=b), dict(bias=b)
    elif kind == "padded-offset":
        keep = rng.random(S) < 0.8
        kw = dict(key_padding_mask=keep, query_offset=50, is_causal=True)
        ref = dict(keep=keep, off=50, causal=True)
    out, lse, info = numbarope.rope_attention(q, k, v, method=method, eps=1e-6,
                                             return_lse=True, return_info=True, **kw)
    want = _lse_reference(q, k, 0.5, **ref)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    tol = 1e-12 if method == "exact" else 1e-5
    assert np.abs(lse[fin] - want[fin]).max() <= tol * max(1, np.abs(want[fin]).max())
    if kind in ("plain", "causal"):
        # two key blocks merged with their lse give the whole (exact path)
        h = S // 2
        o1, l1 = numbarope.rope_attention(q, k[:h], v[:h], method="exact", return_lse=True,
                                          **kw)
        o2, l2 = numbarope.rope_attention(q, k[h:], v[h:], method="exact", return_lse=True,
                                          query_offset=-h, **kw)
        tot = np.logaddexp(l1, l2)
        w1 = np.where(np.isfinite(l1), np.exp(l1 - tot), 0.0)[:, None]
        w2 = np.where(np.isfinite(l2), np.exp(l2 - tot), 0.0)[:, None]
        ex = numbarope.rope_attention(q, k, v, method="exact", **kw)
        np.testing.assert_allclose(w1 * o1 + w2 * o2, ex, atol=1e-13)
        np.testing.assert_allclose(tot, want, atol=1e-12)
