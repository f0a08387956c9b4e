"""Grouped-query attention (``enable_gqa=True``) on the fast path: the query heads of
one key/value head share one polynomial and one key side, give the same numbers as
each query head against its own copy of the key/value head, and keep every head's
certified bound when their radii differ. (The planner's sharing rule on hand-made
HeadSpecs: tests/pipeline/test_plan.py; GQA's broadcasting rule against torch:
tests/test_torch_interop.py. Origin: the fast path as a drop-in for PyTorch users.)"""

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention


def _gqa_inputs(n=300, E=4, hq=6, hk=2, same_radius=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hq, n, E))
    k = rng.standard_normal((hk, n, E))
    if same_radius:
        q /= np.linalg.norm(q, axis=-1).max(axis=-1)[:, None, None]
        k /= np.linalg.norm(k, axis=-1).max(axis=-1)[:, None, None]
    return q * 1.5, k * 1.5, rng.standard_normal((hk, n, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_heads_share_the_key_side(causal):
    q, k, v = _gqa_inputs()
    kw = dict(rotary=True, is_causal=causal, method="fast", eps=1e-4)
    out, info = rope_attention(q, k, v, enable_gqa=True, return_info=True, **kw)
    assert (info.shared_heads == 3).all()
    assert all("shared by 3 query heads" in r for r in info.reason)
    # the same numbers as each query head against its own copy of the key/value head
    alone = rope_attention(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), **kw)
    np.testing.assert_allclose(out, alone, rtol=0, atol=1e-14)
    exact = rope_attention(q, k, v, enable_gqa=True, rotary=True, is_causal=causal)
    assert (np.abs(out - exact).max(axis=(-2, -1)) <= info.error_bound).all()


def test_gqa_sharing_keeps_every_bound_with_unequal_radii():
    # one head of a group with a larger radius: the group takes its polynomial (valid
    # on the smaller radii too) or, where that costs more, heads of equal degree share
    q, k, v = _gqa_inputs(seed=3)
    q[1] *= 1.6
    out, info = rope_attention(q, k, v, enable_gqa=True, rotary=True, method="fast",
                               eps=1e-4, return_info=True, verify=300)
    exact = rope_attention(q, k, v, enable_gqa=True, rotary=True)
    err = np.abs(out - exact).max(axis=(-2, -1))
    assert (err <= info.error_bound).all()
    own = numbarope.plan(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), rotary=True,
                         method="fast", eps=1e-4)
    for h, o in zip(info.heads, own.heads):     # a shared polynomial covers each radius
        assert h.radius >= o.radius * (1 - 1e-12)   # (plan() reads unrotated norms)
    shared = [h for h in info.heads if h.shared_heads > 1]
    for h in shared:
        peers = [g for g in shared if g.head[0] // 3 == h.head[0] // 3 and g.degree == h.degree]
        assert all(np.array_equal(g.coef, h.coef) for g in peers)
