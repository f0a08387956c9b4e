"""The fast lane (numbarope._pipeline.fastlane): exact calls with the plan of their
shapes reused return exactly what the full pipeline returns (the same bits), send
everything they cannot decide alike to it, and keep its errors."""

import numpy as np
import pytest

from numbarope import Rotary, rope_attention
from numbarope.rotary import DynamicNTKScaling, YarnScaling
from numbarope.bias import Causal, Chunked, Packed, Window
from numbarope._pipeline import fastlane

try:
    import torch
except ImportError:          # pragma: no cover
    torch = None


def _full(*a, **kw):
    # return_info=True never takes the lane: the full pipeline's answer
    return rope_attention(*a, return_info=True, **kw)[0]


def _qkv(rng, B, Bk, L, S, E=16, Ev=8, dtype=np.float32, s=1.0):
    return (rng.standard_normal((B, L, E)).astype(dtype) * s,
            rng.standard_normal((Bk, S, E)).astype(dtype) * s,
            rng.standard_normal((Bk, S, Ev)).astype(dtype))


CASES = [
    dict(B=2, Bk=2, L=7, S=7),
    dict(B=6, Bk=2, L=1, S=300, enable_gqa=True),
    dict(B=6, Bk=2, L=1, S=300, enable_gqa=True, causal_alignment="bottom_right",
         is_causal=True),
    dict(B=4, Bk=4, L=40, S=40, is_causal=True),
    dict(B=9, Bk=3, L=33, S=33, enable_gqa=True, bias=Causal()),
    dict(B=3, Bk=3, L=5, S=70, is_causal=True, query_offset=65),
    dict(B=2, Bk=2, L=2, S=90, dtype=np.float64),
    dict(B=6, Bk=2, L=40, S=40, enable_gqa=True, bias=Window(7, 0)),
    dict(B=6, Bk=2, L=3, S=60, enable_gqa=True, bias=Window(9, 0), query_offset=57),
    dict(B=6, Bk=2, L=50, S=50, enable_gqa=True, bias=Chunked(16)),
    dict(B=2, Bk=2, L=50, S=50, bias=Packed((0, 7, 30, 50))),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method", ["auto", "exact"])
def test_same_bits_as_the_full_pipeline(case, padded, method):
    kw = dict(CASES[case])
    rng = np.random.default_rng(case)
    q, k, v = _qkv(rng, kw.pop("B"), kw.pop("Bk"), kw.pop("L"), kw.pop("S"),
                   dtype=kw.pop("dtype", np.float32), s=2.0)
    if padded:
        m = rng.random((k.shape[0], k.shape[1])) < 0.7
        m[:, -1] = True
        kw["key_padding_mask"] = np.repeat(m, q.shape[0] // k.shape[0], axis=0)
    fastlane.clear()
    for _ in range(2):                                  # the entry made, then reused
        out, lse = rope_attention(q, k, v, method=method, return_lse=True, **kw)
        ref, rl = rope_attention(q, k, v, method=method, return_lse=True,
                                 return_info=True, **kw)[:2]
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(lse, rl)
    assert len(fastlane._cache) == 1


def test_small_radius_auto_goes_to_the_full_pipeline():
    # a head the planner would serve with the polynomial: the lane must not compute
    # it exactly (the result would differ from the full pipeline's)
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 2, 512, 512, E=4, s=0.05)
    fastlane.clear()
    out = rope_attention(q, k, v, eps=1e-2)
    full, info = rope_attention(q, k, v, eps=1e-2, return_info=True)
    assert set(info.method.ravel()) == {"fast"}
    np.testing.assert_array_equal(out, full)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("L", [1, 30])
def test_non_finite_inputs_keep_the_full_pipelines_error(bad, L):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, 2, L, 30)
    v[1, 4, 3] = bad
    with pytest.raises(ValueError) as lane:
        rope_attention(q, k, v)
    with pytest.raises(ValueError) as full:
        rope_attention(q, k, v, return_info=True)
    assert str(lane.value) == str(full.value)


def test_what_the_lane_does_not_serve():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 2, 2, 6, 6)
    assert fastlane.try_fast_exact(q, k, v, method="fast", eps=1e-3, approx="chebyshev",
                                   workers=None, return_lse=False) is None
    for kw in (dict(rotary=True, positions=np.arange(6)),
               dict(bias=np.zeros(11, np.float32))):
        assert fastlane.try_fast_exact(q, k, v, method="exact", eps=1e-3,
                                       approx="chebyshev", workers=None,
                                       return_lse=False, **kw) is None
    assert fastlane.try_fast_exact(q, k, v.astype(np.float64), method="exact", eps=1e-3,
                                   approx="chebyshev", workers=None,
                                   return_lse=False) is None


ROTARIES = [True, Rotary(layout="interleaved", base=500.0),
            Rotary(dim=12, scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32)),
            Rotary(scaling=DynamicNTKScaling(factor=2.0, original_max_position_embeddings=40))]


@pytest.mark.parametrize("rot", range(len(ROTARIES)))
@pytest.mark.parametrize("case", [1, 2, 3, 5, 6, 7])
def test_rotary_calls_take_the_lane_with_the_same_bits(rot, case):
    # rotated as the full pipeline rotates them (float64, the same positions: query
    # offsets, bottom-right alignment, a length-dependent scaling), then the lane
    kw = dict(CASES[case], rotary=ROTARIES[rot])
    rng = np.random.default_rng(10 + case)
    q, k, v = _qkv(rng, kw.pop("B"), kw.pop("Bk"), kw.pop("L"), kw.pop("S"),
                   dtype=kw.pop("dtype", np.float32), s=2.0)
    fastlane.clear()
    for _ in range(2):
        out, lse = rope_attention(q, k, v, return_lse=True, **kw)
        ref, rl = rope_attention(q, k, v, return_lse=True, return_info=True, **kw)[:2]
        assert out.dtype == ref.dtype == q.dtype
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(lse, rl)
    assert len(fastlane._cache) == 1          # served, and its entry reused
    # the rotation is not skipped: without it the result differs
    assert not np.array_equal(out, rope_attention(q, k, v, **dict(kw, rotary=None)))


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_torch_tensors_same_bits():
    rng = np.random.default_rng(2)
    q, k, v = (torch.from_numpy(a) for a in _qkv(rng, 6, 2, 1, 200))
    out = rope_attention(q, k, v, enable_gqa=True)
    ref = _full(q, k, v, enable_gqa=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("L,padded", [(1, False), (40, False), (40, True), (300, False)])
def test_low_precision_tensors_take_the_lane_with_the_same_bits(dtype, L, padded):
    # float16/bfloat16 are widened to float32 and computed as the full pipeline computes
    # them, the result rounded back to their dtype: the lane serves them (a bfloat16
    # model's layers), with the full pipeline's bits, in their dtype
    g = torch.Generator().manual_seed(L)
    dt = getattr(torch, dtype)
    S = L if L > 1 else 50
    q = torch.randn(2, 9, L, 64, generator=g).to(dt)
    k, v = (torch.randn(2, 3, S, 64, generator=g).to(dt) for _ in range(2))
    kw = dict(is_causal=L > 1, enable_gqa=True, scale=0.125)
    if padded:
        m = torch.ones(2, 1, S, dtype=torch.bool)
        m[1, 0, :5] = False
        kw["key_padding_mask"] = m
    fastlane.clear()
    out, lse = rope_attention(q, k, v, return_lse=True, **kw)
    assert len(fastlane._cache) == 1                    # served by the lane
    ref, rl, _ = rope_attention(q, k, v, return_lse=True, return_info=True, **kw)
    assert out.dtype == ref.dtype == dt
    assert torch.equal(out, ref) and torch.equal(lse, rl)
    # a float32 tensor of the same shapes is another signature (another output dtype)
    rope_attention(q.float(), k.float(), v.float(), **kw)
    assert len(fastlane._cache) == 2


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_transposed_queries_as_transformers_passes_them():
    # transformers hands over (B, H, L, E) views of (B, L, H, E) tensors: the lane scales
    # them into the kernel's layout in one pass, with the full pipeline's bits
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 37, 9, 64, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 3, 37, 64, generator=g) for _ in range(2))
    assert not q.is_contiguous()
    for kw in (dict(is_causal=True), dict(is_causal=True, scale=3.0)):
        fastlane.clear()
        out = rope_attention(q, k, v, enable_gqa=True, **kw)
        assert len(fastlane._cache) == 1
        assert torch.equal(out, _full(q, k, v, enable_gqa=True, **kw))


@pytest.mark.parametrize("bias", [None, Chunked(64)])
@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize("rotary", [None, True])
def test_a_growing_cache_derives_its_plans(method, bias, rotary, monkeypatch):
    # a decoding cache grows by one key a step: each step's plan is derived from the
    # previous one's (no pass over the data), with the full pipeline's bits
    rng = np.random.default_rng(9)
    fastlane.clear()
    built = []
    real = fastlane._entry
    monkeypatch.setattr(fastlane, "_entry", lambda *a, **k: built.append(1) or real(*a, **k))
    for S in range(200, 206):
        q, k, v = _qkv(rng, 6, 2, 1, S, E=64, Ev=64, s=2.0)   # as SmolLM2: auto is exact
        pad = np.ones((6, S), bool)
        pad[:, :3] = False                                  # left padding
        kw = dict(enable_gqa=True, is_causal=True, causal_alignment="bottom_right",
                  key_padding_mask=pad, method=method, bias=bias, rotary=rotary)
        np.testing.assert_array_equal(rope_attention(q, k, v, **kw), _full(q, k, v, **kw))
    assert len(built) == 1
    assert all(e.r_star == 0.0 for e in fastlane._cache.values())
