"""numbarope.ops._common: the pieces the separable algorithms share — which keys a row
sees, chunk sizes and task ranges, the one masked chunk kernel (with and without a
decay), the key-side state, and the layering rules of the algorithm modules."""

import ast
import importlib
import pathlib

import numpy as np
import pytest
from numpy.polynomial.polynomial import polyval

from _poly_ref import separable_inputs
from numbarope import _config
from numbarope.ops import _common
from numbarope.ops._common import _horner_block, visible_keys
from numbarope.polynomial import exp_approximation

SEPARABLE = ("_common", "gemm", "prefix", "decay", "window", "fft")


def test_visible_keys():
    keep = np.array([False, True, True, False, True])
    np.testing.assert_array_equal(visible_keys(4, 5, 0, True, keep), [0, 1, 2, 2])
    np.testing.assert_array_equal(visible_keys(3, 5, -1, True, None), [0, 1, 2])
    np.testing.assert_array_equal(visible_keys(2, 5, 3, True, None), [4, 5])
    assert visible_keys(1, 5, 4, True, None) is None            # decoding: sees all
    assert visible_keys(4, 5, 0, False, keep) is None
    last_padded = np.array([True, True, True, True, False])
    assert visible_keys(2, 5, 3, True, last_padded) is None     # both see the 4 real keys


def test_chunk_sizes_and_ranges(monkeypatch):
    # recurrence_chunk's rule (its docstring: 32, 96, 160 for m = 70, 495, 969, Ev = E)
    assert [_common.recurrence_chunk(m, E, E, g) for m, E, g in ((70, 4, 4), (495, 8, 4),
                                                                 (969, 16, 3))] == [32, 96, 160]
    monkeypatch.setattr(_common, "CHUNK", 7)
    assert _common.recurrence_chunk(969, 16, 16, 3) == 7
    assert _common.gemm_chunk(969) == 64 and _common.gemm_chunk(1) == _config.FEATURE_CHUNK
    assert _common.prefix_chunk(10) == _config.CAUSAL_CHUNK
    r = _common._ranges(3, 20, 4)
    assert r[0][0] == 3 and r[-1][1] == 20 and all(a < b for a, b in r)
    assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
    w = _common._ranges(0, 6, 2, weight=[10, 0, 0, 0, 0, 10])     # balanced by weight
    assert len(w) == 2 and w[0][0] == 0 and w[-1][1] == 6 and w[0][1] == w[1][0]
    # whole feature blocks, by the sizes only
    blocks = _common._row_blocks(5, 1000, 64)
    assert blocks[0][0] == 5 and blocks[-1][1] == 1000
    assert all((a - 5) % 64 == 0 for a, _ in blocks)


@pytest.mark.parametrize("decayed", [False, True])
def test_masked_chunk_kernel(decayed):
    """_horner_block: rows against a block of keys, each row its own key range, weight p
    (Horner) times the optional decay factor dec[xrow − kpos]."""
    rng = np.random.default_rng(1)
    nq, nk, E, Ev = 30, 50, 4, 3
    qs = rng.uniform(-0.5, 0.5, (nq, E))
    ks = rng.uniform(-0.5, 0.5, (nk, E))
    v = rng.standard_normal((nk, Ev))
    coef = exp_approximation(1.0, degree=5).coef
    pc = np.ascontiguousarray(coef[::-1])
    lo = rng.integers(0, nk, nq)
    hi = lo + rng.integers(0, nk, nq)
    kpos = np.sort(rng.choice(200, nk, replace=False)).astype(np.int64)
    xrow = kpos[np.minimum(hi, nk) - 1] if decayed else np.empty(0, np.int64)
    dec = np.exp(-0.01 * np.arange(400)) if decayed else np.empty(0)
    num = np.zeros((nq, Ev))
    den = np.zeros(nq)
    s0, s1 = 10, 40
    _horner_block(qs, ks, v, pc, 0, nq, s0, s1, lo, hi, dec,
                  kpos if decayed else np.empty(0, np.int64), xrow, num, den)
    rnum, rden = np.zeros((nq, Ev)), np.zeros(nq)
    for r in range(nq):
        for t in range(max(lo[r], s0), min(hi[r], s1)):
            w = polyval(qs[r] @ ks[t], coef)
            if decayed:
                w *= dec[xrow[r] - kpos[t]]
            rnum[r] += w * v[t]
            rden[r] += w
    np.testing.assert_allclose(num, rnum, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(den, rden, rtol=1e-13, atol=1e-14)


def test_scan_without_and_with_unit_decay():
    """_scan: without a decay (the prefix) and with every factor exactly 1 (dec of ones):
    the same sums (to rounding)."""
    rng = np.random.default_rng(2)
    q, k, v, s = separable_inputs(rng, 300)
    coef = exp_approximation(1.0, eps=1e-6).coef
    F = _common._Side(coef, 4)
    sq = np.sqrt(s)
    qs, ks = np.ascontiguousarray(q * sq), np.ascontiguousarray(k * sq)
    lim = np.arange(1, 301, dtype=np.int64)
    a = _common._scan(qs, ks, v, lim, F, 1, 32)
    b = _common._scan(qs, ks, v, lim, F, 1, 32, np.arange(300, dtype=np.int64),
                      np.ones(301))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13)


def test_key_side_state():
    rng = np.random.default_rng(3)
    q, k, v, s = separable_inputs(rng, 200, E=3)
    coef = exp_approximation(1.0, degree=3).coef
    S, sv = _common.key_side_state(k, v, s, coef)
    a = _common.key_side_state(k[:77], v[:77], s, coef)
    b = _common.key_side_state(k[77:], v[77:], s, coef)
    St, st = _common.add_states(a, b)
    np.testing.assert_allclose(St, S, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(st, sv, rtol=1e-12, atol=1e-13)
    keep = rng.random(200) < 0.5
    Sm, _ = _common.key_side_state(k, v, s, coef, key_mask=keep)
    Sr, _ = _common.key_side_state(k[keep], v[keep], s, coef)
    assert np.array_equal(Sm, Sr)
    # φ(q)ᵀψ(k) = p(s qᵀk): the state of one key against one query
    from numbarope.ops.gemm import apply_state
    out, den = apply_state(q[:1], _common.key_side_state(k[:1], v[:1], s, coef), s, coef)
    np.testing.assert_allclose(den, polyval(s * q[0] @ k[0], coef), rtol=1e-13)
    np.testing.assert_allclose(out[0], v[0], rtol=1e-13)


def _module_path(name):
    return pathlib.Path(importlib.import_module(f"numbarope.ops.{name}").__file__)


@pytest.mark.parametrize("name", SEPARABLE)
def test_layering_of_the_algorithm_modules(name):
    """Each module imports only from the registry, the shared leaves of ops/, _config,
    _runtime.threads and bias: no function-local imports of numbarope modules, nothing
    of numbarope._pipeline or numbarope.api (no import cycle with the package)."""
    allowed = {".registry", "._common", "._bounds", "._cost", "._exp", "._features",
               "._toeplitz", ".._config", ".._runtime.threads", "..bias", ".."}
    tree = ast.parse(_module_path(name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            if node.level == 0:
                assert not mod.startswith("numbarope"), (name, mod)
            else:
                assert mod in allowed | {"."}, (name, mod)
                if mod == "..":
                    assert {a.name for a in node.names} <= {"_config", "bias"}, name
                if mod == ".":          # a shared leaf as a module (its live settings)
                    assert {"." + a.name for a in node.names} <= allowed, name
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("numbarope") for a in node.names), name
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    assert node.level == 0 and not (node.module or "").startswith(
                        "numbarope"), (name, fn.name)


# the exact path is a package (one algorithm, one place): its modules one by one
PARALLEL = SEPARABLE + ("streaming.kernel", "streaming.decode", "streaming.backward",
                        "toeplitz_fft", "_features")


def test_the_exact_package_has_its_loops():
    # every module of ops/streaming/ with a parallel loop is in PARALLEL
    import numbarope.ops.streaming as pkg
    mods = {m.stem for m in pathlib.Path(pkg.__file__).parent.glob("*.py")}
    looped = {m for m in mods if "prange(" in
              (pathlib.Path(pkg.__file__).parent / f"{m}.py").read_text()}
    assert looped == {n.split(".")[1] for n in PARALLEL if n.startswith("streaming.")}


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_loops_are_thin_pranges(name):
    # issue 20: every parallel loop is a numba parallel=True function whose body is one
    # prange over tasks calling one serial kernel (results independent of the threads;
    # compile time small); no Python thread pool
    from numba.core.registry import CPUDispatcher
    src = _module_path(name).read_text()
    assert "run_tasks" not in src and "ThreadPool" not in src, name
    mod = importlib.import_module(f"numbarope.ops.{name}")
    tree = ast.parse(src)
    funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    from numbarope._runtime.threads import _PrangeLoop
    loops = 0
    for attr, obj in vars(mod).items():
        if isinstance(obj, _PrangeLoop) and obj.pyfunc.__module__ == mod.__name__:
            assert obj.dispatcher.targetoptions.get("parallel"), f"{name}.{attr}"
            loops += 1
        elif isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__:
            if not obj.targetoptions.get("parallel"):
                assert "prange" not in ast.unparse(funcs[attr]), f"{name}.{attr}"
                continue
            # a direct parallel loop (the decoding kernel's: microsecond calls cannot
            # pay prange_loop's function-pointer conversion): thin all the same
            loops += 1
        else:
            continue
        fn = funcs[attr]
        body = [b for b in fn.body if not isinstance(b, ast.Expr)
                or not isinstance(b.value, ast.Constant)]          # docstring aside
        assert len(body) == 1 and isinstance(body[0], ast.For), f"{name}.{attr}"
        loop = body[0]
        assert isinstance(loop.iter, ast.Call) and ast.unparse(loop.iter.func) == "prange"
        assert len(loop.body) == 1 and isinstance(loop.body[0], ast.Expr) \
            and isinstance(loop.body[0].value, ast.Call), f"{name}.{attr}"
    assert loops or name in ("gemm", "prefix", "fft", "toeplitz_fft"), name


def test_each_algorithm_registers_itself():
    import numbarope.ops as ops
    from numbarope.ops import decay, fft, gemm, prefix, window
    for mod, name in ((gemm, "gemm"), (prefix, "prefix"), (decay, "decay"),
                      (window, "window"), (fft, "fft")):
        alg = ops.get(name)
        assert type(alg).__module__ == mod.__name__
        assert alg.fast and alg in ops.fast_algorithms()
