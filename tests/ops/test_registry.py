"""numbarope.ops.registry: one object per algorithm in a registry the planner walks (an
unknown name is an error, never a fall-through); the ``Algorithm`` base class: the
structure types an algorithm declares (``structures``, ``serves``) and its structured
reasons (``unavailable``); an algorithm registered from outside is considered and run.
(Every registered algorithm on its own example: tests/ops/test_registry_suite.py.)"""

import numpy as np
import pytest

import numbarope
from numbarope import bias as nb
from numbarope import ops
from numbarope.ops import REASONS, HeadSpec, Reason
from numbarope.ops import gemm


def test_registry_names_and_unknown_names():
    assert set(ops.registry()) >= {"streaming", "gemm", "prefix", "fft", "toeplitz-fft"}
    with pytest.raises(ValueError, match="unknown algorithm 'fft2'.*registered"):
        ops.get("fft2")
    with pytest.raises(ValueError, match="unknown reason code"):
        Reason("because", "text")
    with pytest.raises(TypeError, match="Algorithm instance"):
        ops.register("gemm")


def test_fast_algorithms_are_the_registry_but_the_exact_path():
    fast = ops.fast_algorithms()
    assert [a.name for a in fast] == [n for n in ops.registry() if n != "streaming"]
    assert not ops.get("streaming").fast and all(a.fast for a in fast)
    assert all(isinstance(a, ops.Algorithm) and ops.get(a.name) is a for a in fast)


def test_algorithms_declare_the_structure_types_they_serve():
    # a structure knows no algorithm: each algorithm names the classes of
    # numbarope.bias it serves, and serves(x) is isinstance over them
    for alg in ops.fast_algorithms():
        assert alg.structures and all(issubclass(t, nb.Structure) for t in alg.structures)
        for x in (nb.NoBias(), nb.Causal(), nb.Window(3, 1), nb.Decay(0.3),
                  nb.Dense(np.zeros(5))):
            assert alg.serves(x) == isinstance(x, alg.structures), (alg.name, x)
    assert ops.get("gemm").structures == (nb.NoBias,)
    assert ops.get("prefix").structures == (nb.Causal,)
    assert ops.get("decay").serves(nb.ALiBi(0.5))          # ALiBi is a Decay
    assert ops.get("window").serves(nb.Window(4, 2))
    assert not ops.get("gemm").serves(nb.Causal())


@pytest.mark.parametrize("structure, general, serving", [
    (nb.NoBias(), False, {"gemm", "fft"}),
    (nb.Causal(), False, {"prefix", "fft"}),
    (nb.Dense(np.zeros(127)), False, {"fft"}),
    (nb.Causal(), True, {"toeplitz-fft"}),
], ids=["none", "causal", "dense", "causal-general"])
def test_each_algorithm_says_why_it_cannot_serve(structure, general, serving):
    h = HeadSpec((), 64, 64, 4, 4, 1.0, 1.0, 1.0, structure=structure, general=general)
    for alg in ops.fast_algorithms():
        why = alg.unavailable(h)
        assert (not why) == (alg.name in serving), (alg.name, why)
        assert all(isinstance(w, Reason) and w.code in REASONS for w in why)


def _inputs(n=2048, E=4, s=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, E)) * s, rng.standard_normal((n, E)) * s,
            rng.standard_normal((n, 3)))


class _Cheap(gemm.Gemm):
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
    ops.register(_Cheap())
    try:
        out, info = numbarope.rope_attention(q, k, v, rotary=True, return_info=True)
        assert info.algorithm[()] == "cheap-gemm" and info.method[()] == "fast"
        assert _Cheap.runs == 1
        exact = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
        assert np.abs(out - exact).max() <= info.error_bound[()]
    finally:
        ops.unregister("cheap-gemm")
    assert "cheap-gemm" not in ops.registry()
    assert numbarope.plan(q, k, v, rotary=True).algorithm[()] != "cheap-gemm"
