"""numbarope.ops: every registered fast algorithm, on the example input it declares
(``Algorithm.example``), against the slow dense reference of tests/naive.py: the
planner gives the head to that algorithm, the output is within the certified bound,
the row log-sum-exp matches, and verify= finds no violation. A new algorithm gets
these tests by registering itself with an example."""

import numpy as np
import pytest

import numbarope
from numbarope import ops
from numbarope.bias import RelativeBias, Structure

import naive


def _reference(q, k, v, kw):
    n = len(q)
    bias = kw.get("bias")
    if isinstance(bias, Structure) and not isinstance(bias, RelativeBias):
        # absolute-position structures (Packed): row i sees keys lo_i <= j < hi_i
        if kw.get("rotary"):
            E = q.shape[1]
            q = np.stack([naive.rotation_matrix(i, E) @ q[i] for i in range(n)])
            k = np.stack([naive.rotation_matrix(j, E) @ k[j] for j in range(n)])
        lo, hi = bias.key_ranges(n, n, 0)
        out = np.zeros((n, v.shape[1]))
        for i in range(n):
            if hi[i] > lo[i]:
                x = np.array([q[i] @ k[j] for j in range(lo[i], hi[i])]) / np.sqrt(len(q[i]))
                w = np.exp(x - x.max())
                out[i] = w @ v[lo[i]:hi[i]] / w.sum()
        return out
    if isinstance(bias, RelativeBias):
        bias = bias.values(n).reshape(-1)           # one head
    b = None if bias is None else (lambda t: bias[t + n - 1])
    W = kw.get("relative")
    causal = kw.get("is_causal", False) or (isinstance(kw.get("bias"), RelativeBias)
                                            and kw["bias"].causal)
    common = dict(bias=b, causal=causal)
    if kw.get("rotary"):
        return naive.rope_attention(q, k, v, **common)
    return naive.attention(q, k, v, W=None if W is None else (lambda t: W[t + n - 1]),
                           **common)


@pytest.mark.parametrize("name", [a.name for a in ops.fast_algorithms()])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_algorithm_on_its_example(name, dtype):
    alg = ops.get(name)
    q, k, v, kw = alg.example(np.random.default_rng(7))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out, lse, info = numbarope.rope_attention(q, k, v, method="fast", eps=1e-4,
                                             return_lse=True, return_info=True,
                                             verify=len(q), **kw)
    (h,) = info.heads                 # one head (a per-head bias may add a unit dim)
    assert h.algorithm == name, (h.algorithm, h.reason)
    assert h.bound_kind.startswith("certified")
    ref = _reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), kw)
    err = np.abs(out.astype(np.float64).reshape(ref.shape) - ref).max()
    assert 0 < err <= h.error_bound, (err, h.error_bound)
    assert h.observed_error <= h.error_bound
    exact_out, exact_lse = numbarope.rope_attention(q, k, v, method="exact", return_lse=True,
                                                    **kw)
    fin = np.isfinite(exact_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    # fast lse: log of weights within (1 ± (δ+ρ)) of the exact ones
    assert np.abs(lse[fin] - exact_lse[fin]).max() <= 2 * 1e-4 + 1e-6
