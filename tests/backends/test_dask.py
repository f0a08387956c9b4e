"""numbarope on Dask, many heads (numbarope.backends.dask, optional extra): a 2-process
LocalCluster against the local call.

Tolerances: the batch/head path runs the very same kernels on the same chunk of
data, so it is compared bitwise (exact) and to the local fast result (same
plan, same polynomial: bitwise here too, asserted with allclose 1e-12 in case a
worker's thread count changes a summation order) plus the certified bound.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import numbarope  # noqa: E402
from numbarope._runtime import interop  # noqa: E402
from numbarope.backends.dask import is_dask, rope_attention_dask  # noqa: E402
from numbarope.bias import ALiBi, Causal, Decay, Window  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _qkv(shape, seed=0, s=0.3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * s for _ in range(3)]


def _chunked(xs, chunks):
    return [da.from_array(x, chunks=chunks) for x in xs]


def test_is_dask():
    q, _, _ = _qkv((2, 8, 4))
    assert not is_dask(q, None)
    assert is_dask(q, da.from_array(q))


def test_import_without_dask():
    # dask is optional: `import numbarope` (which imports the backends) must not import it
    code = "import sys, numbarope; sys.exit('dask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert is_dask is interop.is_dask


def test_batch_heads_exact_bitwise(client):
    q, k, v = _qkv((2, 4, 257, 8))
    ref, rinfo = numbarope.rope_attention(q, k, v, rotary=True, is_causal=True,
                                          return_info=True)
    out, info = rope_attention_dask(*_chunked((q, k, v), (1, 2, -1, -1)), rotary=True,
                                    is_causal=True, return_info=True)
    assert isinstance(out, da.Array) and out.shape == ref.shape
    o, i = dask.compute(out, info)
    assert np.array_equal(o, ref)
    assert i.batch_shape == (2, 4) and list(i.method.ravel()) == list(rinfo.method.ravel())
    assert np.all(np.abs(o - ref) <= i.error_bound[..., None, None])


def test_batch_heads_fast_within_bound(client):
    q, k, v = _qkv((2, 4, 2048, 8), seed=1, s=0.2)
    exact = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
    ref = numbarope.rope_attention(q, k, v, rotary=True, method="fast", eps=1e-4)
    out, lse, info = rope_attention_dask(*_chunked((q, k, v), (2, 1, -1, -1)), rotary=True,
                                         method="fast", eps=1e-4, return_lse=True,
                                         return_info=True)
    o, l, i = dask.compute(out, lse, info)
    assert set(i.method.ravel()) == {"fast"}
    err = np.abs(o - exact).max(axis=(-2, -1))
    assert np.all(err <= i.error_bound) and np.all(i.error_bound <= 1e-4 * np.abs(v).max())
    np.testing.assert_allclose(o, ref, rtol=0, atol=1e-12)
    assert l.shape == (2, 4, 2048) and np.isfinite(l).all()


def test_broadcast_gqa_bias_mask(client):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 100, 8)) * 0.3
    k, v = (rng.standard_normal((2, 2, 90, 8)) * 0.3 for _ in range(2))
    bias = rng.standard_normal(100 + 90 - 1) * 0.1
    kpm = rng.random((2, 1, 90)) > 0.2
    kw = dict(bias=bias, key_padding_mask=kpm, enable_gqa=True, scale=0.5)
    ref = numbarope.rope_attention(q, k, v, **kw)
    dq = da.from_array(q, chunks=(1, 2, -1, -1))
    dkpm = da.from_array(kpm, chunks=(1, 1, -1))
    out = rope_attention_dask(dq, k, v, **dict(kw, key_padding_mask=dkpm)).compute()
    assert np.array_equal(out, ref)


def test_newuser_findings_heads(client):
    # typed biases (per-head ALiBi sliced per chunk of heads) and per-head radius on dask
    q, k, v = _qkv((2, 4, 128, 8), seed=15)
    dq, dk, dv = _chunked((q, k, v), (1, 2, -1, -1))
    for bias in (ALiBi.from_heads(4), Causal(), Window(10, 0), Decay(0.1)):
        out = rope_attention_dask(dq, dk, dv, rotary=True, bias=bias).compute()
        assert np.array_equal(out, numbarope.rope_attention(q, k, v, rotary=True, bias=bias))
    with pytest.raises(ValueError, match="per-head parameters"):
        rope_attention_dask(dq, dk, dv, bias=ALiBi.from_heads(3))
    r = np.full(4, 5.0)
    out = rope_attention_dask(dq, dk, dv, rotary=True, radius=r).compute()
    assert np.array_equal(out, numbarope.rope_attention(q, k, v, rotary=True, radius=r))
    with pytest.raises(ValueError, match=r"key has shape \(2, 4, 128, 4\)"):   # the real one
        rope_attention_dask(dq, dk[..., :4], dv)


def test_worker_killed_mid_computation(client):
    q, k, v = _qkv((8, 3000, 16), seed=5)
    ref = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
    out = rope_attention_dask(*_chunked((q, k, v), (1, -1, -1)), rotary=True, method="exact")
    fut = client.compute(out)
    # wait until a task is running, then SIGKILL one worker process (its nanny restarts it)
    pids = client.run(os.getpid)
    deadline = time.time() + 20
    while time.time() < deadline and not any(client.processing().values()):
        time.sleep(0.01)
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    o = fut.result(timeout=120)
    assert np.array_equal(o, ref)
    assert not fut.done() or fut.status == "finished"


def test_bad_input_refused_before_scheduling(client):
    q, k, v = _qkv((2, 2, 64, 8))
    dq, dk, dv = _chunked((q, k, v), (1, 1, -1, -1))
    # keys only: an earlier test's tasks may still be leaving the scheduler meanwhile
    before = set(client.cluster.scheduler.tasks) if hasattr(client.cluster, "scheduler") \
        else None
    with pytest.raises(ValueError, match="key has shape"):
        rope_attention_dask(dq, dk[..., :4], dv)
    with pytest.raises(ValueError, match="do not broadcast"):
        rope_attention_dask(dq, dk[:, :1].repeat(3, axis=1), dv)
    with pytest.raises(TypeError):
        rope_attention_dask(dq.astype(np.int64), dk, dv)
    with pytest.raises(TypeError, match="bias"):
        rope_attention_dask(dq, dk, dv, attn_mask=np.zeros(127))
    with pytest.raises(ValueError, match="bias has shape"):
        rope_attention_dask(dq, dk, dv, bias=np.zeros(50))
    with pytest.raises(ValueError):
        rope_attention_dask(dq, dk, dv, eps=2.0)
    with pytest.raises(ValueError):
        rope_attention_dask(dq, dk, dv, method="fastest")
    with pytest.raises(ValueError, match="key_padding_mask"):
        rope_attention_dask(dq, dk, dv, key_padding_mask=np.ones((2, 2, 63), bool))
    with pytest.raises(ValueError, match="enable_gqa"):
        rope_attention_dask(dq, dk[:, :1], dv[:, :1], enable_gqa=True)   # head chunks of 1
    if before is not None:
        assert not set(client.cluster.scheduler.tasks) - before     # nothing new scheduled
    # NaN inside a lazy array cannot be seen before computing: the task raises it
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    out = rope_attention_dask(da.from_array(bad, chunks=(1, 1, -1, -1)), dk, dv)
    with pytest.raises(ValueError, match="NaN"):
        out.compute()
