"""One long sequence on Dask (numbarope.backends.long_sequence, optional extra): a
2-process LocalCluster against the local call.

Tolerances: the long-sequence path merges key blocks by log-sum-exp (exact) or adds
key-side states in a tree (fast), a different order of the same sums: 1e-12
relative to max|V| (observed ~1e-16); the fast graph's certified bound is the
in-memory call's (the same plan), compared bitwise.
"""
import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import numbarope  # noqa: E402
from numbarope.backends import long_sequence  # noqa: E402
from numbarope.backends.long_sequence import long_sequence_attention  # noqa: E402
from numbarope.bias import ALiBi, Decay, Dense, Window, window_bias  # noqa: E402


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


@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_exact(client, causal):
    q, k, v = _qkv((2, 1000, 8), seed=3)
    ref = numbarope.rope_attention(q, k, v, rotary=True, is_causal=causal, method="exact")
    out, lse, bound = long_sequence_attention(q, k, v, query_block=256, key_block=192,
                                              client=client, rotary=True, is_causal=causal,
                                              method="exact", return_lse=True,
                                              return_info=True)
    o, l, b = dask.compute(out, lse, bound)
    assert np.abs(o - ref).max() <= 1e-12 * np.abs(v).max()
    assert np.all(np.abs(o - ref).max(axis=(-2, -1)) <= b)
    _, rl = numbarope.rope_attention(q, k, v, rotary=True, is_causal=causal, method="exact",
                                     return_lse=True)
    np.testing.assert_allclose(l, rl, rtol=1e-12)
    # dask inputs, no client: the blocks come from the dask array's chunks
    o2 = long_sequence_attention(*_chunked((q, k, v), (-1, 300, -1)), query_block=256,
                                 rotary=True, is_causal=causal, method="exact").compute()
    assert np.abs(o2 - ref).max() <= 1e-12 * np.abs(v).max()


def _task_names(x):
    from dask.utils import key_split
    return [key_split(k) for k in dict(x.__dask_graph__())]


@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_fast_state_tree(client, causal):
    # 5 blocks (not a power of 2): tree nodes and the prefix covers of every block.
    # Same plan as in memory (same HeadSpec from the blocks' maxima), so the same
    # polynomial and bound; the sums are added in another order: 1e-12·max|v|.
    q, k, v = _qkv((2, 2500, 8), seed=4, s=0.2)
    kw = dict(rotary=True, is_causal=causal, method="fast", eps=1e-4)
    ref, rl, info = numbarope.rope_attention(q, k, v, return_lse=True, return_info=True, **kw)
    exact = numbarope.rope_attention(q, k, v, rotary=True, is_causal=causal, method="exact")
    out, lse, bound = long_sequence_attention(q, k, v, query_block=512, client=client,
                                              return_lse=True, return_info=True, **kw)
    names = _task_names(out)
    # causal: the last key block's state serves no query block and is never computed
    assert names.count("key_block_state") == (4 if causal else 5) and "pair" not in names
    assert names.count("add_states") == 3          # 4 leaves pair up into 2, then 1
    o, l, b = dask.compute(out, lse, bound)
    np.testing.assert_array_equal(b, info.error_bound)
    assert np.abs(o - ref).max() <= 1e-12 * np.abs(v).max()
    np.testing.assert_allclose(l, rl, rtol=1e-12)
    assert np.all(np.abs(o - exact).max(axis=(-2, -1)) <= b)
    # "auto" plans the whole sequence (fast here) and builds the same graph
    o2 = long_sequence_attention(*_chunked((q, k, v), (-1, 400, -1)), query_block=512,
                                 rotary=True, is_causal=causal, method="auto", eps=1e-4).compute()
    assert np.abs(o2 - ref).max() <= 1e-12 * np.abs(v).max()


def test_long_sequence_fast_refused_or_exact():
    q, k, v = _qkv((1, 600, 8), seed=6, s=3.0)       # R far above the fast path's reach
    out = long_sequence_attention(q, k, v, query_block=256, rotary=True, is_causal=True,
                                  method="fast")
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(numbarope.FastPathError):
            out.compute()
        # "auto" plans exact for the whole sequence: the exact pairs
        a = long_sequence_attention(q, k, v, query_block=256, rotary=True, is_causal=True)
        assert "pair" in _task_names(a)
        ref = numbarope.rope_attention(q, k, v, rotary=True, is_causal=True)
        assert np.abs(a.compute() - ref).max() <= 1e-12 * np.abs(v).max()
    with pytest.raises(ValueError, match="aligned blocks"):
        long_sequence_attention(q, k, v, query_block=256, key_block=128, is_causal=True,
                                method="fast")


@pytest.mark.parametrize("bias", [ALiBi([0.05, 0.001]), Decay(0.01, causal=True)])
def test_long_sequence_fast_decay_tree(client, bias):
    # The decayed states: each node referenced at its last key, a's state decayed by
    # γ^{e_b − e_a} when joined to b. Same plan (degree, bound) as in memory.
    q, k, v = _qkv((2, 2500, 8), seed=7, s=0.2)
    kw = dict(rotary=True, bias=bias, method="fast", eps=1e-4)
    ref, rl, info = numbarope.rope_attention(q, k, v, return_lse=True, return_info=True, **kw)
    assert set(info.algorithm.ravel()) == {"decay"}
    exact = numbarope.rope_attention(q, k, v, rotary=True, bias=bias, method="exact")
    out, lse, bound = long_sequence_attention(q, k, v, query_block=512, client=client,
                                              return_lse=True, return_info=True, **kw)
    o, l, b = dask.compute(out, lse, bound)
    np.testing.assert_array_equal(b, info.error_bound)
    assert np.abs(o - ref).max() <= 1e-12 * np.abs(v).max()
    np.testing.assert_allclose(l, rl, rtol=1e-12)
    assert np.all(np.abs(o - exact).max(axis=(-2, -1)) <= b)


@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_padding(client, causal):
    # key padding: dropped from the key-block states, masked in the diagonal block (fast);
    # sliced per key block (exact pairs). The first 40 keys padded: rows that see no real
    # key are 0 with lse −inf, as in memory.
    q, k, v = _qkv((2, 1500, 8), seed=8, s=0.2)
    kpm = np.random.default_rng(9).random((2, 1500)) > 0.3
    kpm[:, :40] = False
    for method in ("fast", "exact"):
        kw = dict(rotary=True, is_causal=causal, key_padding_mask=kpm, method=method, eps=1e-4)
        ref, rl = numbarope.rope_attention(q, k, v, return_lse=True, **kw)
        out, lse = long_sequence_attention(q, k, v, query_block=400, client=client,
                                           return_lse=True, **kw)
        o, l = dask.compute(out, lse)
        assert np.abs(o - ref).max() <= 1e-12 * np.abs(v).max()
        np.testing.assert_allclose(l, rl, rtol=1e-12)
        assert np.array_equal(np.isinf(l), np.isinf(rl))


def test_long_sequence_window_and_array_bias():
    q, k, v = _qkv((2, 1400, 8), seed=10)
    with dask.config.set(scheduler="synchronous"):
        # a causal window of 300: each query block of 350 needs its own and the previous
        # key block only (7 pairs of the 10 causal ones)
        w = Window(300, 0)
        ref = numbarope.rope_attention(q, k, v, rotary=True, bias=w, method="exact")
        out = long_sequence_attention(q, k, v, query_block=350, rotary=True, bias=w)
        assert _task_names(out).count("pair") == 7
        assert np.abs(out.compute() - ref).max() <= 1e-12 * np.abs(v).max()
        # an array over the offsets (L+S−1 per head), rectangular blocks
        b = np.random.default_rng(11).standard_normal((2, 2 * 1400 - 1)) * 0.3   # per head
        ref = numbarope.rope_attention(q[None], k[None], v[None], rotary=True, bias=b,
                                       is_causal=True)[0]
        out = long_sequence_attention(q[None], k[None], v[None], query_block=350,
                                      key_block=200, rotary=True, bias=b, is_causal=True)
        assert np.abs(out.compute()[0] - ref).max() <= 1e-12 * np.abs(v).max()


def test_long_sequence_refusals():
    q, k, v = _qkv((1, 600, 8), seed=12, s=0.2)
    with pytest.raises(ValueError, match="serves no bias"):
        long_sequence_attention(q, k, v, query_block=100, bias=Window(50, 0), method="fast")
    with pytest.raises(ValueError, match="serves no bias"):
        long_sequence_attention(q, k, v, query_block=100, bias=ALiBi([0.1]), method="fast",
                                key_padding_mask=np.ones(600, bool))
    with pytest.raises(ValueError, match="expected"):
        long_sequence_attention(q, k, v, query_block=100, bias=np.zeros(600))
    with pytest.raises(ValueError, match="NaN"):
        long_sequence_attention(q, k, v, query_block=100, bias=np.full(1199, np.nan))
    with pytest.raises(ValueError, match="key_padding_mask"):
        long_sequence_attention(q, k, v, query_block=100, key_padding_mask=np.ones(599, bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        long_sequence_attention(q, k, v, query_block=100, key_padding_mask=np.ones(600))
    # decay over many tiny blocks: more decay steps than the certified bound counts
    out = long_sequence_attention(q, k, v, query_block=4, bias=ALiBi([0.1]), method="fast")
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(ValueError, match="decay steps"):
            out.compute()


def test_long_sequence_repeated_calls_on_the_default_client(client):
    # client=None with a distributed Client around (the default scheduler): identical
    # calls in a row once shared data-token keys, and a scheduler still forgetting one
    # call's keys cancelled the next ("lost dependencies": 7 calls in 20 on a busy
    # machine; timing-dependent, so this is a smoke test: it passed before the fix on an
    # idle machine). Each call's blocks now have keys of their own.
    q, k, v = _qkv((4, 512, 8), seed=13, s=0.2)
    ref = numbarope.rope_attention(q, k, v, rotary=True)
    for _ in range(20):
        out = long_sequence_attention(q, k, v, query_block=128, rotary=True).compute()
    assert np.abs(out - ref).max() <= 1e-12 * np.abs(v).max()
    dq, dk, dv = _chunked((q, k, v), (2, 200, -1))
    for _ in range(5):
        out = long_sequence_attention(dq, dk, dv, query_block=128, rotary=True).compute()
    assert np.abs(out - ref).max() <= 1e-12 * np.abs(v).max()


def test_newuser_findings_long_sequence(client, monkeypatch):
    # what a new user (README only) found; each was silently wrong or failed late
    q, k, v = _qkv((4, 256, 8), seed=14, s=0.5)
    for name, val in (("query_offset", 3), ("degree", 0), ("radius", 1e-9), ("verify", 3),
                      ("enable_gqa", True), ("causal_alignment", "bottom_right")):
        with pytest.raises(TypeError, match=f"does not take {name}"):     # was ignored
            long_sequence_attention(q, k, v, query_block=64, is_causal=True, **{name: val})
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        long_sequence_attention(q, k, v, query_block=64, client="tcp://x:1")
    with pytest.raises(ValueError, match="key_padding_mask has shape"):   # was at compute
        long_sequence_attention(q, k, v, query_block=64, key_padding_mask=np.ones((4, 1, 256),
                                                                                  bool))
    bad = q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="query contains NaN"):          # was at compute
        long_sequence_attention(bad, k, v, query_block=64)
    with pytest.raises(TypeError, match="bias must be a float"):
        long_sequence_attention(q, k, v, query_block=64, bias=np.zeros(511, int))
    monkeypatch.setattr(long_sequence, "_MANY_PAIRS", 10)   # (the real limit: 20000 pairs)
    with pytest.warns(RuntimeWarning, match="pairs"):
        long_sequence_attention(q, k, v, query_block=64, method="exact")
    monkeypatch.undo()
    with dask.config.set(scheduler="synchronous"):
        # float32 output: its rounding is in the bound now (was 4e-11 for an error 2e-7)
        q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v * 100))
        out, b = dask.compute(*long_sequence_attention(
            q32, k32, v32, query_block=64, rotary=True, method="exact", precision="float64",
            return_info=True))
        exact = numbarope.rope_attention(*(x.astype(np.float64) for x in (q32, k32, v32)),
                                         rotary=True, method="exact")
        assert np.all(np.abs(out - exact).max(axis=(-2, -1)) <= b)
        assert long_sequence_attention(q[:, :0], k, v, query_block=64).compute().shape \
            == (4, 0, 8)
        for bias in (Dense(window_bias(256, 5)), np.arange(511) % 3 > 0):   # Dense; a mask
            ref = numbarope.rope_attention(q, k, v, bias=bias, method="exact")
            out = long_sequence_attention(q, k, v, query_block=64, bias=bias,
                                          method="exact").compute()
            assert np.abs(out - ref).max() <= 1e-12 * np.abs(v).max()
    for _ in range(5):                 # scattered blocks get keys of their own per call
        long_sequence_attention(q, k, v, query_block=64, client=client).compute()


def test_long_sequence_bad_input_refused_before_scheduling(client):
    q, k, v = _qkv((2, 2, 64, 8))
    # keys only: an earlier test's tasks may still be leaving the scheduler meanwhile
    before = set(client.cluster.scheduler.tasks) if hasattr(client.cluster, "scheduler") \
        else None
    with pytest.raises(ValueError, match="query_block"):
        long_sequence_attention(q, k, v, query_block=0)
    with pytest.raises(ValueError, match="key has shape"):
        long_sequence_attention(q, k[..., :4], v, query_block=16)
    with pytest.raises(ValueError, match="value has shape"):
        long_sequence_attention(q, k, v[..., :4, :], query_block=16, client=client)
    with pytest.raises(TypeError, match="float32 or float64"):
        long_sequence_attention(q.astype(np.int64), k, v, query_block=16, client=client)
    if before is not None:
        assert not set(client.cluster.scheduler.tasks) - before     # nothing new scheduled
