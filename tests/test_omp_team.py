"""The decoding and exact kernels on torch's OpenMP team (numbarope._runtime.omp_team).

With torch tensors, the fast lane's calls run their tasks on torch's OpenMP threads;
the results must be bitwise those of numba's parallel loop over the same tasks,
with every mask and range the kernel reads, and a forked child (GNU OpenMP does
not survive fork) must fall back to numba's threads and finish.
"""

import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest

import numbarope
import numbarope.bias
from numbarope._runtime import omp_team
from numbarope.ops.streaming import decode as _decode

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    omp_team.team() is None, reason="torch's parallel backend is not GNU OpenMP here")


def _inputs(rng, dt, B=2, Hq=9, Hk=3, L=1, S=1100, E=64):
    q = rng.standard_normal((B, Hq, L, E)).astype(dt)
    k = rng.standard_normal((B, Hk, S, E)).astype(dt)
    v = rng.standard_normal((B, Hk, S, E)).astype(dt)
    return q, k, v


def _counting(monkeypatch):
    calls = []
    real = omp_team.Team.run

    def run(self, fn, data, n):
        calls.append(n)
        return real(self, fn, data, n)

    monkeypatch.setattr(omp_team.Team, "run", run)
    return calls


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["plain", "key_padding", "causal_rows"])
def test_team_gives_the_bits_of_numbas_loop(monkeypatch, dt, case):
    rng = np.random.default_rng(3)
    kw = dict(enable_gqa=True)
    L = 4 if case == "causal_rows" else 1
    q, k, v = _inputs(rng, dt, L=L)
    if case == "key_padding":
        m = np.ones((2, 1, k.shape[2]), bool)
        m[1, 0, :300] = False
        kw["key_padding_mask"] = m
    if case == "causal_rows":          # a few new tokens onto a cache
        kw.update(is_causal=True, causal_alignment="bottom_right")
    ref = numbarope.rope_attention(q, k, v, **kw)       # numpy: numba's threads
    calls = _counting(monkeypatch)
    tkw = {a: torch.from_numpy(b) if isinstance(b, np.ndarray) else b
           for a, b in kw.items()}
    out = numbarope.rope_attention(*(torch.from_numpy(x) for x in (q, k, v)), **tkw)
    assert calls and calls[-1] == numbarope.get_workers() > 1
    assert out.dtype == torch.from_numpy(q).dtype
    assert np.array_equal(out.numpy(), ref)


def test_team_flags_nonfinite_inputs_as_the_loop_does(monkeypatch):
    # a NaN in the cache: the lane hands the call to the full pipeline, which refuses
    rng = np.random.default_rng(4)
    q, k, v = (torch.from_numpy(x) for x in _inputs(rng, np.float32))
    k[1, 2, 17, 3] = float("nan")
    calls = _counting(monkeypatch)
    with pytest.raises(ValueError, match="key"):
        numbarope.rope_attention(q, k, v, enable_gqa=True)
    assert calls


def test_switched_off_by_the_environment():
    code = ("import torch, numbarope._runtime.omp_team as t; torch.ones(2) + 1; "
            "print(t.team() is None)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "NUMBAROPE_TORCH_TEAM": "0"},
                         timeout=120)
    assert res.stdout.strip() == "True", res.stderr


def _child(q, k, v, queue):
    try:
        out = numbarope.rope_attention(*(torch.from_numpy(x) for x in (q, k, v)),
                                       enable_gqa=True)
        queue.put((omp_team.team() is None, out.numpy()))
    except BaseException as exc:          # pragma: no cover - reported to the parent
        queue.put(exc)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork here")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_uses_numbas_threads(monkeypatch):
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, np.float32)
    calls = _counting(monkeypatch)
    parent = numbarope.rope_attention(*(torch.from_numpy(x) for x in (q, k, v)),
                                      enable_gqa=True).numpy()
    assert calls                                   # the parent ran on torch's team
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, k, v, queue))
    p.start()
    try:
        res = queue.get(timeout=120)
    finally:
        p.join(30)
        if p.is_alive():            # pragma: no cover - a hang
            p.kill()
    assert not isinstance(res, BaseException), res
    no_team, child = res
    assert no_team
    assert np.array_equal(child, parent)


def test_single_thread_skips_the_team(monkeypatch):
    rng = np.random.default_rng(6)
    q, k, v = (torch.from_numpy(x) for x in _inputs(rng, np.float32))
    calls = _counting(monkeypatch)
    with numbarope.set_workers(1):
        numbarope.rope_attention(q, k, v, enable_gqa=True)
    assert not calls


def test_team_body_compiled_once_per_dtype():
    a = _decode._team_body(np.dtype(np.float32))
    assert a == _decode._team_body(np.dtype(np.float32)) and isinstance(a, int)


# ------------------------------------------------------------------ the exact kernel

@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["full", "causal", "key_padding", "window"])
def test_exact_kernel_on_team_gives_the_bits_of_numbas_loop(monkeypatch, dt, case):
    # prefill-sized calls (a transformers layer): the exact kernel's groups on
    # torch's team, with the GEMMs at one BLAS thread as in numba's loop
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, dt, L=300, S=300)
    kw = dict(enable_gqa=True)
    if case in ("causal", "key_padding"):
        kw["is_causal"] = True
    if case == "key_padding":
        m = np.ones((2, 1, 300), bool)
        m[1, 0, :40] = False
        kw["key_padding_mask"] = m
    if case == "window":
        kw["bias"] = numbarope.bias.Window(64)
    ref = numbarope.rope_attention(q, k, v, **kw)
    calls = _counting(monkeypatch)
    tkw = {a: torch.from_numpy(b) if isinstance(b, np.ndarray) else b
           for a, b in kw.items()}
    out = numbarope.rope_attention(*(torch.from_numpy(x) for x in (q, k, v)), **tkw)
    assert calls
    assert np.array_equal(out.numpy(), ref)


def test_exact_kernel_on_team_writes_heads_last(monkeypatch):
    # the transformers backend's layout (B, L, H, Ev) written by the team's tasks: the
    # values of numba's loop in the usual layout
    from numbarope.ops import streaming as st
    rng = np.random.default_rng(8)
    q = rng.standard_normal((6, 300, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 300, 16)).astype(np.float32) for _ in range(2))
    plan = st.exact_plan(6, 300, 2, 300, 16, 16, kvidx=np.repeat(np.arange(2), 3),
                         workers=2)
    want, _ = st.exact_run(plan, q, k, v, 0.3)
    calls = _counting(monkeypatch)
    got, _ = st.exact_run(plan, q, k, v, 0.3, team=omp_team.team(), heads_last=3)
    assert calls
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous
    assert np.array_equal(got.reshape(6, 300, 16), want)


def test_exact_kernel_on_team_keeps_blas_quiet():
    # OpenBLAS (pthreads) called from an OpenMP thread with more than one BLAS
    # thread prints "Detect OpenMP Loop and this application may hang"
    code = """
import numpy as np, torch
torch.set_num_threads(2)
import numbarope
import numbarope.bias
from threadpoolctl import threadpool_limits
rng = np.random.default_rng(0)
q, k, v = (torch.from_numpy(rng.standard_normal((1, 4, 600, 64))) for _ in range(3))
with threadpool_limits(limits=2, user_api="blas"):
    for _ in range(3):
        numbarope.rope_attention(q, k, v, is_causal=True)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.stdout.strip() == "ok", res.stderr
    assert "OpenMP Loop" not in res.stderr
