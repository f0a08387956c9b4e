"""numbarope called from several Python threads at once, and in forked children.

Field reports: (1) concurrent calls left numpy's and scipy's BLAS at one thread for
the rest of the process (each call's BLAS limit was a save/set/restore of a
process-wide setting, interleaved across threads); (2) a child forked after any
call that used the (old) thread pool hung in its first call. Both are tested with
real threads and processes. Issue 20: the parallel loops are numba prange loops on
the tbb layer; results bitwise equal for any ``workers`` and any layer (tbb, omp,
workqueue), 4 Python threads at once (workqueue: serialised), torch in the same
process in either order. Also: ``workers=`` checks, numba's thread count, Ctrl-C.
"""

import contextlib
import multiprocessing as mp
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import numbarope
import numbarope.bias
from numbarope import rope_attention, rotary_relative_matrices
from numbarope._runtime import threads as _threads

N, E = 1536, 8


def _limited():
    """Paths of the BLAS libraries numbarope limits: scipy's (numba's np.dot), when it
    can be told apart from numpy's and others."""
    _threads._blas_libs()
    return set(_threads._blas_paths)


def _blas_info():
    """(filepath, num_threads) of every BLAS library numbarope limits."""
    lim = _limited()
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas" and i["filepath"] in lim)


def _cases():
    """Exact float64 and float32, and the fast prefix, gemm, window and FFT paths."""
    rng = np.random.default_rng(0)

    def qkv(dtype):
        q, k = 0.1 * rng.standard_normal((2, N, E))          # small logits: fast path
        v = rng.standard_normal((N, E))
        return q.astype(dtype), k.astype(dtype), v.astype(dtype)

    x64, x32, xf = qkv(np.float64), qkv(np.float32), qkv(np.float64)
    bias = rng.standard_normal(2 * N - 1)
    return [
        ("exact64", x64, dict(method="exact", rotary=True, is_causal=True)),
        ("exact32", x32, dict(method="exact", rotary=True, is_causal=True)),
        ("prefix", xf, dict(method="fast", rotary=True, is_causal=True)),
        ("gemm", xf, dict(method="fast", rotary=True)),
        ("window", xf, dict(method="fast", rotary=True, bias=numbarope.bias.Window(64, 0))),
        ("fft", xf, dict(method="fast", rotary=True, bias=bias)),
    ]


def _call(case):
    _, (q, k, v), kw = case
    return numbarope.rope_attention(q, k, v, **kw)


def _baseline(user_limit):
    """The BLAS settings to come back to: the process's own, or a user's
    ``threadpool_limits(2)`` block around the test (threadpoolctl then lets only this
    thread set OpenBLAS's threads: numbarope must still limit from its threads)."""
    if user_limit:
        return threadpool_limits(limits=2, user_api="blas")
    if all(n == 1 for _, n in _blas_info()):
        pytest.skip("BLAS at 1 thread already: nothing to restore")
    return contextlib.nullcontext()


@pytest.mark.parametrize("user_limit", [False, True], ids=["default", "user_limit"])
def test_concurrent_calls_match_sequential_and_restore_blas(monkeypatch, user_limit):
    """6 threads x 3 rounds of exact/fast calls: results bitwise equal to sequential
    calls, BLAS at 1 thread inside every parallel section, and the BLAS settings
    exactly as before once the last call returns (they stayed at 1 for good)."""
    cases = _cases()
    ctl = ThreadpoolController()
    blas = [lc for lc in ctl.lib_controllers if lc.user_api == "blas"
            and lc.filepath in _limited()]
    assert blas, "no BLAS library found by threadpoolctl"
    inside = []           # BLAS threads seen inside every parallel section

    def spy(parallel):
        @contextlib.contextmanager
        def section(nthreads):
            with parallel(nthreads):
                inside.append(tuple(lc.get_num_threads() for lc in blas))
                yield
        return section

    import numbarope.ops._common
    import numbarope.ops._features
    import numbarope.ops.decay
    import numbarope.ops.streaming.backward
    import numbarope.ops.streaming.decode
    import numbarope.ops.streaming.entry
    import numbarope.ops.window
    for mod in (numbarope.ops.streaming.entry, numbarope.ops.streaming.decode,
                numbarope.ops.streaming.backward, numbarope.ops._common,
                numbarope.ops.decay, numbarope.ops.window, numbarope.ops._features):
        monkeypatch.setattr(mod, "parallel", spy(mod.parallel))
    with _baseline(user_limit):
        before = _blas_info()
        if all(n == 1 for _, n in before):
            pytest.skip("the BLAS libraries cannot use 2 threads here")
        sequential = {case[0]: _call(case) for case in cases}
        assert _blas_info() == before
        n_sequential = len(inside)
        assert n_sequential >= len(cases) and set(inside) == {(1,) * len(blas)}
        with ThreadPoolExecutor(6) as ex:
            for _ in range(3):
                futures = [(case[0], ex.submit(_call, case)) for case in cases]
                for name, fut in futures:
                    out = fut.result()
                    assert np.array_equal(out, sequential[name]), name
        after = _blas_info()
    assert len(inside) > n_sequential
    assert set(inside) == {(1,) * len(blas)}, "BLAS not at 1 thread in a parallel section"
    assert after == before


def test_blas_limit_counts_sections_of_several_threads():
    """The interleaving that broke the per-call limit, forced: A enters, B enters,
    A leaves (B still inside: still 1), B leaves (restored) — in threads other than
    the one that set the limit first."""
    with _baseline(user_limit=False):
        before = _blas_info()
        entered = [threading.Event(), threading.Event()]
        leave = [threading.Event(), threading.Event()]
        left = [threading.Event(), threading.Event()]

        def section(i):
            with _threads.blas_threads(1):
                entered[i].set()
                leave[i].wait(30)
            left[i].set()

        threads = [threading.Thread(target=section, args=(i,)) for i in range(2)]
        threads[0].start()
        assert entered[0].wait(30)
        threads[1].start()
        assert entered[1].wait(30)
        assert all(n == 1 for _, n in _blas_info())
        leave[0].set()
        assert left[0].wait(30)
        assert all(n == 1 for _, n in _blas_info()), "restored while B was inside"
        # a user's threadpoolctl block inside a section: its setting holds in the
        # block, and it restores the 1 it found
        with threadpool_limits(limits=2, user_api="blas"):
            assert all(n == 2 for _, n in _blas_info())
        assert all(n == 1 for _, n in _blas_info())
        leave[1].set()
        for t in threads:
            t.join(30)
        assert _blas_info() == before
    # a lasting change made during a section (by any thread) is kept when the last
    # section leaves: it is not the 1 numbarope set
    with threadpool_limits(limits=2, user_api="blas"):      # restores `before` after
        with _threads.blas_threads(1):
            threadpool_limits(limits=3, user_api="blas")     # not undone by itself
            changed = _blas_info()
        assert _blas_info() == changed
    assert _blas_info() == before
    assert all(n != 1 for _, n in changed)
    with pytest.raises(ValueError, match="1 thread"):
        _threads.blas_threads(2)


# ---------------------------------------------------------------------------
# workers= and numba's thread count

@pytest.mark.parametrize("workers", [2, -1, None])
def test_workers_give_identical_results_on_every_path(workers):
    """Field reports (issue 7); issue 20: every path, bitwise, against workers=1 (the
    partitions into tasks depend on the sizes only)."""
    for name, (q, k, v), kw in _cases():
        ref = rope_attention(q, k, v, workers=1, **kw)
        out = rope_attention(q, k, v, workers=workers, **kw)
        assert np.array_equal(out, ref), name


def test_exact_results_do_not_depend_on_batching_heads():
    """A head computed alone or with others gives the same bits (the exact kernel's row
    blocks depend on the sequence length only): a Dask chunk of heads equals the whole."""
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((8, 700, 16)).astype(np.float32) for _ in range(3))
    whole = rope_attention(q, k, v, method="exact", is_causal=True)
    for h in (0, 5):
        one = rope_attention(q[h:h + 1], k[h:h + 1], v[h:h + 1], method="exact",
                             is_causal=True)
        assert np.array_equal(one[0], whole[h])


@pytest.mark.parametrize("bad, exc, pat", [(0, ValueError, "workers=0"),
                                           (-1000, ValueError, "workers=-1000"),
                                           (1.5, TypeError, "workers must be an int")])
def test_bad_workers_refused(bad, exc, pat):
    """Field reports (issue 7)."""
    q = np.zeros((4, 2))
    with pytest.raises(exc, match=pat):
        rope_attention(q, q, q, workers=bad)


def test_set_workers_checks_its_argument_when_called():
    """New-user findings, second round."""
    with pytest.raises((TypeError, ValueError)):
        numbarope.set_workers(0)
    with pytest.raises(TypeError):
        numbarope.set_workers("x")


def test_workers_above_the_cores_are_clamped(monkeypatch):
    """New-user report: workers= larger than the machine was accepted silently with no
    documented effect. As scipy.fft, it is accepted; numbarope clamps it to the cores
    the process may use (numba's pool has no more threads), the same way for
    resolve_workers, set_workers/get_workers and workers=, without a warning."""
    import warnings

    from numbarope._runtime import threads
    monkeypatch.setattr(threads, "_cpu_count", lambda: 3)
    assert threads.resolve_workers(64) == 3 and threads.resolve_workers(3) == 3
    assert threads.resolve_workers(2) == 2 and threads.resolve_workers(np.int64(9)) == 3
    assert threads.resolve_workers(-1) == 3 and threads.resolve_workers(None) == 3
    with numbarope.set_workers(1000):
        assert numbarope.get_workers() == 3
    monkeypatch.undo()
    ncpu = threads._cpu_count()
    q = np.random.default_rng(0).standard_normal((2, 16, 4)) * 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rope_attention(q, q, q, workers=ncpu + 5, method="exact")
    np.testing.assert_array_equal(out, rope_attention(q, q, q, workers=1, method="exact"))


def _det_cases(rng, n, e):
    return {
        "exact": dict(method="exact", rotary=True),
        "exact-relative": dict(method="exact", relative=rotary_relative_matrices(n, None, e),
                               bias=rng.standard_normal(2 * n - 1), is_causal=True),
        "gemm": dict(method="fast", rotary=True),
        "prefix": dict(method="fast", rotary=True, is_causal=True),
        "fft": dict(method="fast", rotary=True, bias=rng.standard_normal(2 * n - 1)),
        "general": dict(method="fast", relative=rotary_relative_matrices(n, None, e)),
    }


def test_determinism_and_threads():
    """Robustness suite."""
    rng = np.random.default_rng(19)
    n, e = 24, 4
    q, k, v = (rng.standard_normal((3, n, e)) * 0.3 for _ in range(3))
    saved = numba.get_num_threads()
    try:
        for name, kw in _det_cases(rng, n, e).items():
            out, info = rope_attention(q, k, v, return_info=True, **kw)
            expect = "exact" if kw["method"] == "exact" else "fast"
            assert np.all(info.method == expect), name
            if name not in ("exact", "exact-relative"):
                assert np.all(info.algorithm == {"general": "toeplitz-fft"}.get(name, name))
            again = rope_attention(q, k, v, **kw)
            assert np.array_equal(out, again), f"{name}: two identical calls differ"
            if numba.config.NUMBA_NUM_THREADS >= 2:
                numba.set_num_threads(1)
                one = rope_attention(q, k, v, **kw)
                numba.set_num_threads(2)
                two = rope_attention(q, k, v, **kw)
                numba.set_num_threads(saved)
                assert np.array_equal(one, two), name
                assert np.array_equal(one, out), name
    finally:
        numba.set_num_threads(saved)
    assert numba.get_num_threads() == saved


# ---------------------------------------------------------------------------
# Ctrl-C

def test_ctrl_c_stops_the_call_and_frees_the_threads():
    """Field reports (issue 7). SIGINT during a long exact call: KeyboardInterrupt comes
    back once the running chunks finish, no kernel keeps running, and the next call works
    (it used to hang)."""
    import subprocess
    import sys
    code = r"""
import os, signal, threading, time
import numpy as np, numbarope
q = np.random.default_rng(0).standard_normal((1, 200000, 16)).astype(np.float32)
numbarope.rope_attention(q[:, :256], q[:, :256], q[:, :256], method="exact")   # compile
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    numbarope.rope_attention(q, q, q, method="exact")
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
out = numbarope.rope_attention(q[:, :1000], q[:, :1000], q[:, :1000], method="exact")
print("next call ok", out.shape)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "interrupted" in res.stdout and "next call ok (1, 1000, 16)" in res.stdout


# ---------------------------------------------------------------------------
# fork

fork = pytest.mark.skipif("fork" not in mp.get_all_start_methods(),
                          reason="no fork start method on this platform")
# Python >= 3.12 warns about fork() in a process with threads (the pool's)
no_fork_warning = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")

CHILD_TIMEOUT = 60


def _in_forked_child(fn):
    """``fn()`` in a child started with fork; its result, or fail (hang or error)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()

    def target():
        try:
            results.put(("ok", fn()))
        except BaseException as exc:     # noqa: BLE001 - sent to the parent
            results.put(("error", repr(exc)))

    p = ctx.Process(target=target, daemon=True)
    p.start()
    try:
        status, value = results.get(timeout=CHILD_TIMEOUT)   # before join: a big result
    except queue.Empty:
        p.kill()
        p.join(10)
        pytest.fail(f"the forked child did not finish within {CHILD_TIMEOUT} s")
    p.join(CHILD_TIMEOUT)
    if p.exitcode is None:
        p.kill()
        p.join(10)
    assert p.exitcode == 0
    assert status == "ok", value
    return value


@fork
@no_fork_warning
@pytest.mark.parametrize("path", ["exact", "fast"])
def test_forked_child_after_a_call(path):
    """The parent ran parallel loops (numba's tbb layer); a forked child's call
    finishes (with the old thread pool it hung forever) with the parent's result."""
    rng = np.random.default_rng(1)
    if path == "exact":
        q, k, v = rng.standard_normal((3, 4, 2048, 64))
        kw = dict(method="exact", rotary=True, is_causal=True)
    else:
        (_, (q, k, v), kw), = [c for c in _cases() if c[0] == "prefix"]
    parent = numbarope.rope_attention(q, k, v, **kw)
    assert _threads.threading_layer() == "tbb"     # started in the parent
    child = _in_forked_child(lambda: numbarope.rope_attention(q, k, v, **kw))
    assert np.array_equal(child, parent)
    assert np.array_equal(numbarope.rope_attention(q, k, v, **kw), parent)


@fork
@no_fork_warning
def test_fork_while_another_thread_is_inside_numbarope():
    """Forked while another thread holds numbarope's locks and is in a parallel
    section (BLAS at 1): the child gets free locks and the BLAS settings of before
    that section; its calls work and leave them so."""
    (_, (q, k, v), kw), = [c for c in _cases() if c[0] == "exact64"]
    parent = numbarope.rope_attention(q, k, v, **kw)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_info()
        inside, release = threading.Event(), threading.Event()

        def hold():
            with _threads._layer_lock, _threads._serial, _threads.blas_threads(1):
                inside.set()
                release.wait(2 * CHILD_TIMEOUT)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert inside.wait(30)
            held = _blas_info()

            def child():
                first = _blas_info()
                out = numbarope.rope_attention(q, k, v, **kw)
                return first, out, _blas_info()

            first, out, last = _in_forked_child(child)
        finally:
            release.set()
            t.join(30)
        assert _blas_info() == before
    assert all(n == 1 for _, n in held)
    assert first == before and last == before
    assert np.array_equal(out, parent)


# ---------------------------------------------------------------------------
# numba's threading layers (issue 20)

_LAYER_SCRIPT = r"""
import sys, threading
import numpy as np
import numbarope
from numbarope._runtime import threads
rng = np.random.default_rng(0)
q, k = 0.1 * rng.standard_normal((2, 2, 1536, 8))
v = rng.standard_normal((2, 1536, 8))
cases = [dict(method="exact", rotary=True, is_causal=True),
         dict(method="fast", rotary=True, is_causal=True),
         dict(method="fast", rotary=True, bias=numbarope.bias.Window(64, 0))]
outs = [numbarope.rope_attention(q, k, v, workers=w, **kw) for kw in cases for w in (1, 2)]
errors = []
def call():                     # 4 Python threads at once
    try:
        for kw, i in zip(cases, range(0, 6, 2)):
            assert np.array_equal(numbarope.rope_attention(q, k, v, **kw), outs[i])
    except Exception as exc:
        errors.append(repr(exc))
ts = [threading.Thread(target=call) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
np.save(sys.argv[1], np.stack(outs))
print(threads.threading_layer())
"""


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_every_layer_gives_the_same_bits_and_takes_concurrent_calls(tmp_path, layer):
    """Each layer in a process of its own (a process starts one layer): results bitwise
    equal to tbb's, for workers 1 and 2; 4 Python threads calling at once work on every
    layer (workqueue aborts the process on concurrent regions: numbarope serialises)."""
    import os
    import subprocess
    import sys
    outs = {}
    for name in ("tbb", layer):
        env = dict(os.environ)
        if name != "tbb":
            env["NUMBA_THREADING_LAYER"] = name
        path = tmp_path / f"{name}.npy"
        res = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT, str(path)], env=env,
                             capture_output=True, text=True, timeout=600)
        if res.returncode and name == "omp" and "omp" in res.stderr.lower() and \
                "not available" in res.stderr.lower():
            pytest.skip("numba's OpenMP layer is not available here")
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.split()[-1] == name
        outs[name] = np.load(path)
    assert np.array_equal(outs["tbb"], outs[layer])


def test_tbb_is_the_default_layer_and_show_config_says_so(capsys):
    cfg = numbarope.show_config()
    assert cfg["threading_layer"] == "tbb"
    assert "threading layer tbb" in capsys.readouterr().out


_TORCH_SCRIPT = r"""
import sys
first = sys.argv[1]
import numpy as np
def run_torch():
    import torch, torch.nn.functional as F
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
def run_numbarope():
    import numbarope
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 1024, 64)).astype(np.float32) for _ in range(3))
    out = numbarope.rope_attention(q, k, v, is_causal=True, method="exact")
    return out, numbarope._runtime.threads.threading_layer()
if first == "torch":
    a = run_torch(); out, layer = run_numbarope(); b = run_torch()
else:
    out, layer = run_numbarope(); a = run_torch(); b = run_torch()
assert bool((a == b).all())
assert np.isfinite(out).all()
print(layer)
"""


@pytest.mark.parametrize("first", ["torch", "numbarope"])
def test_torch_and_numbarope_in_one_process_either_order(first):
    """torch (its own OpenMP runtime) imported and run first, then numbarope, and the
    reverse: both run, numbarope on tbb (speed: tools/threads_interop.py)."""
    pytest.importorskip("torch")
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, first], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-1] == "tbb"


def test_only_scipys_blas_is_limited():
    # numba's np.dot calls scipy's BLAS; numpy's (and torch's) are left alone: setting
    # each costs microseconds per call and their users' threads are not ours to change
    lim = _limited()
    assert lim and all("scipy" in p for p in lim)
    others = [i for i in threadpool_info() if i["user_api"] == "blas"
              and i["filepath"] not in lim]
    with _threads.parallel(2):
        inside = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    for i in others:
        assert inside[i["filepath"]] == i["num_threads"]
