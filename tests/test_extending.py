"""The extension contract, proven from outside: docs/examples/chunked_attention.py adds
a structure (chunked local attention, not a relative bias) and an algorithm for it
(a chunk-reset prefix scan) with no edit to numbarope; the exact path serves the
structure from its key ranges, the planner offers it to the new algorithm and picks
it where it is cheaper, and the fast result keeps the certified bound."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

import numbarope

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "chunked_attention.py"


@pytest.fixture(scope="module")
def chunked():
    if "chunked-prefix" in numbarope.ops.registry():
        numbarope.ops.unregister("chunked-prefix")
    spec = importlib.util.spec_from_file_location("chunked_attention", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["chunked_attention"] = mod          # as an import would (dataclasses)
    spec.loader.exec_module(mod)                    # registers "chunked-prefix"
    yield mod
    numbarope.ops.unregister("chunked-prefix")
    del sys.modules["chunked_attention"]


def _reference(q, k, v, c):
    """Dense loops: query at position i sees keys c·⌊i/c⌋ <= j <= i."""
    n, E = q.shape
    out = np.zeros((n, v.shape[1]))
    for i in range(n):
        j0 = i // c * c
        logits = q[i] @ k[j0:i + 1].T / np.sqrt(E)
        w = np.exp(logits - logits.max())
        out[i] = w @ v[j0:i + 1] / w.sum()
    return out


@pytest.mark.parametrize("n, c", [(37, 8), (200, 64), (130, 1), (50, 50), (70, 200)])
def test_exact_path_serves_the_new_structure(chunked, n, c):
    rng = np.random.default_rng(n + c)
    q, k, v = (rng.standard_normal((n, 4)) for _ in range(3))
    out, info = numbarope.rope_attention(q, k, v, bias=chunked.Chunked(c), method="exact",
                                         return_info=True)
    assert np.abs(out - _reference(q, k, v, c)).max() <= info.error_bound.max()


@pytest.mark.parametrize("c", [16, 64, 100])
def test_fast_path_runs_the_new_algorithm_within_its_bound(chunked, c):
    rng = np.random.default_rng(c)
    q, k, v = (rng.standard_normal((2, 300, 4)) * 0.4 for _ in range(3))
    out, info = numbarope.rope_attention(q, k, v, rotary=True, bias=chunked.Chunked(c),
                                         method="fast", return_info=True)
    assert info.algorithm.tolist() == ["chunked-prefix"] * 2
    exact = numbarope.rope_attention(q, k, v, rotary=True, bias=chunked.Chunked(c),
                                     method="exact")
    assert np.all(np.abs(out - exact).max(axis=(-2, -1)) <= info.error_bound)


def test_the_planner_picks_it_where_it_is_cheaper(chunked):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 16384, 8)) * 0.15 for _ in range(3))
    info = numbarope.plan(q, k, v, rotary=True, bias=chunked.Chunked(8192))
    assert info.algorithm.tolist() == ["chunked-prefix"]
    assert info.code.tolist() == ["fast-cheaper"]
    # no other registered fast algorithm serves the structure
    st = chunked.Chunked(8192)
    assert [a.name for a in numbarope.ops.fast_algorithms() if a.serves(st)] == \
        ["chunked-prefix"]


def test_grouped_query_heads_and_padding(chunked):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 2, 120, 4)) * 0.4            # 2 query heads per kv head
    k, v = (rng.standard_normal((2, 1, 120, 4)) * 0.4 for _ in range(2))
    keep = np.ones((2, 1, 120), bool)
    keep[1, :, :7] = False                                   # left padding
    kw = dict(rotary=True, bias=chunked.Chunked(32), enable_gqa=True, key_padding_mask=keep)
    fast, info = numbarope.rope_attention(q, k, v, method="fast", return_info=True, **kw)
    exact = numbarope.rope_attention(q, k, v, method="exact", **kw)
    assert np.all(np.abs(fast - exact).max(axis=(-2, -1)) <= info.error_bound)


def test_a_chunked_structure_is_not_a_relative_bias(chunked):
    st = chunked.Chunked(4)
    assert not st.relative and st.causal
    lo, hi = st.key_ranges(6, 6)
    assert lo.tolist() == [0, 0, 0, 0, 4, 4] and hi.tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TypeError, match="not a relative bias"):
        numbarope.bias.ALiBi([0.1]) + st
